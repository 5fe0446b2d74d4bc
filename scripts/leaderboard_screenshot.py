"""Make docs/leaderboard.png: the HTML leaderboard of a few SYNTHETIC records (made by the
tests' record factory, not measured), screenshotted by headless chromium.

    PYTHONPATH=. python scripts/leaderboard_screenshot.py [OUT.png]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_leaderboard import CURRENT, EMA, flag, make_record, write  # noqa: E402

from leaderboard.compile import write_leaderboard  # noqa: E402

# row -> (method, defenses, AutoAttack last per seed, PGD-20 last, seconds per epoch)
ROWS = {
    "AT": ("at", [], [0.40, 0.43, 0.41], 0.46, 2.0),
    "AT+AWP": ("at", [{"name": "awp", "params": {"gamma": 0.01}}], [0.45, 0.44, 0.47], 0.50, 2.4),
    "TRADES": ("trades", [], [0.42, 0.44, 0.42], 0.47, 2.6),
    "AT+SWA": ("at", [{"name": "swa", "params": {}}], [0.43, 0.42, 0.45], 0.49, 2.0),
}


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "results"
        for label, (method, defenses, aas, pgd, spe) in ROWS.items():
            for seed, aa in enumerate(aas):
                rec = make_record(label, method=method, defenses=defenses, seed=seed,
                                  aa_last=aa, pgd_last=pgd + 0.01 * seed, spe=spe,
                                  extra_models=EMA if label == "AT+SWA" else None,
                                  flags=[flag("pgd_far_above_aa", "health")]
                                  if label == "TRADES" and seed == 2 else None)
                write(res, rec)
        board = Path(tmp) / "board"
        os.chdir(tmp)  # the page names its source: "results", not the temporary folder
        write_leaderboard(Path("results"), board, current_hashes=CURRENT)
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            raise SystemExit("chromium is not installed (apt-get install chromium)")
        subprocess.run([chromium, "--headless", "--disable-gpu", "--no-sandbox",
                        "--hide-scrollbars", f"--user-data-dir={Path(tmp) / 'profile'}",
                        f"--screenshot={out}", "--window-size=1600,1000",
                        (board / "leaderboard.html").as_uri()], check=True,
                       capture_output=True, timeout=120)
    print(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1
         else ROOT / "docs" / "leaderboard.png")
