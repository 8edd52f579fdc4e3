"""Mount-table helpers: bind mounts, cache dropping, leak checks."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def mounted_at(path: Path) -> list[str]:
    """mountinfo lines whose mount point is `path` (or below it)."""
    p = str(path)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == p or mp.startswith(p + "/"):
                out.append(line.rstrip())
    return out


def is_mountpoint(path: Path) -> bool:
    return any(line.split()[4] == str(path) for line in mounted_at(path))


def umount(path: Path, lazy: bool = False) -> None:
    args = ["umount"] + (["-l"] if lazy else []) + [str(path)]
    subprocess.run(args, check=True)


def umount_all_under(path: Path) -> None:
    # Deepest first, so that stacked mounts come off in order.
    for line in sorted(mounted_at(path), key=lambda l: -len(l.split()[4])):
        mp = line.split()[4]
        subprocess.run(["umount", mp], check=False)
    if mounted_at(path):
        for line in mounted_at(path):
            subprocess.run(["umount", "-l", line.split()[4]], check=False)


def bind_ro(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(src), str(dest)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(dest)], check=True)


def drop_caches() -> None:
    """Flush dirty data, then drop page cache, dentries and inodes."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
