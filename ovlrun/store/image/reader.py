"""Reading an image back into :class:`~.tree.Node` s, for checks without a mount
(``snapshot verify``, tests): reads the layouts :func:`~.writer.write_image` uses
(including those of images written before compact inodes and stored files) and refuses
anything else."""

from __future__ import annotations

import mmap
import stat
import struct

from ovlrun.store.image.format import (
    BLOCK_BITS,
    BLOCK_SIZE,
    COMPACT_INODE,
    COMPACT_SIZE,
    DIRENT,
    DIRENT_SIZE,
    EXTENDED_INODE,
    EXTENDED_SIZE,
    FEATURE_INCOMPAT_CHUNKED_FILE,
    LAYOUT_CHUNK_BASED,
    LAYOUT_FLAT_INLINE,
    LAYOUT_FLAT_PLAIN,
    NULL_ENTRY,
    SUPER,
    SUPER_MAGIC,
    SUPER_OFFSET,
    SUPER_SIZE,
    XATTR_HEADER_SIZE,
    XATTR_PREFIXES,
)
from ovlrun.store.image.layout import chunk_layout
from ovlrun.store.image.tree import ImageError, Node

_DIR_NAMES = (b".", b"..")
_OPAQUE = {b"trusted.overlay.opaque": b"y"}
_METACOPY = b"trusted.overlay.metacopy"
_REDIRECT = b"trusted.overlay.redirect"


def read_image(data: bytes | mmap.mmap) -> Node:
    """The tree stored in an image made by :func:`~.writer.write_image`.

    Raises :class:`ImageError` when the image is not what write_image would write: a
    directory without ``trusted.overlay.opaque=y``, a file that is neither metacopy nor
    stored whole, other xattrs, data outside the image.  Files stored whole come back
    with ``data_at`` 0 (their bytes are not read).
    """
    view = memoryview(data)
    if len(data) < SUPER_OFFSET + SUPER_SIZE:
        raise ImageError("image too short")
    sb = SUPER.unpack_from(data, SUPER_OFFSET)
    magic, blkszbits, root_nid, epoch_sec, epoch_nsec = sb[0], sb[3], sb[5], sb[7], sb[8]
    blocks, meta_blkaddr, xattr_blkaddr, incompat = sb[9], sb[10], sb[11], sb[14]
    if magic != SUPER_MAGIC or blkszbits != BLOCK_BITS or incompat & ~FEATURE_INCOMPAT_CHUNKED_FILE:
        raise ImageError("not an EROFS image with the layout ovlrun writes")
    if blocks << BLOCK_BITS > len(data):
        raise ImageError(f"image truncated: {len(data)} bytes of {blocks} blocks")
    epoch = epoch_sec * 1_000_000_000 + epoch_nsec
    meta = meta_blkaddr << BLOCK_BITS
    shared_base = xattr_blkaddr << BLOCK_BITS

    def xattr_entry(pos: int) -> tuple[bytes, bytes, int]:
        name_len, index, value_size = struct.unpack_from("<BBH", data, pos)
        prefix = XATTR_PREFIXES.get(index)
        if prefix is None:
            raise ImageError(f"unknown xattr name index {index}")
        name = prefix + bytes(view[pos + 4:pos + 4 + name_len])
        value = bytes(view[pos + 4 + name_len:pos + 4 + name_len + value_size])
        return name, value, (4 + name_len + value_size + 3) & ~3

    def read_inode(nid: int) -> tuple[Node, int, int, int]:
        """(node with attributes and xattr-derived fields, layout, i_u, offset after xattrs)."""
        pos = meta + (nid << 5)
        if struct.unpack_from("<H", data, pos)[0] & 1:
            fmt, icount, mode, _, size, i_u, _, uid, gid, sec, nsec, _ = EXTENDED_INODE.unpack_from(data, pos)
            node = Node(mode, uid, gid, sec * 1_000_000_000 + nsec, size)
            end = pos + EXTENDED_SIZE
        else:
            fmt, icount, mode, _, size, mtime_offset, i_u, _, uid, gid, _ = COMPACT_INODE.unpack_from(data, pos)
            if mtime_offset:
                raise ImageError(f"compact inode with an mtime offset at nid {nid}")
            node = Node(mode, uid, gid, epoch, size)
            end = pos + COMPACT_SIZE
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
            want = _OPAQUE
        elif fmtbits == stat.S_IFREG and xattrs:  # metacopy (a file stored whole has no xattrs)
            want = {_METACOPY: b""}
            node.redirect = xattrs.get(_REDIRECT)
            if node.redirect is not None:
                want[_REDIRECT] = node.redirect
        elif fmtbits == stat.S_IFREG:
            node.data_at = 0
        elif fmtbits != stat.S_IFLNK:
            raise ImageError(f"unexpected file type {fmtbits:o} at nid {nid}")
        if xattrs != want:
            raise ImageError(f"unexpected xattrs {xattrs!r} at nid {nid}")
        return node, (fmt >> 1) & 7, i_u, end

    def spans(nid: int, size: int, layout: int, i_u: int, end: int) -> list[tuple[int, int]]:
        """(offset, length) of each block of a flat inode's data (the last one possibly short)."""
        count = (size + BLOCK_SIZE - 1) >> BLOCK_BITS
        out = []
        for b in range(count):
            length = min(BLOCK_SIZE, size - (b << BLOCK_BITS))
            if layout == LAYOUT_FLAT_INLINE and b == count - 1:
                if (end & (BLOCK_SIZE - 1)) + length > BLOCK_SIZE:
                    raise ImageError(f"inline data crosses a block boundary at nid {nid}")
                out.append((end, length))
            elif layout in (LAYOUT_FLAT_PLAIN, LAYOUT_FLAT_INLINE):
                if i_u + b >= blocks:
                    raise ImageError(f"data block {i_u + b} outside the image at nid {nid}")
                out.append(((i_u + b) << BLOCK_BITS, length))
            else:
                raise ImageError(f"unexpected data layout {layout} at nid {nid}")
        return out

    def content(nid: int, node: Node, layout: int, i_u: int, end: int) -> list[bytes]:
        return [bytes(view[at:at + length]) for at, length in spans(nid, node.size, layout, i_u, end)]

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
            if node.data_at >= 0:  # stored whole: its blocks must be in the image
                spans(nid, node.size, layout, i_u, end)
            elif layout == LAYOUT_CHUNK_BASED and node.size:
                entries, fmtbits = chunk_layout(node.size)
                if i_u != fmtbits or bytes(view[end:end + 4 * entries]) != NULL_ENTRY * entries:
                    raise ImageError(f"a file with data blocks at nid {nid}")
            elif layout != LAYOUT_FLAT_PLAIN or node.size:  # (empty metacopy files: older images)
                raise ImageError(f"unexpected file layout {layout} at nid {nid}")
            continue
        if nid in dirs_seen:
            raise ImageError(f"directory nid {nid} is linked twice")
        dirs_seen.add(nid)
        children: dict[bytes, Node] = {}
        blocks_of_dir = content(nid, node, layout, i_u, end)
        node.children = children
        node.size = 0
        previous = b""
        seen_dots = 0
        for block in blocks_of_dir:
            count = struct.unpack_from("<H", block, 8)[0] // DIRENT_SIZE
            for i in range(count):
                child_nid, nameoff, _ = DIRENT.unpack_from(block, i * DIRENT_SIZE)
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


def check_image(data: bytes | mmap.mmap) -> None:
    """Raise :class:`ImageError` unless ``data`` is an image :func:`~.writer.write_image`
    could have written: what a node checks before a fetched image enters its store (the
    image owner wrote it, and the kernel mounts it with root's trust).

    :func:`read_image` (the superblock, every inode and directory in bounds, names in
    order, no directory linked twice, only regular files, directories and symlinks, only
    the overlay xattrs ovlrun writes, metacopy files without data blocks) plus: names
    that are one path component each, and redirects that are normalised absolute paths
    (the kernel resolves them inside the data-only layer, the release).  Iterative, one
    pass over the metadata: no recursion, whatever the image's depth.
    """
    try:
        root = read_image(data)
    except ImageError:
        raise
    except (struct.error, IndexError, ValueError, OverflowError) as e:  # an offset outside the image
        raise ImageError(f"malformed image: {e}") from None
    stack = [root]
    while stack:
        node = stack.pop()
        if node.redirect is not None:
            path = node.redirect
            parts = path.split(b"/")
            if not path.startswith(b"/") or any(p in (b"", b".", b"..") for p in parts[1:]) or b"\0" in path:
                raise ImageError(f"redirect {path!r} is not a normalised absolute path")
        for name, child in (node.children or {}).items():
            if not name or b"/" in name or b"\0" in name:
                raise ImageError(f"directory entry name {name!r} is not one path component")
            stack.append(child)
