"""A child process of the launcher dies with it (Linux).

The launcher puts its pid in the child's environment (`ROBENCH_PARENT_PID`); the child
calls `die_with_parent()` first thing: it asks the kernel for SIGTERM when its parent dies
(`prctl(PR_SET_PDEATHSIG)`) and, should the parent already be gone, exits at once. So a
killed launcher (or Ray worker) leaves no training process writing into a run folder whose
lock is about to be recovered by another process. This is done in the child, after it
started, rather than in the launcher between fork and exec, which is unsafe in a launcher
that runs several threads.
"""

from __future__ import annotations

import os
import signal
import sys

PARENT_ENV = "ROBENCH_PARENT_PID"
PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """Arm the parent-death signal; True when it is armed. Exits if the parent is gone."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM)) != 0:
            return False
    except (OSError, AttributeError, ValueError):
        return False
    if os.getppid() != int(parent):  # the parent died before the signal was armed
        sys.exit(143)
    return True
