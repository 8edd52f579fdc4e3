"""Ended jobs: the bounded history ``ovlrun jobs`` lists.

A job's record lives in ``RUNDIR[/NODE]/ID.json`` while the job runs (:mod:`.records`).
When its end is known -- the Slurm Epilog, or ``ovlrun learn --profile`` for the job it
ran -- the record gets ``ended`` (and learn's figures) and moves to
``RUNDIR[/NODE]/.ended/ID.json`` (the name cannot be a node's: node names never start
with a dot).  That history is bounded: at most :data:`MAX_ENDED` records and none older
than :data:`MAX_AGE`, pruned whenever a record is added.  Launches nobody ran under
learn end unseen; their records stay where they are until ``snapshot gc`` prunes them.

The move holds an exclusive ``flock`` on the record directory, so two Epilogs ending at
once never prune each other's records half-way.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ovlrun.errors import OvlrunError
from ovlrun.jobs.records import (
    RECORD_SUFFIX,
    RUNDIR_MODE,
    JobRecord,
    check_id,
    open_record_dir,
    valid_record_id,
)
from ovlrun.linux.files import UntrustedError, open_trusted

ENDED = ".ended"
MAX_ENDED = 1000
MAX_AGE = 7 * 86400.0


@contextmanager
def locked(node: str | None = None) -> Iterator[int]:
    """The record directory of ``node``, opened and locked exclusively for this block."""
    dir_fd = open_record_dir(node)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        yield dir_fd
    finally:
        os.close(dir_fd)  # releases the lock


def _ended_dir(dir_fd: int, create: bool) -> int | None:
    """An fd of the history directory below ``dir_fd`` (root's, not writable by others)."""
    if create:
        try:
            os.mkdir(ENDED, RUNDIR_MODE, dir_fd=dir_fd)
        except FileExistsError:
            pass
    try:
        return open_trusted(ENDED, dir_fd=dir_fd, directory=True)
    except FileNotFoundError:
        return None
    except UntrustedError as e:
        raise OvlrunError(f"refusing the job history directory {ENDED}: {e.problem}") from None


def finish(job_id: str, change: Callable[[JobRecord], None] | None = None, node: str | None = None,
           ended: float | None = None) -> JobRecord | None:
    """The job has ended: apply ``change``, set ``ended``, move the record into the
    history (its user's view files go) and prune the history; None if there is no record."""
    check_id(job_id)
    name = job_id + RECORD_SUFFIX
    with locked(node) as dir_fd:
        record = JobRecord.load_path(name, dir_fd)
        if record is None:
            return None
        if change is not None:
            change(record)
        record.ended = time.time() if ended is None else ended
        history = _ended_dir(dir_fd, create=True)
        assert history is not None
        try:
            record.save(history, views=False)
            JobRecord.remove(job_id, node)
            prune(history, now=record.ended)
        finally:
            os.close(history)
        return record


def prune(history_fd: int, *, now: float, keep: int = MAX_ENDED, max_age: float = MAX_AGE) -> int:
    """Remove ended records beyond the newest ``keep`` or older than ``max_age``."""
    entries = []
    for name in os.listdir(history_fd):
        if not name.endswith(RECORD_SUFFIX) or not valid_record_id(name[:-len(RECORD_SUFFIX)]):
            continue
        try:
            entries.append((os.stat(name, dir_fd=history_fd, follow_symlinks=False).st_mtime, name))
        except FileNotFoundError:
            continue
    entries.sort(reverse=True)
    removed = 0
    for i, (mtime, name) in enumerate(entries):
        if i >= keep or now - mtime > max_age:
            try:
                os.unlink(name, dir_fd=history_fd)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def ended_records() -> list[JobRecord]:
    """Every readable ended record of every node of this host (root)."""
    return JobRecord.all(within=ENDED)


def recent(limit: int) -> list[JobRecord]:
    """The ``limit`` most recently started jobs of this host, running or ended (root)."""
    found: dict[tuple[str, str], JobRecord] = {}
    for record in ended_records() + JobRecord.all():  # a running record wins over a stale ended one
        found[(record.node, record.job_id)] = record
    return sorted(found.values(), key=lambda r: (-r.started, r.job_id))[:limit]
