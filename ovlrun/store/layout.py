"""Where the snapshot store is and whether a snapshot in it may be trusted.

Light on imports (os and stat only): a launch with a cached mount plan checks every
snapshot it mounts through here without loading :mod:`ovlrun.store.index`.
"""

from __future__ import annotations

import os
import stat

from ovlrun.errors import OvlrunError

DEFAULT_STORE = "/var/lib/ovlrun"
INDEX = "index.json"


def store_dir(environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get("OVLRUN_STORE") or DEFAULT_STORE


def check_snapshot_trusted(store: str, snapshot_dir: str, trusted: set[str] | None = None) -> None:
    """Refuse a snapshot anyone but root could have written.

    ``trusted.overlay.*`` xattrs decide what an overlay serves (a redirect can point
    anywhere in the data layer), so every directory from the store root down to the
    snapshot's own directory must be root-owned and not writable by group or others,
    and the snapshot directory must be closed to them entirely (the tree inside keeps
    the source's modes, which may include world-writable directories).  ``trusted``
    remembers directories already checked in this launch (the store root and
    ``snapshots/`` are shared by all snapshots).
    """
    key_dir = os.path.dirname(snapshot_dir)
    for d in (store, os.path.join(store, "snapshots"), key_dir, snapshot_dir):
        if trusted is not None and d in trusted:
            continue
        try:
            st = os.lstat(d)
        except OSError as e:
            raise OvlrunError(f"snapshot store path {d}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise OvlrunError(f"snapshot store path {d} is not a directory (symlink or tampering?)")
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise OvlrunError(
                f"refusing snapshot store path {d}: it must be owned by root and not group/other-writable "
                f"(owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)})"
            )
        if d == snapshot_dir and st.st_mode & 0o077:
            raise OvlrunError(f"refusing snapshot {d}: mode {stat.filemode(st.st_mode)} lets other users reach "
                              "its tree; it must be 0700 (ovlrun snapshot build tightens it)")
        if trusted is not None:
            trusted.add(d)
