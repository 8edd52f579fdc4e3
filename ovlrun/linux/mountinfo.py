"""``ovlrun status``: what the current job localises, read back from the kernel.

The mount table is the truth (not what the launcher meant to do): every overlay mount
whose layers come from the snapshot store is a localised path.
"""

from __future__ import annotations

import os
from typing import Any

from ovlrun.store.index import store_path


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = bytearray(), 0
    raw = field.encode("utf-8", "surrogateescape")
    while i < len(raw):
        if raw[i:i + 1] == b"\\" and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def overlay_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str]]:
    """(mount point, super options) of every overlay mount."""
    result = []
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            fstype, _source, options = ([*right.split(" ", 2), "", ""])[:3]
            if fstype == "overlay":
                result.append((_unescape(left.split(" ")[4]), options))
    return result


def job_status() -> dict[str, Any]:
    store = str(store_path()).rstrip("/") + "/"
    localised = []
    for point, options in overlay_mounts():
        if store in options:
            after = options.split(store, 1)[1]
        elif "=snapshots/" in options:
            # A store path too long for the kernel's string interfaces is given relative to
            # the store root (linux/layerpaths.py): lowerdir+=snapshots/KEY/ID/tree.
            after = "snapshots/" + options.split("=snapshots/", 1)[1]
        else:
            continue
        snapshot = store + "/".join(after.split("/")[:3])
        data_only = "::" in options or "datadir+" in options
        localised.append({"path": point, "snapshot": snapshot,
                          "mode": "data-only" if data_only else "fallback (shared tree as regular lower layer)"})
    return {"profile": os.environ.get("OVLRUN_PROFILE", ""), "localised": localised}
