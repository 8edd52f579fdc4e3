"""The NFS operations a job cost, from the client's own counters (issue 19, item 3).

The kernel counts every NFS operation per mount (``/proc/self/mountstats``: LOOKUP,
GETATTR, ACCESS, OPEN, READ, READDIR(PLUS), READLINK, ...), exactly, but per mount, not
per process: learn reads the counters of the NFS mounts that hold a traced tree (or lie
inside one) before the job starts and after it ends, and reports the difference as the
job's cost *where the node ran only that job* on those mounts (the report says so).
The parsing is :mod:`ovlrun.linux.mountstats`'s (``read``, ``delta``); on a node without
it, or without NFS mounts under the trees, there is nothing to report.
"""

from __future__ import annotations

import importlib
from typing import Any

from ovlrun.learn.trees import TreeSpec

OPS = ("LOOKUP", "GETATTR", "ACCESS", "OPEN", "READ", "READDIR", "READDIRPLUS", "READLINK")


def _module() -> Any:
    try:
        return importlib.import_module("ovlrun.linux.mountstats")
    except ImportError:
        return None


def _relevant(point: str, trees: list[TreeSpec]) -> bool:
    for tree in trees:
        for root in {tree.root, tree.real}:
            if root == point or root.startswith(point.rstrip("/") + "/") or point.startswith(root + "/"):
                return True
    return False


class NfsCounters:
    """Before/after counters of the NFS mounts under the traced trees."""

    def __init__(self, trees: list[TreeSpec], path: str = "/proc/self/mountstats") -> None:
        self.trees = trees
        self.path = path
        self.module = _module()
        self.before: Any = None

    def _read(self) -> Any:
        try:
            stats = self.module.read(self.path)
        except OSError:
            return None
        return {point: s for point, s in stats.items() if _relevant(point, self.trees)}

    def start(self) -> None:
        if self.module is not None:
            self.before = self._read()

    def finish(self) -> dict[str, dict[str, int]] | None:
        """mount point -> operation -> calls during the job; None if nothing was counted."""
        if self.module is None or not self.before:
            return None
        after = self._read()
        if not after:
            return None
        out = {}
        for point, stats in self.module.delta(self.before, after).items():
            ops = stats.ops if hasattr(stats, "ops") else stats
            out[point] = {op: int(n) for op, n in ops.items() if n}
        return out


def format_lines(deltas: dict[str, dict[str, int]]) -> list[str]:
    lines = []
    for point, ops in sorted(deltas.items()):
        shown = "  ".join(f"{op} {ops[op]:,}" for op in OPS if ops.get(op))
        others = sum(n for op, n in ops.items() if op not in OPS)
        lines.append(f"NFS operations on {point} during the job (the mount's own counters: the job's alone only "
                     f"if nothing else used it): {shown or 'none'}" + (f"  other {others:,}" if others else ""))
    return lines
