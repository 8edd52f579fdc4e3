"""Job records: what a scheduler hook decided for one job, for the hooks after it.

A small JSON file per job, root-owned, under ``/run/ovlrun/jobs`` (``OVLRUN_JOB_RUNDIR``
for tests): which profile the job asked for, whose job it is, where its namespace is
pinned and what went wrong.  ``ovlrun enter``, the epilog, CloneNSScript and gc rely on
it instead of anything the user can influence.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ovlrun.errors import OvlrunError
from ovlrun.linux.files import UntrustedError, open_trusted, write_atomic

DEFAULT_RUNDIR = "/run/ovlrun/jobs"


def rundir() -> Path:
    """Directory of job records; tests point it elsewhere with OVLRUN_JOB_RUNDIR."""
    return Path(os.environ.get("OVLRUN_JOB_RUNDIR", DEFAULT_RUNDIR))


def host_node() -> str:
    """This host's short name: the node name of its one slurmd, usually."""
    return os.uname().nodename.split(".")[0]


def valid_node_name(node: str) -> bool:
    return bool(node) and node[0] != "." and all(c.isascii() and (c.isalnum() or c in "._-") for c in node)


def record_dir(node: str | None = None) -> Path:
    """Where the records of slurmd node ``node`` live: the run directory itself for the
    host's own node, a subdirectory per node name for the others (Slurm's multiple-slurmd:
    several nodes on one host, where one job id can run on two of them)."""
    base = rundir()
    if not node or node == host_node():
        return base
    if not valid_node_name(node):
        raise OvlrunError(f"invalid node name {node!r}")
    return base / node


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
    node: str = ""  # the slurmd node name ("": the host's own node)

    @staticmethod
    def path_for(job_id: str, node: str | None = None) -> Path:
        if not valid_job_id(job_id):
            # Job ids come from the environment of a root hook or the command line of
            # `ovlrun enter`; never let them name a path outside the run directory.
            raise OvlrunError(f"invalid job id {job_id!r}: expected digits")
        return record_dir(node) / f"{job_id}.json"

    @classmethod
    def messages_path(cls, job_id: str, node: str | None = None) -> Path:
        return cls.path_for(job_id, node).with_suffix(".messages")

    @classmethod
    def env_path(cls, job_id: str, node: str | None = None) -> Path:
        return cls.path_for(job_id, node).with_suffix(".env")

    def save(self) -> None:
        directory = record_dir(self.node)
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_atomic(str(self.path_for(self.job_id, self.node)),
                     (json.dumps(asdict(self), indent=1) + "\n").encode())
        # The same messages as plain lines, for readers without Python: the optional
        # Slurm TaskProlog is a shell script running as the user, possibly unable to
        # reach the interpreter that runs ovlrun.
        notes = "".join(m.replace("\n", " ") + "\n" for m in self.messages)
        write_atomic(str(self.messages_path(self.job_id, self.node)), notes.encode())
        # What a launch puts in a job's environment, for the TaskProlog to export (profile
        # names are [A-Za-z0-9_.+-], job ids digits: nothing to quote).
        env = f"OVLRUN_PROFILE={self.profile}\nOVLRUN_JOB_ID={self.job_id}\n" if self.state == "localised" else ""
        write_atomic(str(self.env_path(self.job_id, self.node)), env.encode())

    @classmethod
    def load(cls, job_id: str, node: str | None = None) -> JobRecord | None:
        return cls._load_path(cls.path_for(job_id, node))

    @classmethod
    def find(cls, job_id: str) -> JobRecord | None:
        """The record of job ``job_id`` on whichever node of this host runs it (``enter``):
        an error if several do (a job spanning nodes of a multiple-slurmd host)."""
        candidates = [cls.path_for(job_id)]
        try:
            candidates += sorted(rundir() / d / f"{job_id}.json" for d in os.listdir(rundir())
                                 if valid_node_name(d) and (rundir() / d).is_dir())
        except OSError:
            pass
        found = [p for p in candidates if os.path.lexists(p)]
        if len(found) > 1:
            nodes = ", ".join(p.parent.name if p.parent != rundir() else host_node() for p in found)
            raise OvlrunError(f"job {job_id} runs on several nodes of this host ({nodes}); "
                              "enter it from a session on the node you mean")
        return cls._load_path(found[0]) if found else None

    @classmethod
    def _load_path(cls, path: Path) -> JobRecord | None:
        try:
            fd = open_trusted(str(path))  # only a record root wrote: the run directory could be misconfigured
        except FileNotFoundError:
            return None
        except OSError as e:
            raise OvlrunError(f"{path}: {e.strerror}") from None
        except UntrustedError as e:
            raise OvlrunError(f"{path}: {e.problem}; refusing to use it") from None
        with os.fdopen(fd, "rb") as f:
            data = json.loads(f.read())
        return cls(**data)

    @classmethod
    def remove(cls, job_id: str, node: str | None = None) -> None:
        cls.path_for(job_id, node).unlink(missing_ok=True)
        cls.messages_path(job_id, node).unlink(missing_ok=True)
        cls.env_path(job_id, node).unlink(missing_ok=True)

    @classmethod
    def all(cls) -> list[JobRecord]:
        """Every readable, trusted record of every node of this host (for gc); unreadable
        ones are skipped."""
        out = []
        directories = [rundir()]
        try:
            directories += [rundir() / d for d in sorted(os.listdir(rundir()))
                            if valid_node_name(d) and (rundir() / d).is_dir()]
        except OSError:
            return []
        for directory in directories:
            try:
                names = sorted(os.listdir(directory))
            except OSError:
                continue
            for name in names:
                job_id, _, ext = name.partition(".")
                if ext != "json" or not valid_job_id(job_id):
                    continue
                try:
                    record = cls._load_path(directory / name)
                except (OvlrunError, ValueError, TypeError):
                    continue
                if record is not None:
                    out.append(record)
        return out
