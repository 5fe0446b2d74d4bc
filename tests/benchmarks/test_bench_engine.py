"""Speed of one PGD-10 AT training step: the engine against a reference-style
loop written for this benchmark (the attack calls `loss.backward()` and so also
computes weight gradients, fp32, PyTorch's default NCHW layout, a CPU DataLoader
with per-image transforms),
same model, data and batch, measured in the same run.

Run: `python -m pytest tests/benchmarks/test_bench_engine.py -s` (threads:
`ROBENCH_BENCH_THREADS`, default 2)
Target: engine >= 1.5x faster on CPU for PreActResNet-18 on CIFAR-shaped
batches and for the small CNN. The measured ratio is printed and stored in
`benchmark.extra_info["speedup"]`.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from bench.config import ModelConfig, RunSpec, load_suite
from bench.data import ArraySplit, DatasetInfo, Splits
from bench.engine import Trainer

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 10
CASES = {
    # name: (model config, batch size, images)
    "preact_resnet18": (ModelConfig("preact_resnet18", {}), 16, 64),
    "small_cnn": (ModelConfig("small_cnn", {"width": 32, "conv_layers": 3, "fc": 256}), 128, 512),
}


def _split(n: int, seed: int = 0) -> ArraySplit:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=gen)
    return ArraySplit(x=x, y=y, index=torch.arange(n))


def _trainer(model_cfg: ModelConfig, batch: int, n: int, tmp_path,
             channels_last: bool | None = None) -> tuple[Trainer, object]:
    suite = load_suite("cifar10-linf")
    suite = replace(suite, model=model_cfg, train=replace(suite.train, batch_size=batch))
    split = _split(n)
    info = DatasetInfo("random-cifar", 10, 3, 32, (0.5,) * 3, (0.25,) * 3)
    splits = Splits(info, split, split, split, split, split)
    trainer = Trainer(RunSpec(suite.name, "at", (), 0), suite, splits, tmp_path,
                      device=torch.device("cpu"), progress=False, channels_last=channels_last)
    return trainer, trainer.build()


def engine_stepper(trainer: Trainer, state):
    """A callable that runs one engine training step on the next batch (cycling)."""
    batches = iter(trainer.loader)

    def step() -> None:
        nonlocal batches
        try:
            x, y, index = next(batches)
        except StopIteration:
            batches = iter(trainer.loader)
            x, y, index = next(batches)
        trainer.train_step(state, x, y, index)

    return step


class _ReferenceDataset(Dataset):
    """Per-image crop + flip on the CPU, as a torchvision transform pipeline does."""

    def __init__(self, split: ArraySplit) -> None:
        self.x, self.y = split.x, split.y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        img = self.x[i].float() / 255
        img = F.pad(img, (4, 4, 4, 4))
        dy, dx = torch.randint(0, 9, (2,)).tolist()
        img = img[:, dy:dy + 32, dx:dx + 32]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img, self.y[i]


def reference_step(model, optimizer, x, y) -> torch.Tensor:
    """The reference-style PGD-AT step (Rice et al.'s loop shape)."""
    delta = torch.zeros_like(x).uniform_(-EPS, EPS)
    delta = (torch.clamp(x + delta, 0, 1) - x).requires_grad_(True)
    for _ in range(STEPS):
        loss = F.cross_entropy(model(x + delta), y)
        loss.backward()  # also computes (and accumulates) weight gradients
        grad = delta.grad.detach()
        delta.data = torch.clamp(delta + ALPHA * torch.sign(grad), -EPS, EPS)
        delta.data = torch.clamp(x + delta.data, 0, 1) - x
        delta.grad.zero_()
    loss = F.cross_entropy(model(x + delta.detach()), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def best_time(fn, repeats: int) -> float:
    """Best-of-`repeats` seconds of `fn` after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _time_pair(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` seconds of each, measured alternately (a, b, a, b, ...), so
    that a load change on the machine hits both sides alike."""
    fn_a()
    fn_b()  # warm-up
    best_a = best_b = float("inf")
    for _ in range(repeats):
        for fn, which in ((fn_a, "a"), (fn_b, "b")):
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
            if which == "a":
                best_a = min(best_a, seconds)
            else:
                best_b = min(best_b, seconds)
    return best_a, best_b


@pytest.mark.parametrize("case", sorted(CASES))
def test_engine_step_vs_reference(benchmark, case, tmp_path):
    torch.set_num_threads(int(os.environ.get("ROBENCH_BENCH_THREADS", "2")))
    model_cfg, batch, n = CASES[case]
    trainer, state = _trainer(model_cfg, batch, n, tmp_path)
    engine_step = engine_stepper(trainer, state)

    # The reference model keeps PyTorch's default NCHW layout, as the papers' scripts
    # do (a channels_last model would also switch the reference's convolutions).
    ref_trainer, _ = _trainer(model_cfg, batch, n, tmp_path / "ref", channels_last=False)
    ref_model = ref_trainer.model
    ref_kernel = next(p for p in ref_model.parameters() if p.dim() == 4)
    assert ref_kernel.is_contiguous() and ref_kernel.shape[1] > 1  # plain NCHW
    ref_model.train()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(_ReferenceDataset(_split(n)), batch_size=batch, shuffle=True,
                        num_workers=0, drop_last=True)
    ref_batches = iter(loader)

    def ref_step():
        nonlocal ref_batches
        try:
            x, y = next(ref_batches)
        except StopIteration:
            ref_batches = iter(loader)
            x, y = next(ref_batches)
        reference_step(ref_model, ref_opt, x, y)

    repeats = 3 if case == "preact_resnet18" else 8
    t_ref, t_engine = _time_pair(ref_step, engine_step, repeats)
    speedup = t_ref / t_engine
    print(f"\n{case}: reference {t_ref * 1000:.0f} ms/step, engine {t_engine * 1000:.0f} ms/step, "
          f"speedup {speedup:.2f}x (batch {batch}, PGD-{STEPS})")
    benchmark.extra_info.update({"reference_s": t_ref, "engine_s": t_engine, "speedup": speedup})
    benchmark.pedantic(engine_step, rounds=2, iterations=1)
    assert speedup >= 1.5, f"{case}: engine only {speedup:.2f}x faster than the reference loop"
