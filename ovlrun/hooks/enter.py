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

from ovlrun.errors import OvlrunError
from ovlrun.jobs.records import JobRecord, valid_job_id
from ovlrun.launch.caller import caller_environment, refuse_tainted_environment, sudo_caller
from ovlrun.launch.execute import current_directory, exec_job
from ovlrun.linux import namespaces, syscalls
from ovlrun.linux.privileges import Identity


def authorised_record(job_id: str, caller: int | None) -> JobRecord:
    """The job's record if ``caller`` (None: root itself) may enter its namespace."""
    if not valid_job_id(job_id):  # a scheduler's job, never a launch (nothing pinned to enter)
        raise OvlrunError(f"invalid job id {job_id!r}: expected digits")
    record = JobRecord.find(job_id)
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
    own_env = dict(os.environ if environ is None else environ)
    if os.geteuid() != 0:
        raise OvlrunError("ovlrun enter must run as root: use 'sudo ovlrun enter JOBID ...'")
    caller = sudo_caller(own_env)
    env = own_env
    if caller is not None:
        # Same sudo rules as a launch (ovlrun/launch/caller.py): nothing the caller set
        # may steer this root process (e.g. where job records are read from); the
        # caller's own environment goes to the command, after the privilege drop.
        refuse_tainted_environment(own_env)
        if "OVLRUN_JOB_RUNDIR" in own_env:
            raise OvlrunError("OVLRUN_JOB_RUNDIR is only honoured for root callers")
        env = caller_environment(caller) or own_env
    record = authorised_record(job_id, caller)
    identity = Identity.of_uid(record.uid, record.gid if record.gid >= 0 else None)
    cwd = current_directory()
    assert record.ns_path is not None  # checked by authorised_record
    fd = os.open(record.ns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        syscalls.setns(fd, syscalls.CLONE_NEWNS)
    except OSError as e:
        raise OvlrunError(f"cannot join the namespace of job {job_id}: {e}") from None
    finally:
        os.close(fd)
    env["OVLRUN_PROFILE"] = record.profile or ""
    env["OVLRUN_JOB_ID"] = job_id
    # setns() moved us to the namespace's root: exec_job re-enters the working directory.
    return exec_job(command, env, identity, cwd, env_shell=caller is not None)
