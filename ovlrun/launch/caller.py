"""How the caller's environment crosses the sudo boundary, and what a sudo caller may ask.

Two environments meet in a sudo launch and must not mix:

- ovlrun's own (root) process runs with the environment sudo built for it: ``env_reset``
  (sudo's default; keep it in sudoers) drops PYTHON*, LD_* and the rest, so nothing the
  caller set can steer the interpreter, its imports or the dynamic loader.  If such a
  variable reaches us anyway, sudoers was loosened: we refuse to run rather than run
  privileged code that the caller may already have influenced.
- the job must see the caller's environment *exactly* (PATH, LD_LIBRARY_PATH,
  PYTHONPATH, ...).  sudo does not pass it on, but it keeps it: the sudo process that
  started us was exec'd with it, so ``/proc/<sudo>/environ`` holds it byte for byte.  We
  read it from our parent after checking that the parent is a root-owned ``sudo`` binary
  running for the same real uid as ``SUDO_UID``, so no other process's environment can be
  substituted.  It is only ever handed to the job, after the privilege drop.
"""

from __future__ import annotations

import os
import stat

from ovlrun.errors import OvlrunError
from ovlrun.linux.privileges import Identity

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

# Variables that would let the caller steer our own root process if sudo let them through.
DANGEROUS_PREFIXES = ("PYTHON", "LD_")
CALLER_ONLY_SETTINGS = ("OVLRUN_PROFILE_PATH", "OVLRUN_STORE", "OVLRUN_JOB_RUNDIR", "OVLRUN_MOUNT_TIMEOUT")
MAX_ANCESTORS = 4  # sudo with use_pty interposes a monitor process


def refuse_tainted_environment(environ: dict[str, str]) -> None:
    """Under sudo, refuse if variables that steer the interpreter reached the root process."""
    tainted = sorted(k for k in environ if k.startswith(DANGEROUS_PREFIXES))
    if tainted:
        raise OvlrunError(
            f"sudo passed {', '.join(tainted)} to ovlrun's root process; refusing to run. Keep 'env_reset' "
            "and do not allow SETENV for ovlrun in sudoers (see contrib/sudoers.d/ovlrun): your environment "
            "still reaches the job")


def check_caller_request(environ: dict[str, str], profile_spec: str) -> None:
    """What a non-root (sudo) caller may not choose: stores and profile paths.  (Nor another
    user: :func:`target_identity` enforces that for every caller.)"""
    from ovlrun.profile.locate import is_path_spec

    for key in CALLER_ONLY_SETTINGS:
        if key in environ:
            raise OvlrunError(f"{key} is only honoured for root callers; ask your administrator to install "
                              "the profile or store system-wide")
    if is_path_spec(profile_spec):
        raise OvlrunError(f"--profile {profile_spec}: profile files by path are only accepted from root; "
                          "name an installed profile instead")


def _status_field(pid: int, name: str) -> list[str]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split()[1:]
    raise OSError(f"no {name} in /proc/{pid}/status")


def _is_sudo_for(pid: int, uid: int) -> bool:
    exe = os.readlink(f"/proc/{pid}/exe")
    if os.path.basename(exe) != "sudo":
        return False
    st = os.stat(exe)
    if st.st_uid != 0 or st.st_mode & 0o022 or not stat.S_ISREG(st.st_mode):
        return False
    return int(_status_field(pid, "Uid")[0]) == uid


def parse_environ_block(raw: bytes) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, eq, value = item.partition(b"=")
        if eq and key:
            # surrogateescape round-trips any bytes back to execve() unchanged.
            env.setdefault(os.fsdecode(key), os.fsdecode(value))
    return env


def caller_environment(caller_uid: int) -> dict[str, str] | None:
    """The environment the sudo caller invoked us with, or None if no sudo parent is found."""
    pid = os.getppid()
    try:
        for _ in range(MAX_ANCESTORS):
            if pid <= 1:
                return None
            if _is_sudo_for(pid, caller_uid):
                with open(f"/proc/{pid}/environ", "rb") as f:
                    return parse_environ_block(f.read())
            pid = int(_status_field(pid, "PPid")[0])
    except (OSError, ValueError, IndexError):
        return None
    return None


def sudo_caller(environ: dict[str, str]) -> int | None:
    """The uid that invoked us through sudo, if not root."""
    raw = environ.get("SUDO_UID", "")
    if not raw:
        return None
    try:
        uid = int(raw)
    except ValueError:
        raise OvlrunError(f"SUDO_UID={raw!r} is not a number") from None
    return uid or None


def target_identity(user: str | None, environ: dict[str, str]) -> Identity | None:
    """Whom to run the command as; ``None`` means stay root.

    ``--user`` is for root callers (scheduler prologs); a sudo caller always runs as
    themselves, with their supplementary groups.
    """
    caller = sudo_caller(environ)
    if user is not None:
        if caller is not None:
            raise OvlrunError("--user is only for root; under sudo the job runs as the calling user")
        ident = Identity.of_name(user)
        return ident if ident.uid != 0 else None
    if caller is not None:
        gid = None
        if environ.get("SUDO_GID", "").isascii() and environ.get("SUDO_GID", "").isdigit():
            gid = int(environ["SUDO_GID"])
        return Identity.of_uid(caller, gid)
    return None


class Caller:
    """Who asked for a launch, and what they get: the job's environment and user."""

    __slots__ = ("identity", "is_sudo", "job_env")

    def __init__(self, is_sudo: bool, identity: Identity | None, job_env: dict[str, str]) -> None:
        self.is_sudo = is_sudo  # a non-root user through sudo: only trusted profiles and stores
        self.identity = identity  # None: the job stays root
        self.job_env = job_env


def resolve_caller(own_env: dict[str, str], profile_spec: str, user: str | None,
                   warn: Callable[[str], None]) -> Caller:
    """Apply the sudo boundary to a launch request (see the module docstring)."""
    caller = sudo_caller(own_env)
    job_env = own_env
    if caller is not None:
        refuse_tainted_environment(own_env)
        check_caller_request(own_env, profile_spec)
        from_sudo = caller_environment(caller)
        if from_sudo is None:
            warn("could not read your environment from the calling sudo process; "
                 "the job gets the environment sudo gave ovlrun")
        else:
            job_env = from_sudo
    return Caller(caller is not None, target_identity(user, own_env), job_env)
