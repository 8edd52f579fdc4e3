"""A job's mount plan as plain data: what a launch mounts, made by the planner or
taken from the plan cache.

Plain classes with ``__slots__``, not NamedTuple/dataclass: this module is on every
launch's path, and ``typing`` alone costs ~10 ms to import on a -I -S interpreter.
"""

from __future__ import annotations

from ovlrun.store.layout import snapshot_image, snapshot_tree


class MountItem:
    """One localised path: mount the image in ``snapshot_dir`` at its ``tree`` (in the
    job's namespace only) and an overlay of it (+ ``source`` as data) on ``source``."""

    __slots__ = ("path", "root", "snapshot_dir", "source", "source_ino", "source_root")

    def __init__(self, path: str, source: str, snapshot_dir: str, root: str, source_root: str = "",
                 source_ino: int = 0) -> None:
        self.path = path  # as the profile names it
        self.source = source  # its real path: data-only layer and mount point
        self.snapshot_dir = snapshot_dir
        self.root = root  # the profile tree's root (to tell a deleted release from an unmounted tree)
        # The directory the snapshot was built from (see store.index.Manifest): the launch
        # opens source_root, then source below it following no symlink, and must find
        # this inode (0: not recorded, never mounted).
        self.source_root = source_root
        self.source_ino = source_ino

    @property
    def tree(self) -> str:
        return snapshot_tree(self.snapshot_dir)

    @property
    def image(self) -> str:
        return snapshot_image(self.snapshot_dir)


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
