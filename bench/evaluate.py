"""Final evaluation of a finished run and its `record.json`: a pure function of (suite,
checkpoint weights, test split).

The evaluator never imports or calls defense code and never builds a `Trainer`. For the
best and the last checkpoint it builds the suite's architecture (`bench.models`), loads
the trained weights (`weights_only=True`, strict: anything that does not fit the
architecture is refused) and attacks them; a defense's extra models (an EMA, a revision
model) are state_dicts of the same architecture saved in the checkpoint at training time,
loaded and scored the same way, as sub-rows that are never ranked. The runner starts it in
a fresh process (`robench evaluate RUN_DIR`), so nothing a submission did to the training
process (globals, hooks, monkeypatches, autocast state, RNG) reaches it. Every attack runs
in fp32 with autocast off (and TF32 off on CUDA).

Per model and checkpoint, per image: clean, PGD-20 (CE, step eps/4, random start),
CW-20 (margin loss) on the suite's evaluation set; on its first `autoattack_size` images
(the *attack subset*), AutoAttack (official `pyautoattack`, the suite's version) and a
gradient-free Square check. An image counts as robust to an attack only if it is also
classified correctly without one (as AutoAttack counts: a random start can land a
misclassified image on a correct prediction, which is not robustness); `worst_case`
counts an image of the subset as robust only if every attack failed on it, and is what the
leaderboard ranks. Sanity checks (`bench.sanity`) flag masked gradients and dead models.
The record carries the sha256 of every checkpoint it scored, the per-image results, the
curve re-check, and provenance.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from attacks.autoattack import attack_set_label, run_autoattack, square_robust
from attacks.pgd import pgd
from bench.config import RunSpec, Suite
from bench.curves import curve_point, derive_seed, pick_device, to_float
from bench.data import DatasetInfo, Splits
from bench.errors import RunMismatchError
from bench.models import build_model
from bench.overfitting import FGSM_KEY, catastrophic_overfitting_field
from bench.overfitting import RULE_KEY as CO_RULE_KEY
from bench.overfitting import RULE_VERSION as CO_RULE_VERSION
from bench.provenance import provenance
from bench.records import (
    RECORD_SCHEMA,
    RecordError,
    device_description,
    read_history,
    validate_record,
    write_json_atomic,
)
from bench.sanity import (
    SANITY_IMAGES,
    autoattack_flags,
    curve_flags,
    flags_from,
    measure,
    near_chance_flag,
)
from leaderboard.schema import pack_bits

ATTACKS = ("clean", "pgd20", "cw20", "autoattack", "square")
# what the engine saves since the evaluator stopped importing defense code
NEEDED_IN_CHECKPOINT = ("eval_models", "defense_params", "cards", "train_settings")


def load_weights(path: Path, device: torch.device) -> tuple[dict, str]:
    """A checkpoint (`weights_only=True`) and the sha256 of the exact bytes loaded."""
    path = Path(path)
    if not path.exists():
        raise RecordError(f"checkpoint {path} does not exist")
    data = path.read_bytes()
    try:
        ckpt = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise RecordError(f"cannot load checkpoint {path}: {exc}. Delete the run folder to "
                          "retrain that run") from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise RecordError(f"{path} is not a ROBench checkpoint (no 'model' state_dict)")
    missing = [k for k in NEEDED_IN_CHECKPOINT if k not in ckpt]
    if missing:
        raise RecordError(f"{path} was written by an older ROBench (no {missing}: the evaluator "
                          "reads extra models, parameters and cards from the checkpoint, never "
                          "from defense code); delete the run folder and run it again")
    return ckpt, hashlib.sha256(data).hexdigest()


def model_from_weights(suite: Suite, info: DatasetInfo, weights: object, name: str,
                       where: Path, device: torch.device,
                       channels_last: bool = False) -> nn.Module:
    """The suite's architecture holding `weights` (strict), in eval mode, frozen."""
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise RecordError(f"{where}: {name!r} is not a state_dict of tensors; the evaluator "
                          f"only loads weights of the suite's architecture ({suite.model.name})")
    model = build_model(suite.model, info)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise RecordError(f"{where}: {name!r} does not fit the suite's architecture "
                          f"({suite.model.name} {suite.model.kwargs}): {first} {detail}"
                          ) from exc
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval().requires_grad_(False)


def _seeded(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def correct_under_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                      step_size: float, steps: int, batch_size: int, generator: torch.Generator,
                      loss: str = "ce", progress: str | None = None) -> torch.Tensor:
    """Per-image correctness (bool) under random-start PGD (`steps` 0: clean)."""
    starts = range(0, len(y), batch_size)
    if progress is not None:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=progress, leave=False)
    out = []
    for i in starts:
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        if steps > 0:
            xb = pgd(model, xb, yb, eps=eps, step_size=step_size, steps=steps, loss=loss,
                     generator=generator)
        with torch.no_grad():
            out.append(model(xb).argmax(1) == yb)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=x.device)


@dataclass
class ModelEvaluation:
    """One model at one checkpoint: metrics (fractions), per-image results, flags."""

    metrics: dict
    per_image: dict[str, torch.Tensor]
    flags: list[dict] = field(default_factory=list)
    autoattack: dict = field(default_factory=dict)
    sanity: dict = field(default_factory=dict)  # what the masking checks measured


def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, suite: Suite,
                   seed: int, label: str, progress: bool, num_classes: int) -> ModelEvaluation:
    """Every attack of the suite on one model (see the module docstring), fp32."""
    e, eps = suite.eval, suite.train.eps
    device = x.device
    model.eval()
    bar = (lambda name: f"{label} {name}") if progress else (lambda name: None)
    n_sub = min(e.autoattack_size or len(y), len(y))
    with torch.autocast(device_type=device.type, enabled=False):
        clean = correct_under_pgd(model, x, y, eps, 0.0, 0, e.batch_size, _seeded(seed, device))
        pgd20 = correct_under_pgd(model, x, y, eps, e.pgd_step_ratio * eps, e.pgd_steps,
                                  e.batch_size, _seeded(seed, device), progress=bar("PGD-20"))
        cw20 = correct_under_pgd(model, x, y, eps, e.pgd_step_ratio * eps, e.cw_steps,
                                 e.batch_size, _seeded(seed + 1, device), loss="cw",
                                 progress=bar("CW-20"))
        pgd20, cw20 = pgd20 & clean, cw20 & clean  # robust = correct clean and attacked
        per_image = {"clean": clean, "pgd20": pgd20, "cw20": cw20}
        gradient = (clean & pgd20 & cw20)[:n_sub]
        aa_info: dict = {"version": e.autoattack}
        result = None
        if e.autoattack != "none":
            if progress:
                print(f"  {label}: {attack_set_label(e.autoattack)} on {n_sub} images ...",
                      flush=True)
            result = run_autoattack(model, x[:n_sub], y[:n_sub], eps=eps, version=e.autoattack,
                                    batch_size=e.batch_size, device=device, seed=seed)
            per_image["autoattack"] = result.robust.to(device)
            gradient = gradient & per_image["autoattack"]
            aa_info.update({"seconds": result.seconds, "settings": result.settings,
                            "warnings": result.warnings, "log": result.log})
        if runs_square_check(suite):
            if progress:
                print(f"  {label}: Square check ({e.square_queries} queries) on "
                      f"{int(gradient.sum())} images no gradient attack broke ...", flush=True)
            square = torch.zeros(n_sub, dtype=torch.bool, device=device)
            survivors = gradient.nonzero().flatten()
            if len(survivors):
                square[survivors] = square_robust(
                    model, x[:n_sub][survivors], y[:n_sub][survivors], eps=eps,
                    n_queries=e.square_queries, seed=seed, batch_size=e.batch_size)
            per_image["square"] = square  # False also where a gradient attack already won
        worst = gradient & per_image["square"] if "square" in per_image else gradient
    n = len(y)
    metrics: dict = {"n": n, "clean": _mean(clean), "pgd20": _mean(pgd20), "cw20": _mean(cw20),
                     "autoattack": result.robust_accuracy if result is not None else None,
                     "n_autoattack": n_sub if result is not None else None,
                     "square_only": None, "worst_case": _mean(worst), "n_worst_case": n_sub}
    if "square" in per_image:
        # images every gradient attack missed and Square broke
        before = (clean & pgd20 & cw20)[:n_sub]
        if "autoattack" in per_image:
            before = before & per_image["autoattack"]
        metrics["square_only"] = _mean(before & ~per_image["square"], n_sub)
    elif result is not None and e.autoattack == "standard":
        metrics["square_only"] = square_gain_in_log(result.log)
    flags = near_chance_flag(metrics["clean"], num_classes) + autoattack_flags(result)
    with torch.autocast(device_type=device.type, enabled=False):
        sanity = measure(model, x[:n_sub], y[:n_sub], per_image, metrics, suite, seed, result)
    if any(f["check"] == "near_chance" for f in flags):
        # a dead model: its gradients are useless by nature, the masking checks say nothing
        flags.append({"check": "masking_checks_skipped", "level": "note",
                      "message": "the masking checks were skipped: the model is at chance"})
    else:
        flags += flags_from(sanity, suite)
    return ModelEvaluation(metrics, per_image, flags, aa_info, sanity)


def runs_square_check(suite: Suite) -> bool:
    """The separate Square check runs where AutoAttack's version has no Square of its own
    (the standard version runs Square with 5,000 queries on what its gradient attacks
    missed: its gain is read from its log instead)."""
    return suite.eval.square_queries > 0 and suite.eval.autoattack != "standard"


AFTER = re.compile(r"robust accuracy after ([A-Z-]+): ([0-9.]+)%")


def square_gain_in_log(log: str) -> float | None:
    """Fraction of the images that AutoAttack's Square broke after APGD-CE, APGD-T and
    FAB-T missed them: the drop in robust accuracy from before Square to after it."""
    after = {name: float(value) / 100 for name, value in AFTER.findall(log)}
    if "SQUARE" not in after:
        return None
    before = [v for k, v in after.items() if k != "SQUARE"]
    return max(0.0, min(before) - after["SQUARE"]) if before else None


def _mean(flags: torch.Tensor, n: int | None = None) -> float:
    total = len(flags) if n is None else n
    return float(flags.sum().item()) / total if total else 0.0


def _spec_of(run_dir: Path) -> RunSpec:
    spec_path = run_dir / "spec.json"
    if not spec_path.exists():
        raise RecordError(f"{run_dir} is not a run folder (no spec.json); "
                          "train it first with `robench run`")
    try:
        return RunSpec.from_dict(json.loads(spec_path.read_text())["spec"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RecordError(f"{spec_path} is unreadable: {exc}") from exc


def _check_checkpoint(ckpt: dict, spec: RunSpec, suite: Suite, path: Path) -> None:
    if ckpt.get("spec") != spec.to_dict():
        raise RunMismatchError(f"{path} belongs to another run than {path.parent}/spec.json")
    expected = suite.run_hash(spec.defense_names)
    found = str(ckpt.get("suite_hash"))
    if found != expected:
        raise RunMismatchError(
            f"{path.parent} was trained under another version of suite {suite.name!r} or of "
            f"its settings for {spec.row_name} (hash {found[:12]} vs {expected[:12]}); "
            "evaluate it with the suite file it was trained under, or delete the run folder "
            "and train it again")


def recheck_curve(model_weights: dict, ckpt: dict, suite: Suite, splits: Splits,
                  spec: RunSpec, device: torch.device, path: Path) -> dict:
    """Recompute the validation PGD accuracy that selected this checkpoint, in this process,
    with the training run's precision, and compare it with the value the training process
    wrote into the history (the best checkpoint is chosen on it)."""
    settings = ckpt.get("train_settings") or {}
    precision = settings.get("precision", "fp32")
    dtype = None if precision == "fp32" else getattr(torch, precision, None)
    channels_last = bool(settings.get("channels_last", True))
    model = model_from_weights(suite, splits.info, model_weights, "model", path, device,
                               channels_last=channels_last)
    x = to_float(splits.val_curve.x.to(device), channels_last)  # as the engine fed it
    yv = splits.val_curve.y.to(device)
    point = curve_point(model, x, yv, suite, derive_seed(spec.seed, "curves"), dtype)
    epoch = int(ckpt["epoch"])
    history = ckpt.get("history") or []
    recorded = history[epoch - 1].get("val_robust") if len(history) >= epoch else None
    return {"epoch": epoch, "recorded": recorded, "recomputed": point.robust,
            "n": len(yv), "precision": precision}


def evaluate_run(run_dir: Path, suite: Suite, splits: Splits, device: torch.device | None = None,
                 progress: bool = True) -> dict:
    """Evaluate best and last checkpoints of a finished run and write `record.json`.
    `splits` must hold the test split (`build_splits(..., with_test=True)`)."""
    run_dir = Path(run_dir)
    device = device or pick_device()
    if splits.test is None:
        raise ValueError("evaluate_run needs the test split: build_splits(..., with_test=True)")
    spec = _spec_of(run_dir)
    last, last_sha = load_weights(run_dir / "last.pt", device)
    if last.get("epoch", 0) < suite.train.epochs:
        raise RecordError(
            f"{run_dir} stopped after epoch {last.get('epoch')} of {suite.train.epochs}; "
            f"resume it with `robench run` before evaluating")
    _check_checkpoint(last, spec, suite, run_dir / "last.pt")
    best, best_sha = load_weights(run_dir / "best.pt", device)
    _check_checkpoint(best, spec, suite, run_dir / "best.pt")
    if device.type == "cuda":  # fp32 means fp32: no TF32 in matmuls or convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        # cuDNN's default algorithm choice, as before (training's autotuning may have run
        # in this process)
        torch.backends.cudnn.benchmark = False
    x = splits.test.x.to(device).float() / 255
    y = splits.test.y.to(device)
    seed = derive_seed(spec.seed, "eval") % (2**31)
    metrics: dict = {}
    per_image: dict = {}
    sanity: dict = {}
    flags: list[dict] = []
    autoattack: dict = {}
    curves: dict = {}
    start = time.perf_counter()
    for tag, ckpt, path in (("best", best, run_dir / "best.pt"),
                            ("last", last, run_dir / "last.pt")):
        extra = ckpt.get("eval_models") or {}
        if not isinstance(extra, dict):
            raise RecordError(f"{path}: 'eval_models' is not a dict of state_dicts")
        curves[tag] = recheck_curve(ckpt["model"], ckpt, suite, splits, spec, device, path)
        flags += [{**f, "model": "model", "checkpoint": tag}
                  for f in curve_flags(curves[tag])]
        for name, weights in {"model": ckpt["model"], **extra}.items():
            model = model_from_weights(suite, splits.info, weights, name, path, device,
                                       channels_last=True)
            label = f"[{tag} epoch {ckpt['epoch']}] {name}"
            result = evaluate_model(model, x, y, suite, seed, label, progress,
                                    num_classes=splits.info.num_classes)
            metrics.setdefault(name, {})[tag] = {**result.metrics, "epoch": int(ckpt["epoch"])}
            per_image.setdefault(name, {})[tag] = {k: pack_bits(v.tolist())
                                                   for k, v in result.per_image.items()}
            flags += [{**f, "model": name, "checkpoint": tag} for f in result.flags]
            sanity.setdefault(name, {})[tag] = result.sanity
            autoattack[f"{name}.{tag}"] = result.autoattack
    eval_seconds = time.perf_counter() - start
    checkpoints = {"best": (best, best_sha), "last": (last, last_sha)}
    record = build_record(spec, suite, run_dir, metrics, per_image, sanity, flags, autoattack,
                          curves, checkpoints, eval_seconds, device, splits)
    validate_record(record, str(run_dir / "record.json"))
    write_json_atomic(run_dir / "record.json", record)
    return record


CURVE_KEYS = ("epoch", "train_robust", "val_robust", "train_clean", "val_clean", "train_loss",
              "lr")


def record_curves(history: list[dict]) -> dict[str, list]:
    """The record's per-epoch curves; `val_fgsm` joins them when the history has it."""
    keys = CURVE_KEYS + ((FGSM_KEY,) if any(FGSM_KEY in row for row in history) else ())
    return {k: [row.get(k) for row in history] for k in keys}


def evaluation_settings(suite: Suite, splits: Splits, device: torch.device) -> dict:
    """What the evaluation ran, for the record and the leaderboard's labels."""
    e = suite.eval
    n = len(splits.test)
    n_sub = min(e.autoattack_size or n, n)
    return {
        "precision": "fp32", "autocast": False, "tf32": False, "process": "evaluator",
        "threads": torch.get_num_threads(), "device": device_description(device),
        "n_images": n, "n_attack_subset": n_sub,
        "pgd": {"steps": e.pgd_steps, "step_ratio": e.pgd_step_ratio, "loss": "ce"},
        "cw": {"steps": e.cw_steps, "step_ratio": e.pgd_step_ratio, "loss": "cw"},
        "autoattack": {"version": e.autoattack, "label": attack_set_label(e.autoattack)
                       if e.autoattack != "none" else None,
                       "n_images": n_sub if e.autoattack != "none" else 0},
        # the separate Square check, or (standard version) AutoAttack's own Square
        "square": {"queries": e.square_queries if runs_square_check(suite) else 0,
                   "n_images": n_sub if runs_square_check(suite) else 0,
                   "within_autoattack": 5000 if e.autoattack == "standard" else 0},
        "worst_case": {"n_images": n_sub, "attacks": [a for a in ATTACKS if a == "clean" or (
            a == "autoattack" and e.autoattack != "none") or (
            a == "square" and runs_square_check(suite)) or a in ("pgd20", "cw20")]},
        "sanity_images": min(SANITY_IMAGES, n_sub),
    }


def build_record(spec: RunSpec, suite: Suite, run_dir: Path, metrics: dict, per_image: dict,
                 sanity: dict, flags: list[dict], autoattack: dict, curves: dict,
                 checkpoints: dict,
                 eval_seconds: float, device: torch.device, splits: Splits) -> dict:
    last = checkpoints["last"][0]
    history = read_history(run_dir / "history.jsonl")
    pretraining = [dict(e) for e in last.get("pretraining") or []]  # clean-model service
    aa_summary = {"version": suite.eval.autoattack}
    for key, info in autoattack.items():
        aa_summary[key] = {k: v for k, v in info.items() if k != "log"}
    sources = last.get("defense_sources") or {}
    return {
        "schema": RECORD_SCHEMA,
        "run_id": spec.run_id,
        "row_name": spec.row_name,
        "spec": spec.to_dict(),
        "suite": {"name": suite.name, "hash": suite.protocol_hash,
                  "run_hash": suite.run_hash(spec.defense_names),
                  "overrides": suite.overrides_for(spec.defense_names),
                  "file_hash": suite.source_hash, "seeds": list(suite.seeds),
                  "description": suite.description,
                  "label_noise": suite.data.label_noise,
                  "injected_feature": suite.data.injected_feature},
        "models": {name: {"role": "trained" if name == "model" else "extra",
                          "ranked": name == "model"} for name in metrics},
        "metrics": metrics,
        "per_image": per_image,
        "sanity": sanity,
        "evaluation": evaluation_settings(suite, splits, device),
        "checkpoints": {tag: {"file": f"{tag}.pt", "sha256": sha, "epoch": int(ckpt["epoch"])}
                        for tag, (ckpt, sha) in checkpoints.items()},
        "curve_recheck": curves,
        "history": {"best_epoch": last["best"]["epoch"], "epochs": suite.train.epochs,
                    "best_val_robust": last["best"]["val_robust"],
                    "curves": record_curves(history)},
        "catastrophic_overfitting": catastrophic_overfitting_field(history),
        CO_RULE_KEY: CO_RULE_VERSION,
        "cost": {"train_seconds": float(last["seconds"]),
                 "seconds_per_epoch": [row["seconds"] for row in history],
                 "cpu_seconds_per_epoch": (
                     [row["cpu_seconds"] for row in history]
                     if history and all("cpu_seconds" in row for row in history) else None),
                 "curve_seconds": sum(row.get("curve_seconds", 0.0) for row in history),
                 "train_cpu_threads": sorted({row["cpu_threads"] for row in history
                                              if "cpu_threads" in row}),
                 "eval_seconds": eval_seconds,
                 "forward_passes": last["passes"]["forward"],
                 "backward_passes": last["passes"]["backward"],
                 "pretraining_seconds": sum(float(e["seconds"]) for e in pretraining),
                 "pretraining_forward_passes": sum(int(e["forward_passes"])
                                                   for e in pretraining),
                 "pretraining_backward_passes": sum(int(e["backward_passes"])
                                                    for e in pretraining)},
        "flags": flags,
        "extra_pretraining": pretraining,
        "cards": last.get("cards") or {},
        "defense_params": last.get("defense_params") or {},
        "autoattack": aa_summary,
        "autoattack_logs": {k: v.get("log", "") for k, v in autoattack.items()},
        "provenance": provenance(sources),
        "versions": provenance(sources)["versions"],
        "device": device_description(device),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
