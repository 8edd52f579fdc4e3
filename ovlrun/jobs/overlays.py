"""Which mounts of a mount table are ovlrun's localising overlays, and which snapshot
serves each: the one filter ``status`` (what this job localises) and gc (which snapshots
live jobs use) share.

An overlay ovlrun mounted has the source ``ovlrun`` (linux/overlay.py names it so) and a
lower layer that is a snapshot's tree, ``STORE/snapshots/KEY/ID/tree``, or, where the
store path was too long for the kernel's string interfaces, ``snapshots/KEY/ID/tree``
relative to the store root (linux/layerpaths.py).  A source anyone can choose proves
nothing by itself: gc also looks only at mount namespaces of the host's own user
namespace (:mod:`ovlrun.jobs.inuse`), where only root mounts.
"""

from __future__ import annotations

import os

from ovlrun.linux import mountinfo
from ovlrun.store.layout import snapshot_of_layer


class Localised:
    """One localised path as its mount shows it."""

    __slots__ = ("data_only", "key_id", "layer", "point")

    def __init__(self, point: str, layer: str, key_id: tuple[str, str], data_only: bool) -> None:
        self.point = point  # the localised path (the overlay's mount point)
        self.layer = layer  # the snapshot tree layer, as the mount options name it
        self.key_id = key_id  # (KEY, ID) of the snapshot
        self.data_only = data_only  # the shared tree is a data-only layer (not the 6.1 fallback)

    def snapshot_dir(self, store: str) -> str:
        """The snapshot's directory (a store-relative layer is relative to ``store``)."""
        return os.path.join(store, os.path.dirname(self.layer.rstrip("/")))


def localised(mounts: list[mountinfo.Mount]) -> list[Localised]:
    """The ovlrun overlays among ``mounts``, each with the snapshot it serves."""
    out = []
    for m in mounts:
        if m.fstype != "overlay" or m.source != "ovlrun":
            continue
        for layer in mountinfo.overlay_layers(m.super_options):
            key_id = snapshot_of_layer(layer)
            if key_id is not None:
                data_only = "datadir+" in m.super_options or "::" in m.super_options
                out.append(Localised(m.point, layer, key_id, data_only))
                break
    return out
