"""Calling defense code from the engine: every hook call goes through `HookGuard`, which
turns an exception raised by a defense, or an output the engine cannot use, into one
`DefenseError` line that names the defense, its file and line, the hook, the epoch and
step, the message, what was kept and how to go on."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bench.errors import DefenseError, NonFiniteLossError

if TYPE_CHECKING:
    from bench.state import TrainState
    from defenses.base import Defense

# raised through the guard unchanged: already one clear line, or not an error of the defense
PASS_THROUGH = (DefenseError, NonFiniteLossError, KeyboardInterrupt, SystemExit)


def source_file(defense: Defense | type) -> str | None:
    """The file that defines the defense's class (None for classes without one)."""
    cls = defense if isinstance(defense, type) else type(defense)
    try:
        return inspect.getsourcefile(cls)
    except (TypeError, OSError):
        return None


def source_fingerprint(defense: Defense | type) -> dict[str, Any]:
    """Where the defense's code lives and the sha256 of that file (for the record)."""
    cls = defense if isinstance(defense, type) else type(defense)
    path = source_file(cls)
    digest = None
    if path and Path(path).is_file():
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "file": path, "sha256": digest}


def raising_line(defense: Defense, exc: BaseException) -> str:
    """`file:line` of the innermost traceback frame in the defense's own file: where the
    defense's code raised (just the file when the error arose in a library it called)."""
    own = source_file(defense)
    frames = traceback.extract_tb(exc.__traceback__)
    chosen = next((f for f in reversed(frames) if own and f.filename == own), None)
    return f"{chosen.filename}:{chosen.lineno}" if chosen else (own or "?")


# called while a checkpoint is written (the engine has counted the epoch just trained) or
# before the first step (setup, and a resume's loading of the defenses' state)
CHECKPOINT_HOOKS = ("eval_models", "state_dict (checkpoint)")
START_HOOKS = ("setup", "load_state_dict (resume)")


def hook_location(defense: Defense, hook: str) -> str:
    """`file:line` of the hook's definition when the defense's own file defines it (an
    output the engine refuses was made there), else the defense's file."""
    own = source_file(defense)
    method = getattr(type(defense), hook.split(" ")[0], None)
    try:
        lines = inspect.getsourcelines(method)  # unwraps @contextmanager
        path = inspect.getsourcefile(inspect.unwrap(method))
    except (TypeError, OSError):
        return own or "?"
    return f"{path}:{lines[1]}" if own and path == own else (own or "?")


def when(hook: str, state: TrainState | None) -> str:
    """' at epoch E, step S' (1-based epoch), worded for the hooks not called in a step."""
    if state is None:
        return ""
    if hook in CHECKPOINT_HOOKS:
        return f" at the checkpoint after epoch {state.epoch} (step {state.step})"
    if hook in START_HOOKS:
        return " before the first step"
    return f" at epoch {state.epoch + 1}, step {state.step}"


def checkpoint_epoch(path: Path) -> int | None:
    """The epoch the checkpoint `path` was written after; None if it cannot be read."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["epoch"])
    except Exception:  # unreadable: the message still says where it is
        return None


class HookGuard:
    """Calls hooks of one run's defenses and words their failures (see the module doc)."""

    def __init__(self, run_dir: Path, row: str) -> None:
        self.run_dir = Path(run_dir)
        self.row = row
        # called before `kept` reads last.pt: the engine sets it to wait for a checkpoint
        # still being written in the background, so the message names what is on disk
        self.settle_writes: Callable[[], None] = lambda: None

    def kept(self, state: TrainState | None = None) -> str:
        """What of the run is on disk and how to go on. The epoch comes from `last.pt`
        itself (a failure while writing a checkpoint leaves the previous one)."""
        self.settle_writes()
        last = self.run_dir / "last.pt"
        if last.exists():
            done = checkpoint_epoch(last)
            which = "the last checkpoint" if done is None else f"the checkpoint after epoch {done}"
            return (f"kept: {which} in {last}; fix the defense, then "
                    f"run the same command again to resume from it (or delete {self.run_dir} "
                    "to start over)")
        return ("nothing of this run was kept yet; fix the defense and run the same command "
                "again (other runs are kept)")

    def error(self, defense: Defense, hook: str, state: TrainState | None, problem: str,
              where: str | None = None) -> DefenseError:
        return DefenseError(
            f"defense {defense.name!r} ({where or hook_location(defense, hook)}) in {hook}"
            f"{when(hook, state)} of {self.row}: {problem}; {self.kept(state)}")

    def wrap(self, defense: Defense, hook: str, state: TrainState | None,
             exc: BaseException) -> DefenseError:
        message = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
        return self.error(defense, hook, state, message, raising_line(defense, exc))

    def call(self, defense: Defense, hook: str, state: TrainState | None) -> Any:
        """`defense.<hook>(state)`, guarded."""
        return self.run(defense, hook, state, lambda: getattr(defense, hook)(state))

    def run(self, defense: Defense, what: str, state: TrainState | None,
            action: Callable[[], Any]) -> Any:
        """`action()` (defense code), guarded: a failure becomes one DefenseError line."""
        try:
            return action()
        except PASS_THROUGH:
            raise
        except Exception as exc:
            raise self.wrap(defense, what, state, exc) from exc

    @contextlib.contextmanager
    def around_update(self, defense: Defense, state: TrainState) -> Iterator[None]:
        """The defense's `around_update` context, with failures on entry and exit worded."""
        try:
            manager = defense.around_update(state)
            manager.__enter__()
        except PASS_THROUGH:
            raise
        except Exception as exc:
            raise self.wrap(defense, "around_update (entering)", state, exc) from exc
        try:
            yield
        except BaseException as inner:
            try:
                suppressed = manager.__exit__(type(inner), inner, inner.__traceback__)
            except BaseException as exc:
                if exc is inner or isinstance(exc, PASS_THROUGH):
                    raise
                raise self.wrap(defense, "around_update (leaving)", state, exc) from exc
            if not suppressed:
                raise
            raise self.error(defense, "around_update", state,
                             f"swallowed an exception of the training step ({inner!r})"
                             ) from inner
        else:
            try:
                manager.__exit__(None, None, None)
            except PASS_THROUGH:
                raise
            except Exception as exc:
                raise self.wrap(defense, "around_update (leaving)", state, exc) from exc


def check_scalar_terms(guard: HookGuard, defense: Defense, hook: str, state: TrainState,
                       terms: Any, need_grad: bool) -> dict[str, torch.Tensor]:
    """`add_losses` / `gradient_terms` output: None or {name: 0-dim floating tensor} (with a
    graph when the loss has one)."""
    if terms is None:
        return {}
    if not isinstance(terms, dict):
        raise guard.error(defense, hook, state, f"returned {type(terms).__name__}; expected "
                          "None or a dict of named scalar tensors")
    for name, value in terms.items():
        if not isinstance(name, str):
            raise guard.error(defense, hook, state, f"term name {name!r} is not a string")
        if not (torch.is_tensor(value) and value.ndim == 0 and value.is_floating_point()):
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise guard.error(defense, hook, state, f"term {name!r} is {shape}; each term "
                              "must be a floating-point scalar tensor (reduce it first)")
        if need_grad and not value.requires_grad:
            raise guard.error(defense, hook, state, f"term {name!r} is detached (no autograd "
                              "graph), so it cannot train anything; compute it from the "
                              "model's outputs without torch.no_grad() or .detach()")
    return terms


def check_per_sample(guard: HookGuard, defense: Defense, hook: str, state: TrainState,
                     value: Any, need_grad: bool) -> torch.Tensor | None:
    """`sample_weights` / `objective_loss` output: None or one float per example."""
    if value is None:
        return None
    n = len(state.y) if state.y is not None else -1
    if not torch.is_tensor(value) or not value.is_floating_point() or tuple(value.shape) != (n,):
        got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise guard.error(defense, hook, state, f"returned {got}; expected a floating-point "
                          f"tensor of shape ({n},), one value per example of the batch")
    if need_grad and not value.requires_grad:
        raise guard.error(defense, hook, state, "returned a detached loss (no autograd graph); "
                          "compute it from the model's outputs without torch.no_grad() or "
                          ".detach()")
    return value
