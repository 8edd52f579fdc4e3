"""Writing a snapshot as one EROFS image, straight from a tree of :class:`~.tree.Node`.

The image holds what overlayfs needs of a lower layer whose directories are all opaque
and whose regular files are metacopy files redirected into the data-only layer (the
shared release), except the files stored whole (empty files, and those a profile
inlines), which are ordinary files.  It is written in one sequential pass (no seeks in
the output, no intermediate tree, no mkfs) and is deterministic: the same tree and data
give the same bytes (nothing depends on the clock).  The format: :mod:`.format`; where
each record goes: :mod:`.layout`.
"""

from __future__ import annotations

import stat
import struct
from typing import BinaryIO

from ovlrun.store.image.format import (
    BLOCK_BITS,
    BLOCK_SIZE,
    COMPACT_INODE,
    DIRENT,
    DIRENT_SIZE,
    EXTENDED_INODE,
    FEATURE_INCOMPAT_CHUNKED_FILE,
    FT_DIR,
    FT_REG,
    FT_SYMLINK,
    LAYOUT_CHUNK_BASED,
    LAYOUT_FLAT_INLINE,
    LAYOUT_FLAT_PLAIN,
    METACOPY_ENTRY,
    NULL_ENTRY,
    SHARED_XATTRS,
    SUPER,
    SUPER_MAGIC,
    SUPER_OFFSET,
    SUPER_SIZE,
    XATTR_HEADER,
    XATTR_HEADER_SIZE,
    i_format,
    redirect_entry,
)
from ovlrun.store.image.layout import dir_size, place, subdirs
from ovlrun.store.image.tree import ImageError, ImageStats, Node

_NO_CHILDREN: dict[bytes, Node] = {}
_CHUNK = 1 << 20  # stored file data is copied in pieces of this size


def _dir_block(node: Node, start: int, end: int, parent_nid: int) -> bytes:
    """One directory block: dirents then names (erofs_fill_dentries reads it this way)."""
    names = node._names
    children = node.children or _NO_CHILDREN
    nameoff = DIRENT_SIZE * (end - start)
    parts = []
    for i in range(start, end):
        name = names[i]
        if name == b".":
            nid, ftype = node._nid, FT_DIR
        elif name == b"..":
            nid, ftype = parent_nid, FT_DIR
        else:
            child = children[name]
            nid = child._nid
            fmt = stat.S_IFMT(child.mode)
            ftype = FT_DIR if fmt == stat.S_IFDIR else FT_REG if fmt == stat.S_IFREG else FT_SYMLINK
        parts.append(DIRENT.pack(nid, nameoff, ftype))
        nameoff += len(name)
    if nameoff > BLOCK_SIZE:
        raise AssertionError("directory block overflow")
    parts.extend(names[start:end])
    return b"".join(parts)


def _read_exactly(data: BinaryIO | None, at: int, length: int) -> bytes:
    if data is None:
        raise ImageError("a file stored whole needs a data source")
    data.seek(at)
    got = data.read(length)
    if len(got) != length:
        raise ImageError(f"the data source holds {len(got)} bytes at {at}, not {length}")
    return got


def _inode(node: Node, layout: int, icount: int, size: int, i_u: int, ino: int, nlink: int) -> bytes:
    if node._compact:
        # i_reserved (the per-inode mtime offset of later kernels) stays 0: every kernel
        # then gives the inode the superblock's time, which is this node's mtime.
        return COMPACT_INODE.pack(i_format(False, layout), icount, node.mode, nlink, size, 0, i_u, ino, node.uid,
                                  node.gid, 0)
    sec, nsec = divmod(node.mtime_ns, 1_000_000_000)
    return EXTENDED_INODE.pack(i_format(True, layout), icount, node.mode, 0, size, i_u, ino, node.uid, node.gid,
                               sec, nsec, nlink)


def write_image(root: Node, out: BinaryIO, data: BinaryIO | None = None) -> ImageStats:
    """Write the EROFS image of the tree ``root`` (a directory) to ``out``, sequentially.

    ``data``: where the files stored whole keep their bytes (``Node.data_at``; a
    seekable binary file, e.g. the build's spool).  Raises :class:`ImageError` for trees
    that cannot be represented.
    """
    if not stat.S_ISDIR(root.mode):
        raise ImageError("the root of an image must be a directory")
    lay = place(root)
    placed, meta_end = lay.placed, lay.meta_end
    # erofs_super_block.root_nid is 16 bits: the root comes first in the order, so it is in
    # block 0, or in block 1 when its inline directory data does not fit after the superblock.
    if root._nid > 0xFFFF:
        raise AssertionError("root inode misplaced")

    # The shared xattr area follows the last inode; ids count 4-byte units from
    # xattr_blkaddr (erofs_init_inode_xattrs / erofs_xattr_iter_shared).
    xattr_blkaddr = meta_end >> BLOCK_BITS
    metacopy_id = (meta_end & (BLOCK_SIZE - 1)) >> 2
    opaque_id = metacopy_id + len(METACOPY_ENTRY) // 4
    data_start = (meta_end + len(SHARED_XATTRS) + lay.shared_redirects + BLOCK_SIZE - 1) >> BLOCK_BITS
    total_blocks = data_start + lay.data_blocks
    epoch_sec, epoch_nsec = divmod(lay.epoch_ns, 1_000_000_000)

    out_w = _Writer(out)
    out_w.write(bytes(SUPER_OFFSET))
    out_w.write(SUPER.pack(
        SUPER_MAGIC, 0, 0,  # magic, checksum (EROFS_FEATURE_COMPAT_SB_CHKSUM off), feature_compat
        BLOCK_BITS, 0, root._nid,  # blkszbits, sb_extslots, root_nid
        len(placed), epoch_sec, epoch_nsec,  # inos, build_time, build_time_nsec: compact inodes' mtime
        total_blocks, 0, xattr_blkaddr,  # blocks, meta_blkaddr, xattr_blkaddr
        bytes(16), bytes(16),  # uuid, volume_name
        FEATURE_INCOMPAT_CHUNKED_FILE if lay.any_chunked else 0,
        0, 0, 0,  # available_compr_algs, extra_devices, devt_slotoff
        0, 0, 0, 0, 0,  # dirblkbits, xattr_prefix_count, xattr_prefix_start, packed_nid, xattr_filter_reserved
        0, 0, 0,  # reserved (in newer kernels' layout: build_time u32, rootnid_8b for 48BIT, reserved2)
    ))

    # The metadata area, in placement order; data blocks are numbered as they are met.
    next_block = data_start
    with_blocks: list[Node] = []
    dir_xattrs = XATTR_HEADER.pack(0, 1, opaque_id)  # h_name_filter 0: no filter (feature off)
    file_xattrs = XATTR_HEADER.pack(0, 1, metacopy_id)
    # Redirects stored as shared xattrs follow metacopy and opaque, in placement order.
    next_shared = ((meta_end & (BLOCK_SIZE - 1)) + len(SHARED_XATTRS)) >> 2
    shared_entries: list[bytes] = []
    dirs = files = symlinks = compact = stored = stored_bytes = 0
    for ino, node in enumerate(placed, 1):
        at = node._nid << 5
        if at < out_w.offset:
            raise AssertionError(f"inode records overlap at nid {node._nid}")
        if at != out_w.offset:
            out_w.write(bytes(at - out_w.offset))
        compact += node._compact
        blkaddr = 0
        if node._blocks:
            blkaddr = next_block
            next_block += node._blocks
            with_blocks.append(node)
        fmt = node.mode & 0o170000
        if fmt == stat.S_IFREG and node.stored:
            files += 1
            stored += 1
            stored_bytes += node.size
            record = _inode(node, LAYOUT_FLAT_INLINE if node._inline else LAYOUT_FLAT_PLAIN, 0, node.size, blkaddr,
                            ino, 1)
            if node._inline:
                full = node._blocks << BLOCK_BITS
                record += _read_exactly(data, node.data_at + full, node.size - full)
            out_w.write(record)
        elif fmt == stat.S_IFREG:
            files += 1
            redirect = node.redirect
            if redirect is None:
                xattrs = file_xattrs
            elif node._xshared:
                # Two shared ids: metacopy, then this file's redirect entry.
                xattrs = XATTR_HEADER.pack(0, 2, metacopy_id) + struct.pack("<I", next_shared)
                entry = redirect_entry(redirect)
                shared_entries.append(entry)
                next_shared += len(entry) >> 2
            else:
                xattrs = file_xattrs + redirect_entry(redirect)
            icount = (len(xattrs) - XATTR_HEADER_SIZE) // 4 + 1  # erofs_xattr_ibody_size()
            # i_u is erofs_inode_chunk_info {format, reserved}; 4-byte block map entries
            # follow the xattrs (already 4-aligned), all EROFS_NULL_ADDR.
            out_w.write(_inode(node, LAYOUT_CHUNK_BASED, icount, node.size, node._chunkfmt, ino, 1) + xattrs
                        + NULL_ENTRY * node._entries)
        elif fmt == stat.S_IFDIR:
            dirs += 1
            inline, parent = node._inline, node._parent
            assert parent is not None
            record = _inode(node, LAYOUT_FLAT_INLINE if inline else LAYOUT_FLAT_PLAIN, 2, dir_size(node), blkaddr,
                            ino, 2 + subdirs(node)) + dir_xattrs
            if inline:
                record += _dir_block(node, node._starts[-1], len(node._names), parent._nid) + b"\0"
            out_w.write(record)
        else:
            symlinks += 1
            target = node.target
            assert target is not None
            out_w.write(_inode(node, LAYOUT_FLAT_INLINE if node._inline else LAYOUT_FLAT_PLAIN, 0, len(target),
                               blkaddr, ino, 1) + (target if node._inline else b""))
    if out_w.offset > meta_end:
        raise AssertionError("metadata overran its layout")
    out_w.write(bytes(meta_end - out_w.offset) + SHARED_XATTRS)
    for entry in shared_entries:
        out_w.write(entry)
    if out_w.offset != meta_end + len(SHARED_XATTRS) + lay.shared_redirects:
        raise AssertionError("shared xattr area does not match its layout")
    out_w.write(bytes((data_start << BLOCK_BITS) - out_w.offset))

    # Data blocks, in the order they were numbered.
    for node in with_blocks:
        fmt = node.mode & 0o170000
        if fmt == stat.S_IFLNK:
            target = node.target
            assert target is not None
            out_w.write(target + bytes(BLOCK_SIZE - len(target)))
        elif fmt == stat.S_IFREG:
            length = min(node._blocks << BLOCK_BITS, node.size)
            for piece in range(0, length, _CHUNK):
                out_w.write(_read_exactly(data, node.data_at + piece, min(_CHUNK, length - piece)))
            out_w.write(bytes(-length & (BLOCK_SIZE - 1)))
        else:
            parent = node._parent
            assert parent is not None
            bounds = [*node._starts, len(node._names)]
            for b in range(node._blocks):
                block = _dir_block(node, bounds[b], bounds[b + 1], parent._nid)
                out_w.write(block + bytes(BLOCK_SIZE - len(block)))
    if next_block != total_blocks or out_w.offset != total_blocks << BLOCK_BITS:
        raise AssertionError("data blocks do not match their numbering")
    out_w.flush()
    for node in placed:
        node.clear_layout()
    return ImageStats(bytes=total_blocks << BLOCK_BITS, inodes=len(placed), blocks=total_blocks, dirs=dirs,
                      files=files, symlinks=symlinks, meta_bytes=meta_end, data_blocks=lay.data_blocks,
                      padding=meta_end - SUPER_OFFSET - SUPER_SIZE - lay.used, compact=compact, stored=stored,
                      stored_bytes=stored_bytes)


class _Writer:
    """Sequential output in ~1 MiB writes."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.offset = 0
        self.parts: list[bytes] = []
        self.buffered = 0

    def write(self, data: bytes) -> None:
        self.parts.append(data)
        self.buffered += len(data)
        self.offset += len(data)
        if self.buffered >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        self.out.write(b"".join(self.parts))
        self.parts.clear()
        self.buffered = 0
