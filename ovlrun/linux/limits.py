"""The caller's resource limits: lifted for ovlrun's own root phase, given back to the job.

Whoever calls ``sudo ovlrun`` chooses ovlrun's resource limits (sudo hands the caller's
limits to its command).  A launch that runs short of descriptors, address space or
threads in the middle of mounting would fail in whatever way the shortage hits it (the
red team of issue 18 saw tracebacks, and once a ``--strict`` launch that ran with a path
unlocalised).  So, as sudo does for itself, the root phase raises the limits it depends
on, and the job gets exactly the caller's limits back just before the privilege drop:
what the user asked of their own job still holds.  (Limits under which the interpreter
cannot even start, e.g. RLIMIT_STACK of a few KiB, end the process before ovlrun runs a
line; nothing is mounted or changed then.)
"""

from __future__ import annotations

import resource

from ovlrun.errors import OvlrunError

# What the root phase needs, and how much: descriptors for the images and the mount
# threads, memory (and address space for thread stacks), file size for the plan cache,
# CPU time.  (RLIMIT_NPROC does not apply to a process whose real uid is root.)
NOFILE_FLOOR = 4096
_LIFTED = ((resource.RLIMIT_NOFILE, NOFILE_FLOOR),
           (resource.RLIMIT_AS, resource.RLIM_INFINITY),
           (resource.RLIMIT_DATA, resource.RLIM_INFINITY),
           (resource.RLIMIT_FSIZE, resource.RLIM_INFINITY),
           (resource.RLIMIT_CPU, resource.RLIM_INFINITY))

_callers: list[tuple[int, tuple[int, int]]] = []  # (resource, the caller's (soft, hard))


def _enough(value: int, need: int) -> bool:
    if value == resource.RLIM_INFINITY:
        return True
    return need != resource.RLIM_INFINITY and value >= need


def lift() -> None:
    """Raise (as root) every limit the launch depends on that the caller set lower;
    remember the caller's values for :func:`restore`.  Best effort: without
    CAP_SYS_RESOURCE a limit stays as it is, and a shortage is then an error."""
    for res, need in _LIFTED:
        soft, hard = resource.getrlimit(res)
        if _enough(soft, need):
            continue
        # Both limits up to what we need (root, with CAP_SYS_RESOURCE), else at least the
        # soft limit up to the hard one (anyone may).
        for limits in ((need, need) if not _enough(hard, need) else (need, hard), (hard, hard)):
            try:
                resource.setrlimit(res, limits)
            except (OSError, ValueError):
                continue
            _callers.append((res, (soft, hard)))
            break


def restore() -> None:
    """Give the caller's limits back (before the drop, while lowering is still possible
    for every value); an error if one cannot be: the job must not run with ours."""
    while _callers:
        res, limits = _callers.pop()
        try:
            resource.setrlimit(res, limits)
        except (OSError, ValueError) as e:
            raise OvlrunError(f"cannot restore your resource limit {res} to {limits}: {e}") from None
