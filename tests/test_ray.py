"""`--ray`: the smoke plan as Ray tasks on a local Ray instance (this machine's CPUs), one of
them killed mid-run: Ray starts the task again, the new worker recovers the dead worker's
lock and the run resumes from `last.pt`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the `ray` extra is not installed (CI installs it)")

ROOT = Path(__file__).resolve().parents[1]

# kills the Ray worker that runs its task (the training process's parent) once, after
# epoch 1 was checkpointed; the marker file says whether it already did
KILLER = """\
import os
import signal

from defenses.base import Defense, DefenseCard


class KillOnce(Defense):
    card = DefenseCard(name='KillOnce', paper='a test')

    def on_epoch_start(self, state):
        marker = os.environ['ROBENCH_TEST_MARKER']
        with open(marker, 'a') as handle:
            handle.write(f"epoch {state.epoch + 1}\\n")
        if state.epoch == 1 and 'killed' not in open(marker).read():
            with open(marker, 'a') as handle:
                handle.write('killed\\n')
            os.kill(os.getppid(), signal.SIGKILL)
"""


def test_a_plan_runs_as_ray_tasks_and_a_killed_task_resumes(tmp_path):
    module = tmp_path / "kill_once.py"
    module.write_text(KILLER)
    marker = tmp_path / "marker.txt"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(ROBENCH_TEST_MARKER=str(marker), RAY_DISABLE_USAGE_STATS="1")
    cmd = [sys.executable, str(ROOT / "scripts" / "run_full_evaluation.py"), "--suite", "smoke",
           "--defenses", f"{module}:KillOnce", "--seeds", "0", "--results",
           str(tmp_path / "results"), "--ray", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    # epoch 2 started, the worker died, and the retried task resumed at epoch 2
    assert marker.read_text().splitlines() == ["epoch 1", "epoch 2", "killed", "epoch 2"]
    records = {json.loads(p.read_text())["row_name"]: p
               for p in (tmp_path / "results").glob("smoke/*/record.json")}
    assert set(records) == {"AT", "AT+KillOnce"}
    history = (records["AT+KillOnce"].parent / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in history] == [1, 2]
    assert "] done AT+KillOnce s0 in " in done.stderr and "] done AT s0 in " in done.stderr
    assert (tmp_path / "results" / "leaderboard" / "leaderboard.md").exists()
    assert not list((tmp_path / "results").glob("smoke/*/.lock"))
