"""Ownership of a run folder (or a clean-model cache entry) by one process at a time.

A lock is a file, `<folder>/.lock`, created atomically (`O_CREAT | O_EXCL`) and holding
JSON: host, pid, a random token and when it was taken. While the owner works, a thread
touches the file every `heartbeat` seconds (its mtime is the heartbeat). Another process
that finds the file treats the lock as *stale*, and recovers it with a message, when the
owner is a dead process on this host or its heartbeat is older than `stale_after` seconds
(an owner on another host, e.g. a Ray node, that died). Recovery renames the stale file
away first; exactly one contender's rename succeeds, and only then does it try the
atomic create, so two processes never both own a folder.

The owner checks at each heartbeat that the file is still its own (same token); if it is
not (a host clock far off, a process frozen for longer than `stale_after`), it records the
loss and `check()` raises instead of letting two owners write one folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.errors import LockLostError

LOCK_FILE = ".lock"
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    token: str
    taken: float
    what: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} ({self.what})"


def _read_owner(path: Path) -> Owner | None:
    try:
        raw = json.loads(path.read_text())
        return Owner(str(raw["host"]), int(raw["pid"]), str(raw["token"]),
                     float(raw["taken"]), str(raw.get("what", "")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):  # half-written or foreign content
        return Owner("?", -1, "?", 0.0, "unreadable lock file")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def stale_reason(path: Path, stale_after: float = STALE_AFTER_S,
                 now: float | None = None) -> str | None:
    """Why the lock file at `path` is stale, or None when its owner is alive (or there is
    no lock)."""
    owner = _read_owner(path)
    if owner is None:
        return None
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return None
    if owner.host == socket.gethostname() and not _pid_alive(owner.pid):
        return f"its owner, {owner.describe()}, is no longer running"
    if age > stale_after:
        return (f"its owner, {owner.describe()}, has not updated it for {age:.0f} s "
                f"(stale after {stale_after:.0f} s)")
    return None


class FolderLock:
    """`with FolderLock(folder, what): ...` or `acquire()` / `release()`."""

    def __init__(self, folder: Path, what: str, heartbeat: float = HEARTBEAT_S,
                 stale_after: float = STALE_AFTER_S, log=None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.what = what
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.token = secrets.token_hex(8)
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- taking and giving back ------------------------------------------------
    def try_acquire(self) -> bool:
        """Take the lock now if it is free or stale; False when a live owner holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return True
            judged = _read_owner(self.path)
            reason = stale_reason(self.path, self.stale_after)
            if reason is None or judged is None:
                if self.path.exists():
                    return False
                continue  # released between our two looks: try again
            moved = self.path.with_name(f"{LOCK_FILE}.stale-{self.token}")
            try:
                os.rename(self.path, moved)  # only one contender wins this rename
            except FileNotFoundError:
                continue
            if _read_owner(moved) != judged:
                # a new owner took the folder between our look and the rename: give it back
                with contextlib.suppress(FileExistsError):
                    os.link(moved, self.path)
                moved.unlink(missing_ok=True)
                continue
            moved.unlink(missing_ok=True)
            self.log(f"recovered the stale lock of {self.folder}: {reason}")
        return False

    def acquire(self, poll: float = 2.0, timeout: float | None = None,
                waiting=None) -> None:
        """Take the lock, waiting for a live owner to release it (`waiting(owner)` is
        called once, when the wait starts)."""
        start = time.monotonic()
        told = False
        while not self.try_acquire():
            if not told and waiting is not None:
                waiting(self.owner())
                told = True
            if timeout is not None and time.monotonic() - start > timeout:
                raise TimeoutError(f"{self.folder} is still locked by {self.owner()}")
            time.sleep(poll)

    def owner(self) -> str:
        owner = _read_owner(self.path)
        return "nobody" if owner is None else owner.describe()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._owns():
            self.path.unlink(missing_ok=True)

    def check(self) -> None:
        """Raise LockLostError if another process has taken the folder over."""
        if self.lost:
            raise LockLostError(self.lost)

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- internals ------------------------------------------------------------------
    def _create(self) -> bool:
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "token": self.token, "taken": time.time(), "what": self.what})
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def _owns(self) -> bool:
        owner = _read_owner(self.path)
        return owner is not None and owner.token == self.token

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self.lost = None
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name=f"lock-heartbeat {self.folder.name}")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            if not self._owns():
                self.lost = (f"the lock of {self.folder} was taken over by "
                             f"{self.owner()} while this process ({self.what}) held it")
                return
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path)


@contextlib.contextmanager
def folder_lock(folder: Path, what: str, waiting=None, **kw) -> Iterator[FolderLock]:
    """Hold the lock of `folder` (waiting for a live owner) for the `with` block."""
    lock = FolderLock(folder, what, **kw)
    lock.acquire(waiting=waiting)
    try:
        yield lock
    finally:
        lock.release()
