"""The file rules every part of ovlrun shares: which files root may trust, the one way
it opens them (:func:`open_trusted`), the one way it opens a release directory on the
shared tree (:func:`open_release`), and how a file is replaced (:func:`write_atomic`).

Light on purpose (os, stat and the syscall wrappers): the launch path uses all of them.
"""

from __future__ import annotations

import errno
import os
import stat

from ovlrun.linux import syscalls

# Masks for :func:`trust_problem`: what group and others may not do.
NOT_WRITABLE = 0o022  # configuration root reads: profiles, the store's directories, job records
PRIVATE = 0o077  # private to root: snapshot directories, cached plans


def trust_problem(st: os.stat_result, closed: int = NOT_WRITABLE, uid: int = 0, owner: str = "root") -> str | None:
    """Why root must not trust the file ``st`` describes, or None if it may.

    Root may trust what only the trusted account (root, unless ``uid``/``owner`` name
    another: published images on a root-squashed NFS export) could have written: owned
    by it and without the permission bits in ``closed`` for group and others.
    """
    if st.st_uid != uid:
        return f"owned by uid {st.st_uid}, not {owner}"
    if st.st_mode & closed:
        what = "writable by group or others" if closed == NOT_WRITABLE else "open to group or others"
        return f"mode {stat.filemode(st.st_mode)} is {what}"
    return None


class UntrustedError(Exception):
    """:func:`open_trusted` refused what it opened: ``problem`` says why ("not a regular
    file", or :func:`trust_problem`'s words), ``wrong_type`` whether it was the type (not
    the owner or mode); the caller names the file in its message."""

    def __init__(self, path: str, problem: str, wrong_type: bool = False) -> None:
        super().__init__(path, problem, wrong_type)
        self.path = path
        self.problem = problem
        self.wrong_type = wrong_type

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def open_trusted(path: str, *, dir_fd: int | None = None, directory: bool = False, closed: int = NOT_WRITABLE,
                 uid: int | None = 0, owner: str = "root", follow_symlinks: bool = False) -> int:
    """Open a file (or, with ``directory``, a directory) whose content root will act on,
    and return the fd once it passed the checks; the checks apply to the fd that is then
    read or mounted, never to a name that could be swapped afterwards.

    - ``O_NOFOLLOW`` (unless ``follow_symlinks``): a symlink planted under the name fails
      with ELOOP (ENOTDIR for a directory) instead of being followed;
    - ``O_NONBLOCK``: a FIFO planted under the name must not block the open (the type
      check refuses it); a regular file is switched back to blocking before it is returned;
    - type: a regular file, or a directory;
    - owner and mode (:func:`trust_problem`): owned by ``uid`` (root unless another account
      is named: published images on a root-squashed export, ``owner`` names it in the
      message), none of the bits in ``closed`` for group and others.  ``uid=None`` skips
      this rule (a caller that reports it rather than refusing, e.g. ``profile check``).

    ``path`` is relative to ``dir_fd`` if given.  Raises the open's ``OSError`` as it is
    (FileNotFoundError for a missing file) and :class:`UntrustedError` for a refusal.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags if follow_symlinks else flags | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not (stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)):
            raise UntrustedError(path, "not a directory" if directory else "not a regular file", wrong_type=True)
        problem = None if uid is None else trust_problem(st, closed, uid, owner)
        if problem is not None:
            raise UntrustedError(path, problem)
        if not directory:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_from_root(path: str, flags: int = os.O_PATH | os.O_DIRECTORY) -> int:
    """Open the absolute ``path`` from ``/`` following no symlink on the way (ELOOP, or
    ENOTDIR on the fallback walk), never through ``..`` (EXDEV); mount points on the way
    are crossed.  For what the administrator names by its real path: a tree root, the
    published image directory."""
    if not path.startswith("/"):
        raise syscalls.SyscallError(errno.EINVAL, "open_from_root", path)
    if not path.strip("/"):
        return os.open("/", flags | os.O_CLOEXEC)
    slash = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return syscalls.open_beneath(slash, path.strip("/"), flags)
    finally:
        os.close(slash)


class TreeRootError(syscalls.SyscallError):
    """:func:`open_release` could not open the tree root itself (from /, following no
    symlink); its errno says why (ELOOP: a symlink on the way to it)."""


def open_release(root: str, relative: str, flags: int = os.O_PATH | os.O_DIRECTORY) -> int:
    """Open the release directory ``relative`` below the tree root ``root`` (the root's
    real path, as a build records it) the one way root trusts one: build (the walk and
    the inode it records), fetch (a published manifest's source identity checked against
    this node) and launch (the directory an overlay is mounted on) all reach it so, so
    they agree on which directory it is.

    - the tree root is opened from ``/`` following no symlink (:func:`open_from_root`):
      a parent directory swapped for a symlink (to ``/``, say) cannot move the release;
      mount points on the way (the tree's own NFS mount, an automounter's) are crossed;
    - the rest below it following no symlink, never leaving it (``..``) and never
      crossing into another mount (``RESOLVE_NO_XDEV``): a FUSE file system a user
      mounted on their own release is not the tree's release.

    ``openat2`` where the kernel has it, else an ``O_NOFOLLOW`` walk (the same lookups as
    a plain open of the whole path: no extra round trip to the shared tree).  Raises
    :class:`TreeRootError` for the root's part, the call's ``OSError`` for the rest
    (ELOOP: a symlink; EXDEV: ``..`` or another mount; ENOENT, ENOTDIR: missing).
    """
    try:
        root_fd = open_from_root(root)
    except OSError as e:
        raise TreeRootError(e.errno or 0, "open tree root", root) from None
    try:
        return syscalls.open_beneath(root_fd, relative, flags, no_xdev=True)
    finally:
        os.close(root_fd)


def temporary_name(path: str) -> str:
    """A fresh hidden sibling of ``path`` (``.NAME.RANDOM.tmp``) for an atomic replace."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{os.urandom(6).hex()}.tmp")


def is_temporary_of(name: str, target_name: str) -> bool:
    """Is ``name`` a leftover :func:`temporary_name` of ``target_name`` (a writer killed
    between creating and renaming it)?"""
    return name.startswith(f".{target_name}.") and name.endswith(".tmp")


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (os.write may write less than it is given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_atomic(path: str, data: bytes, mode: int = 0o644, dir_fd: int | None = None,
                 owner: tuple[int, int] | None = None, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never
    a part, and a crash (power loss included) leaves one of the two.

    A fresh temporary name (O_EXCL, O_NOFOLLOW) so concurrent writers and symlinks
    planted in the directory cannot redirect the write; fsync before rename(2) so the
    rename never publishes a file whose data is not on disk.  On failure (a full disk)
    the temporary file is removed.  With ``dir_fd``, ``path`` is relative to that
    directory (a directory reached without following symlinks).  With ``owner`` (uid,
    gid; -1 keeps root's), the file is given to that account before it appears under
    ``path``.  ``durable=False`` skips the fsync (and the wait for a disk) for a file that
    need not survive a crash: readers still see the old or the new file.
    """
    tmp = temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, mode)  # the umask must not decide who can read it
            if owner is not None:
                os.fchown(fd, *owner)
            write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
