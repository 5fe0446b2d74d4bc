"""The clean-model service: a network trained on clean data for the same suite,
architecture and seed, handed to every defense that lists the `clean_model` capability
(as `state.clean_model`, a frozen eval-mode copy; e.g. for a warm start or an affinity model).

A defense declares how its clean model is trained with a `CleanRecipe`
(`Defense.clean_model_recipe`). The default recipe is the suite's `standard` method for
`suite.clean_model_epochs` epochs (`[clean_model] epochs`, default the suite's epochs) with
the suite's augmentation and schedule; a recipe may instead ask for another augmentation
(e.g. none), a share of the suite's epochs and its own piecewise learning-rate decays. The
engine trains each recipe once and caches it in the results folder, next to the suite's
runs:

    results/<suite>/_clean_models/<model>-seed<seed>-<key>/
        train/             the standard run's folder (spec.json, history.jsonl, and its
                           checkpoints while it trains: an interrupted clean model resumes)
        clean_model.json   what it is and what it cost (informational)
        model.pt           weights and the same facts, written atomically and last

A folder without `model.pt` is a half-written cache and is never used (training resumes
from `train/last.pt`). The entry is locked (`bench/locks.py`) while a process looks it up
and trains it: a second run that needs the same clean model at the same time (another
worker, another launcher) waits for the first and then loads what it made. `key` hashes
the suite's protocol hash, the architecture, the seed and the recipe (method, epochs,
precision; and for any recipe but the default its augmentation and schedule), so another
suite version, seed, budget or recipe gets its own entry (the default recipe's key is the
one it had before recipes existed, so existing caches stay valid). Every later run
that needs the same clean model loads `model.pt` (`weights_only=True`) instead of training
it again; a run that resumes never asks for it (its checkpoint already holds what the
defense built from it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.config import ConfigError, Suite
from bench.data import AUGMENTATIONS
from bench.locks import folder_lock
from bench.records import RecordError, atomic_torch_save, load_checkpoint, write_json_atomic

CLEAN_MODELS_DIR = "_clean_models"
MODEL_FILE = "model.pt"
INFO_FILE = "clean_model.json"
FORMAT = 1
METHOD = "standard"


@dataclass(frozen=True)
class CleanRecipe:
    """How a defense wants its clean model trained (always the `standard` method, the
    suite's architecture, optimizer and seed). `None` everywhere is the default recipe.

    augment: one of bench.data.AUGMENTATIONS; None = the suite's [data] augment.
    epoch_share: epochs as a share of the suite's [train] epochs (rounded, at least 1);
        None = `suite.clean_model_epochs`.
    milestones: a piecewise schedule decaying the learning rate (by the suite's
        lr_decay) at these fractions of the clean model's epochs, with no warm-up;
        None = the suite's schedule.
    """

    augment: str | None = None
    epoch_share: float | None = None
    milestones: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.augment is not None and self.augment not in AUGMENTATIONS:
            raise ConfigError(f"clean-model recipe: augment must be one of "
                              f"{list(AUGMENTATIONS)} or None, got {self.augment!r}")
        if self.epoch_share is not None and not 0 < self.epoch_share:
            raise ConfigError(f"clean-model recipe: epoch_share must be > 0, got "
                              f"{self.epoch_share!r}")
        if self.milestones is not None and not all(0 < m < 1 for m in self.milestones):
            raise ConfigError(f"clean-model recipe: milestones must be fractions in (0, 1), "
                              f"got {self.milestones!r}")

    @property
    def is_default(self) -> bool:
        return self == DEFAULT_RECIPE

    def epochs(self, suite: Suite) -> int:
        if self.epoch_share is None:
            return suite.clean_model_epochs
        return max(1, round(self.epoch_share * suite.train.epochs))

    def suite_for(self, suite: Suite) -> Suite:
        """The suite the clean model trains under."""
        train = replace(suite.train, epochs=self.epochs(suite))
        if self.milestones is not None:
            train = replace(train, schedule="piecewise", milestones=tuple(self.milestones),
                            warmup_epochs=0.0)
        data = suite.data if self.augment is None else replace(suite.data,
                                                                augment=self.augment)
        return replace(suite, train=train, data=data)


DEFAULT_RECIPE = CleanRecipe()


def recipe(suite: Suite, precision: str, how: CleanRecipe = DEFAULT_RECIPE) -> dict:
    """What the clean model's training is, resolved on `suite`: method, epochs, precision;
    for any recipe but the default also its augmentation and schedule."""
    out: dict = {"method": METHOD, "epochs": how.epochs(suite), "precision": precision}
    if not how.is_default:
        trained = how.suite_for(suite)
        out.update(augment=trained.data.augment, schedule=trained.train.schedule,
                   milestones=list(trained.train.milestones),
                   warmup_epochs=trained.train.warmup_epochs)
    return out


def cache_key(suite: Suite, seed: int, precision: str,
              how: CleanRecipe = DEFAULT_RECIPE) -> str:
    """sha256 of suite (name and protocol hash), architecture, seed and recipe."""
    payload = {"format": FORMAT, "suite": suite.name, "protocol": suite.protocol_hash,
               "model": {"name": suite.model.name, "kwargs": suite.model.kwargs},
               "seed": seed, "recipe": recipe(suite, precision, how)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_dir(root: Path, suite: Suite, seed: int, precision: str,
              how: CleanRecipe = DEFAULT_RECIPE) -> Path:
    """The cache entry's folder under `root` (results/<suite>/_clean_models)."""
    key = cache_key(suite, seed, precision, how)
    return Path(root) / f"{suite.model.name}-seed{seed}-{key[:12]}"


def clean_suite(suite: Suite, how: CleanRecipe = DEFAULT_RECIPE) -> Suite:
    """The suite the clean model trains under (the default: the clean model's epochs)."""
    return how.suite_for(suite)


@dataclass
class CleanModel:
    weights: dict[str, torch.Tensor]  # the model's state_dict, on the CPU
    info: dict  # the record's `extra_pretraining` entry


def load_cached(folder: Path, key: str) -> CleanModel | None:
    """The cached clean model in `folder`, or None when there is none (yet)."""
    path = Path(folder) / MODEL_FILE
    if not path.exists():
        return None
    try:
        payload = load_checkpoint(path)
    except RecordError as exc:
        raise RecordError(f"the cached clean model {path} cannot be read "
                          f"({exc.__cause__ or exc}); delete the folder {folder} to train "
                          "it again") from exc
    if payload.get("format") != FORMAT or payload.get("key") != key:
        raise RecordError(
            f"{path} holds another clean model (format {payload.get('format')}, key "
            f"{str(payload.get('key'))[:12]}, expected {key[:12]}); delete the folder "
            f"{folder} to train it again")
    return CleanModel(payload["model"], dict(payload["facts"]))


def obtain_clean_model(root: Path, suite: Suite, seed: int, precision: str,
                       train: Callable[[Path, Suite], None], progress: bool,
                       how: CleanRecipe = DEFAULT_RECIPE) -> CleanModel:
    """The clean model for (suite, architecture, seed, recipe `how`): from the cache under
    `root`, else trained by `train(folder, suite)` (the engine's standard run in `folder`,
    resumable, under the recipe's suite), then cached. `info["reused"]` says which."""
    key = cache_key(suite, seed, precision, how)
    folder = cache_dir(root, suite, seed, precision, how)

    def waiting(owner: str) -> None:
        print(f"clean model for {suite.name} seed {seed}: waiting for {owner}, which is "
              f"making it in {folder}", flush=True)

    with folder_lock(folder, f"clean model seed {seed}", waiting=waiting):
        return _obtain_locked(folder, key, suite, seed, precision, train, progress, how)


def _obtain_locked(folder: Path, key: str, suite: Suite, seed: int, precision: str,
                   train: Callable[[Path, Suite], None], progress: bool,
                   how: CleanRecipe) -> CleanModel:
    epochs = how.epochs(suite)
    facts_recipe = recipe(suite, precision, how)
    what = f"standard training for {epochs} epochs"
    if not how.is_default:
        what += (f", augment {facts_recipe['augment']}, lr decays at "
                 f"{facts_recipe['milestones']} of them")
    cached = load_cached(folder, key)
    if cached is not None:
        if progress:
            print(f"clean model for {suite.name} seed {seed}: reusing {folder}", flush=True)
        cached.info["reused"] = True
        return cached
    if progress:
        print(f"clean model for {suite.name} seed {seed}: {what}, cached in {folder}",
              flush=True)
    work = folder / "train"
    train(work, clean_suite(suite, how))
    last = load_checkpoint(work / "last.pt")
    if last["epoch"] != epochs:
        raise RecordError(f"the clean model in {work} stopped after epoch {last['epoch']} "
                          f"of {epochs}; run again to resume it")
    facts = {
        "kind": "clean_model",
        "what": f"clean model ({what.replace(' for ', ', ', 1)})",
        "where": str(folder), "key": key, "suite": suite.name,
        "protocol_hash": suite.protocol_hash, "model": suite.model.name, "seed": seed,
        "recipe": facts_recipe, "epochs": epochs,
        "seconds": float(last["seconds"]),
        "forward_passes": int(last["passes"]["forward"]),
        "backward_passes": int(last["passes"]["backward"]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(folder / INFO_FILE, facts)
    atomic_torch_save({"format": FORMAT, "key": key, "facts": facts, "model": last["model"]},
                      folder / MODEL_FILE)  # the commit: from here on the cache is used
    for name in ("last.pt", "best.pt"):  # the weights now live in model.pt
        (work / name).unlink(missing_ok=True)
    made = load_cached(folder, key)  # the very bytes every later run will load
    assert made is not None
    made.info["reused"] = False
    return made
