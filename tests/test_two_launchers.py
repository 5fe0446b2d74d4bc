"""Run locks end to end: two launchers on one results folder train every run once, and a
launcher killed mid-run leaves a stale lock that the next launcher recovers (resuming the
run). A file-based defense appends one line to a marker file each time its `setup` runs
(once per training process), which counts trainings independently of the launchers' own
reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COUNTING = """\
import os
import time

from defenses.base import Defense, DefenseCard


class Counting(Defense):
    card = DefenseCard(name='Counting', paper='a test')
    params = {'pause': 0.0}

    def setup(self, state):
        with open(os.environ['ROBENCH_TEST_MARKER'], 'a') as handle:
            handle.write(f"{state.spec.seed} {os.getpid()}\\n")

    def on_epoch_end(self, state):
        time.sleep(self.hparams['pause'])
"""


def _command(tmp_path: Path, defense: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "run_full_evaluation.py"), "--suite",
            "smoke", "--defenses", defense, "--seeds", "0,1", "--results",
            str(tmp_path / "results"), "--quiet", *extra]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "ROBENCH_TEST_MARKER": str(tmp_path / "marker.txt"),
            "PYTHONPATH": str(ROOT)}


def test_two_launchers_on_one_results_folder_train_every_run_once(tmp_path):
    module = tmp_path / "counting.py"
    module.write_text(COUNTING)
    cmd = _command(tmp_path, f"{module}:Counting", "--workers", "2", "--threads", "1")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path, env=_env(tmp_path)) for _ in range(2)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    trainings = Counter(line.split()[0] for line in
                        (tmp_path / "marker.txt").read_text().splitlines())
    assert trainings == {"0": 1, "1": 1}  # AT+Counting: each seed trained by one process
    text = "".join(err for _, err in outputs)
    done = Counter(line.split("] done ")[1].split(" in ")[0]
                   for line in text.splitlines() if "] done " in line)
    kept = Counter(line.split("] kept ")[1].split(" (")[0]
                   for line in text.splitlines() if "] kept " in line)
    runs = {"AT s0", "AT s1", "AT+Counting s0", "AT+Counting s1"}
    assert set(done) == runs and set(done.values()) == {1}  # each trained by one launcher
    assert kept == done  # and taken as finished by the other
    records = list((tmp_path / "results").glob("smoke/*/record.json"))
    assert len(records) == 4
    assert not list((tmp_path / "results").glob("smoke/*/.lock"))  # all let go
    for _, err in outputs:
        assert "Traceback" not in err


def test_a_killed_launchers_lock_is_recovered_and_its_run_resumes(tmp_path):
    module = tmp_path / "counting.py"
    module.write_text(COUNTING)
    defense = f"{module}:Counting:pause=2.0"
    first = subprocess.Popen(_command(tmp_path, defense, "--workers", "1", "--threads", "1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=tmp_path, env=_env(tmp_path), start_new_session=True)
    marker = tmp_path / "marker.txt"
    deadline = time.time() + 300
    lock = None
    while time.time() < deadline:  # until AT+Counting seed 0 has finished an epoch
        locks = list((tmp_path / "results").glob("smoke/*/.lock"))
        if marker.exists() and locks and list(locks[0].parent.glob("last.pt")):
            lock = locks[0]
            break
        time.sleep(0.1)
    assert lock is not None, "the first launcher never got into the AT+Counting run"
    owner = json.loads(lock.read_text())
    first_epoch = (lock.parent / "history.jsonl").read_text().splitlines()[0]
    os.killpg(first.pid, signal.SIGKILL)  # the launcher and (by PDEATHSIG) its children
    first.communicate()
    time.sleep(0.5)
    assert lock.exists()  # nobody cleaned up: stale
    second = subprocess.run(_command(tmp_path, defense, "--workers", "1", "--threads", "1"),
                            capture_output=True, text=True, cwd=tmp_path, env=_env(tmp_path),
                            timeout=600)
    assert second.returncode == 0, second.stderr
    assert (f"recovered the stale lock of {lock.parent}: its owner, pid {owner['pid']}"
            in second.stderr)
    assert "is no longer running" in second.stderr
    lines = (lock.parent / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert lines[0] == first_epoch  # resumed from epoch 1 (a restart re-times it)
    assert len(list((tmp_path / "results").glob("smoke/*/record.json"))) == 4
