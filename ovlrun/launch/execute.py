"""Running a job from its plan: private mount namespace, overlays, job record, drop, exec.

Plan first, then execute (mkosi style): the plan (:mod:`ovlrun.launch.plan`, made by
:mod:`ovlrun.launch.planner` or taken from its cache) names every overlay; only here does
anything change, inside a namespace that dies with the job, so nothing can be left
mounted on the host.  The launch's job record (:mod:`ovlrun.jobs.records`) is written
once the overlays exist, into the directory opened before the first mount; the command
then *is* the job process, so nobody writes its end (the record says how to tell).
This module is on every launch's path and imports nothing heavy.

:func:`exec_job` is the common end of a launch and of ``ovlrun enter``: working
directory, environment, privilege drop, exec.
"""

from __future__ import annotations

import errno
import os
import sys

from ovlrun.errors import EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, OvlrunError
from ovlrun.jobs import records
from ovlrun.jobs.stats import given, snapshot_name
from ovlrun.launch.mount import TreeRootMissing, mount_items, report_missing, warn_stderr
from ovlrun.linux import limits
from ovlrun.linux.kernel import probe
from ovlrun.linux.namespaces import enter_private_namespace
from ovlrun.linux.privileges import Identity, drop_to

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from ovlrun.launch.plan import JobPlan, MountItem

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def find_executable(name: str, path_var: str) -> str | None:
    """execvp(3)'s search, run after the privilege drop with the user's rights: as root it
    would tell, by 126 vs 127, whether a name exists in a directory the user cannot
    search.  A non-executable match is returned so execve() reports EACCES (-> 126), as
    a shell would."""
    if "/" in name:
        return name
    fallback = None
    for d in path_var.split(":"):
        candidate = os.path.join(d or ".", name)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            fallback = fallback or candidate
    return fallback


def exec_command(argv: list[str], environ: dict[str, str], identity: Identity | None,
                 cwd: str | None = None) -> int:
    """Drop to ``identity``, re-enter ``cwd`` and exec; returns an exit status only if exec
    failed.

    Root's part ends with the drop: the working directory and the command are resolved
    afterwards, with the user's rights, and nothing is imported or read as root any more.
    The caller's resource limits, lifted for the root phase, are given back first.
    """
    limits.restore()
    if identity is not None:
        drop_to(identity)
    enter_working_directory(cwd, identity.home if identity is not None else None)
    path = find_executable(argv[0], environ.get("PATH", DEFAULT_PATH))
    if path is None:
        print(f"ovlrun: {argv[0]}: command not found", file=sys.stderr)
        return EXIT_NOT_FOUND
    try:
        try:
            os.execve(path, argv, environ)
        except OSError as e:
            if e.errno != errno.ENOEXEC:
                raise
            # A script without "#!": run it with /bin/sh, as execvp(3) and env(1) do.
            os.execve("/bin/sh", ["/bin/sh", path, *argv[1:]], environ)
    except OSError as e:
        print(f"ovlrun: {argv[0]}: {e.strerror}", file=sys.stderr)
        return EXIT_NOT_FOUND if isinstance(e, FileNotFoundError) else EXIT_CANNOT_EXECUTE
    raise AssertionError("unreachable")  # pragma: no cover


def enter_working_directory(cwd: str | None, home: str | None) -> None:
    """Re-enter the caller's working directory by path, with the job's own rights.

    By path, so a directory inside a localised release is now the overlay's view of it.
    Called after the privilege drop: as root, a component of the path swapped for a
    symlink meanwhile (renameat2 RENAME_EXCHANGE) would land the job in a directory its
    user may not enter.  If the user cannot enter it, start where a login would (home,
    then /), with one warning; if it is gone (None), in /.
    """
    if cwd is None:
        os.chdir("/")
        return
    try:
        os.chdir(cwd)
        return
    except OSError as e:
        problem = e.strerror
    for fallback in (home, "/"):
        if not fallback:
            continue
        try:
            os.chdir(fallback)
        except OSError:
            continue
        warn_stderr(f"cannot enter working directory {cwd}: {problem}; starting in {fallback}")
        return
    raise OvlrunError(f"cannot enter working directory {cwd} ({problem}), nor your home or /")


def shell_argv(identity: Identity | None, env: dict[str, str], *, login: bool, env_shell: bool) -> list[str]:
    """The shell a job without a command gets, as ``sudo -s`` does it: ``$SHELL`` from the
    job's environment when that is the user's own (``env_shell``), else the user's shell
    from the password database; not a login shell (a login shell re-reads /etc/profile
    and resets PATH, losing the environment the job is promised) unless ``login``."""
    shell = env.get("SHELL", "") if env_shell else ""
    if not shell.startswith("/"):
        shell = identity.shell if identity else Identity.of_uid(0).shell
    return [shell, "-l"] if login else [shell]


def current_directory() -> str | None:
    """The working directory to re-enter in the job's namespace (None if it is gone)."""
    try:
        return os.getcwd()
    except OSError:
        return None


def exec_job(command: list[str], env: dict[str, str], identity: Identity | None, cwd: str | None, *,
             login: bool = False, env_shell: bool = True) -> int:
    """In the job's namespace: drop to ``identity``, re-enter ``cwd`` and exec ``command``
    (a shell if empty, see :func:`shell_argv`) with ``env``.  Returns only if that failed."""
    if identity is not None:
        env.setdefault("HOME", identity.home)
    sys.stdout.flush()
    sys.stderr.flush()
    argv = command or shell_argv(identity, env, login=login, env_shell=env_shell)
    # The working directory is re-entered by path after the drop (exec_command): if it
    # lies in a localised subtree the job's cwd is then the overlay's view of it.
    return exec_command(argv, env, identity, cwd)


def run(plan: JobPlan, command: list[str], *, store: str, identity: Identity | None, strict: bool,
        environ: dict[str, str], login: bool = False, env_shell: bool = True) -> int:
    """Set up the job's namespace from ``plan`` and exec ``command`` in it (as root)."""
    argv, env, cwd = prepare(plan, command, store=store, identity=identity, strict=strict, environ=environ,
                             login=login, env_shell=env_shell)
    return exec_job(argv, env, identity, cwd)


def prepare(plan: JobPlan, command: list[str], *, store: str, identity: Identity | None, strict: bool,
            environ: dict[str, str], login: bool = False,
            env_shell: bool = True) -> tuple[list[str], dict[str, str], str | None]:
    """Everything a launch does before its exec, as root: the job's namespace with the
    plan's overlays, and its job record.  Returns the command (``command``, or the shell),
    its environment and the working directory to re-enter, for :func:`exec_job`.
    (``ovlrun learn --profile`` runs it in the job's first process, before the tracer
    attaches.)"""
    import time

    started = time.time()
    # The caller chose our resource limits; the job gets them back in exec_command.
    limits.lift()
    env = dict(environ)
    cwd = current_directory()
    warnings: list[str] = []

    def warn(message: str) -> None:
        warn_stderr(message)
        warnings.append(message)

    report_missing(plan, strict=strict, warn=warn)
    # Everything root needs is looked up, opened or imported before the first mount (the
    # shell from the password database, pyroute2, the job record's directory): afterwards
    # an overlay may cover any directory a localised path names, so root reads nothing more.
    command = command or shell_argv(identity, env, login=login, env_shell=env_shell)
    record = _launch_record(plan, identity, started, warn)
    env["OVLRUN_PROFILE"] = plan.name
    if record is not None:
        env["OVLRUN_JOB_ID"] = record[0].job_id
    if plan.network == "none":
        # pyroute2 also imports lazily, so the network is set up here, not just imported;
        # the network and mount namespaces are independent.
        from ovlrun.linux.network import isolate_network  # pyroute2 is slow to import: only here

        try:
            isolate_network()
        except OSError as e:
            raise OvlrunError(f"cannot create a private network namespace: {e}") from None
    try:
        ns_ino = enter_private_namespace()
    except OSError as e:
        raise OvlrunError(f"cannot create a private mount namespace: {e}") from None
    try:
        mounted = mount_items(plan.items, store, strict=strict, warn=warn, missing_root=plan.missing_root)
    except TreeRootMissing as e:
        raise OvlrunError(f"{e}; refusing to run the job there "
                          "(profiles may allow it with missing_root = \"unlocalised\")") from None
    if record is not None:
        _save_launch_record(*record, ns_ino, mounted, warnings, plan)
    return command, env, cwd


def _launch_record(plan: JobPlan, identity: Identity | None, started: float,
                   warn: Callable[[str], None]) -> tuple[records.JobRecord, int] | None:
    """The launch's job record, and the fd of the directory it goes in, opened now,
    before the first mount; None (after a warning) if there is no usable directory: the
    job runs all the same."""
    try:
        pid_start = records.process_start()
        dir_fd = records.open_record_dir()
    except (OSError, ValueError, OvlrunError) as e:
        warn(f"no job record for this launch: {e}")
        return None
    pid = os.getpid()
    uid, gid, user = (identity.uid, identity.gid, identity.name) if identity is not None else (0, 0, "root")
    record = records.JobRecord(records.launch_id(pid, pid_start), uid, gid, user,
                               kind=records.LAUNCH, profile=plan.name, state=records.PREPARING, pid=pid,
                               pid_start=pid_start, started=started)
    return record, dir_fd


def _save_launch_record(record: records.JobRecord, dir_fd: int, ns_ino: int, mounted: list[MountItem],
                        warnings: list[str], plan: JobPlan) -> None:
    """Write the record relative to its directory's fd (nothing is resolved by path after
    the first mount); a failure costs the record, not the job."""
    record.ns_ino = ns_ino
    record.localised = [item.path for item in mounted]
    record.state = records.LOCALISED if mounted else records.UNLOCALISED
    record.messages = warnings
    features = probe()  # as mount_items found them (probed once per process)
    record.stats["given"] = given([(item.path, snapshot_name(item.snapshot_dir)) for item in mounted],
                                  plan.missing + [item.path for item in plan.items if item not in mounted],
                                  features.data_only_layers, record.started, features.method)
    try:
        record.save(dir_fd)
    except OSError as e:
        warn_stderr(f"no job record for this launch: cannot write it ({e.strerror})")
    finally:
        os.close(dir_fd)
