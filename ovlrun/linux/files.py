"""The two file rules every part of ovlrun shares: which files root may trust, and how a
file is replaced.

Light on purpose (os and stat only): the launch path uses both.
"""

from __future__ import annotations

import os
import stat

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


def temporary_name(path: str) -> str:
    """A fresh hidden sibling of ``path`` (``.NAME.RANDOM.tmp``) for an atomic replace."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{os.urandom(6).hex()}.tmp")


def is_temporary_of(name: str, target_name: str) -> bool:
    """Is ``name`` a leftover :func:`temporary_name` of ``target_name`` (a writer killed
    between creating and renaming it)?"""
    return name.startswith(f".{target_name}.") and name.endswith(".tmp")


def write_atomic(path: str, data: bytes, mode: int = 0o644, dir_fd: int | None = None) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never
    a part, and a crash (power loss included) leaves one of the two.

    A fresh temporary name (O_EXCL, O_NOFOLLOW) so concurrent writers and symlinks
    planted in the directory cannot redirect the write; fsync before rename(2) so the
    rename never publishes a file whose data is not on disk.  On failure (a full disk)
    the temporary file is removed.  With ``dir_fd``, ``path`` is relative to that
    directory (a directory reached without following symlinks).
    """
    tmp = temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, mode)  # the umask must not decide who can read it
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
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
