"""Running work that touches the shared tree with a time limit.

A stalled NFS server (hard mount) or FUSE daemon blocks a syscall in a state that no
signal but SIGKILL ends, and not even SIGKILL once the request is in the server's hands
(fs/fuse/dev.c: request_wait_answer waits uninterruptibly for a request userspace has
read; NFS hard mounts retry forever).  So a builder that walks the shared tree in its
own process can hang forever.  :func:`run_bounded` forks a worker for that walk; the
parent waits on a pipe with a deadline and, if it passes, SIGKILLs the worker and gives
up with a clear message instead of waiting.  A worker stuck in the kernel dies as soon
as its request completes (the SIGKILL is pending; it never returns to user code).

The worker gets PR_SET_PDEATHSIG=SIGKILL, so killing the parent (Ctrl-C, SIGKILL) never
leaves a worker behind that keeps writing into the store's tmp/ while the next build
cleans it.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable
from typing import TypeVar

from ovlrun.errors import OvlrunError
from ovlrun.linux.children import die_with_parent, outcome, result
from ovlrun.linux.files import write_all

T = TypeVar("T")
DEFAULT_TIMEOUT = 300.0

# Workers we gave up on; reaped opportunistically so they do not stay zombies.
_abandoned: list[int] = []


class StallError(OvlrunError):
    """The shared tree did not answer in time."""


def _reap_abandoned() -> None:
    for pid in list(_abandoned):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            _abandoned.remove(pid)


def _child(fn: Callable[[], T], w: int, close_fds: tuple[int, ...], parent: int) -> None:
    die_with_parent(parent)
    # Report only through the pipe: a worker abandoned in an uninterruptible wait must not
    # keep the caller's stdout/stderr open (a script reading them would wait for EOF).
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(null, std)
    os.close(null)
    for fd in close_fds:  # e.g. the source lock: it must die with the parent, not us
        os.close(fd)
    data = outcome(fn)  # the error keeps its class and status (ovlrun.linux.children)
    try:
        write_all(w, data)
    except OSError:
        pass


def run_bounded(fn: Callable[[], T], *, timeout: float, what: str, close_fds: tuple[int, ...] = ()) -> T:
    """Run ``fn`` in a forked worker and return its result, or raise :class:`StallError`
    if it has not finished after ``timeout`` seconds.  ``fn``'s ``OvlrunError`` and
    ``OSError`` are re-raised here with their class (a bug as
    :class:`~ovlrun.linux.children.ChildFailed`); ``what`` names the work in the stall
    message."""
    _reap_abandoned()
    r, w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the worker
        try:
            os.close(r)
            _child(fn, w, close_fds, parent)
        finally:
            os._exit(0)
    os.close(w)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                _abandoned.append(pid)
                _reap_abandoned()
                raise StallError(f"{what}: no answer from the shared tree within {timeout:g}s "
                                 "(server stalled or unreachable?); gave up, nothing was published")
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        raise OvlrunError(f"{what}: worker died ({_describe(status)})")
    return result(b"".join(chunks), what)  # type: ignore[return-value]


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"

