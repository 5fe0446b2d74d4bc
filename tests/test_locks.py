"""Run locks (bench/locks.py): one owner at a time, stale locks recovered, lost locks seen."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from bench.errors import LockLostError
from bench.locks import LOCK_FILE, FolderLock, stale_reason


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(folder, host: str, pid: int, age: float = 0.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    path.write_text(json.dumps({"host": host, "pid": pid, "token": "other", "taken": 0.0,
                                "what": "someone"}))
    then = time.time() - age
    os.utime(path, (then, then))


def test_one_owner_at_a_time_and_release_frees_it(tmp_path):
    first = FolderLock(tmp_path / "run", "first", heartbeat=60)
    second = FolderLock(tmp_path / "run", "second", heartbeat=60)
    assert first.try_acquire()
    owner = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert owner["host"] == socket.gethostname() and owner["pid"] == os.getpid()
    assert not second.try_acquire()  # a live owner (this very process) holds it
    assert f"pid {os.getpid()}" in second.owner()
    first.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    assert second.try_acquire()
    second.release()


def test_a_lock_of_a_dead_process_on_this_host_is_recovered_with_a_message(tmp_path):
    _write_lock(tmp_path, socket.gethostname(), _dead_pid())
    messages = []
    lock = FolderLock(tmp_path, "me", heartbeat=60, log=messages.append)
    assert lock.try_acquire()
    assert len(messages) == 1 and "no longer running" in messages[0]
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.token
    lock.release()


def test_a_remote_owner_is_stale_only_once_its_heartbeat_is_old(tmp_path):
    _write_lock(tmp_path, "another-node", 12345, age=10)
    assert stale_reason(tmp_path / LOCK_FILE, stale_after=60) is None
    assert not FolderLock(tmp_path, "me", stale_after=60).try_acquire()
    _write_lock(tmp_path, "another-node", 12345, age=61)
    assert "has not updated it for 61 s" in stale_reason(tmp_path / LOCK_FILE, stale_after=60)
    lock = FolderLock(tmp_path, "me", stale_after=60, heartbeat=60, log=lambda m: None)
    assert lock.try_acquire()
    lock.release()


def test_a_live_local_owner_is_not_stale_even_with_an_old_heartbeat_below_the_limit(tmp_path):
    _write_lock(tmp_path, socket.gethostname(), os.getpid(), age=30)
    assert stale_reason(tmp_path / LOCK_FILE, stale_after=60) is None


def test_the_heartbeat_refreshes_the_file_and_a_takeover_is_detected(tmp_path):
    lock = FolderLock(tmp_path, "me", heartbeat=0.05)
    assert lock.try_acquire()
    path = tmp_path / LOCK_FILE
    os.utime(path, (time.time() - 100, time.time() - 100))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5  # beaten again
    lock.check()  # still ours
    _write_lock(tmp_path, "another-node", 1)  # someone judged us stale and took over
    time.sleep(0.3)
    with pytest.raises(LockLostError, match="taken over by pid 1 on another-node"):
        lock.check()
    lock.release()
    assert path.exists()  # the new owner's lock is left alone


def _contend(folder: str, start: float, queue) -> None:
    lock = FolderLock(folder, "contender", heartbeat=60, log=lambda m: None)
    while time.time() < start:
        pass
    queue.put(lock.try_acquire())
    time.sleep(5.0)  # hold it (alive) until every contender has tried


def test_exactly_one_of_many_contenders_wins_a_stale_lock(tmp_path):
    _write_lock(tmp_path, socket.gethostname(), _dead_pid())
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    start = time.time() + 3.0  # all spawned by then, then all try at once
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), start, queue)) for _ in range(6)]
    for proc in procs:
        proc.start()
    wins = [queue.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join()
    assert sum(wins) == 1


def test_robench_evaluate_refuses_a_folder_another_process_works_on(tmp_path, capsys):
    from bench.cli import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "spec.json").write_text("{}")
    holder = FolderLock(run_dir, "a launcher", heartbeat=60)
    assert holder.try_acquire()
    try:
        assert main(["evaluate", str(run_dir)]) == 2
    finally:
        holder.release()
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"robench: error: {run_dir} is being trained or evaluated by pid "
                          f"{os.getpid()} on {socket.gethostname()} (a launcher)")
