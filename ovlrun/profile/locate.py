"""Where profiles are found, and whether one may be trusted: no parsing here.

Kept free of heavy imports (no pathlib, re, typing, tomllib) because a launch whose
mount plan is cached (:mod:`ovlrun.launch.plan`) needs to locate and trust-check the profile
file without parsing it.
"""

from __future__ import annotations

import os

from ovlrun.errors import OvlrunError
from ovlrun.linux.files import NOT_WRITABLE, trust_problem

DEFAULT_PROFILE_DIRS = ("/etc/ovlrun/profiles",)
_NAME_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_NAME_REST = _NAME_FIRST | frozenset(".+-")


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


def is_path_spec(spec: str) -> bool:
    return "/" in spec or spec.endswith(".toml")


def check_trusted_profile(path: str) -> None:
    """A profile a sudo caller gets must be one only root could have written."""
    for p in (os.path.dirname(path) or ".", path):
        problem = trust_problem(os.stat(p), NOT_WRITABLE)
        if problem:
            raise OvlrunError(f"refusing profile {path}: {p} must be owned by root and not group/other-writable "
                              f"({problem})")


def locate_profile(spec: str, dirs: list[str] | None = None, *, trusted_only: bool = False) -> str:
    """Map ``--profile`` to a file: a path if it looks like one, else a name to search.

    With ``trusted_only`` (non-root callers) the file and its directory must be root-owned
    and not group/other-writable.
    """
    if is_path_spec(spec):
        if not os.path.isfile(spec):
            raise OvlrunError(f"profile file {spec} does not exist")
        return spec
    if not valid_name(spec):
        raise OvlrunError(f"invalid profile name {spec!r}: use letters, digits, '_', '.', '+', '-'")
    search = profile_dirs() if dirs is None else dirs
    for d in search:
        candidate = os.path.join(d, f"{spec}.toml")
        if os.path.isfile(candidate):
            if trusted_only:
                check_trusted_profile(candidate)
            return candidate
    where = ", ".join(search) or "(no directories)"
    raise OvlrunError(f"no profile named {spec!r} (searched {where})")
