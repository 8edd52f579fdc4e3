"""Per-job statistics: what a job was given, and where each figure of ``JobRecord.stats``
comes from.

``stats`` holds JSON values only, under these keys (README "Job records" shows them):

- ``given`` (every launch, every Slurm Prolog that localised; ``ovlrun status`` computes
  the same from the job's mount table): ``localised`` [{``path``, ``snapshot``
  ("KEY/ID"), ``age`` (seconds from the snapshot's build to the job's start)}],
  ``unlocalised`` (paths the profile names that the job runs without), ``data_only``
  (the shared tree is a data-only layer: every lookup below a localised path is
  answered by its snapshot), ``method`` (the mount method, as ``ovlrun doctor`` names
  it; records only), ``oldest_age``;
- ``learned`` (``ovlrun learn --profile``, as root): what the job's lookups cost, traced
  (:func:`ovlrun.learn.report.learned_stats`);
- ``nfs`` (``ovlrun learn --profile``, where the job's trees are on NFS mounts): the NFS
  operations those mounts sent while the job ran (:mod:`ovlrun.jobs.nfs`).

On the launch path (``given``): imports nothing; the snapshot's age comes from the build
time its ID starts with (``20250107T101201Z-...``), so no manifest is read.
"""

from __future__ import annotations

# What ``ovlrun jobs`` shows.
PUBLIC = ("given", "learned", "nfs")


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm):
    ``time.strptime`` would import re and locale on every launch."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def snapshot_time(snapshot_id: str) -> float | None:
    """The UTC build time a snapshot ID starts with (``YYYYmmddTHHMMSSZ-...``, see
    ``store.index.new_snapshot_id``), as a Unix time; None for another shape."""
    stamp = snapshot_id[:16]
    digits = stamp[:8] + stamp[9:15]
    if len(stamp) != 16 or stamp[8] != "T" or stamp[15] != "Z" or not (digits.isascii() and digits.isdigit()):
        return None
    year, month, day = int(stamp[:4]), int(stamp[4:6]), int(stamp[6:8])
    hour, minute, second = int(stamp[9:11]), int(stamp[11:13]), int(stamp[13:15])
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        return None
    return float(_days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second)


def snapshot_name(snapshot_dir: str) -> str:
    """``KEY/ID`` of a snapshot directory (``STORE/snapshots/KEY/ID``)."""
    head, snapshot_id = snapshot_dir.rstrip("/").rsplit("/", 1)
    return head.rsplit("/", 1)[-1] + "/" + snapshot_id


def given(localised: list[tuple[str, str]], unlocalised: list[str], data_only: bool, started: float,
          method: str = "") -> dict[str, object]:
    """What a job was given: ``localised`` is (path, "KEY/ID") per localised path."""
    paths = []
    oldest = None
    for path, snapshot in localised:
        built = snapshot_time(snapshot.rpartition("/")[2])
        age = None if built is None else max(0, int(started - built))
        if age is not None and (oldest is None or age > oldest):
            oldest = age
        paths.append({"path": path, "snapshot": snapshot, "age": age})
    out: dict[str, object] = {"localised": paths, "unlocalised": unlocalised, "data_only": data_only,
                              "oldest_age": oldest}
    if method:
        out["method"] = method
    return out


def public(stats: dict[str, object]) -> dict[str, object]:
    """The figures the job's user and ``ovlrun jobs`` see (none of the internal ones)."""
    return {k: stats[k] for k in PUBLIC if k in stats}
