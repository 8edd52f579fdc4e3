"""Counting a job's lookups per release directory, and showing the counts.

Columns, per release directory: lookups; ENOENT lookups; opens (successful opens and
execs of files: their data comes from the shared tree even inside a localised path, so
they are the floor no profile removes); share of the job's lookups.  Inside a job view
(learn ``--profile``, or learn run inside ``ovlrun --profile``) each lookup under a tree
is also *local* (answered by a snapshot: below a localised path, and not a file open)
or *remote* (it reached the shared tree), which is the residual: what the profile
still misses.
"""

from __future__ import annotations

import posixpath
from typing import Any

from ovlrun.learn.events import Lookup
from ovlrun.learn.trees import Attributor, Place, TreeSpec, release_real_path, under_any

ENOENT = 2


class Counts:
    __slots__ = ("enoent", "errors", "local", "lookups", "opens", "remote", "remote_enoent")

    def __init__(self) -> None:
        self.lookups = self.enoent = self.errors = self.opens = 0
        self.local = self.remote = self.remote_enoent = 0

    def add(self, lookup: Lookup, times: int = 1) -> None:
        self.lookups += times
        if lookup.error == ENOENT:
            self.enoent += times
        elif lookup.error:
            self.errors += times
        if lookup.data_open:
            self.opens += times

    def merge(self, other: Counts, local: bool | None = None) -> None:
        """Add ``other``; with ``local`` also say where its lookups were answered: by a
        snapshot (all but the file opens) or by the shared tree (all of them)."""
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if local is True:
            self.local += other.saved
            self.remote += other.opens
        elif local is False:
            self.remote += other.lookups
            self.remote_enoent += other.enoent

    def to_json(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    @property
    def saved(self) -> int:
        """What a snapshot of the directory answers without the server: every lookup but
        the opens of file data."""
        return self.lookups - self.opens


class Tally:
    """Every lookup of one job, by where it falls (see :class:`Place`).

    Lookups are counted per path as they come; :meth:`finish` attributes the paths once
    all are known (the tree's shape is learned from all of them, see
    :class:`~ovlrun.learn.trees.Attributor`).
    """

    def __init__(self, trees: list[TreeSpec], localised: list[str] | None = None) -> None:
        self.attributor = Attributor(trees)
        self.localised = set(localised or ())
        self.total = Counts()
        self.unattributed = Counts()  # relative paths learn could not resolve, unreadable ones
        self.truncated = 0
        self.processes = 0  # set by whoever ran the job (aggregated lookups carry no process)
        self.paths: dict[str, Counts] = {}
        self.opened: dict[str, int] = {}  # after finish(): path -> data opens
        self.outside = Counts()  # not under any tree
        self.releases: dict[tuple[str, str], Counts] = {}
        self.top: dict[str, Counts] = {}  # per tree root: lookups at the top levels
        self.unrecognised: dict[tuple[str, str], Counts] = {}  # no release level found
        self._real: dict[tuple[str, str], str] = {}

    def add(self, lookup: Lookup, times: int = 1) -> None:
        self.truncated += lookup.truncated * times
        self.total.add(lookup, times)
        if not lookup.path.startswith("/"):
            self.unattributed.add(lookup, times)
            return
        # A truncated path's last component may be cut: it is counted as "somewhere in" its
        # directory (the trailing '/' keeps it apart from a lookup of the directory itself).
        key = posixpath.dirname(lookup.path) + "/" if lookup.truncated else lookup.path
        counts = self.paths.get(key)
        if counts is None:
            counts = self.paths[key] = Counts()
        counts.add(lookup, times)

    def finish(self) -> None:
        self.attributor.learn(list(self.paths))
        for path, counts in self.paths.items():
            place = self.attributor.place(path)
            if place is None:
                self.outside.merge(counts)
                continue
            self._bucket(place).merge(counts, self._is_local(place, path) if self.localised else None)
        # Kept past the per-path counts: which files' data the job opened, how often
        # (learn --inline proposes what to store whole from them).
        self.opened = {path: counts.opens for path, counts in self.paths.items() if counts.opens}
        self.paths = {}

    def _bucket(self, place: Place) -> Counts:
        root = place.tree.root
        if place.release is None:
            return self.unrecognised.setdefault((root, place.top), Counts())
        if not place.release:
            return self.top.setdefault(root, Counts())
        return self.releases.setdefault((root, place.release), Counts())

    def _is_local(self, place: Place, path: str) -> bool:
        if place.release:
            # Through a symlinked release (app/latest -> 1.0) the lookup lands in 1.0's overlay.
            key = (place.tree.root, place.release)
            if key not in self._real:
                real, _ = release_real_path(place.tree, place.release)
                self._real[key] = posixpath.join(place.tree.real, real) if real is not None else ""
            for prefix in (posixpath.join(place.tree.root, place.release), posixpath.join(place.tree.real,
                                                                                           place.release)):
                if self._real[key] and (path == prefix or path.startswith(prefix + "/")):
                    path = self._real[key] + path[len(prefix):]
                    break
        return under_any(path, self.localised)

    def rows(self) -> list[tuple[str, str, str, Counts]]:
        """(label, tree root, release, counts), the biggest first, then the other buckets."""
        rows = [(posixpath.join(root, rel), root, rel, c) for (root, rel), c in self.releases.items()]
        rows.sort(key=lambda r: (-r[3].lookups, r[0]))
        rows += [(f"{root} (top levels)", root, "", c) for root, c in sorted(self.top.items())]
        rows += [(f"{posixpath.join(root, top)} (no release level found)", root, "", c)
                 for (root, top), c in sorted(self.unrecognised.items())]
        return rows

    def under_trees(self) -> Counts:
        """Every lookup below the trees' roots (releases, top levels, unrecognised)."""
        under = Counts()
        for c in (*self.releases.values(), *self.top.values(), *self.unrecognised.values()):
            under.merge(c)
        return under

    def residual(self) -> dict[str, int]:
        under = self.under_trees()
        release_enoent = sum(c.remote_enoent for c in self.releases.values())
        return {"local": under.local, "remote": under.remote, "remote_enoent": under.remote_enoent,
                "remote_enoent_in_releases": release_enoent, "remote_opens": under.opens}


def job_figures(tally: Tally) -> dict[str, int]:
    """A job's lookups under the trees as ``JobRecord.stats`` keeps them (``learned``):
    ``lookups``, ``enoent``, ``opens``, and where they were answered,
    ``local`` (by a snapshot) and ``remote`` (``remote_enoent`` of them failed)."""
    under = tally.under_trees()
    out = {"lookups": under.lookups, "enoent": under.enoent, "opens": under.opens}
    if tally.localised:
        out.update(local=under.local, remote=under.remote, remote_enoent=under.remote_enoent)
    else:  # no localised path: everything reached the tree
        out.update(local=0, remote=under.lookups, remote_enoent=under.enoent)
    return out


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "-"


def format_table(tally: Tally, header: str) -> str:
    residual = bool(tally.localised)
    cols = ["lookups", "ENOENT", "opens", "share"] + (["local", "remote", "remote ENOENT"] if residual else [])
    rows = tally.rows()
    extra = [("outside the trees", tally.outside), ("not attributed (relative, unreadable)", tally.unattributed)]
    labels = [r[0] for r in rows] + [label for label, c in extra if c.lookups]
    width = max([len("release directory"), *(len(label) for label in labels)])
    lines = [header, f"{'release directory':<{width}}" + "".join(f"  {c:>13}" if c == "remote ENOENT" else f"  {c:>9}"
                                                                  for c in cols)]

    def line(label: str, c: Counts) -> str:
        cells = [f"{c.lookups:,}", f"{c.enoent:,}", f"{c.opens:,}", _share(c.lookups, tally.total.lookups)]
        out = f"{label:<{width}}" + "".join(f"  {v:>9}" for v in cells)
        if residual:
            out += f"  {c.local:>9,}  {c.remote:>9,}  {c.remote_enoent:>13,}"
        return out

    lines += [line(label, c) for label, _, _, c in rows]
    lines += [line(label, c) for label, c in extra if c.lookups]
    lines.append(line("total", tally.total))
    if residual:
        r = tally.residual()
        lines.append(f"residual under the trees: {r['local']:,} answered by snapshots, {r['remote']:,} reached the "
                     f"shared tree ({r['remote_opens']:,} of them file opens, the floor; {r['remote_enoent']:,} "
                     f"ENOENT, {r['remote_enoent_in_releases']:,} of those inside release directories)")
    return "\n".join(lines)


def to_json(tally: Tally) -> dict[str, Any]:
    def entry(label: str, root: str, rel: str, c: Counts) -> dict[str, Any]:
        share = c.lookups / tally.total.lookups if tally.total.lookups else 0.0
        return {"label": label, "root": root, "release": rel, **c.to_json(), "share": round(share, 4)}

    out: dict[str, Any] = {"lookups": tally.total.lookups, "processes": tally.processes,
                           "rows": [entry(*row) for row in tally.rows()],
                           "outside_trees": tally.outside.to_json(), "unattributed": tally.unattributed.to_json(),
                           "truncated_paths": tally.truncated}
    if tally.localised:
        out["localised"] = sorted(tally.localised)
        out["residual"] = tally.residual()
    return out


def write_events(stream: Any, lookup: Lookup, times: int = 1) -> None:
    """A lookup (made ``times`` times) as a JSON line (``--events FILE``); pid 0 for
    lookups bpftrace counted in the kernel."""
    import json

    stream.write(json.dumps({"syscall": lookup.syscall, "kind": lookup.kind, "pid": lookup.pid,
                             "path": lookup.path, "result": lookup.result, "exact": lookup.exact,
                             "count": times}) + "\n")


def release_dirs_exist(tally: Tally) -> dict[tuple[str, str], tuple[str | None, str]]:
    """For each release directory: its real path below the root (None if it cannot be
    localised) and a note; one lstat walk each, after the job."""
    by_root = {t.root: t for t in tally.attributor.trees}
    return {(root, rel): release_real_path(by_root[root], rel) for root, rel in tally.releases}

