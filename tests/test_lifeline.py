"""A launcher's child dies with it (bench/lifeline.py): a parent process starts a child with
the launcher's environment and is killed; the child, which would otherwise sleep for a
minute and then write a file, is gone within seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PARENT = """\
import subprocess, sys, time
from bench.runner import child_environment
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=child_environment())
print(child.pid, flush=True)
time.sleep(120)
"""

CHILD = """\
import time
from bench.lifeline import die_with_parent
armed = die_with_parent()
open('{out}.state', 'w').write('armed' if armed else 'not armed')
time.sleep(60)
open('{out}', 'w').write('outlived its parent')
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_a_child_dies_with_the_process_that_started_it(tmp_path):
    out = tmp_path / "outlived.txt"
    child_code = CHILD.format(out=out)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, child_code], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    child_pid = int(parent.stdout.readline())
    state = Path(f"{out}.state")
    deadline = time.time() + 30
    while not (state.exists() and state.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    assert state.read_text().strip() == "armed"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        # reaped by init, or a zombie for a moment: /proc says which
        status = Path(f"/proc/{child_pid}/status")
        if not status.exists() or "zombie" in status.read_text():
            break
        time.sleep(0.1)
    else:
        os.kill(child_pid, signal.SIGKILL)
        pytest.fail("the child outlived its parent")
    assert not out.exists()


def test_without_the_launchers_environment_nothing_is_armed(monkeypatch):
    from bench.lifeline import PARENT_ENV, die_with_parent

    monkeypatch.delenv(PARENT_ENV, raising=False)
    assert die_with_parent() is False
