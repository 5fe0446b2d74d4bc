"""Cost of DOM-DA after its warm-up against its base method, PGD-10 AT: blocks of engine
training steps (small CNN, batches of 128 CIFAR-shaped images, CPU), AT alone, AT+DOM-DA
with the batched transforms (defenses/_dom_da_batched.py) and AT+DOM-DA with the previous
path (torchvision's RandAugment / AugMix module called on the flagged sub-batch, or image by
image with per_image), measured alternately in the same run.

The "predicted by passes" figure is the ratio of the passes the engine counts
(`state.counter.work()`, in forward units: a forward 1, an attack's input-gradient backward
1, a weight-gradient backward 2, as `robench cost`) per block: DOM-DA adds the natural
forward of the batch and one forward of the still-flagged sub-batch per round but the
last (counted as whole passes, so the prediction is an upper bound for them). tau is the
median natural loss of the first batch, so about half of each batch is flagged.

Run: `python -m pytest tests/benchmarks/test_bench_dom_da.py -s` (threads:
`ROBENCH_BENCH_THREADS`, default 2; steps per block: `ROBENCH_BENCH_DOM_DA_STEPS`,
default 4)
Target: DOM-DA (batched) per-block cost / AT's <= 1.5 x the passes' prediction. The
measured ratios are printed and stored in `benchmark.extra_info`.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from test_bench_engine import CASES as ENGINE_CASES
from test_bench_engine import _trainer, engine_stepper

from defenses.dom_da import DomDA

TARGET = 1.5
CASES = {"small_cnn": ENGINE_CASES["small_cnn"]}  # (model config, batch size, images)
VARIANTS = {  # name: DOM-DA parameters
    "randaugment": {"aug": "randaugment"},
    "augmix": {"aug": "augmix"},
    "randaugment-per-image": {"aug": "randaugment", "per_image": True},
}


class TorchvisionDA(DomDA):
    """DOM-DA's previous transform path: torchvision's module on the sub-batch, or one call
    per image (per_image)."""

    def augment_uint8(self, images: torch.Tensor) -> torch.Tensor:
        reference = T.RandAugment() if self.aug == "randaugment" else T.AugMix()
        if self.per_image:
            return torch.stack([reference(image) for image in images])
        return reference(images)


def block_runner(model_cfg, batch: int, n: int, tmp_path, steps: int,
                 defense: DomDA | None):
    """A trainer (optionally with `defense` injected, active from the first step) and a
    callable running `steps` training steps; the callable returns the passes it made."""
    trainer, state = _trainer(model_cfg, batch, n, tmp_path)
    if defense is not None:
        x, y, _ = next(iter(trainer.loader))
        with torch.no_grad():
            losses = F.cross_entropy(trainer.model(x), y, reduction="none")
        defense.tau = float(losses.median())
        trainer.defenses = [defense]
        defense.bind_random_stream(0, state.device)
        trainer._bind_defenses()
        defense.setup(state)
    step = engine_stepper(trainer, state)

    def run() -> float:
        before = state.counter.work()
        for _ in range(steps):
            step()
        return state.counter.work() - before

    return run


def time_alternating(runners: dict, repeats: int) -> tuple[dict, dict]:
    """Best-of-`repeats` seconds of each runner, run in turn (a, b, c, a, b, c, ...), so
    that a load change on the machine hits all alike; and the passes of one block each."""
    passes = {name: run() for name, run in runners.items()}  # warm-up
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, passes


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_dom_da_vs_at(benchmark, case, variant, tmp_path):
    torch.set_num_threads(int(os.environ.get("ROBENCH_BENCH_THREADS", "2")))
    steps = int(os.environ.get("ROBENCH_BENCH_DOM_DA_STEPS", "4"))
    model_cfg, batch, n = CASES[case]
    params = VARIANTS[variant]
    runners = {
        "at": block_runner(model_cfg, batch, n, tmp_path / "at", steps, None),
        "new": block_runner(model_cfg, batch, n, tmp_path / "new", steps,
                            DomDA(tau=1.0, warmup=0.0, **params)),
        "old": block_runner(model_cfg, batch, n, tmp_path / "old", steps,
                            TorchvisionDA(tau=1.0, warmup=0.0, **params)),
    }
    seconds, passes = time_alternating(runners, repeats=3)
    predicted = passes["new"] / passes["at"]
    ratio_new, ratio_old = seconds["new"] / seconds["at"], seconds["old"] / seconds["at"]
    print(f"\n{case} dom_da {variant}: per block of {steps} steps AT {seconds['at']:.3f} s, "
          f"DOM-DA batched {seconds['new']:.3f} s ({ratio_new:.2f}x AT), torchvision path "
          f"{seconds['old']:.3f} s ({ratio_old:.2f}x AT); passes predict {predicted:.2f}x "
          f"(AT {passes['at']:.0f}, DOM-DA {passes['new']:.0f} forward-equivalents); "
          f"batched vs torchvision {seconds['old'] / seconds['new']:.2f}x faster")
    benchmark.extra_info.update({
        "at_s": seconds["at"], "dom_da_s": seconds["new"], "dom_da_torchvision_s": seconds["old"],
        "ratio": ratio_new, "ratio_torchvision": ratio_old, "predicted": predicted,
        "speedup_vs_torchvision": seconds["old"] / seconds["new"]})
    benchmark.pedantic(runners["new"], rounds=1, iterations=1)
    assert ratio_new <= TARGET * predicted, (
        f"{case} dom_da {variant}: {ratio_new:.2f}x AT, passes predict {predicted:.2f}x")
