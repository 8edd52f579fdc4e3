"""Where every record of an image goes, decided before a byte is written.

Records are placed breadth-first (a directory's entries get neighbouring inodes), each at
a 32-byte slot (nids count slots).  A record with an inline tail (a directory's last
block, a symlink target, the last block of a file stored whole) must not cross a block
boundary (``erofs_map_blocks_flat`` / ``erofs_fill_symlink`` reject that); such records
are deferred (up to :data:`MAX_DEFERRED`) until a block has room, while records without
one (metacopy files, whose inode and xattrs may straddle blocks) fill the gap: the
metadata area has almost no padding.
"""

from __future__ import annotations

import stat
from collections import Counter
from typing import NamedTuple

from ovlrun.store.image.format import (
    BLOCK_BITS,
    BLOCK_SIZE,
    CHUNK_BLKBITS_MAX,
    COMPACT_SIZE,
    DIRENT_SIZE,
    EXTENDED_SIZE,
    MAX_XATTR_VALUE,
    NAME_MAX,
    SLOT_SIZE,
    SUPER_OFFSET,
    SUPER_SIZE,
    SYMLINK_MAX,
    U16_MAX,
    U32_MAX,
    XATTR_HEADER,
    redirect_entry_size,
)
from ovlrun.store.image.tree import ImageError, Node

# Records with an inline tail that does not fit in the current block wait for one that
# does; more than this many waiting and the block is padded out instead.
MAX_DEFERRED = 64
_NO_CHILDREN: dict[bytes, Node] = {}


class Layout(NamedTuple):
    placed: list[Node]  # in placement (= nid) order
    meta_end: int  # end of the last record
    used: int  # bytes of records
    data_blocks: int
    any_chunked: bool
    epoch_ns: int  # the superblock's build time: compact inodes' mtime
    shared_redirects: int  # bytes of redirect entries in the shared xattr area


def check_name(name: bytes) -> None:
    if not name or len(name) > NAME_MAX or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise ImageError(f"invalid directory entry name {name!r}")


def chunk_layout(size: int) -> tuple[int, int]:
    """(number of block map entries, chunk format) for a data-less file of ``size`` bytes."""
    # Smallest chunk (a power of two, at least one block) covering the whole file, capped
    # at blocksize << 31; bigger files get several null entries.
    bits = max(BLOCK_BITS, (size - 1).bit_length())
    fmt = min(bits - BLOCK_BITS, CHUNK_BLKBITS_MAX)
    chunk = 1 << (BLOCK_BITS + fmt)
    return -(-size // chunk), fmt


def dir_blocks(names: list[bytes]) -> tuple[list[int], int]:
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


def tail_bytes(names: list[bytes], start: int) -> int:
    return DIRENT_SIZE * (len(names) - start) + sum(map(len, names[start:]))


def dir_size(node: Node) -> int:
    return (len(node._starts) - 1) * BLOCK_SIZE + tail_bytes(node._names, node._starts[-1])


def subdirs(node: Node) -> int:
    return sum(1 for c in (node.children or _NO_CHILDREN).values() if stat.S_ISDIR(c.mode))


def order(root: Node) -> list[Node]:
    """Breadth-first order, computing each directory's names and block starts on the way."""
    out = [root]
    root._parent = root
    i = 0
    while i < len(out):
        node = out[i]
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
            check_name(name)
            child = children[name]
            out.append(child)
            child._parent = node
        node._names = names
        node._starts = dir_blocks(names)[0]
    return out


def choose_epoch(nodes: list[Node]) -> int:
    """The mtime most entries that could have a compact inode share (ties: the earliest);
    0 if none can."""
    counts = Counter(n.mtime_ns for n in nodes if n.uid <= U16_MAX and n.gid <= U16_MAX and n.mtime_ns >= 0)
    if not counts:
        return 0
    best = max(counts.values())
    return min(t for t, c in counts.items() if c == best)


def _check(node: Node) -> None:
    if not 0 <= node.uid <= U32_MAX or not 0 <= node.gid <= U32_MAX:
        raise ImageError(f"uid/gid {node.uid}/{node.gid} out of range")
    if not 0 <= node.mode <= 0xFFFF or not -(1 << 63) <= node.mtime_ns // 1_000_000_000 < 1 << 63:
        raise ImageError(f"mode {node.mode:o} or mtime {node.mtime_ns} out of range")


def _slots(size: int) -> int:
    return (size + SLOT_SIZE - 1) & ~(SLOT_SIZE - 1)


def _record(node: Node, epoch: int) -> tuple[int, bool, int]:
    """Decide ``node``'s inode kind and data layout: (record bytes, whether the record must
    stay within one block, data blocks)."""
    fmt = stat.S_IFMT(node.mode)
    if fmt == stat.S_IFDIR:
        size, nlink = dir_size(node), 2 + subdirs(node)
    elif fmt == stat.S_IFREG:
        if node.size < 0:
            raise ImageError(f"negative file size {node.size}")
        size, nlink = node.size, 1
    elif fmt == stat.S_IFLNK:
        target = node.target
        if not target or len(target) > SYMLINK_MAX or b"\0" in target:
            raise ImageError(f"invalid symlink target {target!r}")
        size, nlink = len(target), 1
    else:
        raise ImageError(f"cannot store file type {fmt:o} (only directories, regular files and symlinks)")
    compact = node._compact = (node.mtime_ns == epoch and node.uid <= U16_MAX and node.gid <= U16_MAX
                               and size <= U32_MAX and nlink <= U16_MAX)
    base = COMPACT_SIZE if compact else EXTENDED_SIZE
    node._inline = False
    node._blocks = node._entries = 0
    node._xshared = False
    if fmt == stat.S_IFDIR:
        starts = node._starts
        tail = tail_bytes(node._names, starts[-1])
        # The tail is inline (tail packing, EROFS_INODE_FLAT_INLINE) when inode, xattrs
        # (header + one shared id), tail and a terminating NUL fit in one block.  A tail of
        # a full block never qualifies, so an inline tail is never empty (the kernel would
        # take i_size % 4096 == 0 as "no tail" and the last block as inline).
        # The NUL: the kernel reads the last name of a block up to a NUL or the block's end
        # (erofs_dirnamecmp in namei.c), and an inline tail is followed by the next inode.
        inline = node._inline = base + XATTR_HEADER.size + tail + 1 <= BLOCK_SIZE
        node._blocks = len(starts) - 1 if inline else len(starts)
        return base + XATTR_HEADER.size + (tail + 1 if inline else 0), inline, node._blocks
    if fmt == stat.S_IFLNK:
        inline = node._inline = base + size <= BLOCK_SIZE
        node._blocks = 0 if inline else 1
        return (base + size if inline else base), inline, node._blocks
    if node.stored:
        tail = size & (BLOCK_SIZE - 1)
        # FLAT_INLINE keeps the partial last block after the inode; a file of whole
        # blocks, or whose tail does not fit beside its inode, is FLAT_PLAIN.
        inline = node._inline = bool(tail) and base + tail <= BLOCK_SIZE
        node._blocks = (size >> BLOCK_BITS) if inline else -(-size // BLOCK_SIZE)
        return (base + tail if inline else base), inline, node._blocks
    node._entries, node._chunkfmt = chunk_layout(size)
    record = base + XATTR_HEADER.size + 4 * node._entries
    redirect = node.redirect
    if redirect is not None:
        if not redirect or len(redirect) > MAX_XATTR_VALUE:
            raise ImageError(f"a redirect of {len(redirect)} bytes cannot be stored")
        # Inline after the inode, or in the shared xattr area (dense, 4-byte aligned) with
        # a 4-byte id: whichever costs fewer bytes once the record is padded to its slots.
        entry = redirect_entry_size(redirect)
        node._xshared = _slots(record + 4) + entry < _slots(record + entry)
        record += 4 if node._xshared else entry
    return record, False, 0


def place(root: Node) -> Layout:
    """Order the tree, choose the epoch, decide every record and give it its nid."""
    nodes = order(root)
    epoch = choose_epoch(nodes)
    placed: list[Node] = []
    pos = SUPER_OFFSET + SUPER_SIZE  # 1152: 32-byte aligned, so the root's nid is 36
    pending: list[tuple[Node, int]] = []
    used = 0
    data_blocks = 0
    any_chunked = False
    shared = 0

    def room() -> int:
        return BLOCK_SIZE - (pos & (BLOCK_SIZE - 1))

    def put(node: Node, size: int) -> None:
        nonlocal pos
        node._nid = pos >> 5
        placed.append(node)
        pos = (pos + size + SLOT_SIZE - 1) & ~(SLOT_SIZE - 1)

    def pad_to_block() -> None:
        nonlocal pos
        pos = (pos + BLOCK_SIZE - 1) & ~(BLOCK_SIZE - 1)

    def put_fitting(waiting: list[tuple[Node, int]]) -> list[tuple[Node, int]]:
        """Place, in order, the deferred records that fit in the room left; return the rest."""
        still = []
        for node, size in waiting:
            if size <= room():
                put(node, size)
            else:
                still.append((node, size))
        return still

    for node in nodes:
        _check(node)
        size, contained, blocks = _record(node, epoch)
        data_blocks += blocks
        any_chunked = any_chunked or node._entries > 0
        if node._xshared:
            assert node.redirect is not None
            shared += redirect_entry_size(node.redirect)
        used += size
        if contained and size > room():
            if len(pending) >= MAX_DEFERRED:  # give up filling this block
                pad_to_block()
                pending = put_fitting(pending)
            if size > room():
                pending.append((node, size))
                continue
        block = pos >> BLOCK_BITS
        put(node, size)
        if pending and pos >> BLOCK_BITS != block:  # a new block began: place what waited, if it fits
            pending = put_fitting(pending)
    for waiting in pending:
        if waiting[1] > room():
            pad_to_block()
        put(*waiting)
    return Layout(placed, pos, used, data_blocks, any_chunked, epoch, shared)
