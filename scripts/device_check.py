"""One command to check a GPU machine before a long run (about 5-8 minutes on one H100).

    python scripts/device_check.py                      # the GPU check
    python scripts/device_check.py --tiny --device cpu  # the same code on the smoke suite

It trains one epoch each of `cifar10-linf` PGD-AT, AT+AWP and TRADES and of `cifar10-fast`
FGSM-RS on PreActResNet-18 with the engine's GPU settings (bf16 autocast, channels_last),
and one PGD-AT epoch in fp32, each from a fresh model; for each it prints seconds per
epoch, training images per second and peak GPU memory. On the bf16 PGD-AT model it then
compares bf16 with fp32 on 1,000 test images (clean predictions and PGD-20 per image: the
training precision is bf16, the evaluation's is fp32), and measures the evaluator's attack
throughput: PGD-20 (fp32, as evaluated) and AutoAttack (the suite's version, on
`--aa-images` images), in images per second. The table is printed and written as JSON
(`--out`, default `device_check.json`).

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
from bench.data import build_splits  # noqa: E402
from bench.engine import Trainer  # noqa: E402

# (label, suite, method, defenses, bf16)
CASES = (
    ("cifar10-linf AT bf16", "cifar10-linf", "at", (), True),
    ("cifar10-linf AT+AWP bf16", "cifar10-linf", "at", ("awp",), True),
    ("cifar10-linf TRADES bf16", "cifar10-linf", "trades", (), True),
    ("cifar10-fast FGSM-RS bf16", "cifar10-fast", "fgsm_rs", (), True),
    ("cifar10-linf AT fp32", "cifar10-linf", "at", (), False),
)
AGREEMENT_IMAGES = 1000


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


def train_one_epoch(label: str, suite: Suite, method: str, defenses: tuple[str, ...],
                    bf16: bool, splits, device: torch.device, folder: Path):
    spec = RunSpec(suite.name, method, tuple(parse_defense_arg(d) for d in defenses), 0)
    trainer = Trainer(spec, suite, splits, folder, device=device, progress=False,
                      mixed_precision=bf16, channels_last=True)
    state = trainer.build()
    for defense in trainer.defenses:
        trainer.guard.call(defense, "setup", state)
    _reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    stats = trainer._train_epoch(state)
    _sync(device)
    seconds = time.perf_counter() - start
    n, batch = len(splits.train.y), suite.train.batch_size
    images = n // batch * batch if suite.train.drop_last else n  # what one epoch sees
    return trainer.model, {
        "case": label, "suite": suite.name, "method": method, "defenses": list(defenses),
        "precision": "bf16" if bf16 else "fp32", "seconds_per_epoch": seconds,
        "images_per_second": images / seconds, "images": images, "steps": state.step,
        "peak_memory_mib": _peak_mib(device), "train_loss": stats["train_loss"]}


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
    result = run_autoattack(model, x[:n], y[:n], eps=eps, version=version,
                            batch_size=suite.eval.batch_size, device=device)
    _sync(device)
    aa_seconds = time.perf_counter() - start
    return {"pgd20_images_per_second": len(y) / pgd_seconds, "pgd20_images": len(y),
            "autoattack_version": version, "autoattack_images": n,
            "autoattack_images_per_second": n / aa_seconds,
            "autoattack_robust_accuracy": result.robust_accuracy}


def table(report: dict) -> str:
    lines = [f"device: {report['device']} ({report['device_name']}), torch {report['torch']}",
             f"{'case':36s} {'s/epoch':>9s} {'img/s':>9s} {'peak MiB':>9s} {'steps':>6s}"]
    for row in report["epochs"]:
        lines.append(f"{row['case']:36s} {row['seconds_per_epoch']:9.1f} "
                     f"{row['images_per_second']:9.0f} {row['peak_memory_mib']:9.0f} "
                     f"{row['steps']:6d}")
    a, t = report["agreement"], report["throughput"]
    lines.append(f"bf16 vs fp32 on {a['images']} test images: clean {100 * a['clean_bf16']:.1f}"
                 f" vs {100 * a['clean_fp32']:.1f}% (predictions agree on "
                 f"{100 * a['clean_prediction_agreement']:.1f}%), PGD-20 "
                 f"{100 * a['pgd20_bf16']:.1f} vs {100 * a['pgd20_fp32']:.1f}% (per image "
                 f"{100 * a['pgd20_per_image_agreement']:.1f}%)")
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
    parser.add_argument("--out", default="device_check.json")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if device.type != "cuda" and not args.tiny:
        print("device_check: error: no CUDA device; use --tiny for the CPU check",
              file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    start = time.perf_counter()
    rows, models, splits_cache = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="robench-device-check-") as folder:
        for i, (label, suite_name, method, defenses, bf16) in enumerate(CASES):
            suite = load_suite("smoke" if args.tiny else suite_name)
            data_key = repr(suite.data)  # cifar10-linf and cifar10-fast share their data
            if data_key not in splits_cache:
                splits_cache[data_key] = build_splits(suite.data, args.data_root,
                                                      suite.curves.size, with_test=True)
            label = f"{label} [smoke]" if args.tiny else label
            model, row = train_one_epoch(label, suite, method, defenses, bf16,
                                         splits_cache[data_key], device,
                                         Path(folder) / f"case{i}")
            print(f"{label}: {row['seconds_per_epoch']:.1f} s/epoch", flush=True)
            rows.append(row)
            models[label] = (model, suite)
    model, suite = next(iter(models.values()))  # the first case: PGD-AT, bf16
    test = splits_cache[repr(suite.data)].test
    n = min(AGREEMENT_IMAGES, len(test.y))
    x = test.x[:n].to(device).float().div_(255).contiguous(memory_format=torch.channels_last)
    y = test.y[:n].to(device)
    report = {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or "cpu"),
        "torch": torch.__version__, "tiny": args.tiny, "epochs": rows,
        "agreement": agreement(model, x, y, suite, device),
        "throughput": throughput(model, x, y, suite, device, args.aa_images),
    }
    report["seconds"] = time.perf_counter() - start
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
