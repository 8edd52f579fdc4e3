"""Mounting a snapshot image (EROFS) as a detached, read-only mount.

Two ways, chosen by behaviour, never by kernel version:

* file-backed: ``fsopen("erofs")`` with ``source`` = the image file.  Kernels built with
  ``CONFIG_EROFS_FS_BACKED_BY_FILE`` (6.12+) read the file directly; others refuse a
  non-block source with ENOTBLK at ``FSCONFIG_CMD_CREATE``;
* a read-only loop device: ``LOOP_CTL_GET_FREE`` on /dev/loop-control, then
  ``LOOP_CONFIGURE`` (5.8+; ``LOOP_SET_FD`` + ``LOOP_SET_STATUS64`` where it is missing)
  with ``LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR``, and ``source=/dev/loopN``.  Autoclear
  detaches the device when its last user goes: our descriptor (closed once the
  superblock holds the device) and then the mount, e.g. with the job's namespace.  One
  device per image, shared by every job that mounts it (they then share one superblock
  too): a device already bound to the image is found and reused, so a user's 30 jobs of
  a 10-path profile hold 10 devices, not 300.

The result is an fsmount(2) descriptor (``MOUNT_ATTR_RDONLY|NOSUID|NODEV``) for
``move_mount`` or for use as an overlay layer (``FSCONFIG_SET_FD``).  The image is given
as an fd the caller opened (and trust-checked): nothing here resolves its path.  Failures
raise :class:`ImageMountError`, whose text is the kernel's reason in words; the caller
names the image.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time

from ovlrun.linux import syscalls

# <linux/loop.h>
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_NAME_SIZE = 64
LOOP_ATTEMPTS = 32  # another process may take the free device first (EBUSY): try the next

# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (u64),
# lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (u32), lo_file_name[64],
# lo_crypt_name[64], lo_encrypt_key[32], lo_init[2] (u64): 232 bytes.
_LOOP_INFO64 = struct.Struct("<QQQQQIIII64s64s32sQQ")
# struct loop_config: fd, block_size (u32), loop_info64, __reserved[8] (u64): 304 bytes.
_LOOP_CONFIG = struct.Struct(f"<II{_LOOP_INFO64.size}s64x")

MOUNT_ATTRS = syscalls.MOUNT_ATTR_RDONLY | syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV
# How mount_image may mount: file-backed where the kernel can, else a loop device ("auto");
# or only one way (tests, and a store whose filesystem erofs cannot read directly).
AUTO, FILE_BACKED, LOOP = "auto", "file", "loop"


class ImageMountError(syscalls.SyscallError):
    """The kernel would not mount the image: ``errno``, the ``call`` that failed and, as
    ``str()``, the reason in words (without the image's name: the caller adds it)."""

    def __init__(self, errno: int, call: str, path: str | None = None, detail: str = "") -> None:
        super().__init__(errno, call, path, detail)

    def __str__(self) -> str:
        return self.detail or self.strerror or super().__str__()


def _refused(e: OSError, detail: str | None = None) -> ImageMountError:
    return ImageMountError(e.errno or 0, getattr(e, "call", "mount"), e.filename,
                           e.strerror or "" if detail is None else detail)


def _describe(e: OSError, fs_fd: int) -> str:
    """errno text plus what the kernel queued on the fs context (erofs logs most refusals
    to the kernel log instead: say so for the usual "not an image" EINVAL)."""
    parts = [e.strerror or os.strerror(e.errno or 0), *syscalls.read_fs_log(fs_fd)]
    if e.errno == errno.EINVAL and len(parts) == 1:
        parts.append("not a valid EROFS image? (the kernel log says why)")
    return "; ".join(parts)


def _erofs_mount(source: str) -> int:
    """fsopen/fsconfig/fsmount of erofs on ``source``: the detached mount's fd."""
    try:
        fs_fd = syscalls.fsopen("erofs")
    except OSError as e:
        if e.errno == errno.ENODEV:
            raise _refused(e, "the kernel has no erofs file system (modprobe erofs?)") from None
        raise _refused(e, str(e)) from None
    try:
        syscalls.fsconfig_set_string(fs_fd, "source", source)
        # A read-only superblock: without it the block device is opened for writing, which
        # a read-only loop device refuses (EACCES).
        syscalls.fsconfig_set_flag(fs_fd, "ro")
        try:
            syscalls.fsconfig_create(fs_fd)
        except OSError as e:
            raise _refused(e, _describe(e, fs_fd)) from None
        return syscalls.fsmount(fs_fd, syscalls.FSMOUNT_CLOEXEC, MOUNT_ATTRS)
    except ImageMountError:
        raise
    except OSError as e:
        raise _refused(e) from None
    finally:
        os.close(fs_fd)


def _loop_info(name: str) -> bytes:
    raw = os.fsencode(name)[-(LO_NAME_SIZE - 1):]
    return _LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR, raw, b"", b"", 0, 0)


def _bind_loop(loop_fd: int, image_fd: int) -> None:
    """Bind the loop device ``loop_fd`` read-only and autoclear to ``image_fd``: in one
    step (LOOP_CONFIGURE), or in two where the kernel lacks it (before 5.8)."""
    info = _loop_info(f"/proc/self/fd/{image_fd}")
    try:
        fcntl.ioctl(loop_fd, LOOP_CONFIGURE, _LOOP_CONFIG.pack(image_fd, 0, info))
        return
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
    fcntl.ioctl(loop_fd, LOOP_SET_FD, image_fd)
    try:
        fcntl.ioctl(loop_fd, LOOP_SET_STATUS64, info)
    except OSError:
        fcntl.ioctl(loop_fd, LOOP_CLR_FD)
        raise


def _attach_loop(image_fd: int) -> tuple[int, str]:
    """A free loop device bound read-only (autoclear) to ``image_fd``: (open fd, /dev/loopN)."""
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise _refused(e, "the kernel reads images only through loop devices and /dev/loop-control "
                       f"is unusable ({e.strerror})") from None
    try:
        for _ in range(LOOP_ATTEMPTS):
            device = f"/dev/loop{fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)}"
            try:
                loop_fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # no devtmpfs node yet
                time.sleep(0.01)
                continue
            try:
                _bind_loop(loop_fd, image_fd)
            except OSError as e:
                os.close(loop_fd)
                if e.errno == errno.EBUSY:  # taken by another process meanwhile
                    continue
                raise ImageMountError(e.errno or 0, "loop setup", device,
                                      f"cannot set up loop device {device}: {e.strerror}") from None
            return loop_fd, device
        raise ImageMountError(errno.EBUSY, "loop setup", None, "no free loop device")
    finally:
        os.close(ctl)


def _mount_loop(image_fd: int) -> int:
    """Mount the image through its loop device: the one already bound to it, else a new
    one.  Under an flock of the image file (every launch opens the same file), so two
    launches never bind two devices to one image."""
    fcntl.flock(image_fd, fcntl.LOCK_EX)
    try:
        loop_fd, device = _bound_loop(image_fd) or _attach_loop(image_fd)
        try:
            return _erofs_mount(device)
        finally:
            # Until the superblock holds the device, this fd keeps autoclear from detaching
            # it; closed now, the device goes away with the last mount of the image (or
            # right now if mounting failed and nobody else uses it).
            os.close(loop_fd)
    finally:
        fcntl.flock(image_fd, fcntl.LOCK_UN)


def _bound_loop(image_fd: int) -> tuple[int, str] | None:
    """A loop device already bound read-only and autoclear to the image ``image_fd``
    (same device and inode, whole file), open: (fd, /dev/loopN); None if there is none.

    The device is kept open from the check to the mount: an opener keeps autoclear from
    detaching it, so it cannot be rebound to another file in between.  Only bound devices
    are looked at (``/sys/block/loopN/loop`` exists): one open and one ioctl each.
    """
    st = os.fstat(image_fd)
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return None
    want = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR
    for name in names:
        if not name.startswith("loop") or not os.path.exists(f"/sys/block/{name}/loop"):
            continue
        device = f"/dev/{name}"
        try:
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # being cleared (ENXIO), or no node
            continue
        try:
            info = _LOOP_INFO64.unpack(fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_LOOP_INFO64.size)))
        except OSError:  # unbound meanwhile
            os.close(fd)
            continue
        lo_device, lo_inode, _, lo_offset, lo_sizelimit, _, _, _, lo_flags = info[:9]
        if (lo_device, lo_inode, lo_offset, lo_sizelimit) == (st.st_dev, st.st_ino, 0, 0) and lo_flags & want == want:
            return fd, device
        os.close(fd)
    return None


def mount_image(image_fd: int, how: str = AUTO) -> int:
    """A detached read-only (nosuid, nodev) mount of the EROFS image open at ``image_fd``:
    its fd.

    File-backed where the kernel can (no loop device to leak or run out of), else a loop
    device; ``how`` forces one of the two (FILE_BACKED fails with ENOTBLK where the kernel
    cannot).  (Seen on 6.18 built with CONFIG_EXT4_DEBUG: erofs reads the metadata of a
    file-backed image with read_cache_folio, which takes no invalidate_lock, and a
    page-cache miss on an image stored on ext4 trips the debug-only WARN_ON_ONCE in
    ext4_check_map_extents_env, tainting the kernel once per boot.  A loop device reads
    through read_iter, whose readahead holds that lock, so it should not; not verified
    here.)  Failures raise :class:`ImageMountError` with the kernel's explanation.
    """
    global _file_backed_refused
    if how == LOOP or (how == AUTO and _file_backed_refused):
        return _mount_loop(image_fd)
    try:
        # The magic link of the fd: the kernel opens exactly the file we checked, and no
        # path length limit applies (fsconfig strings stop at FSCONFIG_STRING_MAX).
        return _erofs_mount(f"/proc/self/fd/{image_fd}")
    except ImageMountError as e:
        if e.errno != errno.ENOTBLK:
            raise
        if how == FILE_BACKED:
            raise ImageMountError(e.errno, e.call, None, "this kernel mounts erofs only from block devices "
                                  "(no CONFIG_EROFS_FS_BACKED_BY_FILE)") from None
        # Once per process: a launch mounting 20 images asks the kernel once.
        _file_backed_refused = True
    return _mount_loop(image_fd)


_file_backed_refused = False  # this kernel refused a file-backed mount (ENOTBLK)
