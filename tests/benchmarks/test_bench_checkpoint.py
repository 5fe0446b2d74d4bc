"""Checkpoint time per epoch, as the training loop sees it: the synchronous writes the
engine used to do (torch.save of the payload to best.pt, again to last.pt, then
history.jsonl, each with fsync) against the background writer (snapshot the payload on
the training thread, then serialise once and write both files and the history in a
thread), for a PreActResNet-18 payload (weights, momentum buffers, RNG states), in one
process, alternating.

"new" is the time the training thread is held (the snapshot); the background write is
waited for outside the timing, as the next epoch's training hides it in a run. The total
of the background write is reported too.

Run: `python -m pytest tests/benchmarks/test_bench_checkpoint.py -s` (threads:
`ROBENCH_BENCH_THREADS`, default 2; `ROBENCH_BENCH_CKPT_MODEL=small_cnn` for a quick
check). The ratios are printed and stored in `benchmark.extra_info`.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import torch

from bench.checkpoint_io import CheckpointWriter
from bench.config import ModelConfig, RunSpec, load_suite
from bench.data import ArraySplit, DatasetInfo, Splits
from bench.engine import Trainer
from bench.records import atomic_torch_save, write_history

MODELS = {"preact_resnet18": ModelConfig("preact_resnet18", {}),
          "small_cnn": ModelConfig("small_cnn", {"width": 8, "conv_layers": 2, "fc": 32})}


def _payload(tmp_path) -> dict:
    """The engine's checkpoint payload after one training step (momentum buffers set)."""
    model = MODELS[os.environ.get("ROBENCH_BENCH_CKPT_MODEL", "preact_resnet18")]
    suite = load_suite("cifar10-linf")
    suite = replace(suite, model=model, train=replace(suite.train, batch_size=4))
    gen = torch.Generator().manual_seed(0)
    split = ArraySplit(x=torch.randint(0, 256, (8, 3, 32, 32), generator=gen,
                                       dtype=torch.uint8),
                       y=torch.randint(0, 10, (8,), generator=gen), index=torch.arange(8))
    info = DatasetInfo("random-cifar", 10, 3, 32, (0.5,) * 3, (0.25,) * 3)
    trainer = Trainer(RunSpec(suite.name, "at", (), 0), suite,
                      Splits(info, split, split, split, split, split), tmp_path,
                      device=torch.device("cpu"), progress=False)
    state = trainer.build()
    x, y, index = next(iter(trainer.loader))
    trainer.train_step(state, x, y, index)
    history = [{"epoch": e, "val_robust": 0.4, "seconds": 10.0} for e in range(1, 101)]
    return trainer._payload(state, history, {"epoch": 100, "val_robust": 0.4}, 1000.0)


def test_checkpoint_time_per_epoch(benchmark, tmp_path):
    torch.set_num_threads(int(os.environ.get("ROBENCH_BENCH_THREADS", "2")))
    payload = _payload(tmp_path / "run")
    history = payload["history"]
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    old_dir.mkdir()
    new_dir.mkdir()
    writer = CheckpointWriter()

    def old() -> None:  # best improved: serialised twice, all on the training thread
        atomic_torch_save(payload, old_dir / "best.pt")
        atomic_torch_save(payload, old_dir / "last.pt")
        write_history(old_dir / "history.jsonl", history)

    def new() -> None:
        writer.submit(payload, [new_dir / "best.pt", new_dir / "last.pt"],
                      then=lambda: write_history(new_dir / "history.jsonl", list(history)))

    at_once_dir = tmp_path / "at_once"
    at_once_dir.mkdir()

    def at_once() -> None:  # the CPU engine's way: torch.save into each file, on this thread
        writer.submit(payload, [at_once_dir / "best.pt", at_once_dir / "last.pt"],
                      then=lambda: write_history(at_once_dir / "history.jsonl",
                                                 list(history)), background=False)

    repeats = int(os.environ.get("ROBENCH_BENCH_REPEATS", "5"))
    t_old = t_new = t_total = t_at_once = float("inf")
    for _ in range(repeats + 1):  # the first round warms up
        start = time.perf_counter()
        old()
        seconds_old = time.perf_counter() - start
        start = time.perf_counter()
        at_once()
        t_at_once = min(t_at_once, time.perf_counter() - start)
        start = time.perf_counter()
        new()
        seconds_new = time.perf_counter() - start
        writer.wait()  # in a run, the next epoch's training hides this
        seconds_total = time.perf_counter() - start
        t_old, t_new = min(t_old, seconds_old), min(t_new, seconds_new)
        t_total = min(t_total, seconds_total)
    assert (old_dir / "last.pt").read_bytes() == (new_dir / "last.pt").read_bytes()
    assert (old_dir / "last.pt").read_bytes() == (at_once_dir / "best.pt").read_bytes()
    assert (new_dir / "best.pt").read_bytes() == (new_dir / "last.pt").read_bytes()
    size_mb = (new_dir / "last.pt").stat().st_size / 2**20
    held, total = t_old / t_new, t_old / t_total
    print(f"\ncheckpoint of {size_mb:.0f} MB: synchronous {t_old * 1000:.0f} ms, "
          f"background {t_new * 1000:.0f} ms on the training thread ({held:.1f}x), "
          f"{t_total * 1000:.0f} ms until written ({total:.2f}x); written at once, as the "
          f"CPU engine does, {t_at_once * 1000:.0f} ms "
          f"({t_old / t_at_once:.2f}x)")
    benchmark.extra_info.update({"size_mb": size_mb, "sync_s": t_old, "held_s": t_new,
                                 "background_total_s": t_total, "speedup_held": held,
                                 "speedup_total": total, "at_once_s": t_at_once,
                                 "speedup_at_once": t_old / t_at_once})
    benchmark.pedantic(lambda: (new(), writer.wait()), rounds=1, iterations=1)
