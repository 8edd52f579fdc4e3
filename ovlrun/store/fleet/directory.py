"""The published image directory DIR (see :mod:`ovlrun.store.fleet`): its layout, its
index, and how root opens what is in it (only what the image owner wrote)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import posixpath
import re
import stat
from dataclasses import dataclass
from typing import Any, NamedTuple

from ovlrun.errors import OvlrunError
from ovlrun.linux.files import UntrustedError, open_from_root, open_trusted, write_atomic
from ovlrun.linux.privileges import Identity, drop_to
from ovlrun.store.siteconfig import Owner

FORMAT = 1
INDEX = "index.json"
LOCK = ".lock"
STAGE_PREFIX = ".stage."
TRASH_PREFIX = ".trash."
INDEX_TMP_PREFIX = ".index.json."
CHUNK = 4 << 20  # large sequential reads: one NFS READ stream, few round trips
MAX_JSON = 16 << 20  # an index or manifest larger than this is not one of ours
# KEY and ID as the store makes them (source_key, new_snapshot_id); anything else in an
# index or a directory listing of DIR is not ours and is never opened.
_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class Entry(NamedTuple):
    """One path's current published version, as DIR/index.json names it."""

    snapshot: str  # "KEY/ID"
    image_sha256: str
    image_bytes: int
    published: float

    def to_json(self) -> dict[str, Any]:
        return self._asdict()


@dataclass
class Outcome:
    """What publish or fetch did for one localised path."""

    path: str
    snapshot: str  # KEY/ID
    status: str  # publish: "published", "unchanged", "made current", "skipped";
    #              fetch: "fetched", "up-to-date", "reinstated", "failed"
    bytes: int = 0  # image bytes copied
    message: str = ""


def valid_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and name not in (".", "..") and not name.startswith(
        (STAGE_PREFIX, TRASH_PREFIX, INDEX_TMP_PREFIX, LOCK))


def refuse(what: str, problem: str) -> OvlrunError:
    return OvlrunError(f"refusing {what}: {problem}")


def open_checked(name: str, dir_fd: int | None, owner: Owner, what: str, *, directory: bool) -> int:
    """Open ``name`` (relative to ``dir_fd``) as root opens every file it trusts
    (:func:`ovlrun.linux.files.open_trusted`: no symlink followed, no FIFO waited for, the
    owner, mode and type checked on the fd that is then read), the owner being the image
    owner; ``what`` names it in the messages."""
    try:
        return open_trusted(name, dir_fd=dir_fd, directory=directory, uid=owner.uid,
                            owner=f"by the image owner {owner.name} (uid {owner.uid})")
    except UntrustedError as e:
        raise refuse(what, e.problem) from None
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno == errno.ENOTDIR and directory and _is_symlink(name, dir_fd)):
            raise refuse(what, "it is a symlink") from None
        if e.errno == errno.ENOENT:
            raise FileNotFoundError(e.errno, f"{what} does not exist") from None
        raise OvlrunError(f"cannot open {what}: {e.strerror}") from None


def _is_symlink(name: str, dir_fd: int | None) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def open_top(directory: str, owner: Owner) -> int:
    """DIR, opened from / following no symlink (mount points on the way, DIR's own NFS
    mount, are crossed) and checked like every file in it: whoever may replace a parent
    directory of DIR by a symlink must not choose what every node fetches."""
    if not directory.startswith("/"):
        raise OvlrunError(f"published image directory {directory!r} must be an absolute path")
    directory = posixpath.normpath(directory)
    what = f"published image directory {directory}"
    parent, name = posixpath.split(directory)
    if not name:
        raise OvlrunError(f"published image directory {directory!r} cannot be /")
    try:
        parent_fd = open_from_root(parent)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.realpath(parent) != parent:
            raise refuse(what, f"a symlink on the way to it (give its real path: "
                         f"{os.path.realpath(directory)})") from None
        if e.errno == errno.ENOENT:
            raise OvlrunError(f"{what} does not exist (not mounted?)") from None
        raise OvlrunError(f"cannot open {what}: {e.strerror}") from None
    try:
        return open_checked(name, parent_fd, owner, what, directory=True)
    except FileNotFoundError:
        raise OvlrunError(f"{what} does not exist (not mounted?)") from None
    finally:
        os.close(parent_fd)


def read_small(fd: int, what: str) -> bytes:
    chunks = []
    total = 0
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
        total += len(chunk)
        if total > MAX_JSON:
            raise OvlrunError(f"{what} is larger than {MAX_JSON} bytes: not an ovlrun file")
    return b"".join(chunks)


def read_index(dir_fd: int, owner: Owner, directory: str) -> dict[str, Entry]:
    what = f"{directory}/{INDEX}"
    try:
        fd = open_checked(INDEX, dir_fd, owner, what, directory=False)
    except FileNotFoundError:
        return {}  # nothing published yet
    try:
        raw = read_small(fd, what)
    finally:
        os.close(fd)
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("sources"), dict):
            raise ValueError(f"not a format {FORMAT} index")
        out = {}
        for path, value in data["sources"].items():
            entry = Entry(**value)
            key, _, snap_id = entry.snapshot.partition("/")
            if not (isinstance(path, str) and isinstance(entry.snapshot, str) and valid_name(key)
                    and valid_name(snap_id) and isinstance(entry.image_sha256, str)
                    and _HEX64.fullmatch(entry.image_sha256) and is_int(entry.image_bytes)
                    and isinstance(entry.published, (int, float)) and not isinstance(entry.published, bool)):
                raise ValueError(f"bad entry for {path!r}")
            out[path] = entry
        return out
    except (ValueError, TypeError, RecursionError) as e:  # RecursionError: JSON nested too deep
        raise OvlrunError(f"{what} is not a valid published index: {e}") from None


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def fsync_dir(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EROFS):  # some filesystems cannot fsync a directory
            raise


def lock(dir_fd: int, directory: str) -> int:
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # NFS: emulated with a POSIX lock by the client
    except OSError as e:
        os.close(fd)
        raise OvlrunError(f"cannot lock {directory}/{LOCK}: {e.strerror}") from None
    return fd


def become(owner: Owner) -> None:
    """In a worker: write DIR as the image owner (root is squashed on most NFS exports,
    and what root wrote there would be owned by nobody and refused by every node).  The
    one verified drop (:func:`ovlrun.linux.privileges.drop_to`: no supplementary groups,
    the owner's gid and uid, no capabilities, no_new_privs), which keeps the worker's
    parent-death signal armed."""
    if os.geteuid() != 0 or owner.uid == 0:
        return
    drop_to(Identity(owner.name, owner.uid, owner.gid, (), "/", "/bin/sh"))


def write_index(dir_fd: int, index: dict[str, Entry]) -> None:
    data = json.dumps({"format": FORMAT, "sources": {p: e.to_json() for p, e in sorted(index.items())}},
                      indent=1, sort_keys=True).encode()
    write_atomic(INDEX, data, 0o644, dir_fd=dir_fd)  # temporary name: INDEX_TMP_PREFIX...
    fsync_dir(dir_fd)
