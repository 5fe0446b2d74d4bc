"""The shared defense invariants (DESIGN.md), as functions every defense's tests call:
zero strength reproduces the plain method bit for bit, weights are clean outside
`around_update`, resume equals an uninterrupted run (model, history, best checkpoint,
and the defense's own state), and the defense trains with every method it declares."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from bench.config import DefenseSpec, RunSpec
from bench.engine import Trainer
from bench.records import load_checkpoint, read_history
from bench.state import kernel_parameters
from defenses.base import Defense, DefenseCard

PROBE_CARD = DefenseCard(name="probe", paper="test")
TIMING_KEYS = ("seconds", "curve_seconds", "cpu_seconds")


def train(tmp: Path, suite, splits, method="at", defenses=(), seed=0, stop=None,
          instances=None) -> Trainer:
    """Train (or resume) a run in `tmp`; `instances` injects unregistered defense objects."""
    spec = RunSpec(suite.name, method, tuple(defenses), seed)
    trainer = Trainer(spec, suite, splits, tmp, device=torch.device("cpu"), progress=False)
    if instances is not None:
        original = trainer.build

        def build():
            state = original()
            trainer.defenses = instances
            for d in instances:
                d.bind_random_stream(seed, torch.device("cpu"))
            trainer._bind_defenses()  # capabilities and slots of the injected defenses
            return state
        trainer.build = build  # type: ignore[method-assign]
    trainer.train(stop_after_epochs=stop)
    return trainer


def model_state(run_dir: Path, name: str = "last.pt") -> dict:
    return load_checkpoint(run_dir / name)["model"]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_equal_nested(a, b, where: str = "") -> None:
    """Tensors equal bit for bit, containers recursively, anything else by ==."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_equal_nested(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def states_differ(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def history_without_timing(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS}
            for r in read_history(run_dir / "history.jsonl")]


PASS_KEYS = ("forward_passes", "backward_passes")  # cost, not training: may differ


def assert_same_training(plain_dir: Path, other_dir: Path) -> None:
    """`other_dir` trained exactly as `plain_dir` did, bit for bit: the last and best
    models, the optimizer state (momentum buffers), every random stream the engine owns
    (data order, second stream, attack, torch's global generator), the step count and the
    per-epoch history (losses, accuracies, curves; a defense's own logged keys and the pass
    counters may be extra)."""
    a, b = load_checkpoint(plain_dir / "last.pt"), load_checkpoint(other_dir / "last.pt")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    assert_same_state(a["model"], b["model"])
    assert_same_state(model_state(plain_dir, "best.pt"), model_state(other_dir, "best.pt"))
    assert a["best"] == b["best"]
    assert_equal_nested(a["optimizer"], b["optimizer"], "optimizer")
    assert_equal_nested(a["rng"], b["rng"], "rng")
    rows_a, rows_b = history_without_timing(plain_dir), history_without_timing(other_dir)
    assert len(rows_a) == len(rows_b)
    for row_a, row_b in zip(rows_a, rows_b):
        for key, value in row_a.items():
            if key not in PASS_KEYS:
                assert row_b.get(key) == value, (row_a["epoch"], key, value, row_b.get(key))


def check_zero_strength_is_plain(tmp: Path, suite, splits, method: str,
                                 zero: DefenseSpec, real: DefenseSpec | None,
                                 plain_dir: Path | None = None) -> None:
    """`zero` trains as the plain method does, bit for bit (`assert_same_training`);
    `real` changes the weights (so the check can fail). `plain_dir` reuses a finished plain
    run of the same suite, method and seed."""
    if plain_dir is None:
        plain_dir = train(tmp / "plain", suite, splits, method=method).run_dir
    with_zero = train(tmp / "zero", suite, splits, method=method, defenses=[zero])
    assert_same_training(plain_dir, with_zero.run_dir)
    if real is not None:
        with_real = train(tmp / "real", suite, splits, method=method, defenses=[real])
        assert states_differ(model_state(plain_dir), model_state(with_real.run_dir))


def check_resume_equals_uninterrupted(tmp: Path, suite, splits, method: str,
                                      defenses: tuple[DefenseSpec, ...]) -> None:
    """Stopping after epoch 1 and resuming gives the uninterrupted run's last and best
    checkpoints (model and defense state) and history. `suite` should have >= 3 epochs."""
    full = train(tmp / "full", suite, splits, method=method, defenses=defenses)
    train(tmp / "cut", suite, splits, method=method, defenses=defenses, stop=1)
    assert load_checkpoint(tmp / "cut" / "last.pt")["epoch"] == 1
    resumed = train(tmp / "cut", suite, splits, method=method, defenses=defenses)
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(full.run_dir / name), load_checkpoint(resumed.run_dir / name)
        assert_same_state(a["model"], b["model"])
        assert_equal_nested(a["defenses"], b["defenses"])
    assert history_without_timing(full.run_dir) == history_without_timing(resumed.run_dir)


def _kernels(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in kernel_parameters(model)}


class CleanWeightsProbe(Defense):
    """Nested inside the defense under test: records the model after the attack (clean),
    on entering `around_update` (after the defense's perturbation), right after the
    optimizer step (still inside) and after the step (the defense's restore done)."""

    name = "probe"
    card = PROBE_CARD

    def __init__(self) -> None:
        super().__init__()
        self.kernels_differ: list[bool] = []  # a conv/linear kernel changed
        self.anything_differs: list[bool] = []  # any parameter or buffer changed
        self.added: list[dict[str, torch.Tensor]] = []  # inside - clean, per kernel
        self.removed: list[dict[str, torch.Tensor]] = []  # stepped inside - after the step
        self.after_step_weights: dict[str, torch.Tensor] = {}
        self.before: dict[str, torch.Tensor] = {}
        self._stepped: dict[str, torch.Tensor] = {}

    def after_attack(self, state) -> None:
        self.before = {k: v.detach().clone() for k, v in state.model.state_dict().items()}

    @contextlib.contextmanager
    def around_update(self, state):
        now = state.model.state_dict()
        inside = _kernels(state.model)
        changed = {k for k, v in now.items() if not torch.equal(self.before[k], v)}
        self.kernels_differ.append(bool(changed & inside.keys()))
        self.anything_differs.append(bool(changed))
        self.added.append({k: v - self.before[k] for k, v in inside.items()})
        yield
        self._stepped = _kernels(state.model)  # the optimizer has stepped, still inside

    def after_step(self, state) -> None:
        self.after_step_weights = {k: v.detach().clone()
                                   for k, v in state.model.state_dict().items()}
        self.removed.append({k: v - self.after_step_weights[k]
                             for k, v in self._stepped.items()})


def check_weights_clean_outside_update(tmp: Path, suite, splits, defense: Defense,
                                       method: str = "at", perturbs: bool = True) -> None:
    """Inside `around_update` the kernels differ from the clean ones at every step when the
    defense `perturbs` the weights, and nothing (parameter or buffer) differs when it does
    not; after the optimizer step the defense takes off exactly what it put on (nothing,
    bit for bit, when it does not perturb; the same shift up to rounding when it does), so
    no perturbation is left behind; the checkpoint holds the weights after the last step."""
    probe = CleanWeightsProbe()
    trainer = train(tmp, suite, splits, method=method, instances=[defense, probe])
    steps = load_checkpoint(trainer.run_dir / "last.pt")["step"]
    assert steps > 0 and len(probe.kernels_differ) == len(probe.removed) == steps
    if perturbs:
        assert all(probe.kernels_differ)
    else:
        assert not any(probe.anything_differs)
    for step, (added, removed) in enumerate(zip(probe.added, probe.removed)):
        for name, shift in added.items():
            if perturbs:
                torch.testing.assert_close(removed[name], shift, rtol=0, atol=1e-6,
                                           msg=f"step {step}: {name}")
            else:
                assert not removed[name].any(), f"step {step}: {name}"
    saved = model_state(trainer.run_dir)
    assert saved.keys() == probe.after_step_weights.keys()
    for name, weight in probe.after_step_weights.items():
        assert torch.equal(saved[name], weight), name
