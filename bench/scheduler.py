"""Runs a plan of runs: one after another, or N at a time on one machine.

`run_plan(specs, suite, launch, workers=N)` starts up to N runs at once, each through
`bench.runner.run_one` (its own training and evaluation processes), each pinned to
`threads` CPU threads (default: the machine's cores divided by N). A run that fails does
not stop the others; every outcome is returned and the caller reports the failures. A run
whose folder another launcher holds is set aside and picked up once that launcher lets it
go (its finished record is then reused, not retrained).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from bench.config import RunSpec, Suite
from bench.errors import RunBusyError
from bench.progress import JobProgress
from bench.runner import Launch, run_one
from bench.worker import USER_ERRORS

BUSY_POLL_S = 2.0


@dataclass
class Outcome:
    spec: RunSpec
    status: str  # "done" | "reused" | "failed" | "interrupted"
    seconds: float = 0.0
    message: str = ""
    record_path: str = ""


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def threads_per_run(workers: int, threads: int | None, device: str | None) -> int | None:
    """Threads of each run's processes: as asked, else (CPU runs) the cores shared evenly
    between the workers; None leaves torch's default (one run at a time on a GPU)."""
    if threads:
        return threads
    if workers <= 1 and (device or "cpu").startswith("cuda"):
        return None
    return max(1, available_cores() // max(1, workers))


RunFunction = Callable[[RunSpec, Launch, bool], object]


def _default_run(suite: Suite) -> RunFunction:
    def run(spec: RunSpec, launch: Launch, wait: bool):
        return run_one(spec, suite=suite, launch=launch, wait=wait)
    return run


def run_plan(specs: list[RunSpec], suite: Suite, launch: Launch, workers: int = 1,
             progress: JobProgress | None = None,
             run: RunFunction | None = None) -> list[Outcome]:
    """Run every spec (up to `workers` at a time); return one Outcome per spec, in plan
    order. KeyboardInterrupt stops starting runs, waits for none, and is re-raised after
    the running children were told to stop (what they computed is kept)."""
    workers = max(1, min(workers, len(specs) or 1))
    progress = progress or JobProgress(specs, workers, mode="quiet")
    run = run or _default_run(suite)
    pending: deque[tuple[int, RunSpec]] = deque(enumerate(specs))
    busy: list[tuple[int, RunSpec]] = []
    outcomes: dict[int, Outcome] = {}
    guard = threading.Lock()
    stop = threading.Event()

    def next_spec() -> tuple[int, RunSpec] | None:
        while not stop.is_set():
            with guard:
                if pending:
                    return pending.popleft()
                if not busy:
                    return None
                pending.extend(busy)  # folders held by another launcher: look again
                busy.clear()
            time.sleep(BUSY_POLL_S)
        return None

    def work() -> None:
        while (item := next_spec()) is not None:
            index, spec = item
            child = replace(launch, output=progress.sink(spec), notices=progress.notice(spec))
            progress.started(spec)
            start = time.perf_counter()
            try:
                result = run(spec, child, False)
            except RunBusyError:
                progress.set_aside(spec)
                with guard:
                    busy.append(item)
                continue
            except USER_ERRORS as exc:
                outcome = Outcome(spec, "failed", time.perf_counter() - start,
                                  " ".join(str(exc).split()))
            except BaseException:  # KeyboardInterrupt: the launcher reports and exits
                stop.set()
                outcome = Outcome(spec, "interrupted", time.perf_counter() - start)
                outcomes[index] = outcome
                progress.finished(outcome)
                raise
            else:
                seconds = float(getattr(result, "seconds", 0.0))
                outcome = Outcome(spec, "reused" if seconds == 0.0 else "done", seconds,
                                  record_path=str(getattr(result, "record_path", "")))
            outcomes[index] = outcome
            progress.finished(outcome)

    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, name=f"worker-{i}", daemon=True)
               for i in range(workers)]
    progress.begin()
    try:
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            for thread in threads:
                thread.join(timeout=0.5)
            progress.tick()
    except KeyboardInterrupt:
        stop.set()
        progress.end()
        raise
    progress.end()
    if errors:
        raise errors[0]
    return [outcomes[i] for i in sorted(outcomes)]
