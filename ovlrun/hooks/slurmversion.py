"""Which slurmd runs a hook, for the one decision that depends on it.

ovlrun's Prolog for 21.08-23.02.4 (``PrologFlags=Contain`` without RunInJob or
CloneNSScript) creates the job directory of job_container/tmpfs before the plugin does,
with the namespace in it.  Since Slurm 23.02.5 (SchedMD commit 49f4dc528e, bug 16164) the
plugin refuses a job directory that already exists ("_create_ns: mkdir ... failed: File
exists", measured on 24.11.5): the job is requeued and held, and never runs.  So the
Prolog asks the slurmd that started it (its parent) for its version first.
"""

from __future__ import annotations

import os
import re
import subprocess

# First release whose job_container/tmpfs fails a job whose directory exists.
REFUSES_EXISTING_JOB_DIR = (23, 2, 5)
_VERSION = re.compile(r"slurm(?:-wlm)? (\d+)\.(\d+)\.(\d+)")  # Debian: "slurm-wlm 24.11.5"


def parent_slurmd_version() -> tuple[int, int, int] | None:
    """``slurmd -V`` of the parent process if it is a slurmd; None if unknown."""
    try:
        exe = os.readlink(f"/proc/{os.getppid()}/exe")
    except OSError:
        return None
    if not os.path.basename(exe).startswith("slurmd"):
        return None  # run by hand or by another scheduler: nothing to learn
    try:
        out = subprocess.run([exe, "-V"], capture_output=True, text=True, timeout=10, env={}).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = _VERSION.match(out.strip())
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def create_mode_problem() -> str | None:
    """Why the Prolog must not create the job directory itself; None if it may."""
    version = parent_slurmd_version()
    if version is None or version < REFUSES_EXISTING_JOB_DIR:
        return None
    return (f"slurmd {'.'.join(map(str, version))} does not let a Prolog prepare the job's namespace "
            "(Slurm >= 23.02.5 fails jobs whose job_container directory exists); configure "
            "PrologFlags=Contain,RunInJob (24.05+) or CloneNSScript on the BasePath line of "
            "job_container.conf (24.11+), see docs/slurm.md")
