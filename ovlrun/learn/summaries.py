"""Node summaries: what ``learn watch`` saw on one node, and reading many of them back.

One JSON file per node, ``NODE.json``, root-owned, replaced atomically
(:func:`ovlrun.linux.files.write_atomic`), bounded in size (:data:`MAX_ENTRIES`
counters at most: the release directories with the fewest lookups a snapshot would
answer are folded into ``dropped`` first)::

    {"format": 1, "node": "n17", "since": T0, "updated": T1, "tracer": "bpftrace 0.17.0",
     "intervals": 12, "problems": {"map_full": 0, "missed": 0, "relative": 41, "truncated": 0},
     "trees": {"/sw": {"releases": {"app/1.0": [LOOKUPS, ENOENT, OPENS, ERRORS], ...},
                       "top": [...], "unrecognised": {"misc": [...]}}},
     "dropped": {"entries": 0, "counts": [...]}}

Nodes may publish theirs to a shared directory (``learn watch --publish DIR``), written
as the site's image owner, and ``learn propose --from DIR`` reads them with the rules
``snapshot fetch`` applies to DIR: DIR and every file owned by the image owner and not
group/other-writable, opened with ``O_NOFOLLOW`` relative to DIR's descriptor and
checked with ``fstat`` on the descriptor that is read, size-capped, in a time-bounded
worker (a stalled NFS server costs the timeout, not a hang).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from typing import Any

from ovlrun.errors import OvlrunError
from ovlrun.learn.report import Counts
from ovlrun.learn.trees import Attributor
from ovlrun.linux.files import NOT_WRITABLE, trust_problem, write_atomic
from ovlrun.store.siteconfig import Owner

FORMAT = 1
MAX_ENTRIES = 20_000
MAX_BYTES = 8 << 20
DEFAULT_DIR = "/var/lib/ovlrun-learn"
_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FIELDS = ("lookups", "enoent", "opens", "errors")


def node_name() -> str:
    return os.uname().nodename.split(".")[0]


def valid_node(name: str) -> bool:
    return bool(_NODE.fullmatch(name))


def empty(node: str, tracer: str, now: float) -> dict[str, Any]:
    return {"format": FORMAT, "node": node, "since": now, "updated": now, "tracer": tracer, "intervals": 0,
            "problems": {"map_full": 0, "missed": 0, "relative": 0, "truncated": 0}, "trees": {},
            "dropped": {"entries": 0, "counts": [0, 0, 0, 0]}}


def _add(cell: list[int], what: str, n: int) -> None:
    cell[0] += n
    if what == "noent":
        cell[1] += n
    elif what == "open":
        cell[2] += n
    elif what == "err":
        cell[3] += n


def add_interval(summary: dict[str, Any], maps: dict[str, dict[str, int]], counters: dict[str, int],
                 attributor: Attributor, strlen: int) -> None:
    """Fold one interval's kernel maps (``@ok``, ``@open``, ``@noent``, ``@err``: path ->
    count) into ``summary``; ``counters`` has ``@n`` (lookups that matched a tree),
    ``@rel`` and ``@missed``."""
    problems = summary["problems"]
    counted = 0
    attributor.learn([p for paths in maps.values() for p in paths])
    for what, paths in maps.items():
        for path, n in paths.items():
            counted += n
            truncated = len(os.fsencode(path)) >= strlen - 1
            problems["truncated"] += n if truncated else 0
            place = attributor.place(os.path.dirname(path) if truncated else path)
            if place is None:
                continue
            tree = summary["trees"].setdefault(place.tree.root, {"releases": {}, "top": [0, 0, 0, 0],
                                                                  "unrecognised": {}})
            if place.release is None:
                cell = tree["unrecognised"].setdefault(place.top, [0, 0, 0, 0])
            elif not place.release:
                cell = tree["top"]
            else:
                cell = tree["releases"].setdefault(place.release, [0, 0, 0, 0])
            _add(cell, what, n)
    problems["map_full"] += max(0, counters.get("n", 0) - counted)
    problems["missed"] += counters.get("missed", 0)
    problems["relative"] += counters.get("rel", 0)
    summary["intervals"] += 1


def bound(summary: dict[str, Any], max_entries: int = MAX_ENTRIES) -> None:
    """Keep at most ``max_entries`` release counters: fold the least useful into ``dropped``."""
    cells = [(root, rel, cell) for root, tree in summary["trees"].items() for rel, cell in tree["releases"].items()]
    if len(cells) <= max_entries:
        return
    cells.sort(key=lambda c: (c[2][1], c[2][0] - c[2][2]))  # fewest ENOENT, then fewest saved lookups
    for root, rel, cell in cells[: len(cells) - max_entries]:
        del summary["trees"][root]["releases"][rel]
        summary["dropped"]["entries"] += 1
        summary["dropped"]["counts"] = [a + b for a, b in zip(summary["dropped"]["counts"], cell, strict=True)]


def encode(summary: dict[str, Any]) -> bytes:
    return (json.dumps(summary, separators=(",", ":"), ensure_ascii=True) + "\n").encode()


def write_local(directory: str, summary: dict[str, Any]) -> str:
    """``DIRECTORY/NODE.json``, root-only directory, world-readable file, atomic replace."""
    os.makedirs(directory, mode=0o755, exist_ok=True)
    st = os.lstat(directory)
    problem = "not a directory" if not stat.S_ISDIR(st.st_mode) else trust_problem(st, NOT_WRITABLE)
    if problem:
        raise OvlrunError(f"refusing summary directory {directory}: {problem}")
    path = os.path.join(directory, f"{summary['node']}.json")
    write_atomic(path, encode(summary), 0o644)
    return path


# ------------------------------------------------------------------ reading


def open_checked(name: str, dir_fd: int | None, owner: Owner, *, directory: bool) -> int:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if directory else os.O_NONBLOCK)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        what = "a symlink" if e.errno in (errno.ELOOP, errno.ENOTDIR) else e.strerror
        raise OvlrunError(f"refusing {name}: {what}") from None
    st = os.fstat(fd)
    kind_ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    problem = ("not a directory" if directory else "not a regular file") if not kind_ok else \
        trust_problem(st, NOT_WRITABLE, owner.uid, f"{owner.name} (uid {owner.uid})")
    if problem:
        os.close(fd)
        raise OvlrunError(f"refusing {name}: {problem}")
    return fd


def _read(fd: int, what: str) -> dict[str, Any]:
    chunks, total = [], 0
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
        total += len(chunk)
        if total > MAX_BYTES:
            raise OvlrunError(f"{what}: larger than {MAX_BYTES >> 20} MiB; not a node summary")
    try:
        data = json.loads(b"".join(chunks))
    except ValueError as e:
        raise OvlrunError(f"{what}: not JSON ({e})") from None
    problem = _invalid(data)
    if problem:
        raise OvlrunError(f"{what}: not a node summary ({problem})")
    return data  # type: ignore[no-any-return]


def _cell_ok(cell: object) -> bool:
    return (isinstance(cell, list) and len(cell) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in cell))


def _invalid(data: object) -> str:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return f"format is not {FORMAT}"
    if not isinstance(data.get("node"), str) or not isinstance(data.get("trees"), dict):
        return "no node or trees"
    for root, tree in data["trees"].items():
        if not (isinstance(root, str) and root.startswith("/") and isinstance(tree, dict)):
            return f"bad tree {root!r}"
        releases = tree.get("releases")
        if not isinstance(releases, dict) or not all(isinstance(k, str) and _cell_ok(v) for k, v in releases.items()):
            return f"bad releases under {root}"
    return ""


def read_dir(directory: str, owner: Owner) -> list[dict[str, Any]]:
    """Every ``NODE.json`` in a shared summary directory, read under the trust rules above."""
    if not directory.startswith("/"):
        raise OvlrunError(f"summary directory {directory!r} must be an absolute path")
    top = open_checked(os.path.normpath(directory), None, owner, directory=True)
    try:
        out = []
        for name in sorted(os.listdir(top)):
            node, _, ext = name.rpartition(".")
            if ext != "json" or not valid_node(node):
                continue
            fd = open_checked(name, top, owner, directory=False)
            try:
                os.set_blocking(fd, True)
                out.append(_read(fd, f"{directory}/{name}"))
            finally:
                os.close(fd)
        return out
    finally:
        os.close(top)


def read_local(path: str) -> dict[str, Any]:
    """This node's own summary (root-owned, as the watcher writes it)."""
    if not os.path.lexists(path):
        raise OvlrunError(f"no node summary at {path}: is learn watch running here? (or use --from DIR)")
    fd = open_checked(path, None, Owner("root", 0, 0), directory=False)
    try:
        os.set_blocking(fd, True)
        return _read(fd, path)
    finally:
        os.close(fd)


def totals(summaries: list[dict[str, Any]]) -> dict[tuple[str, str], Counts]:
    """Release counters summed over nodes: (root, release) -> counts."""
    out: dict[tuple[str, str], Counts] = {}
    for s in summaries:
        for root, tree in s["trees"].items():
            for rel, cell in tree["releases"].items():
                c = out.setdefault((root, rel), Counts())
                c.lookups += cell[0]
                c.enoent += cell[1]
                c.opens += cell[2]
                c.errors += cell[3]
    return out
