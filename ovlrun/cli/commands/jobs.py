"""``ovlrun jobs [--json] [--limit N]`` (root): this node's recent jobs, what each was
given and what it saved.

One line per job, newest first: running ones (their records) and ended ones (the
bounded history the Slurm Epilog and learn keep, jobs/history.py).  The figures are the
record's ``stats`` (jobs/stats.py): the snapshots' age, and, where ``learn --profile``
counted the job's lookups, the share answered by snapshots, the failed lookups that
still reached the tree, and the NFS operations of the job's trees' mounts.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from ovlrun.cli.options import JsonOpt, print_json, require_root

HEADER = ("JOB", "USER", "PROFILE", "STATE", "STARTED", "TIME", "PATHS", "OLDEST", "LOCAL", "REMOTE ENOENT", "NFS")


def register(parent: typer.Typer, name: str) -> list[str]:
    parent.command(name)(jobs)
    return []


LimitOpt = Annotated[int, typer.Option("--limit", min=1, metavar="N", help="Show the N newest jobs.")]


def jobs(as_json: JsonOpt = False, limit: LimitOpt = 50) -> None:
    """This node's recent jobs (running, and ended ones the Slurm Epilog or learn kept):
    whose, which profile, what each was given (localised paths, the oldest snapshot's
    age) and, where learn --profile counted its lookups, what it saved: the share
    answered by snapshots (LOCAL), failed lookups that still reached the tree (REMOTE
    ENOENT), the NFS LOOKUP+GETATTR+ACCESS its trees' mounts sent (* other jobs ran
    meanwhile).  Root only: job records are root's."""
    require_root("ovlrun jobs", "job records are root's alone")
    from ovlrun.jobs.history import recent
    from ovlrun.jobs.stats import public

    found = recent(limit)
    now = time.time()
    if as_json:
        print_json([{**r.to_dict(), "stats": public(r.stats), "status": _status(r)} for r in found])
        return
    rows = [HEADER] + [_row(r, now) for r in found]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    for row in rows:  # the first four columns are words, the rest figures
        cells = [cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells))
    if not found:
        print("(no job records on this node)")


def _status(record: Any) -> str:
    """running, ended, or gone (a launch whose end nobody saw)."""
    if record.ended is not None:
        return "ended"
    return "running" if record.alive() else "gone"


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _row(record: Any, now: float) -> tuple[str, ...]:
    from ovlrun.jobs.nfs import CACHE_OPS, totals
    status = _status(record)
    end = record.ended if record.ended is not None else now if status == "running" else None
    given = record.stats.get("given")
    given = given if isinstance(given, dict) else {}
    unlocalised = given.get("unlocalised")
    paths = f"{len(record.localised)}" + (f"/{len(record.localised) + len(unlocalised)}"
                                          if isinstance(unlocalised, list) and unlocalised else "")
    oldest = given.get("oldest_age")
    local = remote_enoent = "-"
    learned = record.stats.get("learned")
    if isinstance(learned, dict):
        counts = {k: v for k, v in learned.items() if isinstance(v, int) and not isinstance(v, bool)}
        total = counts.get("local", 0) + counts.get("remote", 0)
        local = f"{100 * counts.get('local', 0) / total:.0f}%" if total else "-"
        remote_enoent = f"{counts.get('remote_enoent', 0):,}"
    nfs = "-"
    figures = record.stats.get("nfs")
    if isinstance(figures, dict):
        ops = totals(figures)
        alone = figures.get("alone")
        nfs = f"{sum(ops.get(op, 0) for op in CACHE_OPS):,}" + ("" if alone else "*" if alone is False else "?")
    started = time.strftime("%m-%d %H:%M", time.localtime(record.started)) if record.started else "-"
    return (record.job_id, record.user, record.profile or "-", f"{record.state}, {status}", started,
            _duration(end - record.started if end is not None else None), paths,
            _duration(oldest if isinstance(oldest, (int, float)) else None), local, remote_enoent, nfs)
