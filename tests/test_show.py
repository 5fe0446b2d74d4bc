"""`robench show RUN_DIR` on hand-written run folders: the summary's numbers (checked by
hand against the record built here), the curves PNG and its best-epoch marker, an
unfinished run, a missing folder."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from test_leaderboard import flag, make_record

from bench.cli import main
from bench.config import load_suite
from bench.show import draw_curves, load_run, show

AWP = [{"name": "awp", "params": {"gamma": 0.01}}]
EMA = {"ema": {"best": {"clean": 0.8, "pgd20": 0.6, "autoattack": 0.55},
               "last": {"clean": 0.8, "pgd20": 0.58, "autoattack": 0.54}}}
# validation robust accuracy peaks at epoch 3 (the record's best epoch for seed 0)
VAL = [0.30, 0.45, 0.52, 0.50, 0.48, 0.47, 0.46, 0.45, 0.44, 0.43]
TRAIN = [0.30, 0.45, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90]


def history_rows(val: list[float], train: list[float]) -> list[dict]:
    return [{"epoch": i + 1, "val_robust": v, "train_robust": t, "val_clean": v + 0.2,
             "train_clean": t + 0.05, "seconds": 2.0} for i, (v, t) in enumerate(zip(val, train))]


def write_run(folder: Path, rows: list[dict], record: dict | None = None,
              spec: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    spec = spec or (record or {}).get("spec")
    (folder / "spec.json").write_text(json.dumps({"spec": spec, "run_id": folder.name,
                                                  "suite_hash": "e" * 64}))
    (folder / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if record is not None:
        (folder / "record.json").write_text(json.dumps(record))
    return folder


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """AT+AWP seed 0, best epoch 3 of 10, an EMA sub-row, a health and a note flag, and a
    clean model pretrained for it."""
    rec = make_record("AT+AWP", defenses=AWP, seed=0, pgd_best=0.55, pgd_last=0.47,
                      aa_best=0.50, aa_last=0.41, extra_models=EMA,
                      flags=[flag("pgd_vs_aa", "health"), flag("aa_zero_gradients", "note")])
    rec["extra_pretraining"] = [{"what": "clean model (standard, 5 epochs)", "seconds": 12.5,
                                 "forward_passes": 300, "backward_passes": 300}]
    rec["cost"].update(pretraining_seconds=12.5, pretraining_forward_passes=300,
                       pretraining_backward_passes=300)
    return write_run(tmp_path / "results" / "quick" / "run0", history_rows(VAL, TRAIN), rec)


def cells(text: str, start: str) -> list[str]:
    """The cells after `start` of the first line that begins with it (after indentation)."""
    line = next(li for li in text.splitlines() if li.strip().startswith(start))
    return line.strip()[len(start):].split()


def block(text: str, title: str) -> str:
    """The four lines of one model's metric table."""
    lines = text.splitlines()
    i = next(k for k, li in enumerate(lines) if li.strip().startswith(title))
    return "\n".join(lines[i:i + 4])


def test_summary_numbers_flags_and_costs(run: Path) -> None:
    text = show(run, plot=False)
    assert text.splitlines()[0].startswith("Run AT+AWP · suite quick · seed 0 · protocol "
                                           + "a" * 12 + " ")
    assert "Best epoch: 3 of 10" in text
    model = block(text, "trained model")
    # clean, PGD-20, AutoAttack, worst case in % (worst case = min over attacks per image)
    assert cells(model, "best (epoch 3)") == ["80.00", "55.00", "50.00", "50.00"]
    assert cells(model, "last (epoch 10)") == ["85.00", "47.00", "41.00", "41.00"]
    assert cells(model, "gap (best - last)") == ["–", "8.00", "9.00", "9.00"]
    ema = block(text, "↳ [ema]")
    assert cells(ema, "best (epoch 3)") == ["80.00", "60.00", "55.00", "55.00"]
    assert cells(ema, "last (epoch 10)") == ["80.00", "58.00", "54.00", "54.00"]
    assert cells(ema, "gap (best - last)") == ["–", "2.00", "1.00", "1.00"]
    assert "[health] pgd_vs_aa (model, last): pgd_vs_aa fired" in text
    assert "[note] aa_zero_gradients (model, last): aa_zero_gradients fired" in text
    assert "  health: " in text and "still ranked" in text and "  note: " in text
    cost = next(li for li in text.splitlines() if li.startswith("Cost:"))
    # make_record: 10 epochs of 2.0 s, 1000 + 1000 passes, 1.0 s evaluation
    assert "training 20.0 s (2.00 s/epoch over 10 epochs)" in cost
    assert "1000 forward + 1000 backward passes, evaluation 1.0 s" in cost
    assert "extra pretraining: clean model (standard, 5 epochs), 12.5 s, 600 passes" in cost


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_cli_writes_a_valid_png_into_the_run_folder(run: Path, capsys) -> None:
    assert main(["show", str(run)]) == 0
    png = run / "curves.png"
    assert f"Curves: {png}" in capsys.readouterr().out
    assert png.stat().st_size > 1000
    assert png_size(png) == (770, 495)  # 7 x 4.5 inches at 110 dpi


def test_out_folder_out_file_and_no_plot(run: Path, tmp_path: Path) -> None:
    assert main(["show", str(run), "--no-plot"]) == 0
    assert not (run / "curves.png").exists()
    show(run, tmp_path / "plots")
    assert png_size(tmp_path / "plots" / "curves_run0.png") == (770, 495)
    show(run, tmp_path / "one.png")
    assert (tmp_path / "one.png").stat().st_size > 0


def test_best_epoch_marker_sits_on_the_validation_peak(run: Path, tmp_path: Path) -> None:
    fig = draw_curves(load_run(run), tmp_path / "c.png")
    try:
        lines = {li.get_label(): li for li in fig.axes[0].get_lines()}
        star = lines["best epoch 3"]
        assert list(star.get_xdata()) == [3] and list(star.get_ydata()) == pytest.approx([52.0])
        vertical = [li for li in fig.axes[0].get_lines() if list(li.get_xdata()) == [3, 3]]
        assert len(vertical) == 1
        assert list(lines["validation robust"].get_ydata()) == pytest.approx(
            [100 * v for v in VAL])
        assert list(lines["train robust"].get_ydata()) == pytest.approx(
            [100 * v for v in TRAIN])
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_unfinished_run_shows_its_curves_so_far(tmp_path: Path) -> None:
    spec = {"suite": "fmnist-quick", "method": "at", "defenses": AWP, "seed": 1}
    # epochs 2 and 4 tie: best.pt holds the first (the engine replaces it only when higher)
    rows = history_rows([0.20, 0.35, 0.33, 0.35], [0.2, 0.3, 0.4, 0.5])
    folder = write_run(tmp_path / "busy", rows, spec=spec)
    text = show(folder)
    planned = load_suite("fmnist-quick").train.epochs
    assert text.splitlines()[0].startswith("Run AT+AWP · suite fmnist-quick · seed 1 · ")
    assert f"Not evaluated yet (no record.json): 4 of {planned} epochs trained" in text
    assert ("Best epoch so far: 2 (validation robust 35.00%); latest epoch 4: validation "
            "robust 35.00%, train robust 50.00%") in text
    assert "Cost:" not in text and "trained model" not in text
    assert png_size(folder / "curves.png") == (770, 495)
    fig = draw_curves(load_run(folder), tmp_path / "c.png")
    labels = [li.get_label() for li in fig.axes[0].get_lines()]
    assert "best epoch 2" in labels and "(not evaluated yet)" in fig.axes[0].get_title()


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_not_a_run_folder_is_one_clear_line(tmp_path: Path, capsys, make: str) -> None:
    folder = tmp_path / "nope"
    if make == "empty":
        folder.mkdir()
    assert main(["show", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"robench: error: {folder} ")
    assert "run folder" in err and "Traceback" not in err


def test_a_broken_record_names_the_field(run: Path, capsys) -> None:
    rec = json.loads((run / "record.json").read_text())
    rec["metrics"]["model"]["best"]["pgd20"] = 0.99  # above clean, disagrees with its bits
    (run / "record.json").write_text(json.dumps(rec))
    assert main(["show", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "breaks the record schema" in err
    assert "robench evaluate" in err
