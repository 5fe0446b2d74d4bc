"""Loading defenses: a registered name, an entry point or `path/to/file.py:Class`, checked
(hook signatures, parameters) and built for a run, with one-line errors that name the file
and line."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
import traceback
from pathlib import Path
from typing import Any

from bench.config import ConfigError, DefenseSpec, Suite
from defenses.base import (
    CAPABILITIES,
    HOOK_PARAMETERS,
    Defense,
    DefenseCard,
    list_defenses,
)

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
