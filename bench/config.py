"""Frozen protocol objects: a `Suite` (everything that is not the defense) and a
`RunSpec` (one run: suite, method, defenses with parameters, seed).

Suites are TOML files under `bench/suites/` (see PROTOCOL.md). Every number that
is a pixel-scale quantity may be written as a fraction string such as "8/255".
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SUITES_DIR = Path(__file__).parent / "suites"
METHODS = ("at", "trades", "fgsm_rs", "n_fgsm", "standard")
# What kind of training each method is: a defense declared for one method can stand in
# with another of the same kind (scripts/run_full_evaluation.py).
METHOD_KIND = {"at": "multi-step", "trades": "multi-step", "fgsm_rs": "single-step",
               "n_fgsm": "single-step", "standard": "natural"}


class ConfigError(ValueError):
    """A suite file or a run specification is invalid."""


def parse_number(value: Any, where: str) -> float:
    """Accept a number or a fraction string like "8/255"."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError) as exc:
            raise ConfigError(f"{where}: cannot read {value!r} as a number or fraction") from exc
    raise ConfigError(f"{where}: expected a number, got {type(value).__name__}")


@dataclass(frozen=True)
class DataConfig:
    dataset: str  # cifar10 | cifar100 | svhn | fashion-mnist | npz:<dir> | synthetic
    train_size: int = 0  # class-balanced subset of the training split; 0 = all
    val_size: int = 1000  # held out from the training split with a fixed seed
    test_size: int = 0  # evaluation subset of the test split; 0 = all
    label_noise: float = 0.0  # fraction of training labels flipped at random (fixed seed)
    augment: str = "crop_flip"  # crop_flip | flip | none
    crop_padding: int = 4
    split_seed: int = 0  # seed of the validation split, subsets and label noise
    # strength (pixel scale [0, 1]) of a class-wise +-pattern added to every image of every
    # split, a stressor that induces catastrophic overfitting; 0 = off (bench/data.py)
    injected_feature: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    name: str  # preact_resnet18 | wide_resnet | small_cnn
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "piecewise"  # piecewise | cyclic | constant
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of training (piecewise)
    lr_decay: float = 0.1
    warmup_epochs: float = 0.0  # linear warm-up of the learning rate (piecewise)
    cyclic_peak: float = 0.4  # fraction of training at which the cyclic lr peaks
    # [base, max]: cycle the SGD momentum against the cyclic lr, as torch's CyclicLR does
    # with cycle_momentum (max at lr 0, base at the lr peak); empty = constant `momentum`
    cyclic_momentum: tuple[float, ...] = ()
    eps: float = 8 / 255
    eps_ramp_epochs: float = 0.0  # linear epsilon ramp (SVHN)
    attack_steps: int = 10
    attack_step_size: float = 2 / 255
    fgsm_step_size: float = 0.0  # FGSM-RS step; 0 = 1.25 eps
    trades_beta: float = 6.0
    attack_bn: str = "train"  # train | eval: BatchNorm mode while attacking (PGD-AT)
    drop_last: bool = False


@dataclass(frozen=True)
class CurveConfig:
    size: int = 1000  # images of validation split and of the fixed training subset
    attack_steps: int = 10
    step_ratio: float = 0.25  # step = ratio * eps
    # also record `val_fgsm` each epoch: FGSM from a zero start with step eps on the
    # validation curve subset (the catastrophic-overfitting signal; see bench/overfitting.py)
    fgsm: bool = False


@dataclass(frozen=True)
class CleanModelConfig:
    """The clean model that defenses with the `clean_model` capability start from (a
    warm start): the suite's `standard` method, trained once per seed and cached."""

    epochs: int = 0  # its training budget; 0 = the suite's [train] epochs


@dataclass(frozen=True)
class ResourcesConfig:
    """What one run asks of a Ray cluster (never part of the protocol): CPUs (also the
    CPU threads of its processes) and GPUs (a fraction lets small runs share a GPU)."""

    cpus: float = 1.0
    gpus: float = 1.0


# Fields added after suites had been published, as (section, key): left out of the protocol
# hash while they hold their dataclass default, so adding them changed no existing suite's
# hash (and so invalidated no run folder and split no leaderboard). A section listed in
# HASH_OPTIONAL_SECTIONS is left out as a whole once all its fields are left out.
HASH_OPTIONAL_FIELDS: tuple[tuple[str, str], ...] = (("curves", "fgsm"),
                                                     ("data", "injected_feature"),
                                                     ("clean_model", "epochs"),
                                                     ("eval", "square_queries"),
                                                     ("train", "cyclic_momentum"))
HASH_OPTIONAL_SECTIONS: tuple[str, ...] = ("clean_model",)
# Suite fields that never enter the protocol hash (see Suite.protocol_hash).
NOT_HASHED: tuple[str, ...] = ("description", "defense_overrides", "source_hash", "methods",
                               "resources")


@dataclass(frozen=True)
class EvalConfig:
    pgd_steps: int = 20
    pgd_step_ratio: float = 0.25
    cw_steps: int = 20
    autoattack: str = "standard"  # standard | apgd (APGD-CE + APGD-T only) | reduced | none
    autoattack_size: int = 0  # AutoAttack on the first N evaluation images; 0 = all
    # the gradient-free check: Square (the first N queries of AutoAttack's own) on the
    # images of the AutoAttack subset that every gradient attack missed; 0 = off
    square_queries: int = 1000
    batch_size: int = 500
    sanity_checks: bool = True


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    seeds: tuple[int, ...]
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    curves: CurveConfig
    eval: EvalConfig
    defense_overrides: dict = field(default_factory=dict)  # {defense: {param: value}}
    source_hash: str = ""  # sha256 of the TOML file
    # the base methods this suite compares: their plain rows are the baselines, and each
    # defense runs with every one of them it composes with
    methods: tuple[str, ...] = ("at",)
    clean_model: CleanModelConfig = field(default_factory=CleanModelConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    @property
    def clean_model_epochs(self) -> int:
        """Epochs of the cached clean model ([clean_model] epochs, else [train] epochs)."""
        return self.clean_model.epochs or self.train.epochs

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> Suite:
        """The inverse of `to_dict` (JSON round trip: lists back to tuples), so a suite
        travels to a training or evaluation process unchanged, hashes included."""
        sections = {name: _from_plain(kind, raw[name]) for name, kind in _SECTION_CLASSES.items()
                    if name in raw and name != "model"}
        model = ModelConfig(name=raw["model"]["name"], kwargs=dict(raw["model"]["kwargs"]))
        return cls(name=raw["name"], description=raw["description"], seeds=tuple(raw["seeds"]),
                   model=model, defense_overrides=raw.get("defense_overrides", {}),
                   source_hash=raw.get("source_hash", ""),
                   methods=tuple(raw.get("methods", ("at",))), **sections)

    @property
    def protocol_hash(self) -> str:
        """sha256 of what every row shares: name, seeds, data, model, training, curves,
        evaluation and the clean model's budget. Comments, the description, the list of
        base methods and the [defenses.*] tables are left out, so editing them never splits
        a leaderboard or invalidates a run (a run's result does not depend on which other
        baselines the suite lists); so are optional fields at their default
        (HASH_OPTIONAL_FIELDS)."""
        protocol = {k: v for k, v in self.to_dict().items() if k not in NOT_HASHED}
        _drop_optional_defaults(protocol)
        return hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()

    def overrides_for(self, defense_names: list[str]) -> dict:
        """The suite's [defenses.NAME] settings that apply to a run with these defenses."""
        return {n: self.defense_overrides[n] for n in sorted(defense_names)
                if n in self.defense_overrides}

    def run_hash(self, defense_names: list[str]) -> str:
        """What a run depends on: the protocol plus the suite settings of its own defenses
        (so a new [defenses.X] table invalidates only X's runs)."""
        payload = {"protocol": self.protocol_hash,
                   "overrides": self.overrides_for(defense_names)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


_SECTION_CLASSES = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig,
                    "curves": CurveConfig, "eval": EvalConfig, "clean_model": CleanModelConfig,
                    "resources": ResourcesConfig}


def _from_plain(kind: type, values: dict):
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _drop_optional_defaults(protocol: dict) -> None:
    """Remove each `HASH_OPTIONAL_FIELDS` entry that holds its default, then each
    `HASH_OPTIONAL_SECTIONS` section left empty (in place)."""
    for section, key in HASH_OPTIONAL_FIELDS:
        default = _SECTION_CLASSES[section].__dataclass_fields__[key].default
        values = protocol.get(section, {})
        if key in values and values[key] == default:
            del values[key]
    for section in HASH_OPTIONAL_SECTIONS:
        if protocol.get(section) == {}:
            del protocol[section]


def _section(raw: dict, name: str, where: str) -> dict:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    return dict(value)


def _build(cls, values: dict, where: str, fractions: tuple[str, ...] = ()):
    known = {f for f in cls.__dataclass_fields__}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; valid keys are {sorted(known)}"
        )
    for key in fractions:
        if key in values:
            values[key] = parse_number(values[key], f"{where}.{key}")
    for key, value in list(values.items()):
        if isinstance(value, list):
            values[key] = tuple(value)
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _check_cyclic_momentum(train: TrainConfig, where: str) -> None:
    """`cyclic_momentum = [base, max]`: two numbers, 0 <= base <= max < 1, only with the
    cyclic schedule, and `momentum` (the value at lr 0, where the cycle starts) = max."""
    cyc = train.cyclic_momentum
    if cyc == ():
        return
    numbers = isinstance(cyc, tuple) and all(
        isinstance(m, int | float) and not isinstance(m, bool) for m in cyc)
    if not numbers or len(cyc) != 2 or not 0 <= cyc[0] <= cyc[1] < 1:
        raise ConfigError(f"{where}: cyclic_momentum must be [base, max] with "
                          f"0 <= base <= max < 1 (e.g. [0.8, 0.9]), got {cyc!r}")
    if train.schedule != "cyclic":
        raise ConfigError(f"{where}: cyclic_momentum needs schedule = \"cyclic\" (got "
                          f"{train.schedule!r}); remove it or change the schedule")
    if train.momentum != cyc[1]:
        raise ConfigError(f"{where}: momentum ({train.momentum}) must equal the max of "
                          f"cyclic_momentum ({cyc[1]}), the momentum at lr 0 where the "
                          f"cycle starts; set momentum = {cyc[1]}")


def parse_suite(text: str, name: str, where: str) -> Suite:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from exc
    data_raw = _section(raw, "data", where)
    model_raw = _section(raw, "model", where)
    if "dataset" not in data_raw:
        raise ConfigError(f"{where}: [data] needs a 'dataset' key")
    if "name" not in model_raw:
        raise ConfigError(f"{where}: [model] needs a 'name' key")
    model = ModelConfig(name=model_raw.pop("name"), kwargs=model_raw)
    train_raw = _section(raw, "train", where)
    if "epochs" not in train_raw:
        raise ConfigError(f"{where}: [train] needs an 'epochs' key")
    train = _build(
        TrainConfig, train_raw, f"{where} [train]",
        fractions=("eps", "attack_step_size", "fgsm_step_size", "lr", "weight_decay"),
    )
    if train.schedule not in ("piecewise", "cyclic", "constant"):
        raise ConfigError(
            f"{where} [train]: schedule {train.schedule!r} is not one of "
            "piecewise, cyclic, constant"
        )
    _check_cyclic_momentum(train, f"{where} [train]")
    if train.attack_bn not in ("train", "eval"):
        raise ConfigError(f"{where} [train]: attack_bn must be 'train' or 'eval'")
    data = _build(DataConfig, data_raw, f"{where} [data]")
    if data.augment not in ("crop_flip", "flip", "none"):
        raise ConfigError(f"{where} [data]: augment must be crop_flip, flip or none")
    if not 0.0 <= data.label_noise < 1.0:
        raise ConfigError(f"{where} [data]: label_noise must be in [0, 1)")
    if (isinstance(data.injected_feature, bool)
            or not isinstance(data.injected_feature, int | float)
            or not 0.0 <= data.injected_feature <= 1.0):
        raise ConfigError(f"{where} [data]: injected_feature is a strength on the [0, 1] "
                          f"pixel scale (0 = off), got {data.injected_feature!r}")
    curves = _build(CurveConfig, _section(raw, "curves", where), f"{where} [curves]")
    if not isinstance(curves.fgsm, bool):
        raise ConfigError(f"{where} [curves]: fgsm must be true or false")
    evaluation = _build(EvalConfig, _section(raw, "eval", where), f"{where} [eval]")
    clean_model = _build(CleanModelConfig, _section(raw, "clean_model", where),
                         f"{where} [clean_model]")
    if (isinstance(clean_model.epochs, bool) or not isinstance(clean_model.epochs, int)
            or clean_model.epochs < 0):
        raise ConfigError(f"{where} [clean_model]: epochs must be an integer >= 0 "
                          f"(0 = the [train] epochs), got {clean_model.epochs!r}")
    if (isinstance(evaluation.square_queries, bool)
            or not isinstance(evaluation.square_queries, int) or evaluation.square_queries < 0):
        raise ConfigError(f"{where} [eval]: square_queries must be an integer >= 0 (0 = no "
                          f"Square check), got {evaluation.square_queries!r}")
    if evaluation.autoattack not in ("standard", "apgd", "reduced", "none"):
        raise ConfigError(f"{where} [eval]: autoattack must be standard, apgd, reduced or none")
    resources = _build(ResourcesConfig, _section(raw, "resources", where),
                       f"{where} [resources]", fractions=("cpus", "gpus"))
    if resources.cpus <= 0 or resources.gpus < 0:
        raise ConfigError(f"{where} [resources]: cpus must be > 0 and gpus >= 0, got "
                          f"cpus = {resources.cpus}, gpus = {resources.gpus}")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{where}: seeds must be a non-empty list of integers")
    overrides = _section(raw, "defenses", where)
    methods = raw.get("methods", ["at"])
    if (not isinstance(methods, list) or not methods
            or any(m not in METHODS for m in methods)):
        raise ConfigError(f"{where}: methods must be a non-empty list drawn from "
                          f"{list(METHODS)}, got {methods!r}")
    return Suite(
        name=raw.get("name", name),
        description=raw.get("description", ""),
        seeds=tuple(seeds),
        data=data,
        model=model,
        train=train,
        curves=curves,
        eval=evaluation,
        defense_overrides=overrides,
        source_hash=hashlib.sha256(text.encode()).hexdigest(),
        methods=tuple(methods),
        clean_model=clean_model,
        resources=resources,
    )


def list_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.toml"))


def load_suite(name_or_path: str) -> Suite:
    """Load a suite by name (`bench/suites/NAME.toml`) or by path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.exists():
        return parse_suite(path.read_text(), path.stem, str(path))
    candidate = SUITES_DIR / f"{name_or_path}.toml"
    if not candidate.exists():
        raise ConfigError(
            f"unknown suite {name_or_path!r}; valid suites are {list_suites()} "
            f"(or give a path to a .toml file)"
        )
    return parse_suite(candidate.read_text(), candidate.stem, str(candidate))


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class DefenseSpec:
    name: str
    params: tuple = ()  # sorted (key, value) pairs

    @property
    def param_dict(self) -> dict:
        return dict(self.params)

    def to_dict(self) -> dict:
        return {"name": self.name, "params": self.param_dict}


def parse_param_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if "/" in text:
        try:
            return float(Fraction(text))
        except (ValueError, ZeroDivisionError):
            pass
    return text


def parse_defense_arg(arg: str) -> DefenseSpec:
    """Parse `name` or `name:key=value,key=value` (name may be `path/file.py:Class`)."""
    if ".py:" in arg:
        path, _, rest = arg.partition(".py:")
        class_name, sep, params_text = rest.partition(":")
        name = f"{path}.py:{class_name}"
    else:
        name, sep, params_text = arg.partition(":")
    params = {}
    if sep:
        for item in params_text.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ConfigError(
                    f"--defense {arg!r}: expected NAME[:key=value,...], could not read {item!r}"
                )
            params[key.strip()] = parse_param_value(value.strip())
    if not name:
        raise ConfigError(f"--defense {arg!r}: the defense name is empty")
    return DefenseSpec(name=name, params=tuple(sorted(params.items())))


@dataclass(frozen=True)
class RunSpec:
    suite: str
    method: str
    defenses: tuple[DefenseSpec, ...] = ()
    seed: int = 0

    def to_dict(self) -> dict:
        return {
            "suite": self.suite,
            "method": self.method,
            "defenses": [d.to_dict() for d in self.defenses],
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, raw: dict) -> RunSpec:
        return cls(
            suite=raw["suite"],
            method=raw["method"],
            defenses=tuple(
                DefenseSpec(d["name"], tuple(sorted(d.get("params", {}).items())))
                for d in raw.get("defenses", [])
            ),
            seed=int(raw.get("seed", 0)),
        )

    @property
    def run_id(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    @property
    def row_name(self) -> str:
        return row_name(self.method, self.defense_names)

    @property
    def defense_names(self) -> list[str]:
        return [d.name for d in self.defenses]


METHOD_LABELS = {
    "at": "AT", "trades": "TRADES", "fgsm_rs": "FGSM-RS", "n_fgsm": "N-FGSM",
    "standard": "Standard",
}


def row_name(method: str, defenses: list[str]) -> str:
    parts = [METHOD_LABELS.get(method, method)]
    for name in defenses:
        if ".py:" in name:
            parts.append(name.rpartition(":")[2])  # a file-based defense: its class name
        else:
            parts.append(name.upper().replace("_", "-"))
    return "+".join(parts)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; valid methods are {list(METHODS)}")
