"""What every bench script shares: the repository root and git facts for result metadata."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    """Output of ``git ARGS`` in the repository, or "unknown" where git is unavailable."""
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance() -> dict:
    """The command line and git commit for a result's meta. A copy of the tree without git (the GPU machine's)
    names its commit in ``KVPASS_GIT_COMMIT``."""
    script = os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else "?"
    commit = os.environ.get("KVPASS_GIT_COMMIT") or git("rev-parse", "HEAD")
    return {"command": " ".join(["python", script, *sys.argv[1:]]), "git_commit": commit}
