"""The build host's side of a fleet (see :mod:`ovlrun.store.fleet`): publish the store's
current images into DIR, and collect the versions DIR's index stopped naming.  Both
write DIR as the image owner, from a bounded worker."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from typing import NamedTuple

from ovlrun.errors import OvlrunError
from ovlrun.linux.files import write_all
from ovlrun.profile.parse import Profile
from ovlrun.store import layout
from ovlrun.store.bounded import run_bounded
from ovlrun.store.fleet.directory import (
    CHUNK,
    INDEX_TMP_PREFIX,
    STAGE_PREFIX,
    TRASH_PREFIX,
    Entry,
    Outcome,
    become,
    fsync_dir,
    lock,
    open_top,
    read_index,
    valid_name,
    write_index,
)
from ovlrun.store.index import Manifest, Store
from ovlrun.store.siteconfig import Owner

DEFAULT_PUBLISHED_GRACE = 3600.0  # a node that read the previous index may still be copying


class _Item(NamedTuple):
    path: str
    key: str
    id: str
    manifest: bytes
    image_fd: int  # opened by the (root) parent: the store is root-only
    image_sha256: str
    image_bytes: int


def _manifest_bytes(manifest: Manifest) -> bytes:
    return json.dumps(manifest.to_json(), indent=1, sort_keys=True).encode()


def publish(store: Store, directory: str, profile: Profile | None, owner: Owner, *, timeout: float) -> list[Outcome]:
    """Copy the current image of every path ``profile`` localises (every path if None)
    from ``store`` into ``directory`` and make it the published version."""
    from ovlrun.store.lifecycle import current_snapshots

    outcomes: list[Outcome] = []
    items: list[_Item] = []
    try:
        for path, snap in current_snapshots(store, profile).items():
            m = snap.manifest
            rel = f"{snap.directory.parent.name}/{snap.directory.name}"
            if not snap.is_image or not m.root:
                why = ("a directory snapshot from before images" if not snap.is_image else
                       "its manifest records no tree root (built by an older ovlrun)")
                outcomes.append(Outcome(path, rel, "skipped", message=f"{why}: 'ovlrun snapshot build --rebuild' "
                                        "or a fresh build replaces it"))
                continue
            fd = os.open(snap.image, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            items.append(_Item(path, snap.directory.parent.name, snap.directory.name, _manifest_bytes(m), fd,
                               m.image_sha256, m.image_bytes))
        if items:
            outcomes += run_bounded(lambda: _publish_worker(directory, owner, items, time.time()), timeout=timeout,
                                    what=f"publishing to {directory}")
    finally:
        for item in items:
            os.close(item.image_fd)
    return outcomes


def _publish_worker(directory: str, owner: Owner, items: list[_Item], now: float) -> list[Outcome]:
    become(owner)
    os.umask(0o022)
    dir_fd = open_top(directory, owner)
    lock_fd = lock(dir_fd, directory)
    try:
        index = read_index(dir_fd, owner, directory)
        out = []
        changed = False
        for item in items:
            rel = f"{item.key}/{item.id}"
            complete = _complete(dir_fd, item.key, item.id)
            entry = index.get(item.path)
            if entry is not None and entry.snapshot == rel and complete:
                out.append(Outcome(item.path, rel, "unchanged"))
                continue
            copied = 0 if complete else _stage(dir_fd, item)
            index[item.path] = Entry(rel, item.image_sha256, item.image_bytes, now)
            changed = True
            out.append(Outcome(item.path, rel, "published" if copied else "made current", copied))
        if changed:
            write_index(dir_fd, index)
        return out
    finally:
        os.close(lock_fd)
        os.close(dir_fd)


def _complete(dir_fd: int, key: str, snap_id: str) -> bool:
    try:
        for name in (layout.MANIFEST, layout.IMAGE):
            if not stat.S_ISREG(os.stat(f"{key}/{snap_id}/{name}", dir_fd=dir_fd, follow_symlinks=False).st_mode):
                return False
    except FileNotFoundError:
        return False
    return True


def _stage(dir_fd: int, item: _Item) -> int:
    """Write one version under a temporary name, fsync it, rename it to KEY/ID."""
    stage = f"{STAGE_PREFIX}{item.key}.{item.id}.{secrets.token_hex(4)}"
    os.mkdir(stage, 0o755, dir_fd=dir_fd)
    try:
        stage_fd = os.open(stage, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            copied = _copy_image_out(item, stage_fd)
            fd = os.open(layout.MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=stage_fd)
            try:
                write_all(fd, item.manifest)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(stage_fd)
        finally:
            os.close(stage_fd)
        try:
            os.mkdir(item.key, 0o755, dir_fd=dir_fd)
        except FileExistsError:
            pass
        key_fd = os.open(item.key, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            os.rename(stage, item.id, src_dir_fd=dir_fd, dst_dir_fd=key_fd)
            fsync_dir(key_fd)
        finally:
            os.close(key_fd)
        fsync_dir(dir_fd)
    except BaseException:
        shutil.rmtree(stage, dir_fd=dir_fd, ignore_errors=True)
        raise
    return copied


def _copy_image_out(item: _Item, stage_fd: int) -> int:
    fd = os.open(layout.IMAGE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                 dir_fd=stage_fd)
    digest = hashlib.sha256()
    offset = 0
    try:
        while chunk := os.pread(item.image_fd, CHUNK, offset):
            digest.update(chunk)
            write_all(fd, chunk)
            offset += len(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    if digest.hexdigest() != item.image_sha256 or offset != item.image_bytes:
        raise OvlrunError(f"the local image of {item.path} does not match its manifest (sha256 or size); "
                          "not published: rebuild it ('ovlrun snapshot build --rebuild')")
    return offset


@dataclass
class PublishedVersion:
    directory: str  # DIR/KEY/ID, or a leftover
    reason: str  # "replaced", "orphaned" (no index entry for its key), "leftover"
    action: str  # "removed", "would remove", "kept: grace"


def gc_published(directory: str, owner: Owner, *, grace: float, dry_run: bool,
                 timeout: float) -> list[PublishedVersion]:
    """Remove published versions the index no longer names, once they have not been
    current for ``grace`` seconds (a node that read the previous index may still be
    copying), and leftovers of killed publishes."""
    return run_bounded(lambda: _gc_worker(directory, owner, grace, dry_run, time.time()), timeout=timeout,
                       what=f"collecting old versions in {directory}")


def _gc_worker(directory: str, owner: Owner, grace: float, dry_run: bool, now: float) -> list[PublishedVersion]:
    if not dry_run:
        become(owner)
    dir_fd = open_top(directory, owner)
    lock_fd = lock(dir_fd, directory) if not dry_run else -1
    try:
        index = read_index(dir_fd, owner, directory)
        current = {e.snapshot for e in index.values()}
        replaced_at: dict[str, float] = {}  # KEY -> when its current version was published
        for e in index.values():
            key = e.snapshot.partition("/")[0]
            replaced_at[key] = max(replaced_at.get(key, 0.0), e.published)
        report = []
        action = "would remove" if dry_run else "removed"
        for name in sorted(os.listdir(dir_fd)):
            if name.startswith((STAGE_PREFIX, TRASH_PREFIX, INDEX_TMP_PREFIX)):
                # Under the lock no publish is running: these are a killed one's.
                report.append(PublishedVersion(f"{directory}/{name}", "leftover", action))
                if not dry_run:
                    _remove(dir_fd, name)
                continue
            if not valid_name(name) or not stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                continue
            key_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                for snap_id in sorted(os.listdir(key_fd)):
                    if f"{name}/{snap_id}" in current:
                        continue
                    since = replaced_at.get(name)
                    reason = "replaced" if since is not None else "orphaned"
                    if since is None:
                        since = os.stat(snap_id, dir_fd=key_fd, follow_symlinks=False).st_mtime
                    if now - since < grace:
                        report.append(PublishedVersion(f"{directory}/{name}/{snap_id}", reason, "kept: grace"))
                        continue
                    report.append(PublishedVersion(f"{directory}/{name}/{snap_id}", reason, action))
                    if not dry_run:
                        # Out of KEY/ in one rename: a gc killed while deleting leaves a
                        # .trash leftover, never a partial version under its name.
                        trash = f"{TRASH_PREFIX}{secrets.token_hex(6)}"
                        os.rename(snap_id, trash, src_dir_fd=key_fd, dst_dir_fd=dir_fd)
                        _remove(dir_fd, trash)
                if not dry_run:
                    try:
                        os.rmdir(name, dir_fd=dir_fd)  # only if empty
                    except OSError:
                        pass
            finally:
                os.close(key_fd)
        return report
    finally:
        if lock_fd >= 0:
            os.close(lock_fd)
        os.close(dir_fd)


def _remove(dir_fd: int, name: str) -> None:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd, ignore_errors=True)  # fd-based: follows no symlink
    else:
        os.unlink(name, dir_fd=dir_fd)
