"""What a Slurm hook is told: the job (its environment), what it asks for (its comment)
and how job_container/tmpfs is configured on this node (job_container.conf).

Variables measured on Slurm 22.05 (docs/slurm.md has the full list).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ovlrun.errors import OvlrunError
from ovlrun.jobs.records import host_node, valid_job_id
from ovlrun.profile.locate import valid_name

COMMENT_PREFIX = "ovl:"
DEFAULT_JC_CONF = "/etc/slurm/job_container.conf"


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    uid: int
    gid: int
    user: str
    comment: str
    node: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SlurmJob:
        """The job a Prolog/Epilog runs for (variables measured on Slurm 22.05)."""
        missing = [v for v in ("SLURM_JOB_ID", "SLURM_JOB_UID") if not env.get(v)]
        if missing:
            raise OvlrunError(f"not run by slurmd: {', '.join(missing)} unset")
        job_id = env["SLURM_JOB_ID"]
        if not valid_job_id(job_id):
            raise OvlrunError(f"SLURM_JOB_ID={job_id!r} is not a number")
        uid = int(env["SLURM_JOB_UID"])
        return cls(
            job_id=job_id,
            uid=uid,
            gid=int(env.get("SLURM_JOB_GID") or -1),
            user=env.get("SLURM_JOB_USER") or str(uid),
            comment=env.get("SLURM_JOB_COMMENT", ""),
            node=env.get("SLURMD_NODENAME") or host_node(),
        )


def requested_profile(comment: str) -> tuple[str | None, str | None]:
    """``(name, problem)`` from a job comment; ``(None, None)`` if it asks for nothing.

    The request is the first whitespace- or comma-separated word starting with
    ``ovl:``, so sites can keep using the comment for other things too.
    """
    for word in re.split(r"[\s,]+", comment.strip()):
        if word.startswith(COMMENT_PREFIX):
            name = word[len(COMMENT_PREFIX):]
            if not name:
                return None, f"empty profile name in job comment {comment!r}"
            # A name, never a path: a user must not make root mount a profile file of
            # their own.
            if not valid_name(name) or name.endswith(".toml"):
                return None, (f"invalid profile name {name!r} in job comment: use a profile "
                              "name (letters, digits, '_', '.', '+', '-'), not a path")
            return name, None
    return None, None


@dataclass(frozen=True)
class JobContainerConf:
    """The parts of job_container.conf (job_container/tmpfs) that ovlrun needs."""

    base_path: Path
    dirs: tuple[str, ...] = ("/tmp", "/dev/shm")
    clone_ns_script: str | None = None

    def job_dir(self, node: str, job_id: str, layout: str | None = None) -> Path:
        """The plugin's per-job directory, which holds the ``.ns`` namespace file.

        Builds with multiple-slurmd support (Debian's) put it under a directory named
        after the node, others directly under BasePath.  The plugin creates
        ``<BasePath>/<node>`` when slurmd starts, which tells the two apart;
        OVLRUN_SLURM_JOBDIR_LAYOUT=node|plain overrides the guess.
        """
        if layout is None:
            layout = "node" if (self.base_path / node).is_dir() else "plain"
        if layout == "node":
            return self.base_path / node / job_id
        return self.base_path / job_id


def jc_conf_path(env: Mapping[str, str]) -> str:
    """job_container.conf sits next to slurm.conf (slurmd passes SLURM_CONF to hooks)."""
    if env.get("OVLRUN_SLURM_JC_CONF"):
        return env["OVLRUN_SLURM_JC_CONF"]
    if env.get("SLURM_CONF"):
        return str(Path(env["SLURM_CONF"]).with_name("job_container.conf"))
    return DEFAULT_JC_CONF


def read_job_container_conf(path: str | Path, node: str) -> JobContainerConf | None:
    """Parse job_container.conf; None if there is none (plugin not in use)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        tokens = [_key_value(tok) for tok in line.split()]
        fields = dict(tokens)
        # Slurm 24.11 (measured on 24.11.5) honours CloneNSScript only after BasePath= or
        # NodeName= on the same line; on a line of its own it is parsed and ignored.
        keys = [k for k, _ in tokens]
        scope = min((keys.index(k) for k in ("basepath", "nodename") if k in keys), default=len(keys))
        if "clonensscript" in keys[:scope]:
            fields.pop("clonensscript")
        names = fields.pop("nodename", None)
        # Lines with NodeName= apply only to the nodes they list (exact names only;
        # hostlist ranges are not expanded); later lines win, as in Slurm.
        if names is not None and node not in names.split(","):
            continue
        values.update(fields)
    if "basepath" not in values:
        raise OvlrunError(f"{path}: no BasePath for node {node}")
    dirs = tuple(d for d in values.get("dirs", "/tmp,/dev/shm").split(",") if d)
    return JobContainerConf(Path(values["basepath"]), dirs, values.get("clonensscript"))


def _key_value(token: str) -> tuple[str, str]:
    key, _, value = token.partition("=")
    return key.lower(), value
