"""`TrainState`: everything a defense hook may read and write during training.

Hooks read the protocol (`suite`, `eps`, `epoch`, `lr`) and the current batch,
and write only the fields their hook documents (`x`/`y` in `before_attack`, or `x_adv`
there to skip the attack, weights inside `around_update`, extra terms in `add_losses`,
...). Services:
`attack()` (the suite's attack, with explicit logged overrides), `draw_batch()`
(an independent second batch stream), `log()` and the pass counters; on request
(capabilities), `clean_model` in `setup` and `term_grads` in `after_backward`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bench.config import RunSpec, Suite

if TYPE_CHECKING:
    from bench.data import DatasetInfo


def bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The BatchNorm buffers of `model` (running mean and variance, batch counts)."""
    return [buf for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            for buf in module.buffers()]


@contextlib.contextmanager
def preserved_bn_stats(model: nn.Module) -> Iterator[None]:
    """Run extra forwards in train mode without touching BatchNorm running
    statistics (they are restored on exit, bit for bit). Use it before the batch's
    training forward (in `before_attack`, `after_attack` or on entering `around_update`):
    the in-place restore after that forward would invalidate its autograd graph.
    Saved and restored with one `_foreach_copy_` per dtype (statistics, batch counts)
    instead of one copy kernel per buffer."""
    buffers = bn_buffers(model)
    saved = [torch.empty_like(buf) for buf in buffers]
    _grouped_copy_(saved, buffers)
    try:
        yield
    finally:
        _grouped_copy_(buffers, saved)


def _grouped_copy_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """dst[i].copy_(src[i]) for all i, one `_foreach_copy_` per (device, dtype) of dst (a
    GPU's batched kernel takes tensors of one dtype)."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(dst):
        groups.setdefault((t.device, t.dtype), []).append(i)
    with torch.no_grad():
        for indices in groups.values():
            torch._foreach_copy_([dst[i] for i in indices], [src[i] for i in indices])


@contextlib.contextmanager
def shifted_weights(params: list[torch.Tensor], shifts: list[torch.Tensor]) -> Iterator[None]:
    """Add `shifts` to `params` in place for the body, subtract them afterwards (also on
    an exception): the pattern of weight-perturbation defenses (perturb, train, restore)."""
    params, shifts = list(params), list(shifts)
    if len(params) != len(shifts):
        raise ValueError(f"shifted_weights: {len(params)} parameters but {len(shifts)} shifts")
    if params:
        with torch.no_grad():
            torch._foreach_add_(params, shifts)
    try:
        yield
    finally:
        if params:
            with torch.no_grad():
                torch._foreach_sub_(params, shifts)


@contextlib.contextmanager
def preserved_global_rng(device: torch.device) -> Iterator[None]:
    """Restore torch's global CPU generator (and the default generator of a CUDA
    `device`) on exit, whatever the body drew from them."""
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()
             ) if cuda else None
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(index) if cuda else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda:
            torch.cuda.set_rng_state(cuda_state, index)


@contextlib.contextmanager
def seeded_global_rng(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """Seed torch's global CPU generator (and the default generator of a CUDA `device`)
    from a number drawn from `generator`; restore both on exit."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator,
                             device=generator.device).item())
    with preserved_global_rng(device):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device.index if device.index is not None
                                   else torch.cuda.current_device()):
                torch.cuda.manual_seed(seed)
        yield


@contextlib.contextmanager
def fixed_convolution_algorithms() -> Iterator[None]:
    """cuDNN's default algorithm choice inside, autotuning (`cudnn.benchmark`, which the
    engine turns on for CUDA training) off: for inputs whose shape changes from call to
    call, where autotuning would time every convolution again for each new shape, and for
    the validation curves (the evaluator does not autotune). Restored on exit."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def kernel_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Conv and linear kernels: parameters with more than one dimension whose
    name ends in `weight` (what weight-perturbation defenses perturb)."""
    return [
        (name, p) for name, p in model.named_parameters()
        if p.ndim > 1 and name.endswith("weight")
    ]


@dataclass
class PassCounter:
    """Forward and backward passes over a batch, for the cost column. `backward` counts
    every backward; `input_backward` those that compute input gradients only (the
    attacks'), so `backward - input_backward` are the ones that also compute weight
    gradients (training, weight perturbations, per-term gradients)."""

    forward: int = 0
    backward: int = 0
    input_backward: int = 0

    def add(self, fwd: int = 0, bwd: int = 0, input_bwd: int = 0) -> None:
        """`bwd`: backwards with weight gradients; `input_bwd`: with input gradients only."""
        self.forward += fwd
        self.backward += bwd + input_bwd
        self.input_backward += input_bwd

    def absorb(self, counter: dict) -> None:
        """An attack's count (`attacks/pgd.py`): its backwards are input gradients only."""
        self.forward += counter.get("fwd", 0)
        self.backward += counter.get("bwd", 0)
        self.input_backward += counter.get("bwd", 0)

    def work(self) -> float:
        """The passes in forward-pass units: a backward with input gradients only costs
        about one forward, one that also computes weight gradients about two."""
        return self.forward + self.input_backward + 2 * (self.backward - self.input_backward)


@dataclass
class TrainState:
    suite: Suite
    spec: RunSpec
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    epochs: int
    batches_per_epoch: int
    autocast_dtype: torch.dtype | None
    channels_last: bool
    # the dataset's channels, image side, classes and normalisation (for defenses that
    # build networks of their own, e.g. a policy network)
    data_info: DatasetInfo | None = None
    # the engine's, with --compile (bench/compiled.py): torch.compile's wrapper of `model`
    # (the same parameters), which the base method runs for its attack and training loss;
    # hooks use `model`
    compiled_model: nn.Module | None = None
    # progress
    epoch: int = 0  # 0-based epoch being trained
    step: int = 0  # global iteration counter
    lr: float = 0.0
    eps: float = 0.0  # current training epsilon (after any ramp)
    # the batch
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    index: torch.Tensor | None = None  # dataset_index capability
    raw_x: torch.Tensor | None = None  # raw_batch capability (unaugmented)
    clean_logits: torch.Tensor | None = None  # clean_logits capability
    x_adv: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # logits of the training forward
    per_sample_loss: torch.Tensor | None = None
    # term_grads capability: "<defense>.<term>" -> the gradient of that defense's
    # `gradient_terms` scalar w.r.t. each trainable parameter (aligned with
    # `[p for p in model.parameters() if p.requires_grad]`); filled before the backward,
    # read in `after_backward`, emptied at the next batch
    term_grads: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    # clean_model capability: during `setup` of a fresh run, a frozen eval-mode model of the
    # suite's architecture trained with `standard` for this seed (bench/clean_model.py);
    # None on resume and after setup (keep what you need in the defense: it is checkpointed)
    clean_model: nn.Module | None = None
    # services, bound by the engine
    attack_fn: Callable[..., torch.Tensor] | None = None
    method_loss_fn: Callable[[], torch.Tensor] | None = None
    batch_fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    counter: PassCounter = field(default_factory=PassCounter)
    logs: dict[str, list[float]] = field(default_factory=dict)
    attack_overrides_log: list[dict] = field(default_factory=list)

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1] (fractional epochs)."""
        return (self.epoch + self.step_in_epoch / max(1, self.batches_per_epoch)) / self.epochs

    @property
    def step_in_epoch(self) -> int:
        return self.step - self.epoch * self.batches_per_epoch

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def attack(self, x: torch.Tensor, y: torch.Tensor, **overrides: Any) -> torch.Tensor:
        """The suite's training attack on (x, y). Overrides (e.g. `steps=1`) are
        recorded once per distinct set so the record shows them."""
        if overrides and overrides not in self.attack_overrides_log:
            self.attack_overrides_log.append(dict(overrides))
        assert self.attack_fn is not None
        return self.attack_fn(x, y, **overrides)

    def method_loss(self) -> torch.Tensor:
        """Per-sample loss of the base method at the current weights, on the
        current batch (`x`, `x_adv`, `y`); builds a graph. Used by defenses that
        ascend the training objective (weight perturbations). Counts one forward."""
        assert self.method_loss_fn is not None
        return self.method_loss_fn()

    def draw_batch(self, augment: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch (x, y, index) from a second, independent stream over the
        training split: sampling it never shifts the main data order. With
        `augment=False` the images are unaugmented (the suite's augmentation draws
        nothing from the stream then)."""
        assert self.batch_fn is not None
        return self.batch_fn(augment)

    def log(self, key: str, value: float | torch.Tensor) -> None:
        """Record a scalar; the epoch mean lands in `history.jsonl`."""
        if isinstance(value, torch.Tensor):
            value = value.detach()
        self.logs.setdefault(key, []).append(value)  # type: ignore[arg-type]

    def pop_logs(self) -> dict[str, float]:
        """The epoch mean of each logged key (fp32, as a float), and empty the logs. The
        tensors logged on a device reach the host in one copy per device, not one each."""
        logs = {key: values for key, values in self.logs.items() if values}
        self.logs = {}
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for values in logs.values():
            for v in values:
                if isinstance(v, torch.Tensor):
                    by_device.setdefault(v.device, []).append(v)
        host: dict[int, torch.Tensor] = {}  # id of a logged tensor -> its fp32 host copy
        for tensors in by_device.values():
            flat = torch.cat([t.detach().to(torch.float32).reshape(-1) for t in tensors])
            flat = flat.cpu()  # the one device-to-host copy
            for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
                host[id(t)] = part.view(t.shape)
        return {key: float(torch.stack([host[id(v)] if isinstance(v, torch.Tensor)
                                         else torch.as_tensor(v, dtype=torch.float32)
                                         for v in values]).mean())
                for key, values in logs.items()}
