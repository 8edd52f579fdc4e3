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
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ovlrun.errors import OvlrunError
from ovlrun.hooks.records import JobRecord, record_dir, valid_job_id
from ovlrun.hooks.slurmversion import create_mode_problem
from ovlrun.launch.mount import mount_items, report_missing
from ovlrun.launch.planner import plan
from ovlrun.linux import namespaces, syscalls
from ovlrun.profile.locate import valid_name
from ovlrun.profile.parse import Profile, load_profile
from ovlrun.store.index import Store

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ovlrun.linux.namespaces import Notes

COMMENT_PREFIX = "ovl:"
DEFAULT_JC_CONF = "/etc/slurm/job_container.conf"
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


# ------------------------------------------------------------------- job and config


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
            node=env.get("SLURMD_NODENAME") or os.uname().nodename.split(".")[0],
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


def _jc_conf_path(env: Mapping[str, str]) -> str:
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
        from ovlrun.store.fleet import fetch_for_job
        from ovlrun.store.siteconfig import load_site_config

        config = load_site_config()
        outcomes = fetch_for_job(store, profile, config.image_dir, config.image_owner,
                                 timeout=config.fetch_timeout)
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
    return {"localised": [item.path for item in mounted], "messages": messages}


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
    record = JobRecord(job.job_id, job.uid, job.gid, job.user, profile=name, node=job.node)
    try:
        profile, store = _load_request(name)
    except OvlrunError as e:
        _record_unlocalised(job, name, str(e), log)
        return 0
    fetch_notes = fetch_missing_images(profile, store, log)  # logged already
    record.messages += fetch_notes
    try:
        jc = read_job_container_conf(_jc_conf_path(env), job.node)
    except (OvlrunError, OSError) as e:
        _record_unlocalised(job, name, f"cannot read job_container.conf: {e}", log)
        return 0
    if profile.network != "host":
        record.messages.append(f"profile {name!r}: network={profile.network!r} is not applied "
                               "to Slurm jobs (only the mount namespace is shared with the job)")
    mode, notes = _prepare_namespace(job, name, profile, store, jc, env.get("OVLRUN_SLURM_JOBDIR_LAYOUT"),
                                     record, log)
    if notes is None:
        return 0  # failure already recorded; job runs unlocalised
    if mode != "record":
        record.state = "localised"
    record.localised = notes["localised"]
    record.messages += notes["messages"]
    record.save()
    for m in record.messages:
        if m not in fetch_notes:
            log("warning", m)
    log("info", f"profile {name!r} ({mode}): {len(record.localised)} localised path(s) for {job.user}")
    return 0


def _prepare_namespace(job: SlurmJob, name: str, profile: Profile, store: Store, jc: JobContainerConf | None,
                       layout: str | None, record: JobRecord, log: HookLog) -> tuple[str, Notes | None]:
    """Decide how this Slurm mounts (see the module docstring) and do it.

    Returns the mode ("join", "record", "create") and the notes of the mount (None if it
    failed, already recorded); sets the record's namespace fields.
    """
    job_dir = jc.job_dir(job.node, job.job_id, layout) if jc else None
    holder = job_dir / ".ns" if job_dir else None
    if holder is not None and namespaces.is_ns_holder(holder):
        # RunInJob (24.05+): the plugin's namespace exists; mount into it.
        record.ns_path = str(holder)
        return "join", _guarded(lambda: namespaces.run_in_namespace(holder, lambda: _mount_overlays(profile, store)),
                                job, name, log)
    if jc is not None and jc.clone_ns_script:
        # 24.11+: CloneNSScript mounts once the namespace exists; it reads this record.
        record.state = "requested"
        return "record", {"localised": [], "messages": []}
    if job_dir is not None:
        # Since Slurm 23.02.5 the plugin fails a job whose directory already exists: only
        # RunInJob or CloneNSScript can localise there (ovlrun.hooks.slurmversion).
        problem = create_mode_problem()
        if problem:
            _record_unlocalised(job, name, problem, log)
            return "create", None
        directory = job_dir
    else:
        record_dir(job.node).mkdir(mode=0o755, parents=True, exist_ok=True)
        directory = record_dir(job.node) / job.job_id
    notes = _create(directory, _setup_dirs(job, jc, directory), profile, store, job, name, log)
    if notes is not None:
        record.ns_path, record.ns_owned = str(directory / ".ns"), True
    return "create", notes


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
            job: SlurmJob, name: str, log: HookLog) -> Notes | None:
    """Make ``directory`` with a pinned namespace in ``.ns``; None (logged) on failure."""
    try:
        directory.mkdir(mode=0o700, parents=False)
    except FileExistsError:
        _record_unlocalised(job, name, f"{directory} already exists (stale job directory?)", log)
        return None
    except OSError as e:
        _record_unlocalised(job, name, f"cannot create {directory}: {e}", log)
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
        JobRecord(job.job_id, job.uid, job.gid, job.user, profile=name, state="unlocalised", node=job.node,
                  messages=[message]).save()
    except OSError as e:
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
    if record is None or record.profile is None or record.state != "requested":
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
        record.localised = notes["localised"]
        record.messages += notes["messages"]
        record.state = "localised"
        record.save()
        log("info", f"profile {record.profile!r}: {len(record.localised)} localised path(s)")
    return 0
