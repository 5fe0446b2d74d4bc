"""The plan runner (bench/scheduler.py) and the job's progress (bench/progress.py), with a
fake run function: concurrency, failures, busy folders, ETA and the three output modes."""

from __future__ import annotations

import io
import threading
import time
from types import SimpleNamespace

import pytest

from bench.config import RunSpec, parse_defense_arg
from bench.errors import RunBusyError, RunFailedError
from bench.progress import JobProgress, clock
from bench.runner import Launch
from bench.scheduler import run_plan, threads_per_run


def _specs(rows: int, seeds: int = 1) -> list[RunSpec]:
    names = [(), (parse_defense_arg("awp"),), (parse_defense_arg("hr"),)]
    return [RunSpec("smoke", "at", names[r % 3], s) for r in range(rows) for s in range(seeds)]


def test_workers_run_at_once_and_a_failure_does_not_stop_the_others():
    specs = _specs(3, 2)
    running, peak, guard = set(), [0], threading.Lock()

    def run(spec, launch, wait):
        with guard:
            running.add(spec.run_id)
            peak[0] = max(peak[0], len(running))
        time.sleep(0.2)
        with guard:
            running.discard(spec.run_id)
        if spec.row_name == "AT+AWP" and spec.seed == 1:
            raise RunFailedError("training AT+AWP seed 1: boom")
        return SimpleNamespace(seconds=0.2, record_path="r")

    out = run_plan(specs, None, Launch(), workers=2, run=run)
    assert peak[0] == 2
    assert [o.spec for o in out] == specs  # plan order
    assert [o.status for o in out] == ["done", "done", "done", "failed", "done", "done"]
    assert out[3].message == "training AT+AWP seed 1: boom"


def test_a_busy_folder_is_set_aside_and_done_later():
    specs = _specs(2)
    calls = []

    def run(spec, launch, wait):
        calls.append(spec.row_name)
        assert wait is False  # the scheduler never blocks a worker on a lock
        if spec.row_name == "AT" and calls.count("AT") == 1:
            raise RunBusyError("held by pid 1 on elsewhere")
        return SimpleNamespace(seconds=0.0, record_path="r")  # made by the other launcher

    import bench.scheduler as scheduler
    scheduler.BUSY_POLL_S, saved = 0.01, scheduler.BUSY_POLL_S
    try:
        out = run_plan(specs, None, Launch(), workers=1, run=run)
    finally:
        scheduler.BUSY_POLL_S = saved
    assert calls == ["AT", "AT+AWP", "AT"]
    assert [o.status for o in out] == ["reused", "reused"]


def test_threads_share_the_cores_between_workers(monkeypatch):
    import bench.scheduler as scheduler
    monkeypatch.setattr(scheduler, "available_cores", lambda: 8)
    assert threads_per_run(2, None, "cpu") == 4
    assert threads_per_run(3, None, None) == 2
    assert threads_per_run(16, None, "cpu") == 1
    assert threads_per_run(2, 3, "cpu") == 3  # asked for
    assert threads_per_run(1, None, "cuda") is None  # torch's default


def _outcome(spec, status="done", seconds=0.0, message=""):
    return SimpleNamespace(spec=spec, status=status, seconds=seconds, message=message)


def test_the_eta_uses_each_rows_measured_time_shared_by_the_workers(monkeypatch):
    import bench.progress as progress_module
    now = [1000.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    at0, at1, at2, awp0, awp1, hr0 = (*_specs(1, 3), *_specs(2, 2)[2:], _specs(3)[2])
    job = JobProgress([at0, at1, at2, awp0, awp1, hr0], workers=2, mode="quiet",
                      stream=io.StringIO())
    assert job.eta() is None  # nothing measured yet
    job.started(at0)
    job.finished(_outcome(at0, seconds=100.0))
    job.started(awp0)
    now[0] += 50
    job.finished(_outcome(awp0, seconds=300.0))
    job.started(at1)
    now[0] += 40  # at1 has run 40 s of its expected 100
    # waiting: at2 (100), awp1 (300), hr0 (never measured: the mean of all, 200); running:
    # at1 (100 - 40 = 60); shared by 2 workers
    assert job.eta() == pytest.approx((100 + 300 + 200 + 60) / 2)


def test_quiet_mode_prints_one_line_per_finished_run():
    specs = _specs(2)
    stream = io.StringIO()
    job = JobProgress(specs, workers=1, mode="quiet", stream=stream)
    job.begin()
    sink = job.sink(specs[0])
    job.started(specs[0])
    sink("train AT seed 0:  45%|####   | 45/100 [00:10<00:12]")
    sink("clean model for smoke seed 0: reusing x")
    job.finished(_outcome(specs[0], seconds=65))
    job.started(specs[1])
    job.finished(_outcome(specs[1], "failed", 3, "training AT+AWP seed 0: boom"))
    job.end()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[1/2] done AT s0 in 1:05; elapsed ")
    assert lines[1].startswith("[2/2] FAILED AT+AWP s0 after 0:03: training AT+AWP seed 0: "
                               "boom; 1 failed")


def test_lines_mode_prefixes_run_lines_and_reports_bars_periodically(monkeypatch):
    import bench.progress as progress_module
    now = [0.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    specs = _specs(2)
    stream = io.StringIO()
    job = JobProgress(specs, workers=2, mode="lines", stream=stream, every=60)
    job.begin()
    for spec in specs:
        job.started(spec)
    job.sink(specs[1])("train AT+AWP seed 0:  10%|#   | 10/100 [00:01<00:09]")
    job.sink(specs[0])("clean model for smoke seed 0: reusing x")
    job.tick()  # not yet a minute
    text = stream.getvalue()
    assert "[AT s0] clean model for smoke seed 0: reusing x" in text
    assert "10/100" not in text  # bar updates are not printed as they come
    now[0] = 61
    job.tick()
    text = stream.getvalue()
    assert "runs [" in text and "0/2 (2 running, 2 workers)" in text
    assert "[AT+AWP s0] 1:01: train AT+AWP seed 0:  10%" in text
    assert "[AT s0] 1:01: starting" in text


def test_tty_mode_redraws_the_block_in_place():
    specs = _specs(1)
    stream = io.StringIO()
    job = JobProgress(specs, workers=1, mode="tty", stream=stream)
    job.begin()
    job.started(specs[0])
    job.sink(specs[0])("train AT seed 0:  50%|##  | 50/100 [00:10<00:10]")
    job.sink(specs[0])("a line of the run")
    text = stream.getvalue()
    assert "\x1b[2F\x1b[J" in text  # the two-line block (overall + the run) was erased
    assert "[AT s0] a line of the run\n" in text
    assert text.rstrip().endswith("50/100 [00:10<00:10]")  # the block is redrawn below
    job.finished(_outcome(specs[0], seconds=20))
    job.end()
    job.tick()  # a late tick draws nothing
    tail = stream.getvalue()[len(text):]
    assert tail.count("runs [") == 2  # the redrawn block after the finished line, the last
    last = tail.rsplit("\x1b[J", 1)[-1]  # what was printed after the block's last erase
    assert last.startswith("runs [") and "1/1 (0 running" in last and last.count("\n") == 1


def test_a_busy_run_is_announced_once_however_often_it_is_looked_at():
    specs = _specs(1)
    stream = io.StringIO()
    job = JobProgress(specs, workers=1, mode="lines", stream=stream)
    for _ in range(3):
        job.started(specs[0])
        job.set_aside(specs[0])
    assert stream.getvalue().count("another process is running it") == 1
    assert job.running == {}


def test_clock_format():
    assert clock(65) == "1:05" and clock(3725) == "1:02:05" and clock(-3) == "0:00"
