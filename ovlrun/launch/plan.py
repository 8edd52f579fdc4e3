"""A job's mount plan as plain data: what a launch mounts, made by the planner or
taken from the plan cache.

Plain classes with ``__slots__``, not NamedTuple/dataclass: this module is on every
launch's path, and ``typing`` alone costs ~10 ms to import on a -I -S interpreter.
"""

from __future__ import annotations

from ovlrun.store.layout import snapshot_tree


class MountItem:
    """One localised path: mount ``snapshot_dir/tree`` (+ ``source`` as data) on ``source``."""

    __slots__ = ("path", "root", "snapshot_dir", "source")

    def __init__(self, path: str, source: str, snapshot_dir: str, root: str) -> None:
        self.path = path  # as the profile names it
        self.source = source  # its real path: data-only layer and mount point
        self.snapshot_dir = snapshot_dir
        self.root = root  # the profile tree's root (to tell a deleted release from an unmounted tree)

    @property
    def tree(self) -> str:
        return snapshot_tree(self.snapshot_dir)


class JobPlan:
    """Everything a launch needs from the profile and the store."""

    __slots__ = ("items", "missing", "missing_root", "name", "network")

    def __init__(self, name: str, network: str, missing_root: str, items: list[MountItem],
                 missing: list[str]) -> None:
        self.name = name
        self.network = network
        self.missing_root = missing_root
        self.items = items
        self.missing = missing  # localised paths (or patterns) with no snapshot
