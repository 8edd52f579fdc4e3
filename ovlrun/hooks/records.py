"""Job records: what a scheduler hook decided for one job, for the hooks after it.

A small JSON file per job, root-owned, under ``/run/ovlrun/jobs`` (``OVLRUN_JOB_RUNDIR``
for tests): which profile the job asked for, whose job it is, where its namespace is
pinned and what went wrong.  ``ovlrun enter``, the epilog, CloneNSScript and gc rely on
it instead of anything the user can influence.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ovlrun.errors import OvlrunError
from ovlrun.linux.files import NOT_WRITABLE, trust_problem, write_atomic

DEFAULT_RUNDIR = "/run/ovlrun/jobs"


def rundir() -> Path:
    """Directory of job records; tests point it elsewhere with OVLRUN_JOB_RUNDIR."""
    return Path(os.environ.get("OVLRUN_JOB_RUNDIR", DEFAULT_RUNDIR))


def valid_job_id(job_id: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts '²' and other Unicode digits."""
    return bool(job_id) and job_id.isascii() and job_id.isdigit()


@dataclass
class JobRecord:
    """What a hook decided for one job; written by root, read by epilog and enter."""

    job_id: str
    uid: int
    gid: int
    user: str
    profile: str | None = None  # profile name the job asked for (None: no request)
    # "requested": waiting for a later hook (CloneNSScript) to mount; "localised";
    # "unlocalised": the job runs on the plain shared tree, messages say why.
    state: str = "requested"
    ns_path: str | None = None  # pinned namespace file, once one exists
    ns_owned: bool = False  # True if ovlrun created the namespace (so it must remove it)
    localised: list[str] = field(default_factory=list)  # mounted paths
    messages: list[str] = field(default_factory=list)  # warnings for the user/admin

    @staticmethod
    def path_for(job_id: str) -> Path:
        if not valid_job_id(job_id):
            # Job ids come from the environment of a root hook or the command line of
            # `ovlrun enter`; never let them name a path outside the run directory.
            raise OvlrunError(f"invalid job id {job_id!r}: expected digits")
        return rundir() / f"{job_id}.json"

    @classmethod
    def messages_path(cls, job_id: str) -> Path:
        return cls.path_for(job_id).with_suffix(".messages")

    def save(self) -> None:
        directory = rundir()
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_atomic(str(self.path_for(self.job_id)), (json.dumps(asdict(self), indent=1) + "\n").encode())
        # The same messages as plain lines, for readers without Python: the optional
        # Slurm TaskProlog is a shell script running as the user, possibly unable to
        # reach the interpreter that runs ovlrun.
        notes = "".join(m.replace("\n", " ") + "\n" for m in self.messages)
        write_atomic(str(self.messages_path(self.job_id)), notes.encode())

    @classmethod
    def load(cls, job_id: str) -> JobRecord | None:
        path = cls.path_for(job_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise OvlrunError(f"{path}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            # Only trust a record root wrote: the run directory could be misconfigured.
            problem = "not a regular file" if not stat.S_ISREG(st.st_mode) else trust_problem(st, NOT_WRITABLE)
            if problem:
                raise OvlrunError(f"{path}: {problem}; refusing to use it")
            data = json.loads(f.read())
        return cls(**data)

    @classmethod
    def remove(cls, job_id: str) -> None:
        cls.path_for(job_id).unlink(missing_ok=True)
        cls.messages_path(job_id).unlink(missing_ok=True)

    @classmethod
    def all(cls) -> list[JobRecord]:
        """Every readable, trusted record (for gc); unreadable ones are skipped."""
        out = []
        try:
            names = sorted(os.listdir(rundir()))
        except OSError:
            return []
        for name in names:
            job_id, _, ext = name.partition(".")
            if ext != "json" or not valid_job_id(job_id):
                continue
            try:
                record = cls.load(job_id)
            except (OvlrunError, ValueError, TypeError):
                continue
            if record is not None:
                out.append(record)
        return out
