"""`robench check PATH.py:Class` (or a registered name): the submission gate.

Static checks (nothing trains): the module imports (a syntax error or a missing dependency
is one line with file and line), the class is a `Defense`, its card is complete, `params`
match `__init__`, every overridden hook has the base class's signature, and its slots,
capabilities, methods and extra models are valid. Dynamic checks, on the `smoke` suite,
with each method the defense declares (`at` when it declares none): a short run trains
with a finite loss (the engine refuses wrong `sample_weights` shapes, detached terms and
extra models that are not of the suite's architecture, naming the hook), the evaluator
accepts the extra models, the weights are clean outside `around_update` (with the learning
rate at 0 a step must leave the weights exactly as they were, and they must still be
clean when `around_update` is entered), and resuming after an interruption equals an
uninterrupted run. It prints one line per check and exits non-zero on any failure.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench.config import METHODS, ConfigError, DefenseSpec, RunSpec, Suite, load_suite
from bench.data import Splits, build_splits
from bench.errors import DefenseError, NonFiniteLossError
from bench.records import load_checkpoint, read_history

REQUIRED_CARD_FIELDS = ("name", "paper", "venue", "link", "extra_data")
TIMING_KEYS = ("seconds", "curve_seconds", "cpu_seconds")
# weights restored by subtracting a perturbation ((w + v) - v, as weight-perturbing
# defenses' reference code does) come back within rounding (~1e-7 of their size), not bit
# for bit; a perturbation left behind is of the order of the defense's strength (1e-3 to 1e-2)
CLEAN_TOLERANCE = 1e-5


@dataclass
class Outcome:
    check: str
    ok: bool
    detail: str = ""


class Failed(Exception):
    """A check failed; the message is its one-line reason."""


def card_problems(cls: type) -> list[str]:
    from defenses.base import DefenseCard

    card = getattr(cls, "card", None)
    if not isinstance(card, DefenseCard):
        return ["no DefenseCard in `card`"]
    problems = [f"card.{f} is empty" for f in REQUIRED_CARD_FIELDS
                if not str(getattr(card, f, "") or "").strip()]
    if not isinstance(card.hyperparameters, dict):
        problems.append("card.hyperparameters must be a dict")
    return problems


def params_problems(cls: type) -> list[str]:
    """`params` names exactly the keyword parameters of `__init__`."""
    if not isinstance(cls.params, dict):
        return ["`params` is not a dict of defaults"]
    try:
        signature = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return []
    args = [p for p in list(signature.parameters.values())[1:]]
    if any(p.kind is p.VAR_KEYWORD for p in args):
        return []
    names = {p.name for p in args if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    problems = []
    if set(cls.params) - names:
        problems.append(f"params {sorted(set(cls.params) - names)} are not parameters of "
                        "__init__")
    required = {p.name for p in args if p.default is p.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if required - set(cls.params):
        problems.append(f"__init__ needs {sorted(required - set(cls.params))}, which have no "
                        "default in params")
    return problems


def declaration_problems(cls: type) -> list[str]:
    from defenses.base import CAPABILITIES, SLOTS

    problems = []
    for attr, valid in (("slots", SLOTS), ("capabilities", CAPABILITIES), ("methods", METHODS)):
        values = getattr(cls, attr, ())
        if not isinstance(values, tuple) or set(values) - set(valid):
            problems.append(f"{attr} {values!r}: each must be one of {list(valid)}")
    extra = getattr(cls, "extra_models", ())
    if not isinstance(extra, tuple) or not all(isinstance(n, str) and n for n in extra):
        problems.append(f"extra_models {extra!r} must be a tuple of names")
    return problems


def static_checks(cls: type) -> list[Outcome]:
    from defenses.base import Defense
    from defenses.registry import hook_signature_problems

    out = [Outcome("Defense subclass", issubclass(cls, Defense))]
    for check, problems in (("card complete", card_problems(cls)),
                            ("params match __init__", params_problems(cls)),
                            ("hook signatures", hook_signature_problems(cls)),
                            ("slots, capabilities, methods", declaration_problems(cls))):
        out.append(Outcome(check, not problems, "; ".join(problems)))
    return out


class WeightsProbe:
    """Hooks run first in the engine's order (the probe is the first defense): it notes the
    weights at the start of every step and checks them after the attack, when
    `around_update` is entered, at the next step's start and at the epoch's end (the
    learning rate is 0: no step may move them)."""

    def __init__(self) -> None:
        self.start: list[torch.Tensor] | None = None
        self.problem: str | None = None

    @staticmethod
    def weights(state) -> list[torch.Tensor]:
        return [p.detach().clone() for p in state.model.parameters()]

    def compare(self, state, when: str) -> None:
        if self.start is None or self.problem:
            return
        now = [p.detach() for p in state.model.parameters()]
        moved = max(_relative_change(a, b) for a, b in zip(self.start, now, strict=True))
        if moved > CLEAN_TOLERANCE:
            self.problem = (f"the model's weights differ from those at the start of step "
                            f"{state.step} {when} (by {moved:.1e} of their size)")


def _relative_change(before: torch.Tensor, after: torch.Tensor) -> float:
    scale = float(before.abs().max()) or 1.0
    return float((after - before).abs().max()) / scale


def make_probe_defense(probe: WeightsProbe):
    from defenses.base import Defense, DefenseCard

    class Probe(Defense):
        name = "robench_weights_probe"
        card = DefenseCard(name="probe", paper="robench check")

        def before_attack(self, state) -> None:
            probe.compare(state, "after the previous step (outside around_update)")
            probe.start = WeightsProbe.weights(state)

        def after_attack(self, state) -> None:
            probe.compare(state, "after the attack (changed in before_attack, before "
                          "around_update)")

        @contextlib.contextmanager
        def around_update(self, state) -> Iterator[None]:
            probe.compare(state, "on entering around_update (changed before it)")
            yield

        def on_epoch_end(self, state) -> None:
            probe.compare(state, "at the end of the epoch (after the last step's hooks)")

    return Probe()


def _trainer(spec: RunSpec, suite: Suite, splits: Splits, run_dir: Path, probe=None):
    from bench.engine import Trainer

    trainer = Trainer(spec, suite, splits, run_dir, device=torch.device("cpu"),
                      progress=False, clean_models_dir=run_dir.parent / "_clean_models")
    if probe is not None:
        original = trainer.build

        def build():
            state = original()
            trainer.defenses.insert(0, probe)
            probe.bind_random_stream(spec.seed, torch.device("cpu"))
            trainer._bind_defenses()
            return state
        trainer.build = build  # type: ignore[method-assign]
    return trainer


def _same(a: object, b: object) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(
            _same(x, y) for x, y in zip(a, b))
    return a == b


def dynamic_checks(spec: DefenseSpec, method: str, smoke: Suite, splits: Splits,
                   tmp: Path) -> list[Outcome]:
    from bench.evaluate import model_from_weights

    run = RunSpec(smoke.name, method, (spec,), 0)
    tag = f"[{method}]"
    outcomes: list[Outcome] = []

    def attempt(check: str, body: Callable[[], str]) -> bool:
        try:
            detail = body()
        except (DefenseError, NonFiniteLossError, ConfigError, Failed) as exc:
            outcomes.append(Outcome(f"{check} {tag}", False, str(exc)))
            return False
        outcomes.append(Outcome(f"{check} {tag}", True, detail))
        return True

    def trains() -> str:
        _trainer(run, smoke, splits, tmp / method / "full").train()
        losses = [row["train_loss"] for row in read_history(tmp / method / "full" /
                                                            "history.jsonl")]
        if not all(math.isfinite(v) for v in losses):
            raise Failed(f"non-finite training loss: {losses}")
        return f"{len(losses)} epochs, losses {', '.join(f'{v:.3f}' for v in losses)}"

    if not attempt("trains with a finite loss", trains):
        return outcomes

    def extra_models() -> str:
        names = []
        for which in ("best.pt", "last.pt"):
            ckpt = load_checkpoint(tmp / method / "full" / which)
            for name, weights in (ckpt.get("eval_models") or {}).items():
                model_from_weights(smoke, splits.info, weights, name, tmp / which,
                                   torch.device("cpu"))
                names.append(name)
        if not names:
            return "no extra models in the checkpoints"
        return f"{sorted(set(names))} load as the suite's architecture"

    attempt("extra models load in the evaluator", extra_models)

    def clean_weights() -> str:
        probe = WeightsProbe()
        still = replace(smoke, train=replace(smoke.train, lr=0.0, epochs=1))
        _trainer(run, still, splits, tmp / method / "still", make_probe_defense(probe)).train()
        if probe.problem:
            raise Failed(probe.problem + ": perturb the weights only inside around_update "
                         "and restore them on leaving it")
        return (f"unchanged by every step at learning rate 0 (within {CLEAN_TOLERANCE:.0e} of "
                "their size: the rounding of a subtracted perturbation)")

    attempt("weights clean outside around_update", clean_weights)

    def resume() -> str:
        cut = tmp / method / "cut"
        _trainer(run, smoke, splits, cut).train(stop_after_epochs=1)
        _trainer(run, smoke, splits, cut).train()
        for which in ("last.pt", "best.pt"):
            a, b = load_checkpoint(tmp / method / "full" / which), load_checkpoint(cut / which)
            for key in ("model", "defenses", "eval_models", "optimizer", "epoch"):
                if not _same(a.get(key), b.get(key)):
                    raise Failed(f"{which}: {key!r} after resuming differs from the "
                                 "uninterrupted run (keep all state in buffers, submodules "
                                 "or get_extra_state/set_extra_state)")
        rows = [[{k: v for k, v in r.items() if k not in TIMING_KEYS}
                 for r in read_history(folder / "history.jsonl")]
                for folder in (tmp / method / "full", cut)]
        if rows[0] != rows[1]:
            raise Failed("the history after resuming differs from the uninterrupted run")
        return "checkpoints and history equal an uninterrupted run"

    attempt("resume equals uninterrupted", resume)
    return outcomes


def run_checks(reference: str, dynamic: bool = True) -> list[Outcome]:
    from bench.config import parse_defense_arg
    from defenses.registry import build_defenses, resolve_defense

    try:
        spec = parse_defense_arg(reference)
        cls = resolve_defense(spec.name)
    except ConfigError as exc:
        return [Outcome("importable", False, str(exc))]
    where = inspect.getsourcefile(cls) if hasattr(cls, "__module__") else "?"
    outcomes = [Outcome("importable", True, f"{cls.__qualname__} from {where}")]
    outcomes += static_checks(cls)
    if not all(o.ok for o in outcomes) or not dynamic:
        return outcomes
    smoke = load_suite("smoke")
    methods = list(cls.methods) or ["at"]
    for method in methods:
        try:
            build_defenses((spec,), method, smoke)
        except ConfigError as exc:
            outcomes.append(Outcome(f"builds on the smoke suite [{method}]", False, str(exc)))
            return outcomes
    splits = build_splits(smoke.data, None, smoke.curves.size)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-exact comparisons need one thread count
    try:
        with tempfile.TemporaryDirectory(prefix="robench-check-") as scratch:
            for method in methods:
                outcomes += dynamic_checks(spec, method, smoke, splits, Path(scratch))
    finally:
        torch.set_num_threads(before)
    return outcomes


def check_defense(reference: str, dynamic: bool = True) -> int:
    """Print one line per check; 0 when every check passed, 1 otherwise."""
    outcomes = run_checks(reference, dynamic)
    width = max(len(o.check) for o in outcomes)
    for o in outcomes:
        print(f"{o.check:<{width}}  {'ok  ' if o.ok else 'FAIL'}  {o.detail}".rstrip())
    failed = [o for o in outcomes if not o.ok]
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} checks passed"
          + ("" if dynamic else " (static checks only)"))
    return 1 if failed else 0
