"""scripts/device_check.py in its tiny CPU mode: every case trains, the table and the JSON
hold what the GPU check reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.config import load_suite

ROOT = Path(__file__).resolve().parents[1]


def test_the_tiny_device_check_runs_every_case_and_writes_its_report(tmp_path):
    out = tmp_path / "device_check.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_check.py"), "--tiny",
                           "--device", "cpu", "--out", str(out), "--aa-images", "16",
                           "--compiled", "at", "--compile-backend", "aot_eager"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    smoke = load_suite("smoke")
    train_images = smoke.data.train_size  # drop_last off: every image once
    assert not smoke.train.drop_last
    full = report["full_epoch"]
    assert full["images"] == train_images  # an epoch sees its training images once
    assert abs(full["images_per_second"] * full["seconds_per_epoch"] - train_images) < 1e-6
    cases = [(r["method"], r["defenses"], r["precision"], r["mode"]) for r in report["cases"]]
    assert cases == [("at", [], "bf16", "eager"), ("at", ["awp"], "bf16", "eager"),
                     ("trades", [], "bf16", "eager"), ("at", ["dom_da"], "bf16", "eager"),
                     ("trades", ["cure"], "bf16", "eager"), ("at", ["aroid"], "bf16", "eager"),
                     ("fgsm_rs", [], "bf16", "eager"), ("at", [], "fp32", "eager"),
                     ("at", [], "bf16", "compiled")]
    batch = smoke.train.batch_size
    batches = -(-train_images // batch)
    k = smoke.train.attack_steps
    rows = {(r["case"], r["mode"]): r for r in report["cases"]}
    for row in report["cases"]:
        assert row["steps"] == 5 and row["peak_memory_mib"] > 0
        assert row["batches_per_epoch"] == batches
        assert abs(row["seconds_per_epoch"] - row["seconds_per_step"] * batches) < 1e-9
        assert abs(row["images_per_second"] * row["seconds_per_step"] - batch) < 1e-6
        ratio = row["cost_ratio"] / row["passes_ratio"]
        assert abs(row["cost_over_passes"] - ratio) < 1e-9
    # passes per step, counted by hand: PGD-AT k attack steps + 1 training pass each way;
    # AWP one more of each; TRADES one clean forward first and a clean + adversarial
    # forward in the loss; FGSM-RS one attack step
    at = rows[("AT", "eager")]
    assert (at["forward_per_step"], at["backward_per_step"]) == (k + 1, k + 1)
    # k input-gradient backwards (the attack's): work k + 1 forwards, k + 2 for the backwards
    assert at["input_backward_per_step"] == k and at["work_per_step"] == 2 * k + 3
    assert at["cost_ratio"] == 1.0 and at["passes_ratio"] == 1.0
    compiled = rows[("AT", "compiled")]  # its ratios are against compiled AT: itself
    assert compiled["compile_mode"] == "default" and compiled["cost_ratio"] == 1.0
    assert (compiled["forward_per_step"], compiled["backward_per_step"]) == (k + 1, k + 1)
    awp = rows[("AT+AWP", "eager")]
    assert (awp["forward_per_step"], awp["backward_per_step"]) == (k + 2, k + 2)
    assert awp["input_backward_per_step"] == k
    assert awp["passes_ratio"] == (2 * k + 6) / (2 * k + 3)
    trades = rows[("TRADES", "eager")]
    assert (trades["forward_per_step"], trades["backward_per_step"]) == (k + 3, k + 1)
    assert trades["passes_ratio"] == (2 * k + 5) / (2 * k + 3)
    fgsm = rows[("FGSM-RS (cifar10-fast)", "eager")]
    assert (fgsm["forward_per_step"], fgsm["backward_per_step"]) == (2, 2)
    # timed at 75% of training, where DOM-DA and CURE are active: more passes than AT
    assert rows[("AT+DOM-DA", "eager")]["forward_per_step"] > k + 1
    assert rows[("TRADES+CURE", "eager")]["forward_per_step"] > k + 3
    agreement = report["agreement"]
    for key in ("clean_fp32", "clean_bf16", "pgd20_fp32", "pgd20_bf16",
                "clean_prediction_agreement", "pgd20_per_image_agreement"):
        assert 0.0 <= agreement[key] <= 1.0
    assert agreement["pgd20_fp32"] <= agreement["clean_fp32"] + 1e-9  # robust => correct
    throughput = report["throughput"]
    assert throughput["autoattack_images"] == 16 and throughput["pgd20_images_per_second"] > 0
    assert "bf16 vs fp32 on" in done.stdout and "AutoAttack" in done.stdout
    assert all(label in done.stdout for label in ("AT+AROID", "FGSM-RS (cifar10-fast)"))


def test_without_a_gpu_the_full_check_says_what_to_do(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_check.py"),
                           "--device", "cpu"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == ("device_check: error: no CUDA device; use --tiny for the "
                                   "CPU check")


def test_synthetic_data_of_three_channels_runs_every_step(tmp_path):
    """--synthetic: random CIFAR-shaped images (3 channels: channels_last differs from NCHW,
    so AutoAttack must get the evaluator's NCHW batch)."""
    out = tmp_path / "device_check.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_check.py"), "--tiny",
                           "--device", "cpu", "--out", str(out), "--aa-images", "8",
                           "--compiled", "none", "--synthetic", "--steps", "1",
                           "--warmup", "0"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["synthetic"] and report["throughput"]["autoattack_images"] == 8
    assert report["full_epoch"]["images"] == 256 and len(report["cases"]) == 8  # smoke sizes
