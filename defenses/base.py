"""The defense extension point: `Defense`, `DefenseCard` and `register_defense`; finding,
checking and building defenses for a run is `defenses.registry`.

A defense is an `nn.Module` (so proxy models, EMA copies and policy networks
move with `.to(device)` and land in `state_dict()`) that overrides only the
hooks it needs. Every hook takes the engine's `TrainState` and does nothing by
default. The engine's loop (`bench/engine.py`) documents when each hook runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from bench.clean_model import DEFAULT_RECIPE, CleanRecipe
from bench.config import ConfigError, Suite
from bench.curves import make_generator
from defenses.card import Published

if TYPE_CHECKING:
    from bench.state import TrainState

SLOTS = ("objective", "augmentation", "update")
CAPABILITIES = ("clean_logits", "per_sample_loss", "dataset_index", "raw_batch", "term_grads",
                "clean_model")
ENTRY_POINT_GROUP = "robench.defenses"
# hook -> its parameters after `self` (what the engine passes)
HOOK_PARAMETERS: dict[str, tuple[str, ...]] = {
    **{hook: ("state",) for hook in (
        "setup", "on_epoch_start", "before_attack", "after_attack", "around_update",
        "add_losses", "sample_weights", "objective_loss", "gradient_terms", "after_backward",
        "after_step", "on_epoch_end", "eval_models")},
    "check_run": ("method", "suite"),
}


@dataclass(frozen=True)
class DefenseCard:
    """What the leaderboard prints about a defense.

    `published`: every number the paper (or a later paper quoting it) reports, one
    `Published` entry each, with its protocol and the matching ROBench suite; the
    leaderboard's reproduction table lists them all. `published_notes`: free-form remarks
    about them that are not numbers (where to find unverified tables, costs).
    """

    name: str
    paper: str
    venue: str = ""
    link: str = ""
    reference_code: str = ""
    hyperparameters: dict = field(default_factory=dict)  # as published (CIFAR-10, PRN-18)
    published: tuple[Published, ...] = ()
    published_notes: dict = field(default_factory=dict)
    extra_data: str = "none"  # extra data or pretrained models used
    notes: str = ""

    def __post_init__(self) -> None:
        entries = self.published
        if isinstance(entries, Published):
            entries = (entries,)
        if not isinstance(entries, list | tuple) or not all(
                isinstance(e, Published) for e in entries):
            raise ConfigError(f"card {self.name!r}: published must be a tuple of "
                              "defenses.card.Published entries (free-form remarks go "
                              "in published_notes)")
        object.__setattr__(self, "published", tuple(entries))
        if not isinstance(self.published_notes, dict):
            raise ConfigError(f"card {self.name!r}: published_notes must be a dict")

    def to_dict(self) -> dict:
        return asdict(self)


class Defense(nn.Module):
    """Base class of every defense. Subclasses set the class attributes and
    override hooks; `params` holds the defaults of every hyperparameter.

    Class attributes:
      name: registry name (set by `@register_defense`).
      card: the `DefenseCard`.
      params: default hyperparameters; a run may override any of them.
      methods: base methods the defense composes with (empty = all).
      slots: single-owner slots it claims (`objective`, `augmentation`, `update`).
      extra_models: names of the models besides the trained one that `eval_models` returns
        (e.g. an EMA); the engine saves each as a state_dict of the suite's architecture in
        every checkpoint, and the evaluator scores it as a sub-row of the defense's row.
      capabilities: what it needs the engine to compute or provide: per batch
        `clean_logits`, `per_sample_loss`, `dataset_index`, `raw_batch`, `term_grads`
        (the parameter gradient of each scalar `gradient_terms` returns, in
        `state.term_grads`, one extra backward each); per run `clean_model` (a model of
        the suite's architecture trained with `standard` for the run's seed, trained once
        and cached by the engine, in `state.clean_model` during `setup` of a fresh run;
        the record declares it as extra pretraining, with its cost). An instance may
        narrow its class's list in `__init__` (a switched-off option needs nothing).
      clean_model_recipe: how that clean model is trained (`bench.clean_model.CleanRecipe`:
        augmentation, share of the suite's epochs, lr decays); the default is the suite's
        own standard training. Each recipe gets its own cache entry; each defense sees the
        model of its own recipe.
    """

    name: ClassVar[str] = ""
    card: ClassVar[DefenseCard]
    params: ClassVar[dict[str, Any]] = {}
    methods: ClassVar[tuple[str, ...]] = ()
    slots: ClassVar[tuple[str, ...]] = ()
    capabilities: ClassVar[tuple[str, ...]] = ()
    extra_models: ClassVar[tuple[str, ...]] = ()
    clean_model_recipe: ClassVar[CleanRecipe] = DEFAULT_RECIPE

    def __init__(self, **hparams: Any) -> None:
        super().__init__()
        self.hparams: dict[str, Any] = dict(hparams)
        self.generator: torch.Generator | None = None  # the defense's own random stream

    @classmethod
    def method_defaults(cls, method: str) -> dict[str, Any]:
        """Defaults that depend on the base method (e.g. TRADES-AWP's gamma)."""
        return {}

    def check_run(self, method: str, suite: Suite) -> None:
        """Refuse (with a ConfigError) settings that cannot run with this method on this
        suite. Called when the run is planned, before any data is loaded."""

    def bind_random_stream(self, run_seed: int, device: torch.device) -> None:
        """Give the defense a generator derived from the run seed and its name,
        so adding a defense never shifts the data order or the attack's randomness."""
        self.generator = make_generator(run_seed, self.name, device)

    # ---- hooks: all no-ops by default -------------------------------------
    def setup(self, state: TrainState) -> None: ...
    def on_epoch_start(self, state: TrainState) -> None: ...
    def before_attack(self, state: TrainState) -> None:
        """May replace `state.x` / `state.y` (augmentation). May also set `state.x_adv`
        (shaped like `state.x`; e.g. `state.x` itself for a phase of clean training): the
        engine then runs no attack for this batch. `state.x_adv` is None on entry."""
    def after_attack(self, state: TrainState) -> None: ...

    @contextlib.contextmanager
    def around_update(self, state: TrainState) -> Iterator[None]:
        yield

    def add_losses(self, state: TrainState) -> dict[str, torch.Tensor] | None:
        return None

    def sample_weights(self, state: TrainState) -> torch.Tensor | None:
        return None

    def objective_loss(self, state: TrainState) -> torch.Tensor | None:
        """Only for a defense that owns the `objective` slot: per-sample loss."""
        return None

    def gradient_terms(self, state: TrainState) -> dict[str, torch.Tensor] | None:
        """Only with the `term_grads` capability: named scalars (built from this batch's
        forward, e.g. from logits kept in `objective_loss`) whose gradients w.r.t. the
        parameters the engine puts in `state.term_grads["<name>.<term>"]` before the
        backward. They are not added to the loss."""
        return None

    def after_backward(self, state: TrainState) -> None: ...
    def after_step(self, state: TrainState) -> None: ...
    def on_epoch_end(self, state: TrainState) -> None: ...

    def eval_models(self, state: TrainState) -> dict[str, nn.Module]:
        """Extra models to evaluate besides the trained model (e.g. an EMA), by the names
        declared in `extra_models`; each must be of the suite's architecture. Called at
        every checkpoint; the evaluator scores the saved weights, never this module."""
        return {}

    # ---- state that is not a tensor (counters, optimizers) -----------------
    def get_extra_state(self) -> Any:
        return {"generator": self.generator.get_state() if self.generator else None}

    def set_extra_state(self, extra: Any) -> None:
        if extra and extra.get("generator") is not None and self.generator is not None:
            self.generator.set_state(extra["generator"])


_REGISTRY: dict[str, type[Defense]] = {}


def register_defense(name: str):
    """Class decorator: `@register_defense("awp")`."""

    def wrap(cls: type[Defense]) -> type[Defense]:
        if not (isinstance(cls, type) and issubclass(cls, Defense)):
            raise TypeError(f"@register_defense({name!r}) must decorate a Defense subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ConfigError(f"defense name {name!r} is registered twice")
        if not hasattr(cls, "card"):
            raise TypeError(f"defense {name!r} needs a DefenseCard in its `card` attribute")
        unknown = sorted(set(cls.slots) - set(SLOTS))
        if unknown:
            raise TypeError(f"defense {name!r} claims unknown slot(s) {unknown}; slots are {SLOTS}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


_loaded_builtin = False


def _load_builtin() -> None:
    global _loaded_builtin
    if _loaded_builtin:
        return
    _loaded_builtin = True
    import defenses  # noqa: F401  (imports the built-in modules)
    from defenses.registry import import_problem

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:
            raise ConfigError(f"entry point {ep.name!r} ({ep.value}) of group "
                              f"{ENTRY_POINT_GROUP!r}: "
                              f"{import_problem(exc, ep.value.split(':')[0])}") from exc
        if ep.name not in _REGISTRY:
            register_defense(ep.name)(cls)


def list_defenses() -> dict[str, type[Defense]]:
    _load_builtin()
    return dict(sorted(_REGISTRY.items()))
