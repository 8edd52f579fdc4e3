"""The checkout itself: no committed file is one that .gitignore ignores.

A committed ignored file is invisible to `git status` once changed locally and breaks
fresh machines: a committed .apt.stamp made `make` skip apt-get there (issue 15).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_no_committed_file_is_ignored() -> None:
    if not (REPO / ".git").exists():  # a directory, or a file in a worktree
        pytest.skip(f"{REPO} is not a git checkout (no .git: e.g. a `git archive` copy)")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    # safe.directory: root runs the suite in checkouts other users may own.
    r = subprocess.run(["git", "-c", f"safe.directory={REPO}", "-C", str(REPO), "ls-files", "-z",
                        "--cached", "--ignored", "--exclude-standard"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ignored = [path for path in r.stdout.split("\0") if path]
    assert ignored == [], f"committed but ignored by .gitignore (git rm --cached them): {ignored}"
