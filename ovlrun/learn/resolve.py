"""Making a traced job's relative paths absolute.

A lookup names its path relative to the process's working directory or to a directory
fd (``openat(dirfd, "lib/x.so")``).  strace prints what those were at the time
(``-y``: ``AT_FDCWD</w>``, ``3</sw/app>``); bpftrace on syscall tracepoints cannot
(no ``d_path`` there), so the :class:`Resolver` follows the job itself: the first
process starts in the directory learn started it in, a forked process inherits its
parent's directory and descriptors, ``chdir``/``fchdir`` move it, a successful open
makes its fd name the opened path, an exec closes close-on-exec fds.  What it cannot
know (a descriptor made by dup(2), a socket, one inherited from outside the job) leaves
the lookup unresolved: counted and reported, never guessed.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

from ovlrun.learn.events import AT_FDCWD, BY_NAME, FCHDIR, O_CLOEXEC, Lookup, Raw, is_fd_only, lookup_kind

MAX_FDS_PER_PROCESS = 4096  # bounded memory for a job that opens (and never closes) a lot


class _Process:
    __slots__ = ("cwd", "fds")

    def __init__(self, cwd: str | None, fds: dict[int, tuple[str, bool]]) -> None:
        self.cwd = cwd  # None: unknown
        self.fds = fds  # fd -> (absolute path, close-on-exec)


def absolute(base: str | None, path: str) -> str | None:
    """``path`` made absolute against ``base`` and lexically normalised ('.', '..', '//'),
    or None if it is relative and ``base`` is unknown."""
    if not path.startswith("/"):
        if base is None:
            return None
        path = base + "/" + path
    normal = posixpath.normpath(path)
    return "/" + normal.lstrip("/")  # normpath keeps a leading '//'


class Resolver:
    """Feeds on :class:`Raw` records in the order the job made them; yields lookups."""

    def __init__(self, cwd: str | None) -> None:
        self.initial_cwd = cwd
        self.processes: dict[int, _Process] = {}
        self.parent_of: dict[int, int] = {}  # child id (thread or process) -> parent process
        self.unresolved = 0  # relative lookups whose base could not be known
        self.unreadable = 0  # the tracer could not read the path at all
        self.untracked = 0  # children the tracer could not follow (their lookups are missing)
        self.exited: set[int] = set()
        self.exits = 0  # processes seen ending (ids are reused: a set would undercount)
        self.first: int | None = None  # the job's first process, when the tracer names it

    def _process(self, pid: int) -> _Process:
        proc = self.processes.get(pid)
        if proc is None:
            parent = self.processes.get(self.parent_of.get(pid, -1))
            if parent is not None:
                proc = _Process(parent.cwd, dict(parent.fds))
            elif not self.processes:
                proc = _Process(self.initial_cwd, {})  # the job's first process
            else:
                proc = _Process(None, {})
            self.processes[pid] = proc
        return proc

    def feed(self, raw: Raw) -> Iterator[Lookup]:
        if raw.what == "first":
            self.first = raw.pid
            self.processes.setdefault(raw.pid, _Process(self.initial_cwd, {}))
            return
        if raw.what == "fork":
            if raw.ret > 0:
                # The child inherits what its parent has at the time of the fork: take a
                # copy now (a thread shares it: its records carry the parent's pid anyway).
                parent = self._process(raw.pid)
                self.parent_of[raw.ret] = raw.pid
                if raw.ret not in self.processes:
                    self.processes[raw.ret] = _Process(parent.cwd, dict(parent.fds))
            return
        if raw.what == "exit":
            # A thread's exit drops the copy a fork record made for it (its lookups
            # carry its process's id); a process's exit drops the process.
            self.processes.pop(raw.tid, None)
            if raw.pid == raw.tid:
                self.exited.add(raw.pid)
                self.exits += 1
            return
        if raw.what == "untracked":
            self.untracked += 1
            return
        if raw.what == "dup":  # ret: the new descriptor, a copy of dirfd
            proc = self._process(raw.pid)
            old = proc.fds.get(raw.dirfd)
            if old is not None:
                proc.fds[raw.ret] = (old[0], bool(raw.flags & O_CLOEXEC))
            else:
                proc.fds.pop(raw.ret, None)
            return
        proc = self._process(raw.pid)
        if raw.what == FCHDIR:
            if raw.ret == 0:
                proc.cwd = raw.dirpath if raw.dirpath is not None else proc.fds.get(raw.dirfd, (None, False))[0]
            return
        if is_fd_only(raw.syscall, raw.flags, raw.path):
            return
        yield from self._lookup(proc, raw)

    def _lookup(self, proc: _Process, raw: Raw) -> Iterator[Lookup]:
        syscall = BY_NAME[raw.syscall]
        if raw.dirpath is not None and raw.dirfd == AT_FDCWD:
            proc.cwd = raw.dirpath  # strace -y told us the working directory: remember it
        if raw.dirpath is not None:
            base: str | None = raw.dirpath
        elif syscall.has_dirfd and raw.dirfd != AT_FDCWD:
            base = proc.fds.get(raw.dirfd, (None, False))[0]
        else:
            base = proc.cwd
        error = -raw.ret if raw.ret < 0 else 0
        kind = lookup_kind(raw.syscall, raw.flags)
        if not raw.path:
            # An empty path without AT_EMPTY_PATH fails with ENOENT in the kernel; one
            # that "succeeded" is a string the tracer could not read.
            if not error:
                self.unreadable += 1
            yield Lookup(raw.syscall, kind, raw.pid, "", error, exact=False)
            return
        path = absolute(base, raw.path)
        if path is None:
            self.unresolved += 1
            yield Lookup(raw.syscall, kind, raw.pid, raw.path, error, exact=False, truncated=raw.truncated)
            return
        if not error:
            if kind == "chdir":
                proc.cwd = path
            elif kind in ("open", "diropen") and raw.ret >= 0 and (raw.ret in proc.fds
                                                                    or len(proc.fds) < MAX_FDS_PER_PROCESS):
                proc.fds[raw.ret] = (path, bool(raw.flags & O_CLOEXEC))
            elif kind == "exec":
                proc.fds = {fd: entry for fd, entry in proc.fds.items() if not entry[1]}
        yield Lookup(raw.syscall, kind, raw.pid, path, error, exact=not raw.truncated, truncated=raw.truncated)
