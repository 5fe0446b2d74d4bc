"""The defense extension point: `Defense`, `DefenseCard`, the registry and its checks.

A defense is an `nn.Module` (so proxy models, EMA copies and policy networks
move with `.to(device)` and land in `state_dict()`) that overrides only the
hooks it needs. Every hook takes the engine's `TrainState` and does nothing by
default. The engine's loop (`bench/engine.py`) documents when each hook runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from bench.config import ConfigError, DefenseSpec, Suite

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
    """What the leaderboard prints about a defense."""

    name: str
    paper: str
    venue: str = ""
    link: str = ""
    reference_code: str = ""
    hyperparameters: dict = field(default_factory=dict)  # as published (CIFAR-10, PRN-18)
    published: dict = field(default_factory=dict)  # published numbers, free-form
    extra_data: str = "none"  # extra data or pretrained models used
    notes: str = ""

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
    """

    name: ClassVar[str] = ""
    card: ClassVar[DefenseCard]
    params: ClassVar[dict[str, Any]] = {}
    methods: ClassVar[tuple[str, ...]] = ()
    slots: ClassVar[tuple[str, ...]] = ()
    capabilities: ClassVar[tuple[str, ...]] = ()
    extra_models: ClassVar[tuple[str, ...]] = ()

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
        digest = hashlib.sha256(f"{run_seed}:{self.name}".encode()).digest()
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int.from_bytes(digest[:8], "little") % (2**63))

    # ---- hooks: all no-ops by default -------------------------------------
    def setup(self, state: TrainState) -> None: ...
    def on_epoch_start(self, state: TrainState) -> None: ...
    def before_attack(self, state: TrainState) -> None: ...
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


_FILE_MODULES: dict[tuple[str, str], Any] = {}  # (resolved path, sha256 of its text) -> module


def _import_file(path: Path) -> Any:
    """Import a defense file once per process and content (a second import would run its
    module code, e.g. `@register_defense`, twice)."""
    resolved = str(path.resolve())
    key = (resolved, hashlib.sha256(path.read_bytes()).hexdigest())
    if key in _FILE_MODULES:
        return _FILE_MODULES[key]
    module_name = f"robench_user_{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise ConfigError(import_problem(exc, str(path))) from exc
    _FILE_MODULES[key] = module
    return module


def _load_from_file(ref: str) -> type[Defense]:
    path_text, _, class_name = ref.rpartition(":")
    path = Path(path_text)
    if not path.exists():
        raise ConfigError(f"defense file {path} does not exist (from --defense {ref!r}); check "
                          f"the path (a relative one starts at {Path.cwd()})")
    module = _import_file(path)
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Defense)):
        found = [n for n, v in vars(module).items()
                 if isinstance(v, type) and issubclass(v, Defense) and v is not Defense]
        if isinstance(cls, type):
            raise ConfigError(
                f"{_defined_at(cls, path)}: {class_name} is not a subclass of "
                f"defenses.base.Defense; declare it as `class {class_name}(Defense)` (with "
                "`from defenses.base import Defense, DefenseCard`)")
        raise ConfigError(
            f"{path} has no class named {class_name!r}; its Defense subclasses are "
            f"{found or 'none'}: name one after the colon (--defense {path}:ClassName)")
    if not isinstance(getattr(cls, "card", None), DefenseCard):
        raise ConfigError(f"{_defined_at(cls, path)}: {class_name} has no DefenseCard in its "
                          "`card` attribute; add `card = DefenseCard(name=..., paper=..., "
                          "link=...)` to the class")
    if not cls.name:
        cls.name = class_name.lower()
    return cls


def _defined_at(obj: Any, fallback: Path | str) -> str:
    """`file:line` where a class or function is defined (else `fallback`)."""
    try:
        return f"{inspect.getsourcefile(obj)}:{inspect.getsourcelines(obj)[1]}"
    except (TypeError, OSError):
        return str(fallback)


def import_problem(exc: BaseException, path: str) -> str:
    """One line for a module that failed to import: file and line, and what to do."""
    if isinstance(exc, SyntaxError):
        return (f"{exc.filename or path}:{exc.lineno}: SyntaxError: {exc.msg}; fix the file "
                "(`python -m py_compile FILE` shows the same)")
    frames = [f for f in traceback.extract_tb(exc.__traceback__)]
    own = [f for f in frames if Path(f.filename).resolve() == Path(path).resolve()]
    where = f"{own[-1].filename}:{own[-1].lineno}" if own else path
    if isinstance(exc, ModuleNotFoundError):
        return (f"{where}: needs the module {exc.name!r}, which is not installed here; "
                f"install it (e.g. `pip install {exc.name}`) or remove the import")
    return f"{where}: importing it raised {type(exc).__name__}: {exc}"


def hook_signature_problems(cls: type) -> list[str]:
    """Overridden hooks whose parameters differ from the base class's (the engine calls
    each with the arguments in HOOK_PARAMETERS)."""
    problems = []
    for hook, expected in HOOK_PARAMETERS.items():
        own = inspect.getattr_static(cls, hook, None)
        if own is None or own is inspect.getattr_static(Defense, hook):
            continue
        func = own.__func__ if isinstance(own, (classmethod, staticmethod)) else own
        if not callable(func):
            problems.append(f"{hook} is not a method")
            continue
        try:
            params = list(inspect.signature(func).parameters.values())[1:]  # without self
        except (TypeError, ValueError):
            continue
        if any(p.kind is p.VAR_POSITIONAL for p in params):
            continue
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        required = [p for p in positional if p.default is p.empty]
        keyword_only = [p for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
        if len(required) > len(expected) or len(positional) < len(expected) or keyword_only:
            names = "".join(f", {p.name}" for p in params)
            problems.append(f"{hook}(self{names}) at {_defined_at(func, _source(cls))} should "
                            f"be {hook}(self, {', '.join(expected)})")
    return problems


def resolve_defense(name: str) -> type[Defense]:
    """A registered name, or `path/to/file.py:ClassName`."""
    if ".py:" in name:
        return _load_from_file(name)
    registry = list_defenses()
    if name not in registry:
        raise ConfigError(
            f"unknown defense {name!r}; valid defenses are {sorted(registry)} "
            f"(or path/to/file.py:ClassName)"
        )
    return registry[name]


def _check_params(cls: type[Defense], given: dict, where: str) -> None:
    unknown = sorted(set(given) - set(cls.params))
    if unknown:
        raise ConfigError(
            f"{where}: defense {cls.name!r} has no parameter(s) {unknown}; "
            f"valid parameters are {sorted(cls.params)}"
        )


def build_defenses(specs: tuple[DefenseSpec, ...], method: str, suite: Suite) -> list[Defense]:
    """Instantiate defenses with defaults < method defaults < suite overrides < run
    parameters, refusing unknown parameters, unsupported methods and slot conflicts."""
    built: list[Defense] = []
    owners: dict[str, str] = {}
    for spec in specs:
        cls = resolve_defense(spec.name)
        if cls.methods and method not in cls.methods:
            raise ConfigError(
                f"defense {spec.name!r} does not compose with method {method!r}; "
                f"it supports {list(cls.methods)}"
            )
        for slot in cls.slots:
            if slot in owners:
                raise ConfigError(
                    f"defenses {owners[slot]!r} and {spec.name!r} both claim the "
                    f"{slot!r} slot; only one defense may own it"
                )
            owners[slot] = spec.name
        wrong = hook_signature_problems(cls)
        if wrong:
            raise ConfigError(f"defense {spec.name!r} ({_source(cls)}): hook signature(s) "
                              f"differ from the base class: {'; '.join(wrong)}; the engine "
                              "calls each hook with these arguments")
        unknown_caps = sorted(set(cls.capabilities) - set(CAPABILITIES))
        if unknown_caps:
            raise ConfigError(
                f"defense {spec.name!r} asks for capability {unknown_caps} that this engine "
                f"does not provide; provided: {list(CAPABILITIES)}"
            )
        values = dict(cls.params)
        values.update(cls.method_defaults(method))
        suite_values = suite.defense_overrides.get(cls.name, {})
        _check_params(cls, suite_values, f"suite {suite.name!r} [defenses.{cls.name}]")
        values.update(suite_values)
        user = spec.param_dict
        _check_params(cls, user, f"defense {spec.name!r}")
        values.update(user)
        defense = _construct(cls, spec.name, values)
        extra_caps = sorted(set(defense.capabilities) - set(cls.capabilities))
        if extra_caps:
            raise ConfigError(f"defense {spec.name!r}: an instance may only narrow its "
                              f"class's capabilities, but adds {extra_caps}")
        try:
            defense.check_run(method, suite)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"defense {spec.name!r} ({_raised_at(cls, exc)}): check_run "
                              f"raised {type(exc).__name__}: {exc}") from exc
        built.append(defense)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"a defense is listed twice in {names}")
    return built


def _source(cls: type) -> str:
    try:
        return inspect.getsourcefile(cls) or cls.__module__
    except (TypeError, OSError):
        return cls.__module__


def _raised_at(cls: type, exc: BaseException) -> str:
    """`file:line` where the defense's own code raised (else its source file)."""
    own = _source(cls)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == own]
    return f"{own}:{frames[-1].lineno}" if frames else own


def _construct(cls: type[Defense], name: str, values: dict[str, Any]) -> Defense:
    """`cls(**values)`, with a refusal of the parameters worded as one line."""
    try:
        return cls(**values)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"defense {name!r} ({_raised_at(cls, exc)}) refused its parameters "
                          f"{values}: {type(exc).__name__}: {exc}; pass values it accepts "
                          f"(--defense NAME:key=value; defaults {dict(cls.params)})") from exc
