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
                           "--device", "cpu", "--out", str(out), "--aa-images", "16"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    smoke = load_suite("smoke")
    train_images = smoke.data.train_size  # drop_last off: every image once
    assert not smoke.train.drop_last
    cases = [(r["method"], r["defenses"], r["precision"]) for r in report["epochs"]]
    assert cases == [("at", [], "bf16"), ("at", ["awp"], "bf16"), ("trades", [], "bf16"),
                     ("fgsm_rs", [], "bf16"), ("at", [], "fp32")]
    for row in report["epochs"]:
        assert row["seconds_per_epoch"] > 0 and row["steps"] > 0
        # an epoch of the smoke suite sees its training images once
        assert row["images"] == train_images
        assert abs(row["images_per_second"] * row["seconds_per_epoch"] - train_images) < 1e-6
        assert row["peak_memory_mib"] > 0
    agreement = report["agreement"]
    for key in ("clean_fp32", "clean_bf16", "pgd20_fp32", "pgd20_bf16",
                "clean_prediction_agreement", "pgd20_per_image_agreement"):
        assert 0.0 <= agreement[key] <= 1.0
    assert agreement["pgd20_fp32"] <= agreement["clean_fp32"] + 1e-9  # robust => correct
    throughput = report["throughput"]
    assert throughput["autoattack_images"] == 16 and throughput["pgd20_images_per_second"] > 0
    assert "bf16 vs fp32 on" in done.stdout and "AutoAttack" in done.stdout
    assert all(f"{label} [smoke]" in done.stdout for label in ("cifar10-linf AT bf16",
                                                               "cifar10-fast FGSM-RS bf16"))


def test_without_a_gpu_the_full_check_says_what_to_do(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_check.py"),
                           "--device", "cpu"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == ("device_check: error: no CUDA device; use --tiny for the "
                                   "CPU check")
