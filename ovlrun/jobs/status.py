"""``ovlrun status``: what the caller's own job localises, with the caller's own rights.

The user runs it inside the job, without sudo, so it reads nothing root keeps to itself
(job records are root-only):

- the mount table (``/proc/self/mountinfo``) is the truth about what is localised, not
  what the launcher meant to do (:mod:`ovlrun.jobs.overlays` picks ovlrun's overlays);
- the profile and job id come from the job's environment (``OVLRUN_PROFILE``,
  ``OVLRUN_JOB_ID``: a launch and ``enter`` set them, and so does Slurm's TaskProlog);
- a Slurm job without the TaskProlog has neither: its view file (``JOBID.env``, which
  the Prolog wrote for the job's user, readable by that user alone) gives them;
- what the job was given (``stats.given``) comes from the mount table: the record is
  root's.  Paths the job runs without show only in the launch's warnings and in the
  record (``ovlrun jobs``).
"""

from __future__ import annotations

import os

from ovlrun.errors import OvlrunError
from ovlrun.jobs.overlays import localised
from ovlrun.jobs.records import JobRecord, valid_job_id
from ovlrun.jobs.stats import given
from ovlrun.linux import mountinfo
from ovlrun.linux.files import UntrustedError, open_trusted
from ovlrun.store.layout import store_dir

MAX_VIEW = 1 << 16


def job_status(environ: dict[str, str] | None = None) -> dict[str, object]:
    """The profile, job id, localised paths and figures (``stats``, see
    :mod:`ovlrun.jobs.stats`) of the job this process runs in (empty outside one)."""
    import time

    env = dict(os.environ if environ is None else environ)
    paths = []
    mounts = localised(mountinfo.read())
    for m in mounts:
        mode = "data-only" if m.data_only else "fallback (shared tree as regular lower layer)"
        paths.append({"path": m.point, "snapshot": m.snapshot_dir(store_dir(env)), "mode": mode})
    profile, job_id = env.get("OVLRUN_PROFILE", ""), env.get("OVLRUN_JOB_ID", "")
    if not profile:
        view = slurm_view(env)
        profile, job_id = view.get("OVLRUN_PROFILE", ""), view.get("OVLRUN_JOB_ID", job_id)
    # What the mount table shows (ages: from each snapshot's build until now).
    figures: dict[str, object] = {}
    if mounts:
        shown = given([(m.point, "/".join(m.key_id)) for m in mounts], [], all(m.data_only for m in mounts),
                      time.time())
        del shown["unlocalised"]  # the mount table cannot tell what the profile named but did not get
        figures["given"] = shown
    return {"profile": profile, "job_id": job_id, "localised": paths, "stats": figures}


def slurm_view(environ: dict[str, str]) -> dict[str, str]:
    """In a Slurm job: the variables its view file (``RUNDIR[/NODE]/JOBID.env``) holds for
    its user; empty if there is none or it is not the caller's."""
    job_id = environ.get("SLURM_JOB_ID", "")
    if not valid_job_id(job_id):
        return {}
    try:
        fd = open_trusted(str(JobRecord.env_path(job_id, environ.get("SLURMD_NODENAME"))), uid=os.getuid(),
                          owner="you")
    except (OSError, UntrustedError, OvlrunError):  # none, not the caller's, or a bad node name
        return {}
    with os.fdopen(fd, "rb") as f:
        text = f.read(MAX_VIEW).decode(errors="replace")
    return dict(line.partition("=")[::2] for line in text.splitlines() if "=" in line)
