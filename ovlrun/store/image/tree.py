"""The tree an image holds: what :func:`~.writer.write_image` writes and
:func:`~.reader.read_image` returns."""

from __future__ import annotations

import stat
from dataclasses import dataclass


class ImageError(ValueError):
    """The tree cannot be represented (bad name, unsupported file type, oversized value),
    or an image is not one ovlrun writes."""


_NO_NAMES: list[bytes] = []
_NO_STARTS: list[int] = []


class Node:
    """One inode of the snapshot tree.

    ``mode`` is the full ``st_mode`` (type bits included).  Regular files: ``size`` is the
    source's size and either ``data_at`` >= 0, the file is *stored whole*: its ``size``
    bytes are at that offset of the data source given to the writer (read_image sets 0),
    or the file is *metacopy*: data-less, with ``redirect`` the value of
    ``trusted.overlay.redirect`` (or None for none).  Empty files are always stored
    (there is no data to redirect to; their redirect is dropped).  Symlinks: ``target``.
    Directories: ``children`` (name bytes -> Node); every directory is opaque.
    """

    __slots__ = ("_blocks", "_chunkfmt", "_compact", "_entries", "_inline", "_names", "_nid", "_parent", "_starts",
                 "_xshared", "children", "data_at", "gid", "mode", "mtime_ns", "redirect", "size", "target", "uid")

    def __init__(self, mode: int, uid: int = 0, gid: int = 0, mtime_ns: int = 0, size: int = 0,
                 target: bytes | None = None, redirect: bytes | None = None,
                 children: dict[bytes, Node] | None = None, data_at: int = -1) -> None:
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.size = size
        self.target = target
        self.redirect = redirect
        self.children = children
        self.data_at = data_at
        # Filled in by the layout (ovlrun.store.image.layout): the nid, compact or
        # extended, and per type the layout.  Directories: parent, sorted names ("." and
        # ".." included), index of the first name of each block, whether the last block
        # is inline.  Metacopy files: block map entries, chunk format, whether the
        # redirect is a shared xattr (_xshared).  Symlinks and
        # stored files: whether the last (partial) block is inline.  All: data blocks.
        self._nid = 0
        self._compact = False
        self._parent: Node | None = None
        self._names: list[bytes] = _NO_NAMES
        self._starts: list[int] = _NO_STARTS
        self._inline = False
        self._entries = 0
        self._chunkfmt = 0
        self._blocks = 0
        self._xshared = False

    @property
    def stored(self) -> bool:
        """A regular file whose data is in the image (not a metacopy redirect)."""
        return stat.S_ISREG(self.mode) and (self.size == 0 or self.data_at >= 0)

    def clear_layout(self) -> None:
        """Drop the layout state (and the child -> parent reference cycles)."""
        self._parent = None
        self._names = _NO_NAMES
        self._starts = _NO_STARTS

    def __repr__(self) -> str:
        return f"Node(mode={self.mode:o}, uid={self.uid}, gid={self.gid}, mtime_ns={self.mtime_ns}, size={self.size})"


@dataclass
class ImageStats:
    bytes: int  # image size
    inodes: int
    blocks: int  # 4 KiB blocks (bytes / 4096)
    dirs: int
    files: int
    symlinks: int
    meta_bytes: int  # superblock + inodes + inline data
    data_blocks: int  # blocks outside the metadata area: directories, symlinks, stored files
    padding: int  # zero bytes in the metadata area: 32-byte inode alignment, blocks padded out
    compact: int = 0  # inodes written compact (32 B)
    stored: int = 0  # regular files stored whole (empty ones included)
    stored_bytes: int = 0  # their bytes
