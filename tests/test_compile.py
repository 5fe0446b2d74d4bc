"""`--compile` (bench/compiled.py): the compiled path trains to the eager path's weights, saves
the same checkpoint keys, freezes the parameters during the attack only (so the attack's
compiled backward computes the input gradient alone, and `.grad` and each parameter's
`requires_grad` come back as they were), and refuses unknown modes. The engine tests use
the `aot_eager` backend (the same Dynamo capture and AOTAutograd forward/backward split as
inductor, run eagerly: seconds to build); one slow test uses inductor itself."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import with_train
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import bench.methods
from bench.cli import build_parser
from bench.compiled import compile_mode
from bench.config import ConfigError, DefenseSpec, RunSpec
from bench.engine import Trainer
from bench.records import load_checkpoint, read_history

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Dynamo's cache outlives a test (an earlier test's graphs, built by another backend,
    could serve this one's model): start each test from an empty cache."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _train(tmp, suite, splits, method, compile=False, backend="aot_eager",
           mixed_precision=None, defenses=()) -> Trainer:
    shutil.rmtree(tmp, ignore_errors=True)
    trainer = Trainer(RunSpec(suite.name, method, defenses, 0), suite, splits, tmp, device=CPU,
                      progress=False, compile=compile, compile_backend=backend,
                      mixed_precision=mixed_precision)
    trainer.train(stop_after_epochs=1)
    return trainer


def _assert_same_training(eager_dir, compiled_dir, atol: float) -> None:
    eager, compiled = load_checkpoint(eager_dir / "last.pt"), load_checkpoint(
        compiled_dir / "last.pt")
    assert list(compiled["model"]) == list(eager["model"])  # plain keys, same order
    for key, value in eager["model"].items():
        torch.testing.assert_close(compiled["model"][key], value, rtol=0, atol=atol)
    assert compiled["passes"] == eager["passes"]
    row_e, row_c = read_history(eager_dir / "history.jsonl")[0], read_history(
        compiled_dir / "history.jsonl")[0]
    assert row_c["train_loss"] == pytest.approx(row_e["train_loss"], abs=atol)
    assert eager["train_settings"]["compile"] is None


@pytest.mark.parametrize(("method", "batch", "bf16", "defenses"), [
    ("at", 48, False, ()),  # 256 images: five batches of 48 and a last one of 16 (recompiles)
    ("trades", 64, False, ()),
    ("fgsm_rs", 64, True, ()),
    # AWP: the method's loss (compiled) ascended in weight space, weights shifted in place
    ("at", 64, False, (DefenseSpec("awp"),)),
])
def test_compiled_training_equals_eager(tmp_path, smoke_suite, smoke_splits, method, batch,
                                        bf16, defenses):
    """One epoch through the engine: the same weights (aot_eager runs the same aten ops as
    eager; a tolerance of 1e-6 leaves room for decompositions), passes, loss; the
    checkpoint holds the plain module's keys (no `_orig_mod.`) and records the mode."""
    suite = with_train(smoke_suite, batch_size=batch)
    eager = _train(tmp_path / "eager", suite, smoke_splits, method, mixed_precision=bf16,
                   defenses=defenses)
    compiled = _train(tmp_path / "compiled", suite, smoke_splits, method, compile=True,
                      mixed_precision=bf16, defenses=defenses)
    _assert_same_training(eager.run_dir, compiled.run_dir, atol=1e-6)
    ckpt = load_checkpoint(compiled.run_dir / "last.pt")
    assert ckpt["train_settings"]["compile"] == "default"
    assert not any("_orig_mod" in key for key in ckpt["model"])
    assert compiled.model is not compiled.compiled_model  # hooks and curves: the plain one


@pytest.mark.slow
def test_inductor_training_equals_eager(tmp_path, smoke_suite, smoke_splits):
    """The real compiler (inductor, C++ on the CPU; about a minute to build): the same
    weights after one epoch of PGD-AT within 1e-4 (inductor fuses and reorders float ops)."""
    eager = _train(tmp_path / "eager", smoke_suite, smoke_splits, "at")
    compiled = _train(tmp_path / "compiled", smoke_suite, smoke_splits, "at",
                      compile="max-autotune-no-cudagraphs", backend="inductor")
    _assert_same_training(eager.run_dir, compiled.run_dir, atol=1e-4)


class _BackwardOutputs:
    """An aot_eager-like backend that records, for each backward graph it compiles, how
    many gradients it returns (one per input of the forward that requires grad)."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.backend = aot_autograd(fw_compiler=self._forward, bw_compiler=self._backward)

    @staticmethod
    def _forward(gm, example_inputs):
        return make_boxed_func(gm.forward)

    def _backward(self, gm, example_inputs):
        output = next(n for n in gm.graph.nodes if n.op == "output")
        self.counts.append(sum(g is not None for g in output.args[0]))
        return make_boxed_func(gm.forward)


def _built(tmp_path, suite, splits, compile, backend="aot_eager"):
    trainer = Trainer(RunSpec(suite.name, "at", (), 0), suite, splits, tmp_path, device=CPU,
                      progress=False, compile=compile, compile_backend=backend)
    state = trainer.build()
    state.x, state.y, state.index = next(iter(trainer.loader))
    state.eps = suite.train.eps
    return trainer, state


def _record_flags(monkeypatch, state) -> list[list[bool]]:
    """Wrap the method's pgd: the parameters' requires_grad while the attack runs."""
    seen: list[list[bool]] = []
    real = bench.methods.pgd

    def pgd(*args, **kwargs):
        seen.append([p.requires_grad for p in state.model.parameters()])
        return real(*args, **kwargs)

    monkeypatch.setattr(bench.methods, "pgd", pgd)
    return seen


def test_compiled_attack_computes_the_input_gradient_only(tmp_path, smoke_suite, smoke_splits,
                                                          monkeypatch):
    """The attack's backward graph returns one gradient (the input's); the training step's
    returns one per parameter. During the attack every parameter is frozen; afterwards each
    has its own requires_grad back (one was frozen before and stays so) and `.grad` is the
    very tensor it was, unchanged."""
    recorder = _BackwardOutputs()
    trainer, state = _built(tmp_path, smoke_suite, smoke_splits, True, recorder.backend)
    params = list(state.model.parameters())
    params[1].requires_grad_(False)  # a parameter some defense froze
    before = [p.requires_grad for p in params]
    for p in params:
        p.grad = torch.full_like(p, 7.0)
    grads = [p.grad for p in params]
    seen = _record_flags(monkeypatch, state)

    x_adv = trainer.method.attack(state)

    assert seen == [[False] * len(params)]
    assert recorder.counts == [1]  # d loss / d x only: no weight gradient in the graph
    assert [p.requires_grad for p in params] == before
    assert all(p.grad is g and bool((g == 7.0).all()) for p, g in zip(params, grads))
    assert x_adv.shape == state.x.shape and not x_adv.requires_grad

    params[1].requires_grad_(True)
    state.x_adv = x_adv
    trainer.model.train()
    loss = trainer._loss(state)
    loss.backward()
    assert recorder.counts == [1, len(params)]  # the training graph: every weight


def test_parameters_come_back_after_a_failed_compiled_attack(tmp_path, smoke_suite,
                                                             smoke_splits, monkeypatch):
    trainer, state = _built(tmp_path, smoke_suite, smoke_splits, True)

    def broken(*args, **kwargs):
        raise RuntimeError("attack failed")

    monkeypatch.setattr(bench.methods, "pgd", broken)
    with pytest.raises(RuntimeError, match="attack failed"):
        trainer.method.attack(state)
    assert all(p.requires_grad for p in state.model.parameters())


def test_eager_attack_keeps_parameters_trainable(tmp_path, smoke_suite, smoke_splits,
                                                 monkeypatch):
    """Eager: no freezing (autocast caches a weight's bf16 cast across the attack only
    while the weight requires grad; test_autocast_cache.py)."""
    trainer, state = _built(tmp_path, smoke_suite, smoke_splits, False)
    seen = _record_flags(monkeypatch, state)
    trainer.method.attack(state)
    assert seen == [[True] * len(list(state.model.parameters()))]
    assert trainer.compiled_model is None and state.compiled_model is None


def test_compile_values(smoke_suite, smoke_splits, tmp_path):
    assert compile_mode(False) is None and compile_mode(None) is None
    assert compile_mode(True) == "default"
    assert compile_mode("reduce-overhead") == "reduce-overhead"
    with pytest.raises(ConfigError) as err:
        Trainer(RunSpec("smoke", "at", (), 0), smoke_suite, smoke_splits, tmp_path,
                progress=False, compile="fast")
    message = str(err.value)
    assert "\n" not in message and "'fast'" in message and "max-autotune" in message
    with pytest.raises(ConfigError):
        compile_mode(1)


def test_the_training_commands_take_compile(monkeypatch, tmp_path, smoke_suite):
    """`robench run` and `robench board` parse `--compile [MODE]`; the launcher hands the
    mode to the training process, which gives it to the Trainer."""
    parser = build_parser()
    assert parser.parse_args(["run"]).compile is None
    assert parser.parse_args(["run", "--compile"]).compile == "default"
    assert parser.parse_args(["board", "--compile", "reduce-overhead"]).compile == \
        "reduce-overhead"
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--compile", "fast"])

    import bench.engine
    import bench.runner
    from bench import worker

    payloads = []
    monkeypatch.setattr(bench.runner, "run_child",
                        lambda args, payload, *a, **k: payloads.append(payload))
    launch = bench.runner.Launch(tmp_path, compile="max-autotune")
    bench.runner.train_in_child(RunSpec("smoke", "at", (), 0), smoke_suite, launch)
    assert payloads[0]["compile"] == "max-autotune"

    made = []

    class FakeTrainer:
        def __init__(self, *args, **kwargs):
            made.append(kwargs)

        def train(self):
            pass

    monkeypatch.setattr(bench.engine, "Trainer", FakeTrainer)
    worker.train(payloads[0])
    assert made[0]["compile"] == "max-autotune"
