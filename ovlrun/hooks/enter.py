"""``ovlrun enter JOBID [--] [CMD...]``: run a command in a job's prepared namespace.

For schedulers (or uses) without a hook that puts processes into the namespace: a
prolog (``ovlrun slurm prolog``) has pinned a mount namespace for the job and recorded
whose job it is; the job's own user joins it through sudo (sudoers line in
docs/slurm.md), e.g. ``sudo ovlrun enter $SLURM_JOB_ID -- ./run.sh`` or from an ssh
session on the node.  Other users' jobs are refused; the command always runs as the
job's user, with no capabilities, in the caller's working directory.
"""

from __future__ import annotations

import os
import sys

from ovlrun.errors import OvlrunError
from ovlrun.launch.caller import caller_environment, refuse_tainted_environment
from ovlrun.linux import namespaces, syscalls
from ovlrun.linux.namespaces import JobRecord
from ovlrun.linux.privileges import Identity, sudo_caller

USAGE = """\
usage: sudo ovlrun enter JOBID [--] [CMD [ARG...]]

Run CMD (default: your login shell) as yourself inside the mount namespace that
ovlrun's prolog prepared for job JOBID on this node, with that job's localised view.
Only the job's owner (or root) may enter it."""


def parse(argv: list[str]) -> tuple[str, list[str]]:
    if not argv:
        raise OvlrunError(USAGE)
    job_id, rest = argv[0], argv[1:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    return job_id, rest


def authorised_record(job_id: str, caller: int | None) -> JobRecord:
    """The job's record if ``caller`` (None: root itself) may enter its namespace."""
    record = JobRecord.load(job_id)
    if record is None:
        raise OvlrunError(f"job {job_id} has no ovlrun namespace on this node "
                          "(not running here, or it asked for no profile)")
    if caller is not None and caller != record.uid:
        # Same message whether or not the job exists for someone else would be nicer,
        # but job ids and owners are public in Slurm anyway (squeue).
        raise OvlrunError(f"job {job_id} belongs to {record.user}; you can only enter your own jobs")
    if not record.ns_path or not namespaces.is_ns_holder(record.ns_path):
        why = "; ".join(record.messages) or "its namespace is gone"
        raise OvlrunError(f"job {job_id} has no localised namespace: {why}")
    return record


def enter(job_id: str, command: list[str], environ: dict[str, str] | None = None) -> int:
    """Join job ``job_id``'s namespace, become its user and exec ``command``."""
    from ovlrun.launch.execute import exec_command, shell_argv

    own_env = dict(os.environ if environ is None else environ)
    if os.geteuid() != 0:
        raise OvlrunError("ovlrun enter must run as root: use 'sudo ovlrun enter JOBID ...'")
    caller = sudo_caller(own_env)
    env = own_env
    if caller is not None:
        # Same sudo rules as a launch (ovlrun/callerenv.py): nothing the caller set may
        # steer this root process (e.g. where job records are read from); the caller's
        # own environment goes to the command, after the privilege drop.
        refuse_tainted_environment(own_env)
        if "OVLRUN_JOB_RUNDIR" in own_env:
            raise OvlrunError("OVLRUN_JOB_RUNDIR is only honoured for root callers")
        env = caller_environment(caller) or own_env
    record = authorised_record(job_id, caller)
    identity = Identity.of_uid(record.uid, record.gid if record.gid >= 0 else None)
    try:
        cwd: str | None = os.getcwd()
    except OSError:
        cwd = None
    assert record.ns_path is not None  # checked by authorised_record
    fd = os.open(record.ns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        syscalls.setns(fd, syscalls.CLONE_NEWNS)
    except OSError as e:
        raise OvlrunError(f"cannot join the namespace of job {job_id}: {e}") from None
    finally:
        os.close(fd)
    # setns() moved us to the namespace's root: re-enter the working directory by path,
    # so a cwd inside a localised release now shows the localised view.
    for d in (cwd, identity.home, "/"):
        try:
            if d:
                os.chdir(d)
                break
        except OSError:
            continue
    env["OVLRUN_PROFILE"] = record.profile or ""
    env["OVLRUN_JOB_ID"] = job_id
    env.setdefault("HOME", identity.home)
    sys.stdout.flush()
    sys.stderr.flush()
    return exec_command(command or shell_argv(identity), env, identity)


def main(argv: list[str]) -> int:
    """``ovlrun enter ...`` (wired in ovlrun/cli.py)."""
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    job_id, command = parse(argv)
    return enter(job_id, command)
