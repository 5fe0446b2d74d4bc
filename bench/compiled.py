"""`--compile`: the training forward through `torch.compile` (an option of the trainer, not
of the protocol: it changes no result beyond float tolerance, so it is recorded in the
checkpoint's `train_settings` and kept out of the protocol hash).

The design (`bench/engine.py`, `bench/methods.py`): `state.model` stays the plain module,
and the engine keeps a compiled wrapper of it beside it, `state.compiled_model`
(`torch.compile(model)`, an `OptimizedModule` that holds the same module, so the same
parameters and buffers). Only the base method runs the wrapper: its attack and its training
loss (also when a defense calls `state.attack()` or `state.method_loss()`). Everything else
sees the plain module: defense hooks (they deep-copy it, walk `named_modules()`, load state
dicts into it, perturb its parameters in place, call it directly, all as in eager), the
checkpoints (its `state_dict()`, without the wrapper's `_orig_mod.` prefix), the validation
curves (a separate eager copy) and the evaluator (another process, eager). An in-place
`module.compile()` was not chosen: a defense's `copy.deepcopy(state.model)` would copy the
compiled call, which stays bound to the original module, so the copy would silently run
the original's weights.

- The attack runs the wrapper with every parameter's `requires_grad` off (restored after,
  also on an exception, each to its own value): the graph AOTAutograd builds for the
  attack then differentiates with respect to the input only. (Eager PGD does not freeze:
  eager autograd already skips weight gradients that `autograd.grad(loss, x)` does not
  ask for, and autocast caches the bf16 copy of a weight only while it requires grad, so
  freezing would redo the casts each iteration; inside a compiled graph the casts are
  fused into the graph's kernels and there is no cache to lose.)
- Static shapes (`dynamic=False`): each batch size gets its own graph. The last batch of
  an epoch is smaller unless the suite sets `drop_last`: one more compilation per graph.
  Graphs also differ by BatchNorm mode (train or eval while attacking), by grad mode and
  by `requires_grad` (attack vs training loss): a few graphs per run (torch's recompile
  limit is raised to RECOMPILE_LIMIT). A defense whose batches change size every step
  would go past it, after which the new shapes run eager (correct, not faster).
- Modes: `default`, `max-autotune-no-cudagraphs`, `max-autotune` and `reduce-overhead`
  (CUDA graphs; on the CPU, torch ignores the CUDA-graph part). With CUDA graphs the
  engine marks the start of each training step (`cudagraph_mark_step_begin`).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from bench.config import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: the command line imports this module
    from torch import nn

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
RECOMPILE_LIMIT = 32

__all__ = ["COMPILE_MODES", "CUDAGRAPH_MODES", "add_compile_argument", "compile_mode",
           "compile_model", "frozen_parameters"]


def add_compile_argument(parser: argparse.ArgumentParser) -> None:
    """`--compile [MODE]` of the commands that train (`robench run`, `robench board`)."""
    parser.add_argument("--compile", nargs="?", const="default", default=None,
                        choices=COMPILE_MODES, metavar="MODE",
                        help="train through torch.compile (MODE: torch.compile's mode, one of "
                        f"{', '.join(COMPILE_MODES)}; default: default); results equal eager "
                        "within float tolerance")


def compile_mode(value: bool | str | None, where: str = "compile") -> str | None:
    """The `torch.compile` mode that `value` asks for: None (off) for False/None, "default"
    for True; a mode name is kept. Anything else: ConfigError."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ConfigError(f"{where}: unknown torch.compile mode {value!r}; use one of "
                      f"{', '.join(COMPILE_MODES)} (or leave it off)")


def compile_model(model: nn.Module, mode: str,
                  backend: str | Callable = "inductor") -> nn.Module:
    """`torch.compile(model)` with static shapes. `backend` is for tests (e.g. "aot_eager",
    which traces forward and backward like inductor but runs them eagerly: fast to build);
    the mode applies to inductor only."""
    import torch
    import torch._dynamo.config

    # graphs per compiled function: batch sizes (the last batch, a defense's reward batch)
    # x BatchNorm mode x grad mode; torch's default of 8 is within reach of one run, past
    # it new shapes run eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               RECOMPILE_LIMIT)
    if backend == "inductor":
        return torch.compile(model, mode=mode, dynamic=False)
    return torch.compile(model, backend=backend, dynamic=False)


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """`requires_grad` off for every parameter of `model` in the body; each parameter gets
    its own earlier value back on exit (also on an exception). `.grad` is not touched."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
