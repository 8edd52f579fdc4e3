"""Where profiles are found, and whether one may be trusted: no parsing here.

A profile is opened once (:func:`open_profile`) and everything after that works on the
fd: the trust check of a sudo launch or a Slurm job, the plan cache's key, and the
parser (:func:`ovlrun.profile.parse.parse_profile`), so what is checked is what is read.

Kept free of heavy imports (no pathlib, re, typing, tomllib) because a launch whose
mount plan is cached (:mod:`ovlrun.launch.plan`) needs to locate and trust-check the profile
file without parsing it.
"""

from __future__ import annotations

import errno
import os

from ovlrun.errors import OvlrunError
from ovlrun.linux.files import NOT_WRITABLE, UntrustedError, open_trusted, trust_problem

DEFAULT_PROFILE_DIRS = ("/etc/ovlrun/profiles",)
_NAME_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_NAME_REST = _NAME_FIRST | frozenset(".+-")
# What a lookup in one profile directory treats as "not here" (try the next directory).
_ABSENT = (errno.ENOENT, errno.ENOTDIR)


def valid_name(name: str) -> bool:
    return bool(name) and name[0] in _NAME_FIRST and all(c in _NAME_REST for c in name)


def profile_dirs(environ: dict[str, str] | None = None) -> list[str]:
    """Directories searched for ``NAME.toml``, in order."""
    env = os.environ if environ is None else environ
    if env.get("OVLRUN_PROFILE_PATH"):
        return [p for p in env["OVLRUN_PROFILE_PATH"].split(":") if p]
    # Never the source checkout's profiles/: a checkout's example profile must not be
    # live for sudo callers on a production node.
    return list(DEFAULT_PROFILE_DIRS)


def profile_names(dirs: list[str] | None = None) -> list[str]:
    """The names of the profiles installed in the search directories (the first of a name
    wins, as for :func:`open_profile`), sorted."""
    names: set[str] = set()
    for directory in profile_dirs() if dirs is None else dirs:
        try:
            entries = os.listdir(directory)
        except OSError:
            continue  # no such directory: nothing installed there
        names.update(n[:-5] for n in entries if n.endswith(".toml") and valid_name(n[:-5]))
    return sorted(names)


def is_path_spec(spec: str) -> bool:
    return "/" in spec or spec.endswith(".toml")


class ProfileFile:
    """A located profile, open: ``path`` (for messages), ``fd`` (what is read), ``st``
    (its fstat: the plan cache's key) and ``dir_st`` (its directory's, None for a path
    given on the command line)."""

    __slots__ = ("dir_st", "fd", "path", "st")

    def __init__(self, path: str, fd: int, dir_st: os.stat_result | None) -> None:
        self.path = path
        self.fd = fd
        self.st = os.fstat(fd)
        self.dir_st = dir_st

    def trust_problem(self) -> str | None:
        """Why a sudo launch or a Slurm job must refuse this profile, None if it may use it:
        the profile and its directory must be only root's to write."""
        checks = [(os.path.dirname(self.path) or ".", self.dir_st), (self.path, self.st)]
        for where, st in checks:
            problem = None if st is None else trust_problem(st, NOT_WRITABLE)
            if problem:
                return f"{where} must be owned by root and not group/other-writable ({problem})"
        return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open(path: str, dir_fd: int | None = None) -> int | None:
    """``path`` opened as a profile (a regular file, following symlinks as the admin
    laid them out, never waiting on a FIFO); None if there is none."""
    try:
        return open_trusted(path, dir_fd=dir_fd, uid=None, follow_symlinks=True)
    except UntrustedError:
        return None  # not a regular file: not a profile
    except OSError as e:
        if e.errno in _ABSENT:
            return None
        raise OvlrunError(f"cannot read profile {path}: {e.strerror}") from None


def _open_in(directory: str, name: str) -> ProfileFile | None:
    try:
        dir_fd = open_trusted(directory, directory=True, uid=None, follow_symlinks=True)
    except (OSError, UntrustedError):
        return None  # no such directory (or not one): nothing found there
    try:
        fd = _open(name, dir_fd)
        return None if fd is None else ProfileFile(os.path.join(directory, name), fd, os.fstat(dir_fd))
    finally:
        os.close(dir_fd)


def open_profile(spec: str, dirs: list[str] | None = None, *, trusted_only: bool = False) -> ProfileFile:
    """Map ``--profile`` to an open profile: a path if it looks like one, else a name to
    search.  The caller closes it.

    With ``trusted_only`` (sudo callers, Slurm jobs) the file and its directory must be
    root-owned and not group/other-writable (:meth:`ProfileFile.trust_problem`), checked
    on what was opened.
    """
    if is_path_spec(spec):
        fd = _open(spec)
        if fd is None:
            raise OvlrunError(f"profile file {spec} does not exist")
        return ProfileFile(spec, fd, None)
    if not valid_name(spec):
        raise OvlrunError(f"invalid profile name {spec!r}: use letters, digits, '_', '.', '+', '-'")
    search = profile_dirs() if dirs is None else dirs
    for d in search:
        found = _open_in(d, f"{spec}.toml")
        if found is None:
            continue
        problem = found.trust_problem() if trusted_only else None
        if problem:
            found.close()
            raise OvlrunError(f"refusing profile {found.path}: {problem}")
        return found
    where = ", ".join(search) or "(no directories)"
    raise OvlrunError(f"no profile named {spec!r} (searched {where})")
