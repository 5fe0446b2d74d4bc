"""Errors with a message written for the user: the command line prints them as one line
(no traceback unless `--debug`) and exits with status 2."""

from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class RunMismatchError(RuntimeError):
    """A run folder holds a different run or was made under another suite file."""


class DefenseError(RuntimeError):
    """Defense code raised, or returned something the engine cannot use. The message names
    the defense, its source file (and line), the hook, the epoch and step, what went wrong,
    what was kept and how to go on."""


class RunFailedError(RuntimeError):
    """A run's training or evaluation process failed; its message is the process's own
    one-line error."""


class RunBusyError(RuntimeError):
    """Another live process holds the run folder's lock (it is training or evaluating
    that run now)."""


class LockLostError(RuntimeError):
    """Another process took over a folder this process held (it judged the lock stale)."""
