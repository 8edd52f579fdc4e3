"""Writing a snapshot as one EROFS image, straight from a tree of :class:`Node`.

The image is metadata only: what overlayfs needs of a lower layer whose directories are
all opaque and whose regular files are all metacopy files redirected into the data-only
layer (the shared release).  It is written in one sequential pass (no seeks, no
intermediate tree, no mkfs) and is deterministic: the same tree and ``build_time`` give
the same bytes.  :func:`read_image` reads such an image back into Nodes (for checks
without a mount) and refuses anything write_image would not have written.

On-disk format: Linux ``fs/erofs/erofs_fs.h`` (also erofs-utils ``include/erofs_fs.h``);
the comments below name the structures and the kernel checks each choice follows.
Layout of an image::

    block 0 ... : 1 KiB zero | erofs_super_block (128 B) at 1024 | inodes (metadata area)
    ...         : shared xattr area (2 entries), right after the last inode
    data blocks : directory blocks that do not fit inline, long symlink targets

* ``meta_blkaddr`` is 0, so an inode's nid is its byte offset / 32 (``erofs_iloc``);
  the root is the first inode (nid 36, just after the superblock, or in block 1 if its
  inline data does not fit there): ``root_nid`` is 16 bits.
* Every inode is ``erofs_inode_extended`` (64 B): 32-bit uid/gid, 64-bit size and its own
  ``i_mtime``/``i_mtime_nsec`` (compact inodes share one nanosecond value per image).
* Regular files are ``EROFS_INODE_CHUNK_BASED`` with the 4-byte block map (no
  ``EROFS_CHUNK_FORMAT_INDEXES``) holding ``EROFS_NULL_ADDR`` for every chunk, chunk size
  the smallest power of two >= the file size: a sparse, data-less file of the source's
  size (as composefs writes them).  Empty files are ``EROFS_INODE_FLAT_PLAIN`` with no block.
* ``trusted.overlay.metacopy`` (empty) and ``trusted.overlay.opaque`` ("y") are stored once
  in the shared xattr area and referenced by id from every file / directory;
  ``trusted.overlay.redirect`` is an inline xattr entry.  All use the name index
  ``EROFS_XATTR_INDEX_TRUSTED`` (so the stored name is "overlay.redirect", etc.).
* Directories: ``erofs_dirent`` s sorted by name bytes ("." and ".." included, since the
  kernel binary-searches them: ``find_target_block_classic`` / ``find_target_dirent`` in
  namei.c), packed per 4 KiB block as [dirents][names]; the first dirent's ``nameoff`` / 12
  is the block's entry count.  Full blocks go to the data area; the last, partial block
  is stored inline right after the inode (``EROFS_INODE_FLAT_INLINE``, tail packing) when
  inode + xattrs + tail fit in one block, else in the data area too (``FLAT_PLAIN``).
* Symlink targets are inline (``FLAT_INLINE``; ``erofs_fill_symlink`` wants them in the
  inode's block), or in one data block when inode + target exceed a block.
* Inline tails must not cross a block boundary (``erofs_map_blocks_flat`` /
  ``erofs_fill_symlink`` reject that).  Records that have one are deferred (up to
  :data:`_MAX_DEFERRED`) until a block has room, while file inodes, which may straddle
  blocks, fill the gap: the metadata area has almost no padding.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass
from typing import BinaryIO

BLOCK_BITS = 12
BLOCK_SIZE = 1 << BLOCK_BITS
SUPER_OFFSET = 1024  # EROFS_SUPER_OFFSET
SUPER_SIZE = 128  # sizeof(struct erofs_super_block) without extension slots
SUPER_MAGIC = 0xE0F5E1E2  # EROFS_SUPER_MAGIC_V1
SLOT_SIZE = 32  # nids count 32-byte slots from meta_blkaddr (erofs_iloc)
INODE_SIZE = 64  # sizeof(struct erofs_inode_extended)
XATTR_HEADER_SIZE = 12  # sizeof(struct erofs_xattr_ibody_header)
DIRENT_SIZE = 12  # sizeof(struct erofs_dirent)
NAME_MAX = 255  # EROFS_NAME_LEN
SYMLINK_MAX = 4095  # PATH_MAX - 1
MAX_XATTR_VALUE = 0xFFFF  # erofs_xattr_entry.e_value_size is 16 bits

# i_format: bit 0 version (1 = extended), bits 1-3 data layout.
_LAYOUT_FLAT_PLAIN = 0  # EROFS_INODE_FLAT_PLAIN
_LAYOUT_FLAT_INLINE = 2  # EROFS_INODE_FLAT_INLINE
_LAYOUT_CHUNK_BASED = 4  # EROFS_INODE_CHUNK_BASED
_FORMAT_PLAIN = 1 | _LAYOUT_FLAT_PLAIN << 1
_FORMAT_INLINE = 1 | _LAYOUT_FLAT_INLINE << 1
_FORMAT_CHUNKED = 1 | _LAYOUT_CHUNK_BASED << 1
_CHUNK_BLKBITS_MAX = 0x1F  # EROFS_CHUNK_FORMAT_BLKBITS_MASK: chunks up to 8 TiB
_NULL_ADDR = 0xFFFFFFFF  # EROFS_NULL_ADDR in a 4-byte block map entry: a hole

_FEATURE_INCOMPAT_CHUNKED_FILE = 0x4  # EROFS_FEATURE_INCOMPAT_CHUNKED_FILE

# erofs_dirent.file_type (EROFS_FT_*, same values as the kernel's FT_*).
_FT_REG = 1
_FT_DIR = 2
_FT_SYMLINK = 7

# Shared xattrs (erofs_xattr_entry: name_len u8, name_index u8, value_size le16, name,
# value, padded to 4).  EROFS_XATTR_INDEX_TRUSTED = 4 stands for the "trusted." prefix.
_XATTR_INDEX_TRUSTED = 4
_METACOPY_ENTRY = struct.pack("<BBH", 16, _XATTR_INDEX_TRUSTED, 0) + b"overlay.metacopy"
_OPAQUE_ENTRY = struct.pack("<BBH", 14, _XATTR_INDEX_TRUSTED, 1) + b"overlay.opaque" + b"y\0"
_SHARED_XATTRS = _METACOPY_ENTRY + _OPAQUE_ENTRY
_REDIRECT_NAME = b"overlay.redirect"
_REDIRECT_HEAD = struct.pack("<BB", len(_REDIRECT_NAME), _XATTR_INDEX_TRUSTED)
_NULL_ENTRY = struct.pack("<I", _NULL_ADDR)

# Records with an inline tail that does not fit in the current block wait for one that
# does; more than this many waiting and the block is padded out instead.
_MAX_DEFERRED = 64

_INODE = struct.Struct("<HHHHQIIIIqII16x")  # struct erofs_inode_extended
_XATTR_HEADER = struct.Struct("<IB7xI")  # erofs_xattr_ibody_header + one shared xattr id
_DIRENT = struct.Struct("<QHBx")  # struct erofs_dirent
_SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB3xIQQ")  # struct erofs_super_block (128 bytes)


_NO_NAMES: list[bytes] = []
_NO_CHILDREN: dict[bytes, Node] = {}
_NO_STARTS: list[int] = []


class ImageError(ValueError):
    """The tree cannot be represented (bad name, unsupported file type, oversized value)."""


class Node:
    """One inode of the snapshot tree.

    ``mode`` is the full ``st_mode`` (type bits included).  Regular files: ``size`` is the
    source's size (the image stores no data) and ``redirect`` the value of
    ``trusted.overlay.redirect`` (or None for none); every regular file is metacopy.
    Symlinks: ``target``.  Directories: ``children`` (name bytes -> Node); every
    directory is opaque.
    """

    __slots__ = ("_chunkfmt", "_entries", "_inline", "_names", "_nid", "_parent", "_starts",
                 "children", "gid", "mode", "mtime_ns", "redirect", "size", "target", "uid")

    def __init__(self, mode: int, uid: int = 0, gid: int = 0, mtime_ns: int = 0, size: int = 0,
                 target: bytes | None = None, redirect: bytes | None = None,
                 children: dict[bytes, Node] | None = None) -> None:
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.size = size
        self.target = target
        self.redirect = redirect
        self.children = children
        # Filled in by write_image: the nid, and per type the layout.  Directories: parent,
        # sorted names ("." and ".." included), index of the first name of each block,
        # whether the last block is inline.  Files: block map entries and chunk format.
        # Symlinks: whether the target is inline.
        self._nid = 0
        self._parent: Node | None = None
        self._names: list[bytes] = _NO_NAMES
        self._starts: list[int] = _NO_STARTS
        self._inline = False
        self._entries = 0
        self._chunkfmt = 0

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
    data_blocks: int  # directory blocks and symlink blocks outside the metadata area
    padding: int  # zero bytes in the metadata area: 32-byte inode alignment, blocks padded out


def _check_name(name: bytes) -> None:
    if not name or len(name) > NAME_MAX or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise ImageError(f"invalid directory entry name {name!r}")


def _chunk_layout(size: int) -> tuple[int, int]:
    """(number of block map entries, chunk format) for a data-less file of ``size`` bytes."""
    # Smallest chunk (a power of two, at least one block) covering the whole file, capped
    # at blocksize << 31; bigger files get several null entries.
    bits = max(BLOCK_BITS, (size - 1).bit_length())
    fmt = min(bits - BLOCK_BITS, _CHUNK_BLKBITS_MAX)
    chunk = 1 << (BLOCK_BITS + fmt)
    return -(-size // chunk), fmt


def _dir_blocks(names: list[bytes]) -> tuple[list[int], int]:
    """Greedy packing of sorted names into dir blocks: (start index per block, tail bytes)."""
    starts = [0]
    used = 0
    for i, name in enumerate(names):
        need = DIRENT_SIZE + len(name)
        if used + need > BLOCK_SIZE:
            starts.append(i)
            used = 0
        used += need
    return starts, used


def _dir_block(node: Node, names: list[bytes], start: int, end: int, parent_nid: int) -> bytes:
    """One directory block: dirents then names (erofs_fill_dentries reads it this way)."""
    children = node.children or _NO_CHILDREN
    nameoff = DIRENT_SIZE * (end - start)
    parts = []
    for i in range(start, end):
        name = names[i]
        if name == b".":
            nid, ftype = node._nid, _FT_DIR
        elif name == b"..":
            nid, ftype = parent_nid, _FT_DIR
        else:
            child = children[name]
            nid = child._nid
            fmt = stat.S_IFMT(child.mode)
            ftype = _FT_DIR if fmt == stat.S_IFDIR else _FT_REG if fmt == stat.S_IFREG else _FT_SYMLINK
        parts.append(_DIRENT.pack(nid, nameoff, ftype))
        nameoff += len(name)
    if nameoff > BLOCK_SIZE:
        raise AssertionError("directory block overflow")
    parts.extend(names[start:end])
    return b"".join(parts)


def _place(order: list[Node]) -> tuple[list[Node], int, int, int, bool]:
    """Give every node its nid; return (nodes in placement order, metadata end, bytes of
    records, data blocks needed, any chunk-based file)."""
    placed: list[Node] = []
    pos = SUPER_OFFSET + SUPER_SIZE  # 1152: 32-byte aligned, so the root's nid is 36
    pending: list[tuple[Node, int]] = []
    used = 0
    data_blocks = 0
    any_chunked = False

    def room() -> int:
        return BLOCK_SIZE - (pos & (BLOCK_SIZE - 1))

    def place(node: Node, size: int) -> None:
        nonlocal pos
        node._nid = pos >> 5
        placed.append(node)
        pos = (pos + size + SLOT_SIZE - 1) & ~(SLOT_SIZE - 1)

    def pad_to_block() -> None:
        nonlocal pos
        pos = (pos + BLOCK_SIZE - 1) & ~(BLOCK_SIZE - 1)

    def place_fitting(waiting: list[tuple[Node, int]]) -> list[tuple[Node, int]]:
        """Place, in order, the deferred records that fit in the room left; return the rest."""
        still = []
        for node, size in waiting:
            if size <= room():
                place(node, size)
            else:
                still.append((node, size))
        return still

    for node in order:
        fmt = stat.S_IFMT(node.mode)
        contained = False  # has an inline tail that must not cross a block boundary
        if not 0 <= node.uid <= 0xFFFFFFFF or not 0 <= node.gid <= 0xFFFFFFFF:
            raise ImageError(f"uid/gid {node.uid}/{node.gid} out of range")
        if not 0 <= node.mode <= 0xFFFF or not -(1 << 63) <= node.mtime_ns // 1_000_000_000 < 1 << 63:
            raise ImageError(f"mode {node.mode:o} or mtime {node.mtime_ns} out of range")
        if fmt == stat.S_IFREG:
            size = INODE_SIZE + _XATTR_HEADER.size
            redirect = node.redirect
            if redirect is not None:
                if not redirect or len(redirect) > MAX_XATTR_VALUE:
                    raise ImageError(f"a redirect of {len(redirect)} bytes cannot be stored")
                size += (4 + len(_REDIRECT_NAME) + len(redirect) + 3) & ~3
            if node.size < 0:
                raise ImageError(f"negative file size {node.size}")
            if node.size:
                node._entries, node._chunkfmt = _chunk_layout(node.size)
                size += 4 * node._entries
                any_chunked = True
            else:
                node._entries = 0
        elif fmt == stat.S_IFDIR:
            starts = node._starts
            size = INODE_SIZE + _XATTR_HEADER.size
            data_blocks += len(starts) - 1 if node._inline else len(starts)
            if node._inline:
                size += _tail_bytes(node._names, starts[-1]) + 1  # + NUL, see _order
                contained = True
        elif fmt == stat.S_IFLNK:
            target = node.target
            if not target or len(target) > SYMLINK_MAX or b"\0" in target:
                raise ImageError(f"invalid symlink target {target!r}")
            inline = node._inline = INODE_SIZE + len(target) <= BLOCK_SIZE
            size = INODE_SIZE + len(target) if inline else INODE_SIZE
            data_blocks += 0 if inline else 1
            contained = inline
        else:
            raise ImageError(f"cannot store file type {fmt:o} (only directories, regular files and symlinks)")
        used += size

        if contained and size > room():
            if len(pending) >= _MAX_DEFERRED:  # give up filling this block
                pad_to_block()
                pending = place_fitting(pending)
            if size > room():
                pending.append((node, size))
                continue
        block = pos >> BLOCK_BITS
        place(node, size)
        if pending and pos >> BLOCK_BITS != block:  # a new block began: place what waited, if it fits
            pending = place_fitting(pending)
    for waiting in pending:
        if waiting[1] > room():
            pad_to_block()
        place(*waiting)
    return placed, pos, used, data_blocks, any_chunked


def _tail_bytes(names: list[bytes], start: int) -> int:
    return DIRENT_SIZE * (len(names) - start) + sum(map(len, names[start:]))


def _order(root: Node) -> list[Node]:
    """Breadth-first order (a directory's entries get neighbouring inodes), computing each
    directory's layout on the way: (sorted names, block starts, tail inline?, parent)."""
    order = [root]
    root._parent = root
    i = 0
    while i < len(order):
        node = order[i]
        i += 1
        if not stat.S_ISDIR(node.mode):
            continue
        children = node.children or _NO_CHILDREN  # None: an empty directory
        if b"." in children or b".." in children:
            raise ImageError('a directory entry cannot be named "." or ".."')
        names = sorted([*children, b".", b".."])
        for name in names:
            if name == b"." or name == b"..":
                continue
            _check_name(name)
            child = children[name]
            order.append(child)
            child._parent = node
        starts, tail = _dir_blocks(names)
        # The tail is inline (tail packing, EROFS_INODE_FLAT_INLINE) when inode, xattrs
        # (header + one shared id), tail and a terminating NUL fit in one block.  A tail of
        # a full block never qualifies, so an inline tail is never empty (the kernel would
        # take i_size % 4096 == 0 as "no tail" and the last block as inline).
        # The NUL: the kernel reads the last name of a block up to a NUL or the block's end
        # (erofs_dirnamecmp in namei.c), and an inline tail is followed by the next inode.
        node._inline = INODE_SIZE + _XATTR_HEADER.size + tail + 1 <= BLOCK_SIZE
        node._names = names
        node._starts = starts
    return order


def write_image(root: Node, out: BinaryIO, *, build_time: int = 0) -> ImageStats:
    """Write the EROFS image of the tree ``root`` (a directory) to ``out``, sequentially.

    ``build_time`` (seconds since the epoch) goes into the superblock; nothing else depends
    on the clock.  Raises :class:`ImageError` for trees that cannot be represented.
    """
    if not stat.S_ISDIR(root.mode):
        raise ImageError("the root of an image must be a directory")
    order = _order(root)
    placed, meta_end, used, data_blocks, any_chunked = _place(order)
    # erofs_super_block.root_nid is 16 bits: the root comes first in the order, so it is in
    # block 0, or in block 1 when its inline directory data does not fit after the superblock.
    if root._nid > 0xFFFF:
        raise AssertionError("root inode misplaced")

    # The shared xattr area follows the last inode; ids count 4-byte units from
    # xattr_blkaddr (erofs_init_inode_xattrs / erofs_xattr_iter_shared).
    xattr_blkaddr = meta_end >> BLOCK_BITS
    metacopy_id = (meta_end & (BLOCK_SIZE - 1)) >> 2
    opaque_id = metacopy_id + len(_METACOPY_ENTRY) // 4
    data_start = (meta_end + len(_SHARED_XATTRS) + BLOCK_SIZE - 1) >> BLOCK_BITS
    total_blocks = data_start + data_blocks

    out_w = _Writer(out)
    out_w.write(bytes(SUPER_OFFSET))
    out_w.write(_SUPER.pack(
        SUPER_MAGIC, 0, 0,  # magic, checksum (EROFS_FEATURE_COMPAT_SB_CHKSUM off), feature_compat
        BLOCK_BITS, 0, root._nid,  # blkszbits, sb_extslots, root_nid
        len(placed), build_time, 0,  # inos, build_time (epoch), build_time_nsec
        total_blocks, 0, xattr_blkaddr,  # blocks, meta_blkaddr, xattr_blkaddr
        bytes(16), bytes(16),  # uuid, volume_name
        _FEATURE_INCOMPAT_CHUNKED_FILE if any_chunked else 0,
        0, 0, 0,  # available_compr_algs, extra_devices, devt_slotoff
        0, 0, 0, 0, 0,  # dirblkbits, xattr_prefix_count, xattr_prefix_start, packed_nid, xattr_filter_reserved
        0, 0, 0,  # reserved (in newer kernels' layout: build_time u32, rootnid_8b for 48BIT, reserved2)
    ))

    # The metadata area, in placement order; data blocks are numbered as they are met.
    next_block = data_start
    with_blocks: list[Node] = []
    dir_xattrs = _XATTR_HEADER.pack(0, 1, opaque_id)  # h_name_filter 0: no filter (feature off)
    file_xattrs = _XATTR_HEADER.pack(0, 1, metacopy_id)
    dirs = files = symlinks = 0
    pack_inode = _INODE.pack
    for ino, node in enumerate(placed, 1):
        at = node._nid << 5
        if at < out_w.offset:
            raise AssertionError(f"inode records overlap at nid {node._nid}")
        if at != out_w.offset:
            out_w.write(bytes(at - out_w.offset))
        mode = node.mode
        fmt = mode & 0o170000
        sec, nsec = divmod(node.mtime_ns, 1_000_000_000)
        if fmt == stat.S_IFREG:
            files += 1
            entries = node._entries
            redirect = node.redirect
            xattrs = file_xattrs
            if redirect is not None:
                xattrs += (_REDIRECT_HEAD + struct.pack("<H", len(redirect)) + _REDIRECT_NAME + redirect
                           + bytes(-len(redirect) & 3))
            icount = (len(xattrs) - XATTR_HEADER_SIZE) // 4 + 1  # erofs_xattr_ibody_size()
            if entries:
                # i_u is erofs_inode_chunk_info {format, reserved}; 4-byte block map entries
                # follow the xattrs (already 4-aligned), all EROFS_NULL_ADDR.
                out_w.write(pack_inode(_FORMAT_CHUNKED, icount, mode, 0, node.size, node._chunkfmt, ino, node.uid,
                                       node.gid, sec, nsec, 1) + xattrs + _NULL_ENTRY * entries)
            else:
                out_w.write(pack_inode(_FORMAT_PLAIN, icount, mode, 0, 0, 0, ino, node.uid, node.gid, sec, nsec, 1)
                            + xattrs)
        elif fmt == stat.S_IFDIR:
            dirs += 1
            names, starts, inline, parent = node._names, node._starts, node._inline, node._parent
            assert parent is not None
            children = node.children or _NO_CHILDREN
            subdirs = sum(1 for c in children.values() if c.mode & 0o170000 == stat.S_IFDIR)
            tail_start = starts[-1]
            dir_size = (len(starts) - 1) * BLOCK_SIZE + _tail_bytes(names, tail_start)
            full = len(starts) - 1 if inline else len(starts)
            blkaddr = 0
            if full:
                blkaddr = next_block
                next_block += full
                with_blocks.append(node)
            record = pack_inode(_FORMAT_INLINE if inline else _FORMAT_PLAIN, 2, mode, 0, dir_size, blkaddr, ino,
                                node.uid, node.gid, sec, nsec, 2 + subdirs) + dir_xattrs
            if inline:
                record += _dir_block(node, names, tail_start, len(names), parent._nid) + b"\0"
            out_w.write(record)
        else:
            symlinks += 1
            target = node.target
            assert target is not None
            if node._inline:
                out_w.write(pack_inode(_FORMAT_INLINE, 0, mode, 0, len(target), 0, ino, node.uid, node.gid,
                                       sec, nsec, 1) + target)
            else:
                out_w.write(pack_inode(_FORMAT_PLAIN, 0, mode, 0, len(target), next_block, ino, node.uid, node.gid,
                                       sec, nsec, 1))
                next_block += 1
                with_blocks.append(node)
    if out_w.offset > meta_end:
        raise AssertionError("metadata overran its layout")
    out_w.write(bytes(meta_end - out_w.offset) + _SHARED_XATTRS)
    out_w.write(bytes((data_start << BLOCK_BITS) - out_w.offset))

    # Data blocks, in the order they were numbered.
    for node in with_blocks:
        if stat.S_ISLNK(node.mode):
            target = node.target
            assert target is not None
            out_w.write(target + bytes(BLOCK_SIZE - len(target)))
            continue
        names, starts, inline, parent = node._names, node._starts, node._inline, node._parent
        assert parent is not None
        bounds = [*starts, len(names)]
        for b in range(len(starts) - 1 if inline else len(starts)):
            block = _dir_block(node, names, bounds[b], bounds[b + 1], parent._nid)
            out_w.write(block + bytes(BLOCK_SIZE - len(block)))
    if next_block != total_blocks or out_w.offset != total_blocks << BLOCK_BITS:
        raise AssertionError("data blocks do not match their numbering")
    out_w.flush()
    for node in placed:  # drop the layout state (and the child -> parent reference cycles)
        node._parent = None
        node._names = _NO_NAMES
        node._starts = _NO_STARTS
    return ImageStats(bytes=total_blocks << BLOCK_BITS, inodes=len(placed), blocks=total_blocks, dirs=dirs,
                      files=files, symlinks=symlinks, meta_bytes=meta_end, data_blocks=data_blocks,
                      padding=meta_end - SUPER_OFFSET - SUPER_SIZE - used)


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


_XATTR_PREFIXES = {1: b"user.", 2: b"system.posix_acl_access", 3: b"system.posix_acl_default", 4: b"trusted.",
                   6: b"security."}
_DIR_NAMES = (b".", b"..")


def read_image(data: bytes) -> Node:
    """The tree stored in an image made by :func:`write_image` (for checks without a mount:
    ``snapshot verify``, tests).  Reads the layouts write_image uses and refuses others;
    raises :class:`ImageError` when the image is not what write_image would write:
    a directory without ``trusted.overlay.opaque=y``, a file without metacopy, other xattrs.
    """
    view = memoryview(data)
    if len(data) < SUPER_OFFSET + SUPER_SIZE:
        raise ImageError("image too short")
    sb = _SUPER.unpack_from(data, SUPER_OFFSET)
    magic, blkszbits, root_nid, meta_blkaddr, xattr_blkaddr, incompat = sb[0], sb[3], sb[5], sb[10], sb[11], sb[14]
    if magic != SUPER_MAGIC or blkszbits != BLOCK_BITS or incompat & ~_FEATURE_INCOMPAT_CHUNKED_FILE:
        raise ImageError("not an EROFS image with the layout ovlrun writes")
    meta = meta_blkaddr << BLOCK_BITS
    shared_base = xattr_blkaddr << BLOCK_BITS

    def xattr_entry(pos: int) -> tuple[bytes, bytes, int]:
        name_len, index, value_size = struct.unpack_from("<BBH", data, pos)
        prefix = _XATTR_PREFIXES.get(index)
        if prefix is None:
            raise ImageError(f"unknown xattr name index {index}")
        name = prefix + bytes(view[pos + 4:pos + 4 + name_len])
        value = bytes(view[pos + 4 + name_len:pos + 4 + name_len + value_size])
        return name, value, (4 + name_len + value_size + 3) & ~3

    def read_inode(nid: int) -> tuple[Node, int, int, int]:
        """(node with attributes and xattr-derived fields, layout, i_u, offset after xattrs)."""
        pos = meta + (nid << 5)
        fmt, icount, mode, _, size, i_u, _, uid, gid, sec, nsec, _ = _INODE.unpack_from(data, pos)
        if not fmt & 1:
            raise ImageError(f"compact inode at nid {nid}")
        node = Node(mode, uid, gid, sec * 1_000_000_000 + nsec, size)
        end = pos + INODE_SIZE
        xattrs: dict[bytes, bytes] = {}
        if icount:
            shared = data[end + 4]
            xend = end + XATTR_HEADER_SIZE + 4 * (icount - 1)
            at = end + XATTR_HEADER_SIZE
            for _ in range(shared):
                (xid,) = struct.unpack_from("<I", data, at)
                name, value, _ = xattr_entry(shared_base + 4 * xid)
                xattrs[name] = value
                at += 4
            while at < xend:
                name, value, step = xattr_entry(at)
                xattrs[name] = value
                at += step
            end = xend
        fmtbits = stat.S_IFMT(mode)
        want: dict[bytes, bytes] = {}
        if fmtbits == stat.S_IFDIR:
            want = {b"trusted.overlay.opaque": b"y"}
        elif fmtbits == stat.S_IFREG:
            want = {b"trusted.overlay.metacopy": b""}
            node.redirect = xattrs.get(b"trusted.overlay.redirect")
            if node.redirect is not None:
                want[b"trusted.overlay.redirect"] = node.redirect
        elif fmtbits != stat.S_IFLNK:
            raise ImageError(f"unexpected file type {fmtbits:o} at nid {nid}")
        if xattrs != want:
            raise ImageError(f"unexpected xattrs {xattrs!r} at nid {nid}")
        return node, (fmt >> 1) & 7, i_u, end

    def content(nid: int, node: Node, layout: int, i_u: int, end: int) -> list[bytes]:
        """The data blocks of a directory or symlink (the last one possibly short)."""
        size = node.size
        count = (size + BLOCK_SIZE - 1) >> BLOCK_BITS
        blocks = []
        for b in range(count):
            length = min(BLOCK_SIZE, size - (b << BLOCK_BITS))
            if layout == _LAYOUT_FLAT_INLINE and b == count - 1:
                if (end & (BLOCK_SIZE - 1)) + length > BLOCK_SIZE:
                    raise ImageError(f"inline data crosses a block boundary at nid {nid}")
                blocks.append(bytes(view[end:end + length]))
            elif layout in (_LAYOUT_FLAT_PLAIN, _LAYOUT_FLAT_INLINE):
                start = (i_u + b) << BLOCK_BITS
                blocks.append(bytes(view[start:start + length]))
            else:
                raise ImageError(f"unexpected data layout {layout} at nid {nid}")
        return blocks

    root, layout, i_u, end = read_inode(root_nid)
    stack = [(root_nid, root, layout, i_u, end)]
    dirs_seen: set[int] = set()
    while stack:
        nid, node, layout, i_u, end = stack.pop()
        fmt = stat.S_IFMT(node.mode)
        if fmt == stat.S_IFLNK:
            node.target = b"".join(content(nid, node, layout, i_u, end))
            node.size = 0
            continue
        if fmt == stat.S_IFREG:
            if layout == _LAYOUT_CHUNK_BASED:
                entries, fmtbits = _chunk_layout(node.size)
                if i_u != fmtbits or bytes(view[end:end + 4 * entries]) != _NULL_ENTRY * entries:
                    raise ImageError(f"a file with data blocks at nid {nid}")
            elif layout != _LAYOUT_FLAT_PLAIN or node.size:
                raise ImageError(f"unexpected file layout {layout} at nid {nid}")
            continue
        if nid in dirs_seen:
            raise ImageError(f"directory nid {nid} is linked twice")
        dirs_seen.add(nid)
        children: dict[bytes, Node] = {}
        blocks = content(nid, node, layout, i_u, end)
        node.children = children
        node.size = 0
        previous = b""
        seen_dots = 0
        for block in blocks:
            count = struct.unpack_from("<H", block, 8)[0] // DIRENT_SIZE
            for i in range(count):
                child_nid, nameoff, _ = _DIRENT.unpack_from(block, i * DIRENT_SIZE)
                stop = struct.unpack_from("<H", block, (i + 1) * DIRENT_SIZE + 8)[0] if i + 1 < count else len(block)
                name = block[nameoff:stop].split(b"\0", 1)[0]
                if name <= previous and previous:
                    raise ImageError(f"directory entries out of order at nid {nid}")
                previous = name
                if name in _DIR_NAMES:
                    seen_dots += 1
                    continue
                child, clayout, ci_u, cend = read_inode(child_nid)
                children[name] = child
                stack.append((child_nid, child, clayout, ci_u, cend))
        if seen_dots != 2:
            raise ImageError(f"directory without . and .. at nid {nid}")
    return root
