"""The NFS operations a job cost, from the client's own counters (issue 19, item 3).

The kernel counts every NFS operation per mount (:mod:`ovlrun.linux.mountstats`: LOOKUP,
GETATTR, ACCESS, OPEN, READ, READDIR(PLUS), READLINK, ...), exactly, but per mount, not
per process.  So a job's cost is the difference of the counters of the NFS mounts that
hold its trees (or lie inside one) between its start and its end, and it is the job's
alone only where nothing else used those mounts meanwhile.  What ovlrun can know of
"something else" is every other job it has a record of: the jobs running when this one
started (:func:`start` notes them) and every job that started before it ended
(:func:`finish`); other processes of the node it cannot see, and the figures say so.

Used by the Slurm Prolog (start) and Epilog (finish), which keep the start in the job
record, and by ``ovlrun learn`` around the job it runs.  Only root reads other jobs'
records: for anyone else ``alone`` is None (unknown).
"""

from __future__ import annotations

import os
import time

from ovlrun.jobs.records import JobRecord
from ovlrun.linux import mountstats

OPS = ("LOOKUP", "GETATTR", "ACCESS", "OPEN", "READ", "READDIR", "READDIRPLUS", "READLINK")
CACHE_OPS = ("LOOKUP", "GETATTR", "ACCESS")  # what a snapshot answers instead of the server


def _relevant(point: str, roots: list[str]) -> bool:
    """Does the NFS mount at ``point`` hold one of the trees, or lie inside one?"""
    for root in roots:
        if root == point or root.startswith(point.rstrip("/") + "/") or point.startswith(root.rstrip("/") + "/"):
            return True
    return False


def tree_roots(roots: list[str]) -> list[str]:
    """The trees' roots as named and as they resolve (a lookup may use either spelling)."""
    out: list[str] = []
    for root in roots:
        for spelling in (root, os.path.realpath(root)):
            if spelling not in out:
                out.append(spelling)
    return out


def _counters(roots: list[str], path: str) -> dict[str, mountstats.MountStats] | None:
    try:
        stats = mountstats.read(path)
    except OSError:
        return None
    return {point: s for point, s in stats.items() if _relevant(point, roots)}


def _others(exclude: str) -> list[str] | None:
    """Ids of the jobs running now (None: their records are not readable here)."""
    if os.geteuid() != 0:
        return None
    return sorted(r.job_id for r in JobRecord.all() if r.job_id != exclude and r.alive())


def start(roots: list[str], own_id: str = "", path: str = mountstats.PROC_MOUNTSTATS) -> dict[str, object] | None:
    """The counters of the NFS mounts under ``roots`` and the jobs running now, as JSON
    values for the job record; None if no NFS mount holds a tree."""
    counters = _counters(roots, path)
    if not counters:
        return None
    mounts = {point: {"device": s.device, "fstype": s.fstype, "age": s.age, "ops": s.nonzero(),
                      "errors": {k: v for k, v in s.errors.items() if v}} for point, s in counters.items()}
    return {"at": time.time(), "roots": roots, "mounts": mounts, "others": _others(own_id)}


def _restore(mounts: object) -> dict[str, mountstats.MountStats]:
    out: dict[str, mountstats.MountStats] = {}
    if not isinstance(mounts, dict):
        return out
    for point, m in mounts.items():
        if not isinstance(m, dict):
            continue
        ops, errors = m.get("ops", {}), m.get("errors", {})
        out[point] = mountstats.MountStats(point, str(m.get("device", "")), str(m.get("fstype", "")), "",
                                           int(m.get("age", 0)),
                                           {str(k): int(v) for k, v in ops.items()} if isinstance(ops, dict) else {},
                                           {str(k): int(v) for k, v in errors.items()}
                                           if isinstance(errors, dict) else {})
    return out


def finish(begun: object, own_id: str = "", own_started: float | None = None,
           path: str = mountstats.PROC_MOUNTSTATS) -> dict[str, object] | None:
    """What the mounts :func:`start` saw sent since: ``ops`` (mount point -> operation ->
    calls), ``errors`` (failed calls: a failed LOOKUP is one), ``alone`` (no other job
    of this node ran meanwhile; None: unknown) and ``overlapping`` (those that did)."""
    if not isinstance(begun, dict) or not isinstance(begun.get("roots"), list):
        return None
    before = _restore(begun.get("mounts"))
    after = _counters([str(r) for r in begun["roots"]], path)
    if not after:
        return None
    ops: dict[str, dict[str, int]] = {}
    errors: dict[str, dict[str, int]] = {}
    for point, d in mountstats.delta({p: s for p, s in before.items() if p in after}, after).items():
        ops[point] = d.nonzero()
        errors[point] = {k: v for k, v in d.errors.items() if v}
    others = begun.get("others")
    overlapping: list[str] | None = None
    if isinstance(others, list) and os.geteuid() == 0:
        since = own_started if own_started is not None else float(begun.get("at", 0.0))
        later = {r.job_id for r in JobRecord.all() if r.job_id != own_id and r.started >= since}
        overlapping = sorted(set(map(str, others)) | later)
    return {"ops": ops, "errors": errors, "alone": None if overlapping is None else not overlapping,
            "overlapping": overlapping or [], "seconds": round(time.time() - float(begun.get("at", 0.0)), 3)}


def totals(nfs: object) -> dict[str, int]:
    """Operation -> calls over every mount of an ``nfs`` figure (empty if none)."""
    out: dict[str, int] = {}
    ops = nfs.get("ops") if isinstance(nfs, dict) else None
    if isinstance(ops, dict):
        for per_mount in ops.values():
            if isinstance(per_mount, dict):
                for op, n in per_mount.items():
                    if isinstance(n, int):
                        out[op] = out.get(op, 0) + n
    return out


def format_lines(nfs: dict[str, object] | None) -> list[str]:
    """One line per mount, for learn's report."""
    ops_by_mount = nfs.get("ops") if nfs else None
    if not nfs or not isinstance(ops_by_mount, dict):
        return []
    alone, overlapping = nfs.get("alone"), nfs.get("overlapping")
    others = ", ".join(map(str, overlapping)) if isinstance(overlapping, list) else ""
    whose = ("the job's alone: no other job of this node ran meanwhile" if alone else
             f"not the job's alone: {others} ran too" if alone is False else
             "the job's alone only if nothing else used them")
    lines = []
    for point, ops in sorted(ops_by_mount.items()):
        shown = "  ".join(f"{op} {ops[op]:,}" for op in OPS if ops.get(op))
        rest = sum(n for op, n in ops.items() if op not in OPS)
        lines.append(f"NFS operations on {point} during the job (the mount's own counters, {whose}): "
                     f"{shown or 'none'}" + (f"  other {rest:,}" if rest else ""))
    return lines
