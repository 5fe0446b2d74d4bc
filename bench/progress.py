"""Progress of a whole job (a plan of runs): one overall bar with runs done / total,
failures and an ETA from the measured run times, above one line per running run.

Three modes:

- `tty` (an interactive terminal): the block (overall bar, then each running run's latest
  progress-bar state) is redrawn in place; other lines of the runs scroll above it,
  prefixed by the run (`[ROW sSEED] ...`).
- `lines` (a log file, CI): the runs' lines are printed as they come, prefixed by the run;
  progress-bar updates are not, but every `every` seconds the overall line and each
  running run's latest state are printed.
- `quiet`: one line per finished run (and per failure), nothing else.

The children's output reaches it through `sink(spec)` (see `bench.runner.Launch.output`).
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections import Counter
from typing import TextIO

from bench.config import RunSpec

BAR_WIDTH = 24


def run_label(spec: RunSpec) -> str:
    return f"{spec.row_name} s{spec.seed}"


def clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def looks_like_bar(text: str) -> bool:
    """A progress-bar state (tqdm: `label:  45%|####  | 45/100 [...]`)."""
    return "%|" in text and "/" in text


class JobProgress:
    def __init__(self, specs: list[RunSpec], workers: int, mode: str = "lines",
                 stream: TextIO | None = None, every: float = 60.0) -> None:
        self.total, self.workers, self.mode, self.every = len(specs), max(1, workers), mode, every
        self.left = Counter(spec.row_name for spec in specs)  # row -> runs not finished
        self.stream = stream or sys.stderr
        self.lock = threading.RLock()
        self.done = self.reused = self.failed = 0
        self.running: dict[str, tuple[RunSpec, float]] = {}  # label -> (spec, start)
        self.status: dict[str, str] = {}  # label -> latest bar state
        self.durations: dict[str, list[float]] = {}  # row -> seconds of runs that ran
        self.aside: set[str] = set()  # runs found busy (held by another process)
        self.start = time.monotonic()
        self._drawn = 0  # lines of the tty block now on screen
        self.closed = False  # end() was called
        self._last_report = 0.0

    @staticmethod
    def choose_mode(quiet: bool, stream: TextIO | None = None) -> str:
        if quiet:
            return "quiet"
        stream = stream or sys.stderr
        return "tty" if hasattr(stream, "isatty") and stream.isatty() else "lines"

    # ---- events -----------------------------------------------------------------------
    def begin(self) -> None:
        self._last_report = time.monotonic()
        if self.mode == "lines":
            self._print(self.overall())

    def sink(self, spec: RunSpec):
        label = run_label(spec)

        def receive(text: str) -> None:
            with self.lock:
                if looks_like_bar(text):
                    self.status[label] = text.strip()
                    if self.mode == "tty":
                        self._redraw()
                elif self.mode != "quiet":
                    self._print(f"[{label}] {text}")
        return receive

    def notice(self, spec: RunSpec):
        """The launcher's own messages about a run (e.g. a stale lock recovered): printed
        in every mode, quiet included."""
        label = run_label(spec)

        def receive(text: str) -> None:
            with self.lock:
                self._print(f"[{label}] {text}")
        return receive

    def started(self, spec: RunSpec) -> None:
        with self.lock:
            self.running[run_label(spec)] = (spec, time.monotonic())
            if self.mode == "tty":
                self._redraw()

    def set_aside(self, spec: RunSpec) -> None:
        """Another process holds the run's folder; said once per run, not at every look."""
        with self.lock:
            label = run_label(spec)
            self.running.pop(label, None)
            if self.mode != "quiet" and label not in self.aside:
                self._print(f"[{label}] another process is running it; coming back to it "
                            "later")
            self.aside.add(label)

    def finished(self, outcome) -> None:
        with self.lock:
            label = run_label(outcome.spec)
            self.running.pop(label, None)
            self.status.pop(label, None)
            if outcome.status != "interrupted":
                self.left[outcome.spec.row_name] -= 1
            if outcome.status == "failed":
                self.failed += 1
                text = f"FAILED {label} after {clock(outcome.seconds)}: {outcome.message}"
            elif outcome.status == "interrupted":
                text = f"interrupted {label}"
            else:
                if outcome.status == "reused":
                    self.reused += 1
                    text = f"kept {label} (finished before)"
                else:
                    self.durations.setdefault(outcome.spec.row_name, []).append(outcome.seconds)
                    text = f"done {label} in {clock(outcome.seconds)}"
                self.done += 1
            self._print(f"[{self.done + self.failed}/{self.total}] {text}; {self.summary()}")

    def tick(self) -> None:
        """Called about twice a second by the scheduler."""
        with self.lock:
            now = time.monotonic()
            if self.mode == "tty":
                self._redraw()
            elif self.mode == "lines" and now - self._last_report >= self.every:
                self._last_report = now
                self._print(self.overall())
                for label, (_, started) in sorted(self.running.items()):
                    state = self.status.get(label, "starting")
                    self._print(f"[{label}] {clock(now - started)}: {state}")

    def end(self) -> None:
        with self.lock:
            if self.mode == "tty":
                self._erase()
                self.closed = True  # the block is not drawn again
            if self.mode != "quiet":
                self._print(self.overall())

    # ---- text -------------------------------------------------------------------------
    def eta(self) -> float | None:
        """Seconds left: each waiting run costs the mean measured time of its row (else
        of every run measured so far), each running one that minus its elapsed time; the
        sum is shared by the workers. None until a run has been measured."""
        measured = [s for row in self.durations.values() for s in row]
        if not measured:
            return None
        overall = sum(measured) / len(measured)

        def estimate(row: str) -> float:
            times = self.durations.get(row)
            return sum(times) / len(times) if times else overall

        now = time.monotonic()
        running = sum(max(0.0, estimate(spec.row_name) - (now - started))
                      for spec, started in self.running.values())
        busy = Counter(spec.row_name for spec, _ in self.running.values())
        waiting = sum(max(0, left - busy[row]) * estimate(row) for row, left in self.left.items())
        return (running + waiting) / self.workers

    def summary(self) -> str:
        parts = [f"{self.failed} failed"] if self.failed else []
        parts.append(f"elapsed {clock(time.monotonic() - self.start)}")
        eta = self.eta()
        parts.append("ETA " + ("?" if eta is None else clock(eta)))
        return ", ".join(parts)

    def overall(self) -> str:
        finished = self.done + self.failed
        filled = int(BAR_WIDTH * finished / max(1, self.total))
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        return (f"runs [{bar}] {finished}/{self.total} ({len(self.running)} running, "
                f"{self.workers} worker{'s' if self.workers > 1 else ''}); {self.summary()}")

    # ---- output -------------------------------------------------------------------------
    def _print(self, text: str) -> None:
        live = self.mode == "tty" and not self.closed
        if live:
            self._erase()
        print(text, file=self.stream, flush=True)
        if live:
            self._draw()

    def _block(self) -> list[str]:
        width = shutil.get_terminal_size((120, 24)).columns - 1
        lines = [self.overall()]
        now = time.monotonic()
        for label, (_, started) in sorted(self.running.items()):
            state = self.status.get(label, f"starting ({clock(now - started)})")
            lines.append(f"  [{label}] {state}")
        return [line[:width] for line in lines]

    def _erase(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        lines = self._block()
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self._drawn = len(lines)

    def _redraw(self) -> None:
        if self.closed:
            return
        self._erase()
        self._draw()
