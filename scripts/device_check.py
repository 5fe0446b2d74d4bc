"""One command to check a GPU machine before a long run, and to measure what the engine and
each defense cost on it.

    python scripts/device_check.py                      # the GPU check (one H100: ~6-9 min)
    python scripts/device_check.py --compiled at        # compile only PGD-AT (shorter)
    python scripts/device_check.py --synthetic          # no CIFAR-10 on the machine
    python scripts/device_check.py --tiny --device cpu  # the same code on the smoke suite

On PreActResNet-18 with the engine's GPU settings (bf16 autocast, channels_last):

1. One full `cifar10-linf` PGD-AT epoch from a fresh model, timed start to end (the last,
   shorter batch included): the measured s/epoch, and the model the precision check uses.
2. Each case below, eager and (`--compiled all`, the default) compiled: `--warmup` steps,
   then `--steps` timed steps at 75% of training (where every defense is active: DOM-DA
   after its warm-up, CURE after its clean phase, AWP after its warm-up), from a fresh
   model. s/epoch is the timed seconds per step times the suite's batches per epoch.
   Per case: images/s, peak GPU memory, the warm-up's seconds (compilation included), the
   passes per step the engine counted, and, against PGD-AT in the same mode, the measured
   cost ratio, the ratio the passes predict (their work in forward units: a forward 1, an
   attack's input-gradient backward 1, a backward with weight gradients 2) and the first
   over the second.
   Cases: `cifar10-linf` AT, AT+AWP, TRADES, AT+DOM-DA, TRADES+CURE, AT+AROID (a defense
   that asks for a clean model gets an untrained one: the weights do not change the work),
   `cifar10-fast` FGSM-RS, and AT in fp32.
3. bf16 against fp32 on 1,000 test images with the step-1 model (clean predictions and
   PGD-20 per image: the training precision is bf16, the evaluation's is fp32), and the
   evaluator's attack throughput: PGD-20 (fp32, as evaluated) and AutoAttack (the suite's
   version, on `--aa-images` images), in images per second.

The targets (one H100): PGD-AT at most 8 s/epoch eager and 5 s/epoch compiled, and every
defense's cost within 1.5x of what its passes predict; the table marks each. The report is
printed and written as JSON (`--out`, default `device_check.json`) after every case, so an
interrupted check keeps what it measured.

`--tiny` runs every step on the `smoke` suite (synthetic data, a tiny CNN) on any device:
the tests run it on the CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from attacks.autoattack import run_autoattack  # noqa: E402
from attacks.pgd import pgd  # noqa: E402
from bench.config import RunSpec, Suite, load_suite, parse_defense_arg  # noqa: E402
from bench.curves import pick_device  # noqa: E402
from bench.data import ArraySplit, DatasetInfo, Splits, build_splits  # noqa: E402
from bench.engine import Trainer  # noqa: E402

# (label, suite, method, defenses, bf16); the first is the base of the cost ratios
CASES = (
    ("AT", "cifar10-linf", "at", (), True),
    ("AT+AWP", "cifar10-linf", "at", ("awp",), True),
    ("TRADES", "cifar10-linf", "trades", (), True),
    ("AT+DOM-DA", "cifar10-linf", "at", ("dom_da",), True),
    ("TRADES+CURE", "cifar10-linf", "trades", ("cure",), True),
    ("AT+AROID", "cifar10-linf", "at", ("aroid",), True),
    ("FGSM-RS (cifar10-fast)", "cifar10-fast", "fgsm_rs", (), True),
    ("AT fp32", "cifar10-linf", "at", (), False),
)
PHASE = 0.75  # the point of training the cases are timed at
AGREEMENT_IMAGES = 1000
TARGETS = {"eager": 8.0, "compiled": 5.0}  # PGD-AT s/epoch on one H100
PASS_TARGET = 1.5  # a defense's cost over what its passes predict


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's, KiB


def _trainer(suite: Suite, method: str, defenses: tuple[str, ...], bf16: bool, splits,
             device: torch.device, folder: Path, compile_mode: str | None,
             compile_backend: str = "inductor"):
    """A trainer with its defenses set up (a clean model, where asked for, is untrained)."""
    spec = RunSpec(suite.name, method, tuple(parse_defense_arg(d) for d in defenses), 0)
    trainer = Trainer(spec, suite, splits, folder, device=device, progress=False,
                      mixed_precision=bf16, channels_last=True,
                      compile=compile_mode or False, compile_backend=compile_backend)
    state = trainer.build()
    if any("clean_model" in d.capabilities for d in trainer.defenses):
        state.clean_model = trainer._fresh_model().eval().requires_grad_(False)
    for defense in trainer.defenses:
        trainer.guard.call(defense, "setup", state)
    state.clean_model = None
    return trainer, state


def synthetic_splits(suite: Suite) -> Splits:
    """Random uint8 images and labels shaped as the suite's data (CIFAR-10 when its sizes
    are 0: 49,000 training images, 1,000 validation, 10,000 test), for timing a machine
    that cannot read the dataset; fixed seed."""
    d = suite.data
    channels, side, classes = (1, 28, 10) if "mnist" in d.dataset else (3, 32, 10)
    val = d.val_size or 1000
    train = d.train_size or 50_000 - val
    test = d.test_size or 10_000
    gen = torch.Generator().manual_seed(0)

    def split(n: int, start: int) -> ArraySplit:
        return ArraySplit(torch.randint(0, 256, (n, channels, side, side), generator=gen,
                                        dtype=torch.uint8),
                          torch.randint(0, classes, (n,), generator=gen),
                          torch.arange(start, start + n))

    info = DatasetInfo(f"synthetic {d.dataset}", classes, channels, side,
                       (0.5,) * channels, (0.25,) * channels)
    train_split, val_split = split(train, 0), split(val, train)
    curve = suite.curves.size

    def head(s: ArraySplit, n: int) -> ArraySplit:
        return ArraySplit(s.x[:n], s.y[:n], s.index[:n])

    return Splits(info, train_split, val_split, split(test, 0), head(train_split, curve),
                  head(val_split, curve))


def full_epoch(suite: Suite, splits, device: torch.device, folder: Path):
    """One PGD-AT epoch (bf16, eager) from a fresh model, timed start to end."""
    trainer, state = _trainer(suite, "at", (), True, splits, device, folder, None)
    _reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    stats = trainer._train_epoch(state)
    _sync(device)
    seconds = time.perf_counter() - start
    n, batch = len(splits.train.y), suite.train.batch_size
    images = n // batch * batch if suite.train.drop_last else n  # what one epoch sees
    return trainer.model, {
        "case": "AT, one full epoch", "suite": suite.name, "seconds_per_epoch": seconds,
        "images": images, "images_per_second": images / seconds, "steps": state.step,
        "peak_memory_mib": _peak_mib(device), "train_loss": stats["train_loss"]}


def timed_steps(case: tuple, suite: Suite, splits, device: torch.device, folder: Path,
                compile_mode: str | None, warmup: int, steps: int,
                compile_backend: str = "inductor") -> dict:
    """`warmup` then `steps` timed training steps of a case at PHASE of training."""
    label, _, method, defenses, bf16 = case
    trainer, state = _trainer(suite, method, defenses, bf16, splits, device, folder,
                              compile_mode, compile_backend)
    state.epoch = min(suite.train.epochs - 1, int(PHASE * suite.train.epochs))
    state.step = state.epoch * state.batches_per_epoch
    trainer.model.train()
    for defense in trainer.defenses:
        trainer.guard.call(defense, "on_epoch_start", state)
    batches = _full_batches(trainer, suite.train.batch_size)
    _reset_peak(device)

    def run(n: int) -> float:
        _sync(device)
        start = time.perf_counter()
        loss = None
        for _ in range(n):
            loss = trainer.train_step(state, *next(batches))
            state.step += 1
        if loss is not None:
            float(loss.detach())  # waits for the device
        _sync(device)
        return time.perf_counter() - start

    warmup_seconds = run(warmup)
    counter = state.counter
    before = (counter.forward, counter.backward, counter.input_backward, counter.work())
    seconds = run(steps)
    per_step = seconds / steps
    return {
        "case": label, "mode": "compiled" if compile_mode else "eager",
        "compile_mode": compile_mode, "suite": suite.name, "method": method,
        "defenses": list(defenses), "precision": "bf16" if bf16 else "fp32",
        "steps": steps, "seconds_per_step": per_step,
        "seconds_per_epoch": per_step * state.batches_per_epoch,
        "batches_per_epoch": state.batches_per_epoch,
        "images_per_second": suite.train.batch_size / per_step,
        "warmup_seconds": warmup_seconds, "peak_memory_mib": _peak_mib(device),
        "forward_per_step": (counter.forward - before[0]) / steps,
        "backward_per_step": (counter.backward - before[1]) / steps,
        "input_backward_per_step": (counter.input_backward - before[2]) / steps,
        "work_per_step": (counter.work() - before[3]) / steps}


def _full_batches(trainer: Trainer, batch_size: int):
    """The training stream's full batches, endlessly (a short last batch would time
    another shape)."""
    while True:
        for x, y, index in trainer.loader:
            if len(y) == batch_size:
                yield x, y, index


def add_ratios(rows: list[dict]) -> None:
    """Each case's cost and passes against PGD-AT (bf16) in the same mode."""
    base = {r["mode"]: r for r in rows if r["case"] == CASES[0][0]}
    for row in rows:
        ref = base.get(row["mode"])
        if ref is None or row["suite"] != ref["suite"]:
            continue
        row["cost_ratio"] = row["seconds_per_step"] / ref["seconds_per_step"]
        row["passes_ratio"] = row["work_per_step"] / ref["work_per_step"]
        row["cost_over_passes"] = row["cost_ratio"] / row["passes_ratio"]


def agreement(model, x, y, suite: Suite, device: torch.device) -> dict:
    """bf16 autocast vs fp32 on the same weights: clean predictions and PGD-20 per image."""
    model.eval()
    eps = suite.train.eps
    out = {}
    preds, robust = {}, {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        gen = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                             enabled=dtype is not None):
            preds[name] = model(x).float().argmax(1)
        x_adv = pgd(model, x, y, eps=eps, step_size=eps / 4, steps=20, generator=gen,
                    autocast_dtype=dtype)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                             enabled=dtype is not None):
            robust[name] = model(x_adv).float().argmax(1) == y
        out[f"clean_{name}"] = (preds[name] == y).float().mean().item()
        out[f"pgd20_{name}"] = robust[name].float().mean().item()
    out["clean_prediction_agreement"] = (preds["fp32"] == preds["bf16"]).float().mean().item()
    out["pgd20_per_image_agreement"] = (robust["fp32"] == robust["bf16"]).float().mean().item()
    out["images"] = len(y)
    return out


def throughput(model, x, y, suite: Suite, device: torch.device, aa_images: int) -> dict:
    eps = suite.train.eps
    model.eval()
    _sync(device)
    start = time.perf_counter()
    pgd(model, x, y, eps=eps, step_size=eps * suite.eval.pgd_step_ratio,
        steps=suite.eval.pgd_steps, generator=torch.Generator(device=device).manual_seed(0))
    _sync(device)
    pgd_seconds = time.perf_counter() - start
    version = suite.eval.autoattack if suite.eval.autoattack != "none" else "apgd"
    n = min(aa_images, len(y))
    start = time.perf_counter()
    # NCHW, as the evaluator hands it over (the official code views gradients as N x -1)
    result = run_autoattack(model, x[:n].contiguous(), y[:n], eps=eps, version=version,
                            batch_size=suite.eval.batch_size, device=device)
    _sync(device)
    aa_seconds = time.perf_counter() - start
    return {"pgd20_images_per_second": len(y) / pgd_seconds, "pgd20_images": len(y),
            "autoattack_version": version, "autoattack_images": n,
            "autoattack_images_per_second": n / aa_seconds,
            "autoattack_robust_accuracy": result.robust_accuracy}


def table(report: dict) -> str:
    lines = [f"device: {report['device']} ({report['device_name']}), torch {report['torch']}"]
    full = report.get("full_epoch")
    if full:
        lines.append(f"{full['case']} ({full['suite']}): {full['seconds_per_epoch']:.1f} s, "
                     f"{full['images_per_second']:.0f} images/s, {full['steps']} steps, peak "
                     f"{full['peak_memory_mib']:.0f} MiB")
    lines.append(f"{'case':24s} {'mode':8s} {'s/epoch':>8s} {'img/s':>7s} {'warmup s':>8s} "
                 f"{'MiB':>6s} {'work':>6s} {'vs AT':>6s} {'passes':>6s} {'/passes':>7s}")
    for row in report["cases"]:
        ratios = (f"{row['cost_ratio']:6.2f} {row['passes_ratio']:6.2f} "
                  f"{row['cost_over_passes']:7.2f}" if "cost_ratio" in row
                  else f"{'–':>6s} {'–':>6s} {'–':>7s}")
        mark = ""
        if row["case"] == CASES[0][0] and not report["tiny"]:
            mark = " ok" if row["seconds_per_epoch"] <= TARGETS[row["mode"]] else " OVER TARGET"
        elif row.get("cost_over_passes", 0) > PASS_TARGET:
            mark = " OVER 1.5x"
        lines.append(f"{row['case']:24s} {row['mode']:8s} {row['seconds_per_epoch']:8.2f} "
                     f"{row['images_per_second']:7.0f} {row['warmup_seconds']:8.1f} "
                     f"{row['peak_memory_mib']:6.0f} "
                     f"{row['work_per_step']:6.1f} {ratios}{mark}")
    a, t = report.get("agreement"), report.get("throughput")
    if a:
        lines.append(f"bf16 vs fp32 on {a['images']} test images: clean "
                     f"{100 * a['clean_bf16']:.1f} vs {100 * a['clean_fp32']:.1f}% (predictions "
                     f"agree on {100 * a['clean_prediction_agreement']:.1f}%), PGD-20 "
                     f"{100 * a['pgd20_bf16']:.1f} vs {100 * a['pgd20_fp32']:.1f}% (per image "
                     f"{100 * a['pgd20_per_image_agreement']:.1f}%)")
    if t:
        lines.append(f"PGD-20 (fp32): {t['pgd20_images_per_second']:.0f} images/s; AutoAttack "
                     f"{t['autoattack_version']} on {t['autoattack_images']} images: "
                     f"{t['autoattack_images_per_second']:.1f} images/s")
    lines.append(f"total {report['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the smoke suite (tests, CPU)")
    parser.add_argument("--device", default=None, help="default: cuda if any")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--aa-images", type=int, default=500)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per case (default 40; 5 with --tiny): a multiple "
                             "of AROID's policy interval, so its passes per step are its mean")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default 6; 2 with --tiny)")
    parser.add_argument("--compiled", choices=("all", "at", "none"), default="all",
                        help="which bf16 cases also run compiled (default all)")
    parser.add_argument("--compile-mode", default="default",
                        help="the engine's --compile mode for the compiled cases")
    parser.add_argument("--synthetic", action="store_true",
                        help="random CIFAR-shaped images and labels of the suites' sizes instead "
                        "of CIFAR-10 (a machine without the data: the timings are the same, "
                        "the accuracies meaningless)")
    parser.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="device_check.json")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if device.type != "cuda" and not args.tiny:
        print("device_check: error: no CUDA device; use --tiny for the CPU check",
              file=sys.stderr)
        return 2
    steps = args.steps or (5 if args.tiny else 40)
    warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 6)
    start = time.perf_counter()
    report: dict = {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or "cpu"),
        "torch": torch.__version__, "tiny": args.tiny, "synthetic": args.synthetic,
        "steps": steps, "warmup": warmup,
        "phase": PHASE, "cases": []}
    out = Path(args.out)

    def save() -> None:
        report["seconds"] = time.perf_counter() - start
        out.write_text(json.dumps(report, indent=2) + "\n")

    splits_cache: dict = {}

    def suite_and_splits(name: str):
        suite = load_suite("smoke" if args.tiny else name)
        key = repr(suite.data)  # cifar10-linf and cifar10-fast share their data
        if key not in splits_cache:
            splits_cache[key] = (synthetic_splits(suite) if args.synthetic else build_splits(
                suite.data, args.data_root, suite.curves.size, with_test=True))
        return suite, splits_cache[key]

    runs = [(case, None) for case in CASES]
    compiled = [c for c in CASES if c[4]] if args.compiled == "all" else (
        [CASES[0]] if args.compiled == "at" else [])
    runs += [(case, args.compile_mode) for case in compiled]
    with tempfile.TemporaryDirectory(prefix="robench-device-check-") as folder:
        suite, splits = suite_and_splits(CASES[0][1])
        model, report["full_epoch"] = full_epoch(suite, splits, device, Path(folder) / "full")
        print(f"one full AT epoch: {report['full_epoch']['seconds_per_epoch']:.1f} s",
              flush=True)
        save()
        for i, (case, mode) in enumerate(runs):
            case_suite, case_splits = suite_and_splits(case[1])
            row = timed_steps(case, case_suite, case_splits, device, Path(folder) / f"c{i}",
                              mode, warmup, steps, args.compile_backend)
            report["cases"].append(row)
            add_ratios(report["cases"])
            print(f"{case[0]} {row['mode']}: {row['seconds_per_epoch']:.2f} s/epoch "
                  f"(warm-up {row['warmup_seconds']:.1f} s)", flush=True)
            save()
    # the evaluator's settings: strict fp32 (no TF32), no cuDNN autotuning (training
    # keeps torch's TF32 defaults and autotunes)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    test = splits.test
    n = min(AGREEMENT_IMAGES, len(test.y))
    x = test.x[:n].to(device).float().div_(255).contiguous(memory_format=torch.channels_last)
    y = test.y[:n].to(device)
    report["agreement"] = agreement(model, x, y, suite, device)
    save()
    report["throughput"] = throughput(model, x, y, suite, device, args.aa_images)
    save()
    print(table(report))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
