"""Typed ctypes wrappers for the mount-related syscalls Python's stdlib lacks.

This is the only module that talks to libc through ctypes (cf. mkosi's ``sandbox.py``).
Python 3.11 has no ``os.unshare``/``os.setns``/``mount``; glibc >= 2.36 exports the new
mount API (fsopen/fsconfig/fsmount/move_mount), older ones do not, so those calls fall
back to ``syscall(2)``: their numbers (428-432) are the same on every architecture,
being allocated after the syscall tables were unified (alpha aside).  Every failure becomes a
:class:`SyscallError` (an ``OSError``) carrying the call, the path and the errno; its text
reads ``mount(/sw/a): Permission denied``.  Modules of ``linux/`` raise it (or a subclass)
and never compose sentences for the user: the caller adds its context once, turning it
into :class:`OvlrunError` (no message is ever parsed again).
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: typing costs ~10 ms to import on the launch path
    from collections.abc import Callable
    from typing import Any

# <sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000

# <sys/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 2

# <linux/mount.h>, new mount API
FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 0x1
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
AT_FDCWD = -100
# fsconfig(2) copies string values of at most 256 bytes, the NUL included.
FSCONFIG_STRING_MAX = 255

# Fallback syscall numbers, used only when libc lacks the wrapper (glibc < 2.36).  Since
# Linux 5.1 new syscalls get one number on every architecture but alpha (asm-generic/unistd.h).
_GENERIC_NUMBERS = {
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
}

_libc = ctypes.CDLL(None, use_errno=True)


class SyscallError(OSError):
    """A failed syscall: ``errno``, ``call``, ``filename`` (the path, if any) and an optional
    ``detail`` (what the kernel said besides the errno, e.g. an fs context's log).
    ``str()`` reads ``call(path): strerror (detail)``.  Crosses process boundaries (pickle)
    with its class and fields."""

    def __init__(self, errno: int, call: str, path: str | None = None, detail: str = "") -> None:
        super().__init__(errno, os.strerror(errno), path)
        self.call = call
        self.detail = detail

    def __str__(self) -> str:
        where = f"({self.filename})" if self.filename else ""
        return f"{self.call}{where}: {self.strerror}" + (f" ({self.detail})" if self.detail else "")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errno, self.call, self.filename, self.detail))

    @classmethod
    def of(cls, e: OSError, call: str, detail: str = "") -> SyscallError:
        """``e`` (any OSError, e.g. from ``os``) as a SyscallError of ``call``."""
        return cls(e.errno or 0, getattr(e, "call", call), e.filename, detail)


def _function(name: str, argtypes: list[Any]) -> Callable[..., int]:
    """Return libc's wrapper for ``name`` or a ``syscall(2)`` shim with the same ABI."""
    try:
        fn = getattr(_libc, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
        return fn  # type: ignore[no-any-return]
    except AttributeError:
        pass
    number = _GENERIC_NUMBERS[name]  # KeyError: a call every libc has (unshare, mount, ...)
    raw = _libc.syscall
    raw.restype = ctypes.c_long

    def shim(*args: Any) -> int:
        converted = (t(a) if a is not None else None for t, a in zip(argtypes, args, strict=True))
        return int(raw(ctypes.c_long(number), *converted))

    return shim


_c_str = ctypes.c_char_p
_c_int = ctypes.c_int
_c_uint = ctypes.c_uint
_c_ulong = ctypes.c_ulong

_unshare = _function("unshare", [_c_int])
_prctl = _function("prctl", [_c_int, _c_ulong, _c_ulong, _c_ulong, _c_ulong])
_setns = _function("setns", [_c_int, _c_int])
_mount = _function("mount", [_c_str, _c_str, _c_str, _c_ulong, _c_str])
_umount2 = _function("umount2", [_c_str, _c_int])
_fsopen = _function("fsopen", [_c_str, _c_uint])
_fsconfig = _function("fsconfig", [_c_int, _c_uint, _c_str, _c_str, _c_int])
_fsmount = _function("fsmount", [_c_int, _c_uint, _c_uint])
_move_mount = _function("move_mount", [_c_int, _c_str, _c_int, _c_str, _c_uint])


def _bytes(path: str | bytes | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def _check(result: int, call: str, path: str | bytes | None = None) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise SyscallError(errno, call, os.fsdecode(path) if path is not None else None)
    return result


def unshare(flags: int) -> None:
    _check(_unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_setns(fd, nstype), "setns")


# <linux/prctl.h>: the process attributes a launch sets.  prctl(2) is called directly
# (every argument given, unused ones 0: PR_SET_NO_NEW_PRIVS refuses anything else) rather
# than through python-prctl, whose import costs a launch ~1.5 ms.
PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
PR_SET_KEEPCAPS = 8
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def get_pdeathsig() -> int:
    """The parent-death signal (0: none)."""
    signal = ctypes.c_int(0)
    prctl(PR_GET_PDEATHSIG, ctypes.addressof(signal))
    return signal.value


def set_pdeathsig(signal: int) -> None:
    prctl(PR_SET_PDEATHSIG, signal)


def last_capability() -> int:
    """The highest capability number this kernel knows: the last one the bounding set
    can be asked about (PR_CAPBSET_READ says EINVAL past it)."""
    cap = 0
    while True:
        try:
            prctl(PR_CAPBSET_READ, cap + 1)
        except OSError as e:
            if e.errno == _errno.EINVAL:
                return cap
            raise
        cap += 1


def mount(source: str | bytes | None, target: str | bytes, fstype: str | bytes | None, flags: int,
          data: str | bytes | None = None) -> None:
    _check(_mount(_bytes(source), _bytes(target), _bytes(fstype), flags, _bytes(data)), "mount", target)


def umount2(target: str | bytes, flags: int = 0) -> None:
    _check(_umount2(_bytes(target), flags), "umount2", target)


def fsopen(fstype: str, flags: int = FSOPEN_CLOEXEC) -> int:
    return _check(_fsopen(fstype.encode(), flags), f"fsopen({fstype})")


def fsconfig_set_string(fd: int, key: str, value: str | bytes) -> None:
    _check(_fsconfig(fd, FSCONFIG_SET_STRING, key.encode(), _bytes(value), 0), f"fsconfig {key}", value)


def fsconfig_set_flag(fd: int, key: str) -> None:
    _check(_fsconfig(fd, FSCONFIG_SET_FLAG, key.encode(), None, 0), f"fsconfig {key}")


def fsconfig_set_fd(fd: int, key: str, value_fd: int, path: str | bytes | None = None) -> None:
    _check(_fsconfig(fd, FSCONFIG_SET_FD, key.encode(), None, value_fd), f"fsconfig {key}", path)


def fsconfig_create(fd: int) -> None:
    _check(_fsconfig(fd, FSCONFIG_CMD_CREATE, None, None, 0), "fsconfig create")


def fsmount(fd: int, flags: int = FSMOUNT_CLOEXEC, attr_flags: int = 0) -> int:
    return _check(_fsmount(fd, flags, attr_flags), "fsmount")


def move_mount(from_fd: int, to_path: str | bytes) -> None:
    """Attach the detached mount ``from_fd`` at ``to_path``."""
    _check(_move_mount(from_fd, b"", AT_FDCWD, _bytes(to_path), MOVE_MOUNT_F_EMPTY_PATH), "move_mount", to_path)


def move_mount_onto_fd(from_fd: int, to_fd: int, what: str | bytes | None = None) -> None:
    """Attach the detached mount ``from_fd`` on the directory ``to_fd`` refers to (no path walk)."""
    _check(_move_mount(from_fd, b"", to_fd, b"", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH), "move_mount", what)


def read_fs_log(fd: int) -> list[str]:
    """Drain the messages the kernel queued on an fs context (see fsopen(2)).

    overlayfs explains most refusals only here ("e overlay: ..."), not in errno.
    """
    messages: list[str] = []
    while True:
        try:
            data = os.read(fd, 1024)
        except OSError:  # ENODATA: queue empty
            break
        if not data:
            break
        messages.append(data.decode(errors="replace").strip())
    return messages


# openat2(2): glibc has no wrapper; 437 is its number on every architecture (it was added
# after the syscall tables were unified).  struct open_how { u64 flags, mode, resolve; }.
SYS_OPENAT2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
# Linux 5.12+ (EINVAL before): the walk uses only what the dentry cache already holds and
# fails with EAGAIN where it would have to ask a file system (a lookup, a revalidation, an
# automount), so it never waits on a server.
RESOLVE_CACHED = 0x20


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def openat2(dir_fd: int, path: str | bytes, flags: int, resolve: int) -> int:
    """openat2(dir_fd, path, {flags, 0, resolve}); raises SyscallError (ENOSYS on < 5.6)."""
    how = _OpenHow(flags, 0, resolve)
    result = _syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dir_fd), ctypes.c_char_p(os.fsencode(path)),
                      ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    return _check(int(result), "openat2", path)


def open_beneath(dir_fd: int, path: str, flags: int, *, no_xdev: bool = False) -> int:
    """Open ``path`` relative to ``dir_fd`` following no symlink and never leaving it.

    openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH) where the kernel has it; otherwise an
    O_NOFOLLOW walk, one component at a time (same result, same lookups).  A symlink on
    the way fails with ELOOP (or ENOTDIR on the walk), '..' with EXDEV.  With
    ``no_xdev`` (RESOLVE_NO_XDEV) crossing into another mount fails with EXDEV too.
    """
    resolve = RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH | (RESOLVE_NO_XDEV if no_xdev else 0)
    try:
        return openat2(dir_fd, path, flags | os.O_CLOEXEC, resolve)
    except OSError as e:
        if e.errno not in (_errno.ENOSYS, _errno.EPERM):  # kernel < 5.6, or a seccomp filter
            raise
    parts = [p for p in path.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise SyscallError(_errno.EXDEV, "open_beneath", path)  # as openat2 would say
    mount = mount_id(dir_fd) if no_xdev else 0
    fd = dir_fd
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            step = flags if last else os.O_PATH | os.O_DIRECTORY
            nxt = os.open(part, step | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            if fd != dir_fd:
                os.close(fd)
            fd = nxt
            if no_xdev and mount_id(fd) != mount:
                raise SyscallError(_errno.EXDEV, "open_beneath", path)
    except BaseException:
        if fd != dir_fd:
            os.close(fd)
        raise
    return fd


def mount_id(fd: int) -> int:
    """The id of the mount ``fd`` is on (``mnt_id`` in /proc/self/fdinfo, Linux 3.15+)."""
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    raise SyscallError(_errno.ENOSYS, "mount_id", f"/proc/self/fdinfo/{fd}")
