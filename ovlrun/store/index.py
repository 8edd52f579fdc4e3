"""The local snapshot store: index, manifests, locks, publishing.

The paths are :mod:`ovlrun.store.layout`'s.  A build happens in ``tmp/`` and is
published by ``rename(2)`` into ``snapshots/`` and then by an atomic rewrite of
``index.json``; a launch reads only ``index.json`` and the manifests it names (or its
cached plan), never the shared tree.  A snapshot that is not in the index is never
mounted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from ovlrun.errors import OvlrunError
from ovlrun.linux.files import is_temporary_of, write_atomic
from ovlrun.store import layout
from ovlrun.store.layout import source_key, store_dir

FORMAT = 2  # 2: snapshots are EROFS images (1: directory trees, no longer mounted)


def _token(nbytes: int) -> str:
    import secrets

    return secrets.token_hex(nbytes)


class Manifest(NamedTuple):
    path: str  # the path as the profile matched it (the index key)
    source: str  # its real path: the data-only layer and the mount point
    id: str
    built: float
    fingerprint: str
    counts: dict[str, int]
    max_redirect: int = 0
    long_redirects: int = 0
    redirect_max: int = 0
    warnings: list[str] = []  # noqa: RUF012 (never mutated; NamedTuple defaults are shared)
    root: str = ""  # the profile tree's root ("" in manifests from before it was recorded)
    image_bytes: int = 0
    image_sha256: str = ""  # "" for directory snapshots (format 1), which launches ignore
    # Which directory the snapshot was built from (issue 9): the tree root's real path at
    # build time, and the source directory's inode number (stable on NFS; st_dev may not
    # be).  A launch opens source_root, then the source below it without following any
    # symlink, and mounts only if it finds this inode.  0/"": built before it was recorded.
    source_root: str = ""
    source_ino: int = 0
    # The files stored whole (issue 17): the tree's inline patterns and size limit when
    # it was built ([] and 0: none but empty files).  Refresh rebuilds with the same.
    inline: list[str] = []  # noqa: RUF012 (never mutated)
    inline_max: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **self._asdict()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        fields = {k: v for k, v in data.items() if k != "format"}
        return cls(**fields)


class Snapshot(NamedTuple):
    """A published snapshot: its directory holds ``manifest.json`` and ``tree/``."""

    directory: Path
    manifest: Manifest

    @property
    def image(self) -> Path:
        return Path(layout.snapshot_image(str(self.directory)))

    @property
    def is_image(self) -> bool:
        """An EROFS image snapshot (not a retired directory snapshot)."""
        return bool(self.manifest.image_sha256)


def _write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(str(path), json.dumps(data, indent=1, sort_keys=True).encode())


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[int]:
    """Hold an exclusive flock on ``path``; yields the fd (a forked worker must close it,
    or the lock would live as long as that worker)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


class SnapshotMissing(OvlrunError):
    """The index names a snapshot directory that is gone (removed by gc meanwhile)."""


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def open(cls, path: Path | str | None = None) -> Store:
        return cls(Path(path if path is not None else store_dir()))

    # -- creation and locking ------------------------------------------------------

    def ensure(self) -> None:
        """Create the store layout (for builders)."""
        try:
            for d in (self.path, self.path / layout.TMP, self.path / layout.LOCKS, self.path / layout.SNAPSHOTS):
                d.mkdir(mode=0o755, exist_ok=True)
        except OSError as e:
            raise OvlrunError(f"cannot create snapshot store {self.path}: {e.strerror}") from None

    @contextlib.contextmanager
    def source_lock(self, source: str) -> Iterator[int]:
        """Serialise builds of one source across processes (flock dies with the holder)."""
        with _flock(self.path / layout.LOCKS / f"{source_key(source)}.lock") as fd:
            yield fd

    @contextlib.contextmanager
    def index_lock(self) -> Iterator[int]:
        """Serialise changes of ``index.json`` and of ``snapshots/`` (publish, gc)."""
        with _flock(self.path / layout.INDEX_LOCK) as fd:
            yield fd

    def build_running(self, key: str) -> bool:
        """Is a build holding the lock of source key ``key`` now?  (For gc: a tmp/ entry
        whose lock nobody holds is the leftover of a killed build.)"""
        try:
            fd = os.open(self.path / layout.LOCKS / f"{key}.lock", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def new_build_dir(self, source: str) -> Path:
        path = self.path / layout.TMP / f"{source_key(source)}.{_token(6)}"
        path.mkdir(mode=0o700)
        return path

    def clean_stale_builds(self, source: str) -> int:
        """Remove leftovers of killed builds of ``source``; caller holds its source lock."""
        removed = 0
        prefix = source_key(source) + "."
        for entry in (self.path / layout.TMP).iterdir():
            if entry.name.startswith(prefix):
                import shutil

                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed

    # -- index -----------------------------------------------------------------------

    def read_index(self) -> dict[str, str]:
        """Map localised path (as matched by a profile) -> snapshot directory, relative to the store."""
        try:
            with open(layout.index_file(str(self.path))) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise OvlrunError(f"snapshot index {layout.index_file(str(self.path))} is unreadable: {e}") from None
        sources = data.get("sources", {}) if isinstance(data, dict) else {}
        return {k: v for k, v in sources.items() if isinstance(k, str) and isinstance(v, str)}

    def clean_index_leftovers(self) -> None:
        """Remove temporary index files of writers SIGKILLed between creating and renaming
        them; caller holds :meth:`index_lock`, so none is in use."""
        for name in os.listdir(self.path):
            if is_temporary_of(name, layout.INDEX):
                with contextlib.suppress(OSError):
                    os.unlink(self.path / name)

    def write_index(self, index: dict[str, str]) -> None:
        """Replace ``index.json``; caller holds :meth:`index_lock`."""
        self.clean_index_leftovers()
        _write_json_atomic(Path(layout.index_file(str(self.path))), {"format": FORMAT, "sources": index})

    def publish(self, build_dir: Path, manifest: Manifest) -> Snapshot:
        """Atomically move a finished build into place and make it current for its source."""
        key_dir = self.path / layout.SNAPSHOTS / source_key(manifest.source)
        _write_json_atomic(build_dir / layout.MANIFEST, manifest.to_json())
        # The snapshot directory stays 0700 (as created): the tree inside mirrors the
        # source's modes, so a world-writable release directory would otherwise be a
        # world-writable directory in a lower layer every job trusts.  Overlayfs reaches
        # its layers with the mounter's (root's) credentials, so jobs are not affected.
        os.chmod(build_dir, 0o700)
        final = key_dir / manifest.id
        # Under the index lock: gc removes empty key directories under it too.
        with self.index_lock():
            key_dir.mkdir(mode=0o755, exist_ok=True)
            os.rename(build_dir, final)
            try:
                index = self.read_index()
                index[manifest.path] = str(final.relative_to(self.path))
                self.write_index(index)
            except BaseException:
                # Not made current (e.g. disk full): take it back so nothing half-published
                # stays in snapshots/; the caller removes build_dir.
                os.rename(final, build_dir)
                raise
        return Snapshot(final, manifest)

    def load(self, relative: str) -> Snapshot:
        directory = self.path / relative
        try:
            with open(directory / layout.MANIFEST) as f:
                manifest = Manifest.from_json(json.load(f))
        except FileNotFoundError:
            raise SnapshotMissing(f"snapshot {directory} is gone (removed by 'ovlrun snapshot gc'?)") from None
        except (OSError, ValueError, TypeError) as e:
            raise OvlrunError(f"snapshot {directory} has no valid manifest: {e}") from None
        return Snapshot(directory, manifest)

    def all_snapshots(self) -> list[Snapshot]:
        out = []
        root = self.path / layout.SNAPSHOTS
        if not root.is_dir():
            return []
        for key_dir in sorted(root.iterdir()):
            try:
                snap_dirs = sorted(key_dir.iterdir())
            except FileNotFoundError:  # removed by a concurrent gc
                continue
            for snap_dir in snap_dirs:
                if (snap_dir / layout.MANIFEST).is_file():
                    try:
                        out.append(self.load(str(snap_dir.relative_to(self.path))))
                    except SnapshotMissing:
                        continue
        return out


def format_time(seconds: float) -> str:
    """How every command shows a time: local, ISO 8601 to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def new_snapshot_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + _token(3)
