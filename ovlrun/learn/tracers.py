"""Starting, reading and stopping the two tracers, behind one interface.

Both tracers follow a job whose first process learn made and holds at a gate
(:mod:`ovlrun.learn.job`): :class:`Bpftrace` is ready when bpftrace says every probe is
attached, :class:`Strace` when strace says it attached (``-p``).  Both are started by
:func:`ovlrun.learn.spawn.spawn`, die with learn, and run in a session of their own, so
a Ctrl-C meant for the job does not stop the trace.  strace runs without
``--seccomp-bpf`` (which only works for a command strace starts itself, and with which a
job whose tracer went away gets ENOSYS from every traced syscall, measured here): learn's
tracer must be able to go away (killed with learn, or stopped when CMD exits) without
breaking the job.
"""

from __future__ import annotations

import os
import selectors
import signal
import time
from collections.abc import Callable, Iterator

from ovlrun.errors import OvlrunError
from ovlrun.learn import bpftrace, strace
from ovlrun.learn.events import Raw
from ovlrun.learn.spawn import spawn

ATTACH_TIMEOUT = 120.0  # bpftrace compiles its program first: seconds on a slow node
STOP_RETRY = 0.5
# bpftrace's stderr lines that say nothing about failure (this project's hosts print the
# first: the memlock rlimit cannot be raised, and modern kernels do not need it).
NOISE = ("couldn't set RLIMIT_MEMLOCK", "WARNING: Addrspace mismatch", bpftrace.READY)

Event = tuple[int, Raw | bpftrace.Control | strace.Exit]


def _new_session() -> None:  # in the tracer's child: no terminal signals (Ctrl-C is the job's)
    os.setsid()


class Tracer:
    """A running tracer: its process, its output stream, and how to read and stop it."""

    name = "tracer"
    strlen = 1 << 16  # paths this long may have been cut short (bpftrace before 0.21: 200 bytes)

    def __init__(self) -> None:
        self.pid = 0
        self.pidfd = -1
        self.out_r = -1  # the event stream
        self.err_r = -1  # its stderr (None for strace starting the command: that is the job's)
        self.hold_w = -1  # a write end learn keeps until the tracer exits (strace -o)
        self.status: int | None = None  # its wait status once reaped
        self.stopping = False
        self.stderr_tail: list[str] = []
        self._partial = b""

    def _started(self, pid: int, out_r: int, err_r: int, hold_w: int = -1) -> None:
        self.pid, self.out_r, self.err_r, self.hold_w = pid, out_r, err_r, hold_w
        self.pidfd = os.pidfd_open(pid)

    def lines(self, chunk: bytes) -> Iterator[bytes]:
        data = self._partial + chunk
        *complete, self._partial = data.split(b"\n")
        yield from complete

    def rest(self) -> Iterator[bytes]:
        if self._partial:
            yield self._partial
            self._partial = b""

    def parse(self, line: bytes) -> Event | None:
        raise NotImplementedError

    def read_stderr(self) -> bool:
        """Keep the tracer's stderr lines that matter; False at EOF."""
        chunk = os.read(self.err_r, 65536)
        for line in chunk.decode(errors="replace").splitlines():
            if line.strip() and not any(n in line for n in NOISE) and not line.startswith((" ", "\t", "~")):
                self.stderr_tail = [*self.stderr_tail[-9:], line.strip()]
        return bool(chunk)

    def failure(self) -> str:
        """The most telling line bpftrace or strace wrote (bpftrace splits some errors
        over several short lines: the longest line that mentions an error wins)."""
        errors = [line for line in self.stderr_tail if "rror" in line and len(line) > 12] or self.stderr_tail
        return max(errors, key=len) if errors else "no message"

    def reap(self) -> int:
        if self.status is None:
            _, self.status = os.waitpid(self.pid, 0)
            if self.hold_w >= 0:
                os.close(self.hold_w)
                self.hold_w = -1
        return self.status

    def stop(self) -> None:
        raise NotImplementedError

    def poll_interval(self) -> float | None:
        """How long a reader may wait for this tracer before :meth:`stop` is repeated."""
        return STOP_RETRY if self.stopping and self.status is None else None

    def kill(self) -> None:
        """End the tracer now, whatever it is doing (learn is giving up)."""
        if self.pid and self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.reap()

    def close(self) -> None:
        for fd in (self.pidfd, self.out_r, self.err_r, self.hold_w):
            if fd >= 0:
                os.close(fd)
        self.pidfd = self.out_r = self.err_r = self.hold_w = -1


class Bpftrace(Tracer):
    def __init__(self, program: str, map_keys: int = bpftrace.MAP_KEYS) -> None:
        super().__init__()
        self.program = program
        self.version = bpftrace.version(program)
        self.strlen = bpftrace.strlen_for(self.version)
        self.map_keys = map_keys
        self.name = "bpftrace " + ".".join(map(str, self.version))

    def start(self, make: Callable[[list[bpftrace.Fields], str], str]) -> None:
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = spawn(bpftrace.child_setup(self.program, make, before=_new_session),
                        env=bpftrace.environment(self.version, self.map_keys), stdout=out_w, stderr=err_w)
        except OvlrunError as e:
            for fd in (out_r, err_r):
                os.close(fd)
            raise OvlrunError(f"bpftrace cannot start: {e.message}") from None
        finally:
            os.close(out_w)
            os.close(err_w)
        self._started(pid, out_r, err_r)

    def wait_ready(self) -> None:
        """Until bpftrace has attached every probe; an error if it exits or stalls first."""
        deadline = time.monotonic() + ATTACH_TIMEOUT
        seen = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.err_r, selectors.EVENT_READ)
            while bpftrace.READY.encode() not in seen:
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    self.kill()
                    raise OvlrunError(f"bpftrace did not attach its probes within {ATTACH_TIMEOUT:.0f} s")
                chunk = os.read(self.err_r, 65536)
                if not chunk:
                    self.reap()
                    raise OvlrunError(f"bpftrace could not attach to the kernel's tracepoints: {self.failure()}")
                seen = seen[-64:] + chunk
                for line in chunk.decode(errors="replace").splitlines():
                    if line.strip() and not any(n in line for n in NOISE) and not line.startswith((" ", "~")):
                        self.stderr_tail = [*self.stderr_tail[-9:], line.strip()]

    def parse(self, line: bytes) -> Event | None:
        if not line.strip():
            return None
        try:
            return bpftrace.parse(line, self.strlen)
        except (ValueError, IndexError, KeyError):
            return 0, bpftrace.Control("other", line)

    def stop(self) -> None:
        """SIGINT: bpftrace stops its probes, drains its buffers and exits.  Repeated by
        the readers every :data:`STOP_RETRY` seconds until it has: bpftrace (0.17) only
        notices the signal when it interrupts its epoll_wait, and one that arrives while
        it formats output is lost (poll_perf_events), leaving it running forever."""
        self.stopping = True
        if self.pid and self.status is None:
            try:
                os.kill(self.pid, signal.SIGINT)
            except ProcessLookupError:
                pass


class Strace(Tracer):
    def __init__(self, program: str) -> None:
        super().__init__()
        self.program = program
        self.name = "strace"
        self.parser = strace.Parser()
        self.sequence = 0

    def attach(self, pid: int) -> None:
        # strace opens its output by name: our own pipe's write end, through /proc.  It
        # gets a descriptor of its own (close-on-exec, so the job never holds it) and
        # learn keeps its end until strace has exited.
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        name = f"/proc/{os.getpid()}/fd/{out_w}"
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            def setup() -> list[str]:
                _new_session()
                return strace.command(self.program, name, pid)

            tracer = spawn(setup, env={**os.environ, "OVLRUN_LEARN_OF": str(os.getpid())}, stderr=err_w)
        finally:
            os.close(err_w)
        self._started(tracer, out_r, err_r, out_w)

    def wait_attached(self, pid: int) -> None:
        want = f"Process {pid} attached"
        while True:
            chunk = os.read(self.err_r, 65536)
            if not chunk:
                self.reap()
                raise OvlrunError(f"strace could not attach to the job: {self.failure()}")
            text = chunk.decode(errors="replace")
            if want in text:
                return
            self.stderr_tail += [line for line in text.splitlines() if line.strip()][-10:]

    def parse(self, line: bytes) -> Event | None:
        record = self.parser.feed(line.decode(errors="surrogateescape"))
        if record is None:
            return None
        self.sequence += 1
        return self.sequence, record

    def stop(self) -> None:
        """SIGKILL: strace blocks the other fatal signals; the kernel detaches its tracees,
        which keep running, and every line it finished is already written."""
        if self.pid and self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
