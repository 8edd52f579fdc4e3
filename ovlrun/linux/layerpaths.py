"""Short names for layer paths too long for the kernel's string interfaces.

Where layers cannot be passed as fds (before Linux 6.15), a layer is a string: fsconfig
caps every string value at 255 bytes and mount(2) copies one page of options.  Measured
on Debian's 6.1 and 6.12 kernels (``tests/vm/features.py``), both of these resolve a
long layer with a short string:

- a path relative to the current directory (overlayfs resolves layers with kern_path,
  relative to the caller's cwd, at fsconfig time on 6.5+ and at mount(2) time on 6.1);
- ``/proc/self/fd/N`` of an O_PATH fd of the layer (a magic link the walk follows).

The snapshot layer uses the first: chdir to the store root and name the layer
``snapshots/KEY/ID/tree``.  That string is what mountinfo shows, and its tail is how
``ovlrun snapshot gc`` recognises a snapshot a running job uses (:mod:`ovlrun.jobs.inuse`);
``/proc/self/fd/3`` would hide the snapshot from gc.  The data layer (the shared subtree,
never looked at by gc) uses the second, which needs no chdir.

The cwd is per process and mounts run from several threads, so the chdir, the call and
the way back are one critical section (the other mount threads only use absolute paths
or fds meanwhile).  Off the common path: only long layers get here.
"""

from __future__ import annotations

import _thread
import os

_cwd_lock = _thread.allocate_lock()
SNAPSHOT_TAIL = 4  # snapshots/KEY/ID/tree


def store_relative(snapshot_tree: str) -> tuple[str, str] | None:
    """(store root, ``snapshots/KEY/ID/tree``) if ``snapshot_tree`` has the store's layout."""
    parts = snapshot_tree.rstrip("/").rsplit("/", SNAPSHOT_TAIL)
    if len(parts) == SNAPSHOT_TAIL + 1 and parts[1] == "snapshots" and parts[4] == "tree":
        return parts[0] or "/", "/".join(parts[1:])
    return None


def fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


class InDirectory:
    """``with InDirectory(path):`` the process' cwd is ``path`` (serialised, then restored)."""

    __slots__ = ("_path", "_saved")

    def __init__(self, path: str) -> None:
        self._path = path
        self._saved = -1

    def __enter__(self) -> None:
        _cwd_lock.acquire()
        try:
            self._saved = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            os.chdir(self._path)
        except BaseException:
            self._restore()
            raise

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        try:
            if self._saved >= 0:
                os.fchdir(self._saved)
                os.close(self._saved)
        finally:
            self._saved = -1
            _cwd_lock.release()
