"""Mounting a snapshot image (EROFS) as a detached, read-only mount.

Two ways, chosen by behaviour, never by kernel version:

* file-backed: ``fsopen("erofs")`` with ``source`` = the image file.  Kernels built with
  ``CONFIG_EROFS_FS_BACKED_BY_FILE`` (6.12+) read the file directly; others refuse a
  non-block source with ENOTBLK at ``FSCONFIG_CMD_CREATE``;
* a read-only loop device: ``LOOP_CTL_GET_FREE`` on /dev/loop-control, then
  ``LOOP_CONFIGURE`` (5.8+; ``LOOP_SET_FD`` + ``LOOP_SET_STATUS64`` where it is missing)
  with ``LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR``, and ``source=/dev/loopN``.  Autoclear
  detaches the device when its last user goes: our descriptor (closed once the
  superblock holds the device) and then the mount, e.g. with the job's namespace.

The result is an fsmount(2) descriptor (``MOUNT_ATTR_RDONLY|NOSUID|NODEV``) for
``move_mount`` or for use as an overlay layer (``FSCONFIG_SET_FD``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time

from ovlrun.errors import OvlrunError
from ovlrun.linux import syscalls

# <linux/loop.h>
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_NAME_SIZE = 64

# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (u64),
# lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (u32), lo_file_name[64],
# lo_crypt_name[64], lo_encrypt_key[32], lo_init[2] (u64): 232 bytes.
_LOOP_INFO64 = struct.Struct("<QQQQQIIII64s64s32sQQ")
# struct loop_config: fd, block_size (u32), loop_info64, __reserved[8] (u64): 304 bytes.
_LOOP_CONFIG = struct.Struct(f"<II{_LOOP_INFO64.size}s64x")

MOUNT_ATTRS = syscalls.MOUNT_ATTR_RDONLY | syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV
_FSCONFIG_STRING_MAX = 255  # fsconfig(2) copies at most 256 bytes including the NUL


class ImageMountError(OvlrunError):
    pass


def _describe(e: OSError, fs_fd: int) -> str:
    """errno text plus what the kernel queued on the fs context (erofs logs most refusals
    to the kernel log instead: say so for the usual "not an image" EINVAL)."""
    parts = [e.strerror or os.strerror(e.errno or 0), *syscalls.read_fs_log(fs_fd)]
    if e.errno == errno.EINVAL and len(parts) == 1:
        parts.append("not a valid EROFS image? (the kernel log says why)")
    return "; ".join(parts)


def _erofs_mount(source: str, image: str) -> int:
    """fsopen/fsconfig/fsmount of erofs on ``source``: the detached mount's fd."""
    try:
        fs_fd = syscalls.fsopen("erofs")
    except OSError as e:
        if e.errno == errno.ENODEV:
            raise ImageMountError("the kernel has no erofs file system (modprobe erofs?)") from None
        raise ImageMountError(f"cannot mount snapshot image {image}: {e}") from None
    try:
        syscalls.fsconfig_set_string(fs_fd, "source", source)
        # A read-only superblock: without it the block device is opened for writing, which
        # a read-only loop device refuses (EACCES).
        syscalls.fsconfig_set_flag(fs_fd, "ro")
        try:
            syscalls.fsconfig_create(fs_fd)
        except OSError as e:
            e.strerror = _describe(e, fs_fd)
            raise
        return syscalls.fsmount(fs_fd, syscalls.FSMOUNT_CLOEXEC, MOUNT_ATTRS)
    finally:
        os.close(fs_fd)


def _source_of(path: str, fd: int) -> str:
    """``path`` if fsconfig can take it, else the magic link of an fd we hold on it."""
    if len(os.fsencode(path)) <= _FSCONFIG_STRING_MAX:
        return path
    return f"/proc/self/fd/{fd}"


def _file_backed(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _erofs_mount(_source_of(path, fd), path)
    finally:
        os.close(fd)


def mount_file_backed(path: str) -> int:
    """Mount the image file directly (kernels with file-backed erofs, 6.12+)."""
    try:
        return _file_backed(path)
    except OSError as e:
        if e.errno == errno.ENOTBLK:
            raise ImageMountError(f"cannot mount snapshot image {path}: this kernel mounts erofs only from "
                                  "block devices (no CONFIG_EROFS_FS_BACKED_BY_FILE)") from None
        raise ImageMountError(f"cannot mount snapshot image {path}: {e.strerror}") from None


def _loop_info(path: str) -> bytes:
    name = os.fsencode(path)[-(LO_NAME_SIZE - 1):]
    return _LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR, name, b"", b"", 0, 0)


def _attach_loop(path: str, image_fd: int) -> tuple[int, str]:
    """A free loop device bound read-only (autoclear) to ``image_fd``: (open fd, /dev/loopN)."""
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise ImageMountError(f"cannot mount snapshot image {path}: the kernel reads images only through "
                              f"loop devices and /dev/loop-control is unusable ({e.strerror})") from None
    try:
        for _ in range(32):  # another process may take the free device first (EBUSY): retry
            number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            device = f"/dev/loop{number}"
            try:
                loop_fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # no devtmpfs node yet
                time.sleep(0.01)
                continue
            try:
                config = _LOOP_CONFIG.pack(image_fd, 0, _loop_info(path))
                try:
                    fcntl.ioctl(loop_fd, LOOP_CONFIGURE, config)
                except OSError as e:
                    if e.errno == errno.EBUSY:
                        os.close(loop_fd)
                        continue
                    if e.errno not in (errno.EINVAL, errno.ENOTTY):
                        raise
                    # No LOOP_CONFIGURE (before 5.8): the two-step way.
                    try:
                        fcntl.ioctl(loop_fd, LOOP_SET_FD, image_fd)
                    except OSError as e2:
                        if e2.errno == errno.EBUSY:
                            os.close(loop_fd)
                            continue
                        raise
                    try:
                        fcntl.ioctl(loop_fd, LOOP_SET_STATUS64, _loop_info(path))
                    except OSError:
                        fcntl.ioctl(loop_fd, LOOP_CLR_FD)
                        raise
                return loop_fd, device
            except OSError as e:
                os.close(loop_fd)
                raise ImageMountError(f"cannot set up loop device {device} for snapshot image {path}: "
                                      f"{e.strerror}") from None
        raise ImageMountError(f"cannot find a free loop device for snapshot image {path}")
    finally:
        os.close(ctl)


def mount_loop(path: str) -> int:
    """Mount the image through a read-only, autoclear loop device."""
    try:
        image_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ImageMountError(f"cannot open snapshot image {path}: {e.strerror}") from None
    try:
        loop_fd, device = _attach_loop(path, image_fd)
    finally:
        os.close(image_fd)  # the loop device holds its own reference to the file
    try:
        return _erofs_mount(device, path)
    except OSError as e:
        raise ImageMountError(f"cannot mount snapshot image {path} (through {device}): {e.strerror}") from None
    finally:
        # Until the superblock holds the device, this fd keeps autoclear from detaching it;
        # closed now, the device goes away with the mount (or right now if mounting failed).
        os.close(loop_fd)


def mount_image(path: str, *, file_backed: bool = True) -> int:
    """A detached read-only (nosuid, nodev) mount of the EROFS image ``path``: its fd.

    File-backed where the kernel can (no loop device to leak or run out of), else a loop
    device; ``file_backed=False`` goes straight to the loop device.  (Seen on 6.18 built
    with CONFIG_EXT4_DEBUG: erofs reads the metadata of a file-backed image with
    read_cache_folio, which takes no invalidate_lock, and a page-cache miss on an image
    stored on ext4 trips the debug-only WARN_ON_ONCE in ext4_check_map_extents_env,
    tainting the kernel once per boot.  A loop device reads through read_iter, whose
    readahead holds that lock, so it should not; not verified here.)  Failures raise
    :class:`ImageMountError` with the kernel's explanation.
    """
    if file_backed:
        try:
            return _file_backed(path)
        except OSError as e:
            if e.errno != errno.ENOTBLK:
                raise ImageMountError(f"cannot mount snapshot image {path}: {e.strerror}") from None
    return mount_loop(path)
