"""Which snapshots running jobs use, from the mount tables of live mount namespaces.

Chosen over a per-use lock because it needs no cooperation from the job and costs the
launch path nothing (launch overhead is the benchmark that matters).  A flock would have
to be an fd without O_CLOEXEC kept open in the job: the job (or a daemon it starts) can
close it or carry it past the job's end, and it leaks ovlrun state into every user
process.  A mount, in contrast, is exactly as alive as the job's namespace: it exists
while any job process does and vanishes with the last one, SIGKILL included.

Each job's overlay shows up in ``/proc/PID/mountinfo`` of its processes as
``lowerdir+=STORE/snapshots/KEY/ID/tree`` (legacy mount(2): ``lowerdir=TREE::DATA``).
We read one mountinfo per distinct mount namespace (identified by the inode of
``/proc/PID/ns/mnt``).
"""

from __future__ import annotations

import os

from ovlrun.linux import mountinfo
from ovlrun.store.layout import snapshot_of_layer


def overlay_layers_in_use() -> set[str]:
    """Every overlay lower/data layer path mounted in any live mount namespace."""
    seen: set[int] = set()
    layers: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{pid}/ns/mnt").st_ino
            if ns in seen:
                continue
            mounts = mountinfo.read(f"/proc/{pid}/mountinfo")
        except OSError:  # exited meanwhile (or a kernel thread): not using anything
            continue
        seen.add(ns)
        for m in mounts:
            if m.fstype == "overlay":
                layers.update(mountinfo.overlay_layers(m.super_options))
    return layers


def snapshot_ids_in_use() -> set[tuple[str, str]]:
    """(KEY, ID) of every store snapshot whose tree is a layer of a live overlay."""
    return {key_id for layer in overlay_layers_in_use() if (key_id := snapshot_of_layer(layer)) is not None}
