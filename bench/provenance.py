"""Where a record's numbers come from: ROBench's version and git commit, the libraries,
and the sha256 of each defense's source file (as the training process saw it)."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import bench
from bench.records import software_versions

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def git_state() -> dict:
    """The commit of the ROBench checkout and whether tracked files differ from it
    (None where this is not a git checkout or git is missing)."""
    if not (ROOT / ".git").exists():
        return {"commit": None, "dirty": None}
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(dirty) if commit else None}


def provenance(defense_sources: dict) -> dict:
    git = git_state()
    return {"robench_version": bench.__version__, "git_commit": git["commit"],
            "git_dirty": git["dirty"], "defense_sources": defense_sources,
            "versions": software_versions()}
