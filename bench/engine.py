"""The shared adversarial-training engine.

The loop, as the pseudocode that documents the defense hooks (`defenses/base.py`):

```
check_run(method, suite)              when the run is planned, before any data: refuse
                                      settings that cannot run (ConfigError)
state.clean_model                     clean_model capability, fresh runs only: a
                                      `standard` model for this seed, trained once per
                                      recipe the defense declares (clean_model_recipe)
                                      and cached (bench/clean_model.py); each defense's
                                      setup sees its own recipe's; None on resume, for
                                      other defenses and once setup has run
setup(state)                          build proxies, EMA, policy nets (may warm-start)
for epoch:
    on_epoch_start(state)
    for batch (x, y, index):           device-resident data, augmented on the device
        state.x_adv = None
        before_attack(state)           may replace state.x / state.y; may set state.x_adv
                                       itself (e.g. to state.x for a clean-training phase)
        clean logits                   only if a defense asks (capability), of that batch
        if state.x_adv is None:        no hook set it: the usual case
            state.x_adv = method.attack  the suite's attack; the method decides its objective
        after_attack(state)            sees x_adv; may compute weight perturbations
        with around_update(state):     context managers, nested in order, closed in reverse
            per-sample loss            the method's (or the `objective` owner's objective_loss)
            add_losses(state)          extra named scalar terms, added to the loss
            sample_weights(state)      per-sample weights, multiplied together;
                                       loss = mean_i(w_i * l_i) + sum(terms)
            gradient_terms(state)      term_grads capability: named scalars (sharing the
                                       loss's graph); the engine puts their parameter
                                       gradients in state.term_grads (one backward each)
            backward
            after_backward(state)      edit gradients (may read state.term_grads)
            optimizer step
        after_step(state)              EMA updates, policy updates
    on_epoch_end(state)
    validation curves                  engine-owned, on a hook-free copy of the model
    eval_models(state) -> {name: module}  only names in `extra_models`, each of the suite's
                                       architecture: saved as state_dicts in the checkpoint
    checkpoints                        best.pt (if validation improved), last.pt, then
                                       history.jsonl; on CUDA snapshotted to host memory
                                       now, serialised once and written in the
                                       background while the next epoch trains
```

Every hook call goes through `bench.hooks.HookGuard`: an exception raised by defense
code, or an output the engine cannot use (a non-scalar or detached term, per-sample
weights of the wrong shape, an extra model of another architecture), ends the run with one
`DefenseError` line naming the defense, its file and line, the hook, epoch and step; the
last checkpoint is kept. The evaluator (`bench/evaluate.py`) never sees a defense: it
scores the weights saved in the checkpoints, in a process of its own. A checkpoint write
runs in a thread (bench/checkpoint_io.py), one at a time: the engine waits for it before
the next, at the end of training, on any error and before an error message names what was
kept; a failed write stops the run with one CheckpointWriteError line. On CUDA the write
overlaps the next epoch's training (a process killed in that window, about a second per
epoch, resumes from the epoch before); on the CPU the engine waits for it at once.

Services on `state` (bench/state.py) that hooks may call: `attack(x, y, **overrides)` (the
suite's attack with logged overrides; PGD-AT also takes `attack_bn="eval"|"train"`, the
BatchNorm mode while attacking), `draw_batch(augment=True)` (a second batch stream;
`augment=False` gives unaugmented images), `data_info` (channels, image side, classes,
normalisation), `log(key, value)` and the pass counters. A `before_attack` hook that sets
`state.x_adv` (a batch shaped like `state.x`, e.g. the clean batch itself during a phase
of clean training) replaces the suite's attack for that batch: the engine runs no attack,
and so counts none of its passes.

The engine owns the threat model, optimizer, schedule (learning rate and, with
`[train] cyclic_momentum`, the SGD momentum, both set per iteration before the hooks run),
mixed precision (bf16 autocast on CUDA, fp32 on CPU; channels_last on both; cuDNN
autotuning on CUDA),
checkpoints and resume. It never names a defense.

`compile` (`--compile [MODE]`, off by default; bench/compiled.py): the base method's
forwards (its attack, with every parameter frozen so that the attack's graph computes input
gradients only, and its training loss) run through `torch.compile` of the model, with
static shapes. `state.model` stays the plain module: hooks, checkpoints (plain state_dict
keys), the curves' eager copy and the evaluator never see the compiled wrapper. Recorded in
the checkpoint's `train_settings`; not part of the protocol (results equal eager within
float tolerance).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench.checkpoint_io import CheckpointWriter
from bench.clean_model import CLEAN_MODELS_DIR, obtain_clean_model
from bench.compiled import CUDAGRAPH_MODES, compile_mode, compile_model
from bench.config import RunSpec, Suite
from bench.curves import curve_point, derive_seed, make_generator, pick_device, to_float
from bench.data import DeviceLoader, Splits, augment_batch
from bench.errors import DefenseError, NonFiniteLossError, RunMismatchError
from bench.hooks import (
    HookGuard,
    check_per_sample,
    check_scalar_terms,
    hook_location,
    source_file,
    source_fingerprint,
)
from bench.methods import build_method
from bench.models import build_model
from bench.records import (
    CheckpointWriteError,
    check_same_params,
    load_checkpoint,
    write_history,
    write_json_atomic,
)
from bench.state import (
    TrainState,
    fixed_convolution_algorithms,
    preserved_bn_stats,
    preserved_global_rng,
)
from defenses.base import Defense
from defenses.registry import build_defenses

NONFINITE_CHECK_EVERY = 50

__all__ = ["NonFiniteLossError", "RunMismatchError", "Trainer", "collect_eval_models",
           "curve_point", "cyclic_scale", "derive_seed", "learning_rate", "make_generator",
           "momentum_at", "pick_device", "to_float"]


def cyclic_scale(suite: Suite, progress_epochs: float) -> float:
    """Where the cyclic schedule stands at a fractional epoch: 0 at the start, rising
    linearly to 1 at `cyclic_peak`, falling linearly to 0 at the end."""
    t = suite.train
    frac, peak = progress_epochs / t.epochs, t.cyclic_peak
    return frac / peak if frac < peak else max(0.0, (1 - frac) / (1 - peak))


def learning_rate(suite: Suite, progress_epochs: float) -> float:
    """Per-iteration learning rate at a fractional epoch."""
    t = suite.train
    frac = progress_epochs / t.epochs
    if t.schedule == "cyclic":
        return t.lr * cyclic_scale(suite, progress_epochs)
    if t.schedule == "constant":
        return t.lr
    lr = t.lr * t.lr_decay ** sum(frac >= m for m in t.milestones)
    if t.warmup_epochs > 0 and progress_epochs < t.warmup_epochs:
        lr *= progress_epochs / t.warmup_epochs
    return lr


def momentum_at(suite: Suite, progress_epochs: float) -> float:
    """Per-iteration SGD momentum: `momentum`, or with `cyclic_momentum = [base, max]`
    the cycle against the lr that torch's CyclicLR runs with cycle_momentum (max at lr 0,
    base at the lr peak): max - (max - base) * cyclic_scale."""
    t = suite.train
    if not t.cyclic_momentum:
        return t.momentum
    base, top = t.cyclic_momentum
    return top - (top - base) * cyclic_scale(suite, progress_epochs)


def current_eps(suite: Suite, progress_epochs: float) -> float:
    t = suite.train
    if t.eps_ramp_epochs > 0:
        return t.eps * min(1.0, progress_epochs / t.eps_ramp_epochs)
    return t.eps


def build_optimizer(model: nn.Module, suite: Suite, device: torch.device) -> torch.optim.SGD:
    t = suite.train
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(
        model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
        nesterov=t.nesterov, **kwargs,
    )


def configure_backend(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per input shape and keep the
    fastest (`cudnn.benchmark`): training is not bit-exact on CUDA anyway, and every
    step of a run repeats the same few shapes. The evaluator (its own process) does not
    set it."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


@dataclass
class TrainOutcome:
    run_dir: Path
    epochs_done: int
    best_epoch: int
    finished: bool


class Trainer:
    """Trains one run in its folder, resuming from `last.pt` when half-done."""

    # device types whose checkpoints are written while the next epoch trains. On the CPU
    # the write would compete with training for the same cores, and a process killed
    # during the overlap (SIGKILL, a lost node) would lose the epoch in flight: there the
    # engine waits for each write. (Tests add "cpu" to exercise the background path.)
    background_checkpoints_on: tuple[str, ...] = ("cuda",)

    def __init__(self, spec: RunSpec, suite: Suite, splits: Splits, run_dir: Path,
                 device: torch.device | None = None, progress: bool = True,
                 mixed_precision: bool | None = None, channels_last: bool | None = None,
                 clean_models_dir: Path | None = None, compile: bool | str | None = False,
                 compile_backend: str | Callable = "inductor") -> None:
        """`mixed_precision` (bf16 autocast) defaults to on for CUDA and off for
        CPU (tests turn it on to exercise the GPU code path); `channels_last`
        defaults to on everywhere (faster convolutions on CUDA and with oneDNN on CPU).
        `clean_models_dir` is the clean-model cache, by default `_clean_models` in the
        run folder's parent (results/<suite>/_clean_models). `compile`: False (eager), True
        (torch.compile's default mode) or a mode name (bench/compiled.py: COMPILE_MODES);
        `compile_backend` is for tests ("aot_eager" compiles in a fraction of the time)."""
        self.spec, self.suite, self.splits = spec, suite, splits
        self.run_dir = Path(run_dir)
        self.clean_models_dir = Path(clean_models_dir or self.run_dir.parent / CLEAN_MODELS_DIR)
        self.label = f"train {spec.row_name} seed {spec.seed}"  # the progress bar's
        self.pretraining: list[dict] = []  # extra pretraining this run used (record)
        self.clean_models: dict = {}  # clean-model recipe -> its model (fresh runs, setup)
        self.device = device or pick_device()
        self.progress = progress
        cuda = self.device.type == "cuda"
        use_bf16 = cuda if mixed_precision is None else mixed_precision
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.channels_last = True if channels_last is None else channels_last
        self.compile_mode = compile_mode(compile, "Trainer(compile=...)")
        self.compile_backend = compile_backend
        self.suite_hash = suite.run_hash(spec.defense_names)
        self.guard = HookGuard(self.run_dir, f"{spec.row_name} seed {spec.seed}")

    # ---- construction -----------------------------------------------------
    def build(self) -> TrainState:
        configure_backend(self.device)
        torch.manual_seed(self.spec.seed)
        self.model = build_model(self.suite.model, self.splits.info).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.defenses: list[Defense] = build_defenses(
            self.spec.defenses, self.spec.method, self.suite)
        for defense in self.defenses:
            defense.to(self.device)
            defense.bind_random_stream(self.spec.seed, self.device)
        self.optimizer = build_optimizer(self.model, self.suite, self.device)
        t = self.suite.train
        self.data_gen = make_generator(self.spec.seed, "data", self.device)
        self.stream_gen = make_generator(self.spec.seed, "second-stream", self.device)
        self.attack_gen = make_generator(self.spec.seed, "attack", self.device)
        self.loader = DeviceLoader(
            self.splits.train, t.batch_size, augment=self.suite.data.augment,
            padding=self.suite.data.crop_padding, shuffle=True, drop_last=t.drop_last,
            device=self.device, generator=self.data_gen, channels_last=self.channels_last)
        self.train_x = self.splits.train.x.to(self.device)
        self.train_y = self.splits.train.y.to(self.device)
        self.train_index = self.splits.train.index.to(self.device)
        self._train_order: torch.return_types.sort | None = None  # for train_x_for
        # the fixed curve subsets, converted once: (x in [0, 1], y) on the device, in the
        # model's memory format (the values do not depend on it)
        self.val_curve = (to_float(self.splits.val_curve.x.to(self.device), self.channels_last),
                          self.splits.val_curve.y.to(self.device))
        self.train_curve = (to_float(self.splits.train_curve.x.to(self.device),
                                     self.channels_last),
                            self.splits.train_curve.y.to(self.device))
        self.method = build_method(self.spec.method, self.attack_gen)
        # the base method's forwards with --compile: a wrapper of the same module (same
        # parameters); state.model stays the plain module for everything else
        self.compiled_model = (compile_model(self.model, self.compile_mode, self.compile_backend)
                               if self.compile_mode else None)
        state = TrainState(
            suite=self.suite, spec=self.spec, device=self.device, model=self.model,
            compiled_model=self.compiled_model,
            optimizer=self.optimizer, epochs=t.epochs, batches_per_epoch=len(self.loader),
            autocast_dtype=self.autocast_dtype, channels_last=self.channels_last,
            data_info=self.splits.info)
        state.attack_fn = lambda x, y, **kw: self._attack_on(state, x, y, **kw)
        state.method_loss_fn = lambda: self._method_loss(state)
        state.batch_fn = self._draw_batch
        self._bind_defenses()
        # the curves run on this copy, which receives the trained weights each epoch: hooks
        # or attributes a defense attaches to the live model never reach the curves (and so
        # never the choice of the best checkpoint); built without touching the global RNG
        with preserved_global_rng(self.device):
            self._curve_model = self._fresh_model()
        return state

    def _fresh_model(self) -> nn.Module:
        """A new model of the suite's architecture, in the engine's memory format."""
        model = build_model(self.suite.model, self.splits.info).to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def _curve_copy(self) -> nn.Module:
        self._curve_model.load_state_dict(self.model.state_dict())
        return self._curve_model

    def _bind_defenses(self) -> None:
        """What the defenses ask of the engine (instances may narrow their class's
        capabilities; tests may swap `self.defenses` after `build`)."""
        self.capabilities = {c for d in self.defenses for c in d.capabilities}
        self.objective_owner = next(
            (d for d in self.defenses if "objective" in d.slots), None)

    # ---- the clean-model service ---------------------------------------------
    @property
    def precision(self) -> str:
        return "fp32" if self.autocast_dtype is None else str(self.autocast_dtype).split(".")[-1]

    def provide_clean_model(self, state: TrainState) -> None:
        """Make the clean model of every recipe the defenses with the capability declare
        (from the cache or trained now; frozen, eval mode), note each as this run's extra
        pretraining, and set `state.clean_model` to the first user's (see
        `clean_model_for`). Torch's global random state is left as it was."""
        users = [d for d in self.defenses if "clean_model" in d.capabilities]
        self.clean_models, self.pretraining = {}, []
        for how in dict.fromkeys(d.clean_model_recipe for d in users):
            with preserved_global_rng(self.device):
                made = obtain_clean_model(self.clean_models_dir, self.suite, self.spec.seed,
                                          self.precision, self._train_clean_model,
                                          self.progress, how)
                model = self._fresh_model()
            model.load_state_dict(made.weights)
            self.clean_models[how] = model.eval().requires_grad_(False)
            self.pretraining.append(
                {**made.info, "for": [d.name for d in users if d.clean_model_recipe == how]})
        state.clean_model = self.clean_model_for(users[0]) if users else None

    def clean_model_for(self, defense: Defense) -> nn.Module | None:
        """The clean model `defense` asked for (its recipe's), or None."""
        if "clean_model" not in defense.capabilities:
            return None
        return self.clean_models.get(defense.clean_model_recipe)

    def _train_clean_model(self, folder: Path, suite: Suite) -> None:
        spec = RunSpec(suite.name, "standard", (), self.spec.seed)
        trainer = Trainer(spec, suite, self.splits, folder, device=self.device,
                          progress=self.progress, mixed_precision=self.autocast_dtype is not None,
                          channels_last=self.channels_last, compile=self.compile_mode or False,
                          compile_backend=self.compile_backend)
        trainer.label = f"clean model (standard) seed {self.spec.seed}"
        trainer.train()

    def _attack_on(self, state: TrainState, x: torch.Tensor, y: torch.Tensor, **kw):
        saved = state.x, state.y
        state.x, state.y = x, y
        try:
            return self.method.attack(state, **kw)
        finally:
            state.x, state.y = saved

    def _method_loss(self, state: TrainState) -> torch.Tensor:
        with state.autocast():
            return self.method.loss(state)

    def _draw_batch(self, augment: bool = True):
        t, n = self.suite.train, len(self.train_y)
        idx = torch.randint(0, n, (t.batch_size,), generator=self.stream_gen, device=self.device)
        x = augment_batch(self.train_x[idx], self.suite.data.augment if augment else "none",
                          self.suite.data.crop_padding, self.stream_gen, self.channels_last)
        return x, self.train_y[idx], self.train_index[idx]

    # ---- checkpoints ------------------------------------------------------
    def _payload(self, state: TrainState, history: list[dict], best: dict,
                 seconds: float) -> dict:
        rng = {"data": self.data_gen.get_state(), "stream": self.stream_gen.get_state(),
               "attack": self.attack_gen.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": 1, "spec": self.spec.to_dict(), "suite_hash": self.suite_hash,
            "epoch": state.epoch, "step": state.step,
            "model": self.model.state_dict(),
            # the defenses' extra models, as plain state_dicts of the suite's architecture:
            # all the evaluator reads of a defense (it never imports defense code)
            "eval_models": self.extra_model_states(state),
            "defenses": [self.guard.run(d, "state_dict (checkpoint)", state, d.state_dict)
                         for d in self.defenses],
            "defense_sources": {d.name: source_fingerprint(d) for d in self.defenses},
            "cards": {d.name: d.card.to_dict() for d in self.defenses},
            "defense_params": {d.name: dict(d.hparams) for d in self.defenses},
            "train_settings": {"precision": self.precision, "channels_last": self.channels_last,
                               "device": self.device.type, "compile": self.compile_mode},
            "optimizer": self.optimizer.state_dict(), "rng": rng, "best": best,
            "history": history, "seconds": seconds,
            "passes": {"forward": state.counter.forward, "backward": state.counter.backward,
                       "input_backward": state.counter.input_backward},
            "pretraining": self.pretraining,
        }

    def extra_model_states(self, state: TrainState | None) -> dict[str, dict]:
        """`{"<defense>.<name>": state_dict}` of the models each defense's `eval_models`
        returns: only names its class declares in `extra_models`, only modules whose
        state_dict fits the suite's architecture (the trained model's keys and shapes)."""
        reference = {k: v.shape for k, v in self.model.state_dict().items()}
        out: dict[str, dict] = {}
        for defense in self.defenses:
            models = self.guard.call(defense, "eval_models", state)
            if not isinstance(models, dict):
                raise self.guard.error(defense, "eval_models", state, f"returned "
                                       f"{type(models).__name__}; expected a dict of "
                                       "{name: model}")
            for name, module in models.items():
                problem = _extra_model_problem(name, module, defense.extra_models, reference)
                if problem:
                    raise self.guard.error(defense, "eval_models", state, problem)
                out[f"{defense.name}.{name}"] = module.state_dict()
        return out

    def check_suite_hash(self, ckpt: dict, remedy: str) -> None:
        """Refuse a checkpoint made under another version of the suite's protocol or of
        its settings for this run's defenses."""
        found = str(ckpt.get("suite_hash"))
        if found != self.suite_hash:
            raise RunMismatchError(
                f"{self.run_dir} was trained under another version of suite "
                f"{self.suite.name!r} or of its settings for {self.spec.row_name} (hash "
                f"{found[:12]} vs {self.suite_hash[:12]}); {remedy}")

    def _restore(self, state: TrainState, ckpt: dict) -> tuple[list[dict], dict, float]:
        if ckpt.get("spec") != self.spec.to_dict():
            raise RunMismatchError(
                f"{self.run_dir / 'last.pt'} belongs to another run ({ckpt.get('spec')}); "
                f"remove the folder or pick another results directory")
        self.check_suite_hash(ckpt, "delete the run folder to start over")
        if ckpt.get("defense_params") is not None:
            check_same_params(ckpt["defense_params"],
                              {d.name: dict(d.hparams) for d in self.defenses},
                              f"{self.run_dir / 'last.pt'} was trained with other parameters "
                              f"for {self.spec.row_name}", "delete the run folder to start over")
        self.model.load_state_dict(ckpt["model"])
        for defense, sd in zip(self.defenses, ckpt["defenses"], strict=True):
            self.guard.run(defense, "load_state_dict (resume)", state,
                           lambda d=defense, sd=sd: d.load_state_dict(sd))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        rng = ckpt["rng"]
        self.data_gen.set_state(rng["data"])
        self.stream_gen.set_state(rng["stream"])
        self.attack_gen.set_state(rng["attack"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        state.epoch, state.step = ckpt["epoch"], ckpt["step"]
        state.counter.forward = ckpt["passes"]["forward"]
        state.counter.backward = ckpt["passes"]["backward"]
        state.counter.input_backward = ckpt["passes"].get("input_backward", 0)
        self.pretraining = list(ckpt.get("pretraining", []))
        return list(ckpt["history"]), dict(ckpt["best"]), float(ckpt["seconds"])

    # ---- the loop -----------------------------------------------------------
    def train(self, stop_after_epochs: int | None = None) -> TrainOutcome:
        """Train to the suite's last epoch (or stop early after
        `stop_after_epochs` completed epochs, as an interruption would)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = self.build()
        last_path = self.run_dir / "last.pt"
        resuming = last_path.exists()
        history: list[dict] = []
        best = {"epoch": 0, "val_robust": -1.0}
        seconds = 0.0
        if not resuming:
            self.provide_clean_model(state)
        for defense in self.defenses:
            state.clean_model = self.clean_model_for(defense)  # its recipe's; None on resume
            self.guard.call(defense, "setup", state)  # proxies/EMA; a checkpoint's values win
        state.clean_model = None  # setup has used it; it is not kept around
        self.clean_models = {}
        if resuming:
            history, best, seconds = self._restore(state, load_checkpoint(last_path))
        else:
            write_json_atomic(self.run_dir / "spec.json", {
                "spec": self.spec.to_dict(), "run_id": self.spec.run_id,
                "suite_hash": self.suite_hash})
        epochs = self.suite.train.epochs
        bar = _epoch_bar(self.progress, epochs, state.epoch, self.label)
        writer = CheckpointWriter()
        self.guard.settle_writes = writer.settle  # error messages name what is on disk
        try:
            best_epoch = self._epochs(state, stop_after_epochs, history, best, seconds,
                                      writer, bar)
        except BaseException as exc:  # the write in flight still lands; then the error
            try:
                writer.wait()
            except CheckpointWriteError as failed:
                exc.add_note(str(failed))
            raise
        writer.wait()
        if bar is not None:
            bar.close()
        return TrainOutcome(self.run_dir, state.epoch, best_epoch, state.epoch >= epochs)

    def _epochs(self, state: TrainState, stop_after_epochs: int | None, history: list[dict],
                best: dict, seconds: float, writer: CheckpointWriter, bar) -> int:
        """The epoch loop of `train`; returns the best epoch. Each epoch's checkpoint
        (best.pt, last.pt, then history.jsonl) is written by `writer`: on CUDA from a
        snapshot, in the background while the next epoch trains; elsewhere at once."""
        epochs = self.suite.train.epochs
        while state.epoch < epochs:
            if stop_after_epochs is not None and state.epoch >= stop_after_epochs:
                break
            writer.check()  # a write that failed during the last epoch stops the run now
            start, cpu_start = time.perf_counter(), time.process_time()
            train_stats = self._train_epoch(state)
            train_seconds = time.perf_counter() - start
            # on the CPU, the only device where it is recorded, no write overlaps training
            train_cpu_seconds = time.process_time() - cpu_start
            curve_start = time.perf_counter()
            curve_model = self._curve_copy()
            with fixed_convolution_algorithms():  # as the evaluator's recheck
                val, trn = self._curves(curve_model)
            curve_seconds = time.perf_counter() - curve_start
            state.epoch += 1
            seconds += train_seconds
            row = {"epoch": state.epoch, "lr": state.lr, "eps": state.eps, **train_stats,
                   "train_robust": trn.robust, "train_clean": trn.clean,
                   "val_robust": val.robust, "val_clean": val.clean,
                   **({"val_fgsm": val.fgsm} if val.fgsm is not None else {}),
                   "seconds": train_seconds, "curve_seconds": curve_seconds,
                   "forward_passes": state.counter.forward,
                   "backward_passes": state.counter.backward}
            if self.device.type == "cpu":  # CPU results are bit-exact only at a fixed count
                row["cpu_threads"] = torch.get_num_threads()
                # the process's CPU time: unlike wall time, other jobs barely change it
                row["cpu_seconds"] = train_cpu_seconds
            history.append(row)
            improved = val.robust > best["val_robust"]
            if improved:
                best = {"epoch": state.epoch, "val_robust": val.robust}
            payload = self._payload(state, history, best, seconds)
            # history.jsonl only once last.pt is on disk
            writer.submit(payload, ([self.run_dir / "best.pt"] if improved else [])
                          + [self.run_dir / "last.pt"],
                          then=functools.partial(write_history, self.run_dir / "history.jsonl",
                                                 list(history)),
                          what=f"the checkpoint after epoch {state.epoch}",
                          # elsewhere on disk before the next epoch starts
                          background=self.device.type in self.background_checkpoints_on)
            if bar is not None:
                fgsm = {} if val.fgsm is None else {"val_fgsm": f"{val.fgsm:.3f}"}
                bar.set_postfix(val_rob=f"{val.robust:.3f}", train_rob=f"{trn.robust:.3f}",
                                **fgsm, best=best["epoch"])
                bar.update(1)
        return best["epoch"]

    def _curves(self, model: nn.Module):
        """This epoch's validation and training curve points (`bench/curves.py`)."""
        seed = derive_seed(self.spec.seed, "curves")
        val = curve_point(model, *self.val_curve, self.suite, seed, self.autocast_dtype,
                          fgsm=self.suite.curves.fgsm)
        trn = curve_point(model, *self.train_curve, self.suite, seed, self.autocast_dtype)
        return val, trn

    def _train_epoch(self, state: TrainState) -> dict[str, float]:
        self.model.train()
        for defense in self.defenses:
            self.guard.call(defense, "on_epoch_start", state)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        seen = 0
        for x, y, index in self.loader:
            loss = self.train_step(state, x, y, index)
            batch = len(state.y)
            loss_sum += loss.detach().float() * batch
            correct += (state.logits.detach().argmax(1) == state.y).sum()
            seen += batch
            state.step += 1
            if state.step % NONFINITE_CHECK_EVERY == 0:
                self._check_finite(loss_sum, state)
        self._check_finite(loss_sum, state)
        for defense in self.defenses:
            self.guard.call(defense, "on_epoch_end", state)
        stats = {"train_loss": float(loss_sum) / max(1, seen),
                 "train_adv_acc": float(correct) / max(1, seen)}
        stats.update(state.pop_logs())
        return stats

    def train_step(self, state: TrainState, x: torch.Tensor, y: torch.Tensor,
                   index: torch.Tensor) -> torch.Tensor:
        """One training iteration on a batch: attack, hooks, update. Returns the loss."""
        model, optimizer = self.model, self.optimizer
        if self.compile_mode in CUDAGRAPH_MODES:  # a new step: CUDA graphs may reuse memory
            torch.compiler.cudagraph_mark_step_begin()
        fractional = state.epoch + state.step_in_epoch / state.batches_per_epoch
        state.lr = learning_rate(self.suite, fractional)
        state.eps = current_eps(self.suite, fractional)
        momentum = momentum_at(self.suite, fractional)
        for group in optimizer.param_groups:
            group["lr"] = state.lr
            group["momentum"] = momentum
        state.x, state.y, state.index = x, y, index
        state.x_adv = None  # a before_attack hook may set it: then no attack runs
        state.term_grads = {}
        if "raw_batch" in self.capabilities:
            state.raw_x = to_float(self.train_x_for(index), self.channels_last)
        for defense in self.defenses:
            self.guard.call(defense, "before_attack", state)
            if state.x_adv is not None and not (torch.is_tensor(state.x_adv)
                                                and state.x_adv.shape == state.x.shape):
                raise self.guard.error(defense, "before_attack", state, (
                    "set state.x_adv to something other than a batch shaped like state.x; "
                    "a hook that sets it replaces the attack for this batch"))
        if "clean_logits" in self.capabilities:  # of the batch as the defenses left it
            with torch.no_grad(), preserved_bn_stats(model), state.autocast():
                state.clean_logits = model(state.x).float()
            state.counter.add(fwd=1)
        if state.x_adv is None:
            state.x_adv = self.method.attack(state)
        for defense in self.defenses:
            self.guard.call(defense, "after_attack", state)
        model.train()
        with contextlib.ExitStack() as stack:
            for defense in self.defenses:
                stack.enter_context(self.guard.around_update(defense, state))
            optimizer.zero_grad(set_to_none=True)
            loss = self._loss(state)
            if "term_grads" in self.capabilities:
                self._term_grads(state)
            if not loss.requires_grad:
                names = ", ".join(f"{d.name!r} ({source_file(d)})" for d in self.defenses)
                raise DefenseError(
                    f"the training loss of {self.guard.row} at epoch {state.epoch + 1}, step "
                    f"{state.step} has no autograd graph: one of the defenses {names} turned "
                    f"off gradients or detached the model's outputs; {self.guard.kept(state)}")
            loss.backward()
            state.counter.add(bwd=1)
            for defense in self.defenses:
                self.guard.call(defense, "after_backward", state)
            optimizer.step()
        if self.compile_mode in CUDAGRAPH_MODES:  # a later replay may reuse its memory
            state.logits = state.logits.detach().clone()
        for defense in self.defenses:
            self.guard.call(defense, "after_step", state)
        return loss

    def train_x_for(self, index: torch.Tensor) -> torch.Tensor:
        """Unaugmented training images of the batch (raw_batch capability)."""
        if self._train_order is None:
            self._train_order = torch.sort(self.train_index)
        order = self._train_order
        positions = torch.searchsorted(order.values, index)
        return self.train_x[order.indices[positions]]

    def _loss(self, state: TrainState) -> torch.Tensor:
        with state.autocast():
            per_sample = None
            if self.objective_owner is not None:
                per_sample = check_per_sample(
                    self.guard, self.objective_owner, "objective_loss", state,
                    self.guard.call(self.objective_owner, "objective_loss", state),
                    need_grad=torch.is_grad_enabled())
            if per_sample is None:
                per_sample = self.method.loss(state)
        state.per_sample_loss = per_sample
        terms: dict[str, torch.Tensor] = {}
        weights = None
        for defense in self.defenses:
            extra = check_scalar_terms(self.guard, defense, "add_losses", state,
                                       self.guard.call(defense, "add_losses", state),
                                       need_grad=per_sample.requires_grad)
            if extra:
                for name, value in extra.items():
                    key = f"{defense.name}.{name}"
                    terms[key] = value.float()
                    state.log(f"loss.{key}", value)
        for defense in self.defenses:
            w = check_per_sample(self.guard, defense, "sample_weights", state,
                                 self.guard.call(defense, "sample_weights", state),
                                 need_grad=False)
            if w is not None:
                weights = w if weights is None else weights * w
        per_sample = per_sample.float()
        loss = (per_sample * weights).mean() if weights is not None else per_sample.mean()
        for value in terms.values():
            loss = loss + value
        return loss

    def _term_grads(self, state: TrainState) -> None:
        """term_grads capability: the parameter gradient of each scalar that a defense's
        `gradient_terms` names, as `state.term_grads["<defense>.<term>"]` (a list aligned
        with `model.parameters()`, zeros where a parameter does not enter the term). The
        loss's graph is kept for the training backward; `.grad` is not touched."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        for defense in self.defenses:
            if "term_grads" not in defense.capabilities:
                continue
            terms = check_scalar_terms(self.guard, defense, "gradient_terms", state,
                                       self.guard.call(defense, "gradient_terms", state),
                                       need_grad=True)
            for name, value in terms.items():
                grads = torch.autograd.grad(value, params, retain_graph=True,
                                            allow_unused=True)
                state.counter.add(bwd=1)
                state.term_grads[f"{defense.name}.{name}"] = [
                    torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    def _check_finite(self, loss_sum: torch.Tensor, state: TrainState) -> None:
        if math.isfinite(float(loss_sum)):
            return
        bad = _nonfinite_terms(state.logs)
        culprits = []
        for defense in self.defenses:
            terms = [key for key in bad if key.startswith(f"{defense.name}.")]
            if terms:
                culprits.append(f"defense {defense.name!r} "
                                f"({hook_location(defense, 'add_losses')}) in add_losses "
                                f"returned {', '.join(terms)}")
        cause = ("; non-finite defense loss terms: " + "; ".join(culprits)) if culprits else ""
        raise NonFiniteLossError(
            f"non-finite training loss in epoch {state.epoch + 1} (step {state.step}) of "
            f"run {self.spec.run_id} ({self.guard.row}){cause}; training stopped. Lower the "
            f"learning rate or a defense's strength (that is a new run), or fix the defense; "
            f"{self.guard.kept(state)}")


def _nonfinite_terms(logs: dict[str, list]) -> list[str]:
    """The logged defense loss terms (`loss.<defense>.<term>`) with a non-finite value this
    epoch, as `<defense>.<term>`."""
    return [key.removeprefix("loss.") for key, values in logs.items()
            if key.startswith("loss.") and not all(math.isfinite(float(v)) for v in values)]


def _extra_model_problem(name: object, module: object, declared: tuple[str, ...],
                         reference: dict[str, torch.Size]) -> str | None:
    """Why an `eval_models` entry cannot be saved for evaluation (None when it can)."""
    if not isinstance(name, str) or name not in declared:
        return (f"returned model {name!r}, which the class does not declare: list the names "
                f"of its extra models in `extra_models` (declared: {list(declared)})")
    if not isinstance(module, nn.Module):
        return f"model {name!r} is a {type(module).__name__}, not a torch.nn.Module"
    try:
        shapes = {k: v.shape for k, v in module.state_dict().items()}
    except Exception as exc:  # e.g. an uninitialised lazy module
        return (f"model {name!r} is not of the suite's architecture: its state_dict cannot be "
                f"read ({type(exc).__name__}: {exc})")
    if shapes != reference:
        missing = sorted(set(reference) - set(shapes))[:3]
        extra = sorted(set(shapes) - set(reference))[:3]
        wrong = sorted(k for k in set(shapes) & set(reference) if shapes[k] != reference[k])[:3]
        return (f"model {name!r} is not of the suite's architecture (missing {missing}, "
                f"unexpected {extra}, other shapes {wrong}); extra models are evaluated as "
                "state_dicts of the suite's model")
    return None


def _epoch_bar(enabled: bool, epochs: int, done: int, label: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=epochs, initial=done, desc=label, unit="epoch", dynamic_ncols=True)


def collect_eval_models(model: nn.Module, defenses: list[Defense],
                        state: TrainState) -> dict[str, nn.Module]:
    """The trained model plus each defense's `eval_models`, named `defense.name`."""
    models: dict[str, nn.Module] = {"model": model}
    for defense in defenses:
        for name, module in defense.eval_models(state).items():
            models[f"{defense.name}.{name}"] = module
    return models


