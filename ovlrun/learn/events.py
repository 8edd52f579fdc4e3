"""What a tracer reports, in one shape whichever tracer it came from.

The syscalls that look a path up (:data:`LOOKUP_SYSCALLS`), named as strace names them
on x86_64 (the kernel's ``newstat`` is strace's ``stat``), with where each keeps its
path, directory fd and flags; the kernel's tracepoint argument names are in
:mod:`ovlrun.learn.bpftrace`.  A tracer's output becomes :class:`Raw` records (one
per syscall, fork, exit), :mod:`ovlrun.learn.resolve` turns those into :class:`Lookup`
records with absolute paths, and everything after that (attribution, reports,
proposals) sees only lookups.
"""

from __future__ import annotations

import errno
from typing import NamedTuple

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
O_DIRECTORY = 0o200000
O_PATH = 0o10000000
O_CLOEXEC = 0o2000000


class Syscall(NamedTuple):
    name: str  # as strace prints it
    kind: str  # open, stat, access, exec, readlink, chdir
    has_dirfd: bool  # *at: the path is relative to a directory fd (AT_FDCWD: the cwd)


LOOKUP_SYSCALLS: tuple[Syscall, ...] = (
    Syscall("open", "open", False),
    Syscall("openat", "open", True),
    Syscall("openat2", "open", True),
    Syscall("creat", "open", False),
    Syscall("stat", "stat", False),
    Syscall("lstat", "stat", False),
    Syscall("newfstatat", "stat", True),
    Syscall("statx", "stat", True),
    Syscall("access", "access", False),
    Syscall("faccessat", "access", True),
    Syscall("faccessat2", "access", True),
    Syscall("execve", "exec", False),
    Syscall("execveat", "exec", True),
    Syscall("readlink", "readlink", False),
    Syscall("readlinkat", "readlink", True),
    Syscall("chdir", "chdir", False),
)
BY_NAME = {s.name: s for s in LOOKUP_SYSCALLS}
# Not lookups, but they move a process's working directory or make new processes, which
# the resolver must follow to make relative paths absolute.
FCHDIR = "fchdir"
PROCESS_SYSCALLS = ("clone", "clone3", "fork", "vfork")


class Raw(NamedTuple):
    """One record from a tracer, before paths are resolved.

    ``what`` is "lookup", "fork" (``ret`` is the child's id), "exit", "fchdir", "dup"
    (``ret`` is a copy of descriptor ``dirfd``), "untracked" (a child the tracer could
    not follow) or "first" (the job's first process: its id as the tracer sees it).  ``ret`` is the syscall's
    return value (a negative errno on failure).  ``dirpath`` is set when the tracer
    itself knew what ``dirfd`` (or, for AT_FDCWD, the working directory) was: strace -y.
    """

    what: str
    syscall: str
    pid: int  # process (thread group) id
    tid: int
    ret: int
    dirfd: int = AT_FDCWD
    flags: int = 0
    path: str = ""
    dirpath: str | None = None
    truncated: bool = False  # the tracer cut the path short (bpftrace before 0.21: ~200 bytes)


class Lookup(NamedTuple):
    """One path lookup of the job, resolved as far as the tracer allowed."""

    syscall: str
    kind: str  # open, diropen (O_DIRECTORY or O_PATH: no file data), stat, access, exec, readlink, chdir
    pid: int
    path: str  # absolute when ``exact`` or ``truncated``; else as given (relative, unresolved)
    error: int  # 0, or the errno
    exact: bool
    truncated: bool = False

    @property
    def result(self) -> str:
        return "ok" if not self.error else errno.errorcode.get(self.error, str(self.error))

    @property
    def data_open(self) -> bool:
        """A successful open of file data: served through the redirect to the shared tree
        even inside a localised path (the floor every open pays)."""
        return not self.error and self.kind in ("open", "exec")


def lookup_kind(syscall: str, flags: int) -> str:
    kind = BY_NAME[syscall].kind
    if kind == "open" and flags & (O_DIRECTORY | O_PATH):
        return "diropen"
    return kind


def is_fd_only(syscall: str, flags: int, path: str) -> bool:
    """fstat(2) as glibc spells it (newfstatat/statx(fd, "", AT_EMPTY_PATH)), fexecve and
    friends: no path is looked up."""
    return not path and bool(flags & AT_EMPTY_PATH)
