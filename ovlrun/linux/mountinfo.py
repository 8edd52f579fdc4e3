"""Reading a mount table (``/proc/PID/mountinfo``): the one parser ovlrun has.

Light on purpose (os only): a launch reads its own once (:func:`mounts_local`), hooks
and ``status`` read it, gc reads one per live mount namespace.  The kernel octal-escapes
space, tab, newline and backslash in the mount point and source (``\\040``), and in
overlay's super options also ',' and '=' in layer paths (fs/seq_file.c: seq_escape;
fs/overlayfs/params.c: ovl_show_options).
"""

from __future__ import annotations

import os


class Mount:
    """One line of mountinfo (proc(5)), with the mount point unescaped."""

    __slots__ = ("fstype", "mount_id", "parent_id", "point", "source", "super_options")

    def __init__(self, point: str, fstype: str, source: str, super_options: str, mount_id: int = 0,
                 parent_id: int = 0) -> None:
        self.mount_id = mount_id
        self.parent_id = parent_id  # the mount this one is mounted on (itself, or absent, at the top)
        self.point = point
        self.fstype = fstype
        self.source = source
        self.super_options = super_options  # still escaped: split on ',' before unescaping

    def __repr__(self) -> str:
        return f"Mount({self.point!r}, {self.fstype!r}, {self.source!r})"


def unescape(field: str) -> str:
    """Undo the kernel's ``\\ooo`` octal escapes (bytes-exact, via surrogateescape)."""
    if "\\" not in field:
        return field
    raw = os.fsencode(field)
    out = bytearray()
    i = 0
    while i < len(raw):
        chunk = raw[i + 1:i + 4]
        if raw[i] == 0x5C and len(chunk) == 3 and all(0x30 <= c <= 0x37 for c in chunk):
            out.append(int(chunk, 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def parse_line(line: str) -> Mount | None:
    """A mountinfo line, or None if it is not one (the optional fields end at '-')."""
    left, sep, right = line.rstrip("\n").partition(" - ")
    fields = left.split(" ")
    tail = right.split(" ", 2)
    if not sep or len(fields) < 5 or len(tail) < 2 or not fields[0].isdigit() or not fields[1].isdigit():
        return None
    return Mount(unescape(fields[4]), tail[0], unescape(tail[1]), tail[2] if len(tail) > 2 else "",
                 int(fields[0]), int(fields[1]))


def read(path: str = "/proc/self/mountinfo") -> list[Mount]:
    """Every mount in the table at ``path``, in its order (parents before children)."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        text = f.read()
    return [m for m in map(parse_line, text.splitlines()) if m is not None]


def _split_legacy_lowerdir(value: str) -> list[str]:
    """``lowerdir=A:B::C``: layers split on unescaped ':' (one or two), '\\:' and '\\\\'
    are a literal ':' and '\\' (fs/overlayfs/params.c: ovl_parse_param_split_lowerdirs)."""
    layers: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            current.append(value[i + 1])
            i += 2
            continue
        if ch == ":":
            if current:
                layers.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    if current:
        layers.append("".join(current))
    return layers


def overlay_layers(super_options: str) -> list[str]:
    """The lower and data layer paths of an overlay mount, from its super options."""
    layers: list[str] = []
    for option in super_options.split(","):  # a ',' inside a value is escaped as \054
        key, _, value = option.partition("=")
        if key in ("lowerdir+", "datadir+"):
            layers.append(unescape(value))
        elif key == "lowerdir":
            layers.extend(_split_legacy_lowerdir(unescape(value)))
    return layers


# File systems whose calls never wait for another machine: memory, and disk file systems
# on a block device that is not a file or a network in disguise.  Everything else (nfs,
# nfs4, cifs, 9p, fuse.*, ceph, lustre, gpfs, autofs, overlay, zfs, a loop device whose
# file may be on NFS, ...) counts as remote: the careful side.
MEMORY_TYPES = frozenset({"tmpfs", "ramfs", "rootfs"})
BLOCK_TYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "reiserfs", "bcachefs", "nilfs2",
                         "vfat", "exfat", "iso9660", "udf", "erofs", "squashfs"})
NOT_LOCAL_DEVICES = ("/dev/loop", "/dev/nbd", "/dev/rbd", "/dev/drbd")


def is_local(fstype: str, source: str) -> bool:
    """Whether a mount of ``fstype`` from ``source`` is local (see :data:`BLOCK_TYPES`)."""
    if fstype in MEMORY_TYPES:
        return True
    return fstype in BLOCK_TYPES and source.startswith("/dev/") and not source.startswith(NOT_LOCAL_DEVICES)


def mounts_local(mount_ids: set[int], path: str = "/proc/self/mountinfo") -> bool:
    """Whether each mount of ``mount_ids`` and every mount it hangs on, up to the root
    of the table, is local (:func:`is_local`): the mounts a walk from ``/`` to a file on
    it crosses.  ``mount_ids`` come from opened files (``mnt_id``, see
    :func:`ovlrun.linux.syscalls.mount_id`), never from paths.  False for a mount the
    table does not list and if the table cannot be read: the careful side.  Reads only
    procfs: no request reaches any file system, however stalled.
    """
    try:
        table = {m.mount_id: m for m in read(path)}
    except (OSError, UnicodeDecodeError):
        return False
    checked: set[int] = set()
    for mount_id in mount_ids:
        mount = table.get(mount_id)
        if mount is None:
            return False
        while mount is not None and mount.mount_id not in checked:
            if not is_local(mount.fstype, mount.source):
                return False
            checked.add(mount.mount_id)
            mount = table.get(mount.parent_id)  # None past the top (the root's parent is not listed)
    return True
