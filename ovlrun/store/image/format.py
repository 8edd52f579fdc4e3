"""The EROFS on-disk format, as far as ovlrun's images use it.

Source: Linux ``fs/erofs/erofs_fs.h`` (also erofs-utils ``include/erofs_fs.h``); the
comments name the structures and the kernel code each choice follows.  Checked by
mounting (tests/test_erofs.py, tests/test_mount.py) on Debian's 6.1 and 6.12 in the VM
tests and on 6.18, and with fsck.erofs 1.5 and 1.8.  Images use only what every kernel
from 6.1 on reads: no compression, no long xattr prefixes (6.4+), no xattr name filter
(6.5+); the one incompat feature is CHUNKED_FILE (5.15+).  The shared xattr area is
also where redirects go that do not fit their inode's slot padding (ids are 32-bit
4-byte offsets from ``xattr_blkaddr``, so the area may span blocks).

Layout of an image::

    block 0 ... : 1 KiB zero | erofs_super_block (128 B) at 1024 | inodes (metadata area)
    ...         : shared xattr area (metacopy, opaque, then redirects), after the last inode
    data blocks : directory blocks that do not fit inline, long symlink targets, and the
                  blocks of files stored whole

* ``meta_blkaddr`` is 0, so an inode's nid is its byte offset / 32 (``erofs_iloc``);
  the root is the first inode (nid 36, just after the superblock, or in block 1 if its
  inline data does not fit there): ``root_nid`` is 16 bits.
* Inodes are compact (32 B: 16-bit uid/gid/nlink, 32-bit size) where they can be, else
  extended (64 B).  A compact inode has no time of its own: 6.1 and 6.12 give it the
  superblock's ``build_time``/``build_time_nsec`` (``erofs_read_inode``); later kernels
  read a 32-bit seconds offset from that time where 6.1 has ``i_reserved``, which ovlrun
  writes as 0.  So the superblock carries the image's most common mtime (the *epoch*, a
  function of the tree, not of the clock) and only entries with exactly that mtime, to
  the nanosecond, get a compact inode; the rest keep theirs in an extended inode.
* Metacopy files are ``EROFS_INODE_CHUNK_BASED`` with the 4-byte block map (no
  ``EROFS_CHUNK_FORMAT_INDEXES``) holding ``EROFS_NULL_ADDR`` for every chunk, chunk size
  the smallest power of two >= the file size: a sparse, data-less file of the source's
  size (as composefs writes them).
* Files stored whole (empty files, and the files a profile inlines) are ordinary
  files: ``EROFS_INODE_FLAT_PLAIN`` (whole blocks in the data area) or
  ``EROFS_INODE_FLAT_INLINE`` (whole blocks, then the last partial block right after the
  inode, tail packing), with no xattrs.
* ``trusted.overlay.metacopy`` (empty) and ``trusted.overlay.opaque`` ("y") are stored once
  in the shared xattr area and referenced by id from every metacopy file / directory;
  ``trusted.overlay.redirect`` is an inline xattr entry, or a shared one (a 4-byte id)
  when that takes fewer bytes once the inode record is padded to its 32-byte slots.  All use the name index
  ``EROFS_XATTR_INDEX_TRUSTED`` (so the stored name is "overlay.redirect", etc.).
* Directories: ``erofs_dirent`` s sorted by name bytes ("." and ".." included, since the
  kernel binary-searches them: ``find_target_block_classic`` / ``find_target_dirent`` in
  namei.c), packed per 4 KiB block as [dirents][names]; the first dirent's ``nameoff`` / 12
  is the block's entry count.  Full blocks go to the data area; the last, partial block
  is stored inline right after the inode (tail packing) when it fits in the inode's
  block, else in the data area too (``FLAT_PLAIN``).
* Symlink targets are inline (``FLAT_INLINE``; ``erofs_fill_symlink`` wants them in the
  inode's block), or in one data block when inode + target exceed a block.
* Inline tails must not cross a block boundary (``erofs_map_blocks_flat`` /
  ``erofs_fill_symlink`` reject that): see :mod:`.layout`.
"""

from __future__ import annotations

import struct

BLOCK_BITS = 12
BLOCK_SIZE = 1 << BLOCK_BITS
SUPER_OFFSET = 1024  # EROFS_SUPER_OFFSET
SUPER_SIZE = 128  # sizeof(struct erofs_super_block) without extension slots
SUPER_MAGIC = 0xE0F5E1E2  # EROFS_SUPER_MAGIC_V1
SLOT_SIZE = 32  # nids count 32-byte slots from meta_blkaddr (erofs_iloc)
COMPACT_SIZE = 32  # sizeof(struct erofs_inode_compact)
EXTENDED_SIZE = 64  # sizeof(struct erofs_inode_extended)
XATTR_HEADER_SIZE = 12  # sizeof(struct erofs_xattr_ibody_header)
DIRENT_SIZE = 12  # sizeof(struct erofs_dirent)
NAME_MAX = 255  # EROFS_NAME_LEN
SYMLINK_MAX = 4095  # PATH_MAX - 1
MAX_XATTR_VALUE = 0xFFFF  # erofs_xattr_entry.e_value_size is 16 bits
U16_MAX = 0xFFFF
U32_MAX = 0xFFFFFFFF

# i_format: bit 0 the inode version (EROFS_INODE_LAYOUT_COMPACT 0 / _EXTENDED 1),
# bits 1-3 the data layout.
LAYOUT_FLAT_PLAIN = 0  # EROFS_INODE_FLAT_PLAIN
LAYOUT_FLAT_INLINE = 2  # EROFS_INODE_FLAT_INLINE
LAYOUT_CHUNK_BASED = 4  # EROFS_INODE_CHUNK_BASED
CHUNK_BLKBITS_MAX = 0x1F  # EROFS_CHUNK_FORMAT_BLKBITS_MASK: chunks up to 8 TiB
NULL_ADDR = 0xFFFFFFFF  # EROFS_NULL_ADDR in a 4-byte block map entry: a hole
NULL_ENTRY = struct.pack("<I", NULL_ADDR)

FEATURE_INCOMPAT_CHUNKED_FILE = 0x4  # EROFS_FEATURE_INCOMPAT_CHUNKED_FILE


def i_format(extended: bool, layout: int) -> int:
    return int(extended) | layout << 1


# erofs_dirent.file_type (EROFS_FT_*, same values as the kernel's FT_*).
FT_REG = 1
FT_DIR = 2
FT_SYMLINK = 7

# xattr entries (erofs_xattr_entry: name_len u8, name_index u8, value_size le16, name,
# value, padded to 4).  EROFS_XATTR_INDEX_TRUSTED = 4 stands for the "trusted." prefix.
XATTR_INDEX_TRUSTED = 4
METACOPY_ENTRY = struct.pack("<BBH", 16, XATTR_INDEX_TRUSTED, 0) + b"overlay.metacopy"
OPAQUE_ENTRY = struct.pack("<BBH", 14, XATTR_INDEX_TRUSTED, 1) + b"overlay.opaque" + b"y\0"
SHARED_XATTRS = METACOPY_ENTRY + OPAQUE_ENTRY
REDIRECT_NAME = b"overlay.redirect"
REDIRECT_HEAD = struct.pack("<BB", len(REDIRECT_NAME), XATTR_INDEX_TRUSTED)
XATTR_PREFIXES = {1: b"user.", 2: b"system.posix_acl_access", 3: b"system.posix_acl_default", 4: b"trusted.",
                  6: b"security."}


def redirect_entry_size(redirect: bytes) -> int:
    """Bytes of an inline ``trusted.overlay.redirect`` entry (4-byte aligned)."""
    return (4 + len(REDIRECT_NAME) + len(redirect) + 3) & ~3


def redirect_entry(redirect: bytes) -> bytes:
    return REDIRECT_HEAD + struct.pack("<H", len(redirect)) + REDIRECT_NAME + redirect + bytes(-len(redirect) & 3)


# struct erofs_inode_compact: format, xattr_icount, mode, nlink, size, reserved (the
# i_mtime offset of later kernels: 0), i_u, ino, uid, gid, reserved2.
COMPACT_INODE = struct.Struct("<HHHHIIIIHHI")
# struct erofs_inode_extended: format, xattr_icount, mode, reserved, size, i_u, ino, uid,
# gid, mtime, mtime_nsec, nlink, reserved2[16].
EXTENDED_INODE = struct.Struct("<HHHHQIIIIqII16x")
XATTR_HEADER = struct.Struct("<IB7xI")  # erofs_xattr_ibody_header + one shared xattr id
DIRENT = struct.Struct("<QHBx")  # struct erofs_dirent
SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB3xIQQ")  # struct erofs_super_block (128 bytes)
