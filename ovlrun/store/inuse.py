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
``/proc/PID/ns/mnt``).  A namespace kept alive only by a bind-mounted nsfs file, with no
process in it, is not seen; ovlrun never creates such namespaces.
"""

from __future__ import annotations

import os
import re

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(value: str) -> str:
    # mountinfo escapes space, tab, newline, backslash (and ',' '=' in super options) as \ooo.
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), value)


def _layers(super_options: str) -> list[str]:
    layers = []
    for option in super_options.split(","):  # ',' inside values is escaped as \054
        key, _, value = option.partition("=")
        if key in ("lowerdir+", "datadir+"):
            layers.append(_unescape(value))
        elif key == "lowerdir":
            # Legacy form: layers separated by ':' (or '::' before data-only layers);
            # a literal ':' in a layer is written '\:'.
            for part in re.split(r"(?<!\\):+", _unescape(value)):
                layers.append(part.replace("\\:", ":").replace("\\\\", "\\"))
    return layers


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
            with open(f"/proc/{pid}/mountinfo", errors="surrogateescape") as f:
                text = f.read()
        except OSError:  # exited meanwhile (or a kernel thread): not using anything
            continue
        seen.add(ns)
        for line in text.splitlines():
            _, sep, right = line.partition(" - ")
            fields = right.split(" ")
            if sep and len(fields) >= 3 and fields[0] == "overlay":
                layers.update(_layers(fields[2]))
    return layers


def snapshot_ids_in_use() -> set[tuple[str, str]]:
    """(KEY, ID) of every store snapshot whose tree is a layer of a live overlay.

    Matched on the layout's tail ``snapshots/KEY/ID/tree`` rather than the full path: the
    store may be reached through a symlink or a path given differently to the mount.  IDs
    carry a timestamp and random bits, so a false match (which only keeps a snapshot
    longer) is as unlikely as it is harmless.
    """
    used = set()
    for layer in overlay_layers_in_use():
        parts = layer.rstrip("/").split("/")
        if len(parts) >= 4 and parts[-1] == "tree" and parts[-4] == "snapshots":
            used.add((parts[-3], parts[-2]))
    return used
