"""Slurm hooks: give every step of a job the localised view its ``--comment`` asks for.

A job opts in with ``sbatch --comment=ovl:NAME`` (the comment is the one job field a
node's Prolog sees; ``--export`` variables are not).  Which hook does the mounting
depends on the Slurm version (docs/slurm.md has the exact configuration):

* 21.08-23.x, ``JobContainerType=job_container/tmpfs`` + ``PrologFlags=Contain``: the
  Prolog runs in slurmd's namespace *before* the plugin sets up the job.  If the job
  directory ``<BasePath>[/<node>]/<jobid>`` already exists, the plugin takes it as set
  up and only joins every step into the namespace pinned at ``.ns`` in it.  So the
  Prolog creates that namespace itself, with the private /tmp and /dev/shm the plugin
  would have made, plus the profile's overlays ("create" mode).
* 24.05+ with ``PrologFlags=RunInJob``: the namespace exists when the Prolog runs, so
  the Prolog joins it and mounts there ("join" mode).
* 24.11+ with ``CloneNSScript=``: the Prolog only records the request; the script
  (``ovlrun slurm clone-ns``) mounts into ``$SLURM_NS``.
* No job_container plugin: the Prolog pins a namespace under /run/ovlrun/jobs, which
  ``ovlrun enter JOBID -- cmd`` joins.

Rule one: a user's mistake never fails a hook (a failing Prolog drains the node).  An
unknown profile, a typo, a missing snapshot: the job runs unlocalised, the reason goes
to the log (``/var/log/ovlrun/slurm.log`` and the hook's stderr) and, with the
optional TaskProlog (contrib/slurm/ovlrun-task-prolog), into the job's output.  Hooks return non-zero only for states
the admin must fix because the node can no longer run jobs correctly.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ovlrun.errors import OvlrunError
from ovlrun.hooks.slurmjob import JobContainerConf, SlurmJob, jc_conf_path, read_job_container_conf, requested_profile
from ovlrun.hooks.slurmversion import create_mode_problem
from ovlrun.jobs import history
from ovlrun.jobs.records import (
    LOCALISED,
    PREPARING,
    REQUESTED,
    SLURM,
    UNLOCALISED,
    JobRecord,
    open_record_dir,
    record_dir,
    valid_job_id,
)
from ovlrun.jobs.stats import given, snapshot_name
from ovlrun.launch.mount import mount_items, report_missing
from ovlrun.launch.planner import plan
from ovlrun.linux import namespaces, syscalls
from ovlrun.linux.kernel import MOUNT_FALLBACK, probe
from ovlrun.profile.parse import Profile, load_profile
from ovlrun.store.index import Store

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ovlrun.linux.namespaces import Notes

DEFAULT_LOG = "/var/log/ovlrun/slurm.log"


# ------------------------------------------------------------------------ logging


class HookLog:
    """Lines to the ovlrun Slurm log file and to stderr (slurmd logs it at debug level)."""

    def __init__(self, hook: str, job_id: str | None, environ: Mapping[str, str]) -> None:
        self.prefix = f"ovlrun slurm {hook} job={job_id or '?'}"
        self.path = Path(environ.get("OVLRUN_SLURM_LOG", DEFAULT_LOG))

    def __call__(self, level: str, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {self.prefix} {level}: {message}"
        print(line, file=sys.stderr, flush=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as e:  # logging must never be what fails a hook
            print(f"{self.prefix} cannot write {self.path}: {e}", file=sys.stderr)


# ----------------------------------------------------------------- what gets mounted


def _load_request(name: str) -> tuple[Profile, Store]:
    """Load profile and store as root would use them; OvlrunError explains failures."""
    # trusted_only: the name comes from a user (the job comment); only root-owned
    # profiles may make root mount anything.
    return load_profile(name, trusted_only=True), Store.open()


def fetch_missing_images(profile: Profile, store: Store, log: Callable[[str, str], None]) -> list[str]:
    """If the node lacks snapshots the profile asks for and the site configuration names
    an image directory, fetch them within its ``fetch_timeout`` (default 5 s); returns
    messages for the job record.  Never raises: a job whose images could not be fetched
    runs with what the node has (unlocalised where nothing is), as without fleets."""
    try:
        from ovlrun.store.fleet.fetch import fetch_for_job
        from ovlrun.store.siteconfig import load_site_config

        config = load_site_config()
        outcomes = fetch_for_job(store, profile, config.image_dir, config.image_owner,
                                 timeout=config.fetch_timeout, max_image_bytes=config.max_image_bytes)
    except Exception as e:  # unreachable or stalled DIR, bad config, a bug: never the job's fault
        message = f"could not fetch snapshot images: {e}"
        log("warning", message)
        return [message]
    if not outcomes:
        return []
    fetched = [o for o in outcomes if o.status in ("fetched", "reinstated")]
    failed = [o for o in outcomes if o.status == "failed"]
    if fetched:
        log("info", f"fetched {len(fetched)} snapshot image(s) from {config.image_dir} "
            f"({sum(o.bytes for o in fetched)} bytes)")
    messages = [f"could not fetch the snapshot of {o.path}: {o.message}" for o in failed]
    for m in messages:
        log("warning", m)
    return messages


def _mount_overlays(profile: Profile, store: Store) -> Notes:
    """Inside the job's namespace: mount the profile; report what for the job record.

    Everything it needs is imported at module level, before any namespace exists: the
    job's private /tmp may hide the directory the package is imported from."""
    messages: list[str] = []
    job_plan = plan(profile, store)
    report_missing(job_plan, strict=False, warn=messages.append)
    mounted = mount_items(job_plan.items, str(store.path), strict=False, warn=messages.append,
                          missing_root=profile.missing_root)
    return {"localised": [item.path for item in mounted], "messages": messages,
            "snapshots": [snapshot_name(item.snapshot_dir) for item in mounted],
            "unlocalised": job_plan.missing + [item.path for item in job_plan.items if item not in mounted],
            "method": [probe().method]}


def _apply_notes(record: JobRecord, notes: Notes) -> None:
    """What the mount step (in the namespace's helper process) reported, into the job's
    record: the localised paths, the warnings, what the job was given (jobs/stats.py)."""
    record.localised = notes["localised"]
    record.messages += notes["messages"]
    if notes.get("method"):
        method = notes["method"][0]
        record.stats["given"] = given(list(zip(record.localised, notes.get("snapshots", []), strict=False)),
                                      notes.get("unlocalised", []), method != MOUNT_FALLBACK, record.started, method)


def _private_dirs(job: SlurmJob, jc: JobContainerConf, job_dir: Path) -> None:
    """The private directories job_container/tmpfs would have given the job.

    Each listed directory (default /tmp) is bound from a user-owned directory under
    the job directory, so it is private to the job and removed with it; /dev/shm is a
    fresh tmpfs.  Runs inside the job's new namespace.
    """
    src_root = job_dir / f".{job.job_id}"
    for d in jc.dirs:
        if d == "/dev/shm":
            syscalls.mount("tmpfs", d, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=1777")
            continue
        src = src_root if d == "/tmp" else src_root / d.strip("/").replace("/", "_")
        src.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chown(src, job.uid, -1)
        syscalls.mount(str(src), d, None, syscalls.MS_BIND)
    # As the plugin does: hide the BasePath mount from the job (the job's own /tmp
    # bind stays; only this namespace's view of the job directory goes).
    syscalls.umount2(str(job_dir), syscalls.MNT_DETACH)


# -------------------------------------------------------------------------- hooks


def prolog(env: Mapping[str, str] | None = None) -> int:
    """Slurm Prolog (root, in slurmd's namespace, or in the job's with RunInJob)."""
    env = os.environ if env is None else env
    log = HookLog("prolog", env.get("SLURM_JOB_ID"), env)
    try:
        job = SlurmJob.from_env(env)
    except OvlrunError as e:
        log("error", str(e))
        return 0
    name, problem = requested_profile(job.comment)
    if problem:
        _record_unlocalised(job, None, problem, log)
        return 0
    if name is None:
        return 0  # the job asked for nothing: leave it to Slurm entirely
    try:
        return _prolog(job, name, env, log)
    except Exception as e:  # a bug must not fail the Prolog: that drains the node
        _record_unlocalised(job, name, f"internal error: {e!r}", log)
        return 0


def _prolog(job: SlurmJob, name: str, env: Mapping[str, str], log: HookLog) -> int:
    record = JobRecord(job.job_id, job.uid, job.gid, job.user, kind=SLURM, profile=name, state=PREPARING,
                       node=job.node, started=time.time())
    try:
        profile, store = _load_request(name)
    except OvlrunError as e:
        _record_unlocalised(job, name, str(e), log)
        return 0
    fetch_notes = fetch_missing_images(profile, store, log)  # logged already
    record.messages += fetch_notes
    try:
        jc = read_job_container_conf(jc_conf_path(env), job.node)
    except (OvlrunError, OSError) as e:
        _record_unlocalised(job, name, f"cannot read job_container.conf: {e}", log)
        return 0
    if profile.network != "host":
        record.messages.append(f"profile {name!r}: network={profile.network!r} is not applied "
                               "to Slurm jobs (only the mount namespace is shared with the job)")
    # Plan, then execute: where the namespace is (or will be) is known before anything
    # is made or mounted, and the record saved now (state "preparing") tells the Epilog
    # what to remove whatever moment this Prolog is killed at (slurmd SIGKILLs a Prolog
    # past PrologEpilogTimeout, or restarts): ns_owned once the directory is ours.
    target = _plan_namespace(job, jc, env.get("OVLRUN_SLURM_JOBDIR_LAYOUT"))
    if isinstance(target, str):
        _record_unlocalised(job, name, target, log)
        return 0
    record.ns_path = target.ns_path
    try:
        record.save()
    except (OSError, OvlrunError) as e:
        # Without a record no Epilog could undo a half-made namespace: make none.
        _record_unlocalised(job, name, f"cannot write the job record ({e})", log)
        return 0
    notes = _localise(target, job, name, profile, store, jc, record, log)
    if notes is None:
        return 0  # failure already recorded; job runs unlocalised
    record.state = REQUESTED if target.mode == "record" else LOCALISED
    _apply_notes(record, notes)
    record.save()
    for m in record.messages:
        if m not in fetch_notes:
            log("warning", m)
    log("info", f"profile {name!r} ({target.mode}): {len(record.localised)} localised path(s) for {job.user}")
    return 0


@dataclass(frozen=True)
class Target:
    """Where a Prolog localises a job (see the module docstring)."""

    mode: str  # "join" the plugin's namespace, "record" (CloneNSScript mounts), "create" one
    ns_path: str | None = None  # the namespace's holder: existing (join) or to be made (create)


def _plan_namespace(job: SlurmJob, jc: JobContainerConf | None, layout: str | None) -> Target | str:
    """How this Slurm mounts: the :class:`Target`, or why it cannot localise the job."""
    job_dir = jc.job_dir(job.node, job.job_id, layout) if jc else None
    holder = job_dir / ".ns" if job_dir else None
    if holder is not None and namespaces.is_ns_holder(holder):
        return Target("join", str(holder))  # RunInJob (24.05+): the plugin's namespace exists
    if jc is not None and jc.clone_ns_script:
        return Target("record")  # 24.11+: CloneNSScript mounts once the namespace exists
    if job_dir is not None:
        # Since Slurm 23.02.5 the plugin fails a job whose directory already exists: only
        # RunInJob or CloneNSScript can localise there (ovlrun.hooks.slurmversion).
        return create_mode_problem() or Target("create", str(job_dir / ".ns"))
    # No job_container plugin: a namespace for `ovlrun enter`, beside the job's record.
    return Target("create", os.path.join(record_dir(job.node), job.job_id, ".ns"))


def _localise(target: Target, job: SlurmJob, name: str, profile: Profile, store: Store,
              jc: JobContainerConf | None, record: JobRecord, log: HookLog) -> Notes | None:
    """Mount the profile where ``target`` says; the notes of the mount, or None if it
    failed (already recorded)."""
    if target.mode == "record":
        return {"localised": [], "messages": []}
    assert target.ns_path is not None
    holder = target.ns_path
    if target.mode == "join":
        return _guarded(lambda: namespaces.run_in_namespace(holder, lambda: _mount_overlays(profile, store)),
                        job, name, log)
    directory = Path(holder).parent
    if jc is None:
        try:
            os.close(open_record_dir(job.node))  # the directory it goes in
        except (OvlrunError, OSError) as e:
            _record_unlocalised(job, name, f"cannot create {directory}: {e}", log)
            return None
    return _create(directory, _setup_dirs(job, jc, directory), profile, store, job, name, record, log)


def _setup_dirs(job: SlurmJob, jc: JobContainerConf | None, directory: Path) -> Callable[[], None]:
    """What to do in a new job namespace before mounting the overlays."""
    if jc is not None:
        return lambda: _private_dirs(job, jc, directory)

    def hide_directory() -> None:
        # No job_container plugin (namespace for `ovlrun enter`): the job keeps the
        # host's /tmp; only hide the holder's directory, as the plugin does.
        syscalls.umount2(str(directory), syscalls.MNT_DETACH)

    return hide_directory


def _create(directory: Path, setup_dirs: Callable[[], None], profile: Profile, store: Store,
            job: SlurmJob, name: str, record: JobRecord, log: HookLog) -> Notes | None:
    """Make ``directory`` with a pinned namespace in ``.ns``; None (logged) on failure.

    The record (state "preparing") says the directory is ours (``ns_owned``) as soon as
    mkdir made it, before anything is mounted on or in it: from then on the Epilog
    removes it whatever moment this Prolog dies at.  An existing directory is never ours.
    """
    try:
        directory.mkdir(mode=0o700, parents=False)
    except FileExistsError:
        _record_unlocalised(job, name, f"{directory} already exists (stale job directory?)", log)
        return None
    except OSError as e:
        _record_unlocalised(job, name, f"cannot create {directory}: {e}", log)
        return None
    record.ns_owned = True
    try:
        record.save()
    except (OSError, OvlrunError) as e:
        os.rmdir(directory)
        _record_unlocalised(job, name, f"cannot write the job record ({e})", log)
        return None

    def setup() -> Notes:
        setup_dirs()
        return _mount_overlays(profile, store)

    try:
        namespaces.make_private_bind(directory)
        holder = directory / ".ns"
        holder.touch(mode=0o600)
        return namespaces.create_pinned_namespace(holder, setup)
    except (OvlrunError, OSError) as e:
        # Undo everything, so job_container/tmpfs sets the job up as if we had never
        # been here: the job still runs, with Slurm's own private /tmp.
        namespaces.remove_tree(directory)
        _record_unlocalised(job, name, f"cannot prepare the job's namespace: {e}", log)
        return None


def _guarded(action: Callable[[], Notes], job: SlurmJob, name: str, log: HookLog) -> Notes | None:
    try:
        return action()
    except (OvlrunError, OSError) as e:
        _record_unlocalised(job, name, f"cannot mount into the job's namespace: {e}", log)
        return None


def _record_unlocalised(job: SlurmJob, name: str | None, reason: str, log: HookLog) -> None:
    message = f"job runs unlocalised: {reason}"
    log("warning", message)
    try:
        JobRecord(job.job_id, job.uid, job.gid, job.user, kind=SLURM, profile=name, state=UNLOCALISED,
                  node=job.node, messages=[message], started=time.time()).save()
    except (OSError, OvlrunError) as e:
        log("error", f"cannot write job record: {e}")


def epilog(env: Mapping[str, str] | None = None) -> int:
    """Slurm Epilog: remove what the Prolog made; never fails for a job's sake.

    On 22.05 job_container/tmpfs has already unpinned and removed the job directory
    when the Epilog runs (its extern step does that); this is the safety net for
    slurmd restarts, killed steps and the no-plugin mode.
    """
    env = os.environ if env is None else env
    log = HookLog("epilog", env.get("SLURM_JOB_ID"), env)
    job_id = env.get("SLURM_JOB_ID", "")
    node = env.get("SLURMD_NODENAME")
    if not valid_job_id(job_id):
        log("error", f"SLURM_JOB_ID={job_id!r} is not a job id")
        return 0
    try:
        record = JobRecord.load(job_id, node)
    except (OvlrunError, ValueError, TypeError) as e:
        log("error", str(e))
        record = None
    if record is not None and record.ns_owned and record.ns_path:
        directory = Path(record.ns_path).parent
        try:
            namespaces.unpin(Path(record.ns_path))
            namespaces.remove_tree(directory)
        except Exception as e:  # whatever it is: an Epilog that fails drains the node
            log("error", f"cleaning {directory}: {e}")
        if directory.exists():
            # Logged, not failed: draining the node would punish the next jobs for
            # a leftover that only this job id can trip over.
            log("error", f"{directory} could not be removed; remove it by hand")
    elif record is not None and record.state == PREPARING and record.ns_path:
        # The Prolog died between making the job directory and saying so: at most an empty
        # directory (nothing is mounted before the record owns it).  rmdir removes only
        # that: never a directory with anything in it, never a mount point.
        try:
            os.rmdir(os.path.dirname(record.ns_path))
        except OSError:
            pass
    try:
        # Kept in the node's bounded history (``ovlrun jobs``).
        history.finish(job_id, node=node)
    except Exception as e:  # whatever it is: an Epilog that fails drains the node
        log("error", f"ending the job record: {e}")
        try:
            JobRecord.remove(job_id, node)
        except OvlrunError as e:
            log("error", str(e))
    return 0


def clone_ns_script(env: Mapping[str, str] | None = None) -> int:
    """job_container/tmpfs CloneNSScript (24.11+): mount into ``$SLURM_NS``."""
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID", "")
    log = HookLog("clone-ns", job_id, env)
    ns = env.get("SLURM_NS")
    if not valid_job_id(job_id) or not ns:
        log("error", "SLURM_JOB_ID or SLURM_NS unset: not run as CloneNSScript")
        return 0
    try:
        record = JobRecord.load(job_id, env.get("SLURMD_NODENAME"))
    except (OvlrunError, ValueError, TypeError) as e:
        log("error", str(e))
        return 0
    if record is None or record.profile is None or record.state != REQUESTED:
        return 0  # nothing requested, or the Prolog already found it unusable
    job = SlurmJob(job_id, record.uid, record.gid, record.user, "", record.node)
    try:
        profile, store = _load_request(record.profile)
    except OvlrunError as e:
        _record_unlocalised(job, record.profile, str(e), log)
        return 0
    notes = _guarded(lambda: namespaces.run_in_namespace(ns, lambda: _mount_overlays(profile, store)),
                     job, record.profile, log)
    if notes is not None:
        record.ns_path = ns
        _apply_notes(record, notes)
        record.state = LOCALISED
        record.save()
        log("info", f"profile {record.profile!r}: {len(record.localised)} localised path(s)")
    return 0
