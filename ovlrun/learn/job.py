"""Running one job under a tracer: ``ovlrun learn -- CMD``.

The job's first process is learn's own child, held at a gate: it does what a launch
does before the exec (with ``--profile``, as root: a private mount namespace with the
profile's overlays, :func:`ovlrun.launch.mount.mount_items`; with ``--user``, the
launch's verified privilege drop), says it is ready and waits.  Then the tracer starts
on that process (bpftrace following its process tree from the next instruction on;
strace attaching with ``-p``, which a user's strace may do to its own parent's child:
the gate names learn as its ptracer for Yama), and only once the tracer is attached
does learn open the gate: the child execs CMD (:func:`ovlrun.launch.execute.exec_job`:
working directory and PATH search with the job's rights, as a launch), so nothing the
job does is missed.  Being learn's child, the job's exit status is always known, even
when the tracer dies.

learn ends when CMD exits (processes it left running are counted and not followed).
While the job runs learn ignores SIGINT and SIGQUIT (the terminal delivers them to the
job, as to any foreground command; the tracers have sessions of their own) and passes
SIGTERM and SIGHUP on to CMD.  Before the job has started, those signals abort learn,
taking the gate's child and the tracer with it.  SIGKILL takes the tracer with it
(PR_SET_PDEATHSIG); the job then runs on, untraced.
"""

from __future__ import annotations

import os
import selectors
import signal
import sys
from collections.abc import Callable
from typing import IO, NamedTuple

import prctl

from ovlrun.errors import EXIT_OVLRUN, OvlrunError
from ovlrun.learn import bpftrace
from ovlrun.learn.collect import Collector
from ovlrun.learn.nfs import NfsCounters
from ovlrun.learn.report import Tally
from ovlrun.learn.resolve import Resolver
from ovlrun.learn.spawn import find_program
from ovlrun.learn.tracers import Bpftrace, Strace, Tracer
from ovlrun.learn.trees import TreeSpec, localised_paths

FORWARDED = (signal.SIGTERM, signal.SIGHUP)
IGNORED = (signal.SIGINT, signal.SIGQUIT)


class Request(NamedTuple):
    command: list[str]
    trees: list[TreeSpec]
    tracer: str = "auto"  # auto, bpftrace, strace
    profile: str | None = None
    user: str | None = None
    events: IO[str] | None = None
    map_keys: int = bpftrace.MAP_KEYS


class Outcome(NamedTuple):
    status: int  # CMD's, as a shell reports it (128 + signal)
    tracer: str
    tally: Tally
    notes: list[str]  # what made the counts incomplete or uncertain
    complete: bool
    nfs: dict[str, dict[str, int]] | None = None  # NFS operations per mount during the job (:mod:`.nfs`)


class Aborted(Exception):
    """A signal arrived before the job started: learn gives up (128 + signal)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _abort(signum: int, _frame: object) -> None:
    raise Aborted(signum)


# ------------------------------------------------------------------ the gate


class Gate:
    """The job's first process, forked and held until the tracer is attached."""

    def __init__(self, prepare: Callable[[], None], run: Callable[[], int]) -> None:
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        go_r, self.go_w = os.pipe2(os.O_CLOEXEC)
        learn = os.getpid()
        self.mark = bpftrace.mark()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover (the child execs or exits)
            os.close(ready_r)
            os.close(self.go_w)
            os._exit(_gate_child(prepare, run, ready_w, go_r, learn, self.mark))
        os.close(ready_w)
        os.close(go_r)
        self.pidfd = os.pidfd_open(self.pid)
        with os.fdopen(ready_r, "rb") as f:
            reply = f.read(1 << 16)
        if reply != b"r":
            os.waitpid(self.pid, 0)
            os.close(self.go_w)
            os.close(self.pidfd)
            raise OvlrunError(reply[1:].decode(errors="replace") if reply.startswith(b"E") else
                              "the job's process could not be prepared")

    def open(self) -> None:
        os.write(self.go_w, b"g")
        os.close(self.go_w)
        self.go_w = -1

    def cancel(self) -> None:
        if self.go_w >= 0:
            os.close(self.go_w)  # EOF at the gate: the child exits without running CMD
            self.go_w = -1
            os.waitpid(self.pid, 0)
        os.close(self.pidfd)


def _gate_child(prepare: Callable[[], None], run: Callable[[], int], ready_w: int, go_r: int,
                learn: int, mark: int) -> int:  # pragma: no cover (child)
    try:
        prepare()
        # Yama (ptrace_scope 1) lets a process trace only its descendants unless the
        # tracee names a ptracer: learn, whose child strace is.
        try:
            prctl.set_ptracer(learn)
        except OSError:
            pass  # no Yama in this kernel: nothing to allow
        os.write(ready_w, b"r")
        os.close(ready_w)
        if os.read(go_r, 1) != b"g":
            return EXIT_OVLRUN  # learn gave up (or died): never run CMD untraced
        os.close(go_r)
        try:
            os.getpgid(mark)  # bpftrace's program adds this process to the job (see bpftrace.mark)
        except ProcessLookupError:
            pass  # ESRCH: always, no process has that id
        return run()
    except OvlrunError as e:
        message = e.message
    except BaseException as e:
        message = f"{type(e).__name__}: {e}"
    try:
        os.write(ready_w, b"E" + message.encode(errors="replace"))
    except OSError:  # after the gate opened: learn no longer listens
        print(f"ovlrun: {message}", file=sys.stderr)
    return EXIT_OVLRUN


# ------------------------------------------------------------------ choosing and starting


def choose_tracer(wanted: str, is_root: bool) -> tuple[str, str, str]:
    """(tracer, program, note): ``auto`` is bpftrace for root where installed, else strace."""
    if wanted not in ("auto", "bpftrace", "strace"):
        raise OvlrunError(f"--tracer {wanted}: use auto, bpftrace or strace")
    bpf = find_program("bpftrace") if wanted != "strace" else None
    if wanted == "bpftrace":
        if not is_root:
            raise OvlrunError("--tracer bpftrace needs root (it loads programs into the kernel); "
                              "use --tracer strace")
        if bpf is None:
            raise OvlrunError("bpftrace is not installed (apt-get install bpftrace); use --tracer strace")
        return "bpftrace", bpf, ""
    if wanted == "auto" and is_root and bpf is not None:
        return "bpftrace", bpf, ""
    st = find_program("strace")
    if st is None:
        raise OvlrunError("strace is not installed (apt-get install strace)"
                          + ("" if wanted == "strace" else "; nor is bpftrace usable here"))
    note = ""
    if wanted == "auto":
        note = "using strace: " + ("bpftrace needs root" if not is_root else "bpftrace is not installed")
    return "strace", st, note


def _start(kind: str, program: str, pid: int, mark: int, map_keys: int) -> Tracer:
    if kind == "bpftrace":
        bt = Bpftrace(program, map_keys)
        bt.start(lambda fields, tracing: bpftrace.job_program(fields, mark, bpftrace.dup_probes(tracing)))
        bt.wait_ready()
        return bt
    st = Strace(program)
    st.attach(pid)
    st.wait_attached(pid)
    return st


# ------------------------------------------------------------------ running


def run(req: Request, prepare: Callable[[], None], exec_job: Callable[[], int], *,
        mountinfo_of_job: bool, warn: Callable[[str], None]) -> Outcome:
    """Trace one job: ``prepare`` and ``exec_job`` run in the gate's child (see
    :mod:`ovlrun.learn.cli` for what they do); ``mountinfo_of_job`` reads the job's
    localised paths from its own mount table (it has one of its own with --profile)."""
    is_root = os.geteuid() == 0
    kind, program, note = choose_tracer(req.tracer, is_root)
    if note:
        warn(note)
    old = {s: signal.signal(s, _abort) for s in (*FORWARDED, signal.SIGINT)}
    gate: Gate | None = None
    tracer: Tracer | None = None
    try:
        gate = Gate(prepare, exec_job)
        localised = localised_paths(f"/proc/{gate.pid}/mountinfo" if mountinfo_of_job else "/proc/self/mountinfo")
        try:
            tracer = _start(kind, program, gate.pid, gate.mark, req.map_keys)
        except OvlrunError as e:
            if req.tracer != "auto" or kind == "strace":
                raise
            warn(f"{e.message}; using strace")
            tracer = _start("strace", find_program("strace") or "strace", gate.pid, gate.mark, req.map_keys)
        forward = _forwarder(gate.pid)
        for s in FORWARDED:
            signal.signal(s, forward)
        for s in IGNORED:
            signal.signal(s, signal.SIG_IGN)
        nfs = NfsCounters(req.trees)
        nfs.start()
        gate.open()
        return _follow(req, gate, tracer, localised)._replace(nfs=nfs.finish())
    except Aborted as e:
        raise OvlrunError(f"interrupted by {signal.Signals(e.signum).name} before the job started",
                          status=128 + e.signum) from None
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
        if tracer is not None:
            tracer.kill()
            tracer.close()
        if gate is not None:
            gate.cancel()


def _forwarder(pid: int) -> Callable[[int, object], None]:
    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    return forward


def _follow(req: Request, gate: Gate, tracer: Tracer, localised: list[str]) -> Outcome:
    """Read the tracer until the job has exited and the tracer has said everything."""
    tally = Tally(req.trees, localised)
    try:
        resolver = Resolver(os.getcwd())  # the job re-enters it by path, as a launch does
    except OSError:
        resolver = Resolver(None)
    collect = Collector(tally, resolver, req.events, tracer.strlen)
    ordered = isinstance(tracer, Strace)
    notes: list[str] = []
    status: int | None = None
    out_open = True
    with selectors.DefaultSelector() as sel:
        sel.register(tracer.out_r, selectors.EVENT_READ, "out")
        if tracer.err_r >= 0:
            sel.register(tracer.err_r, selectors.EVENT_READ, "err")
        sel.register(tracer.pidfd, selectors.EVENT_READ, "tracer")
        sel.register(gate.pidfd, selectors.EVENT_READ, "job")
        while out_open or tracer.status is None or status is None:
            ready = sel.select(tracer.poll_interval())
            if not ready:
                tracer.stop()  # bpftrace missed the signal (see Bpftrace.stop): again
            for key, _ in ready:
                if key.data == "out":
                    chunk = os.read(tracer.out_r, 1 << 20)
                    if not chunk:
                        out_open = False
                        sel.unregister(tracer.out_r)
                    for line in tracer.lines(chunk) if chunk else tracer.rest():
                        collect.take(tracer.parse(line), ordered)
                elif key.data == "err":
                    if not tracer.read_stderr():
                        sel.unregister(tracer.err_r)
                elif key.data == "tracer":
                    sel.unregister(tracer.pidfd)
                    code = os.waitstatus_to_exitcode(tracer.reap())
                    if status is None:
                        notes.append(f"{tracer.name} exited ({_describe(code)}: {tracer.failure()}) while the job "
                                     "ran: lookups after that are missing")
                elif key.data == "job":
                    sel.unregister(gate.pidfd)
                    _, wait_status = os.waitpid(gate.pid, 0)
                    code = os.waitstatus_to_exitcode(wait_status)
                    status = code if code >= 0 else 128 - code
                    tracer.stop()
    uncounted = collect.finish()
    tally.finish()
    first = resolver.first if resolver.first is not None else gate.pid  # the tracer's id for it
    outlived = sum(1 for pid in resolver.processes if pid != first and pid not in resolver.exited)
    tally.processes = resolver.exits + outlived + (first not in resolver.exited)
    complete = not notes and not (collect.lost or uncounted or resolver.untracked)
    return Outcome(status, tracer.name, tally, _notes(notes, collect, uncounted, resolver, tally, tracer, outlived),
                   complete)


def _describe(code: int) -> str:
    return f"status {code}" if code >= 0 else f"killed by {signal.Signals(-code).name}"


def _notes(notes: list[str], collect: Collector, uncounted: int, resolver: Resolver, tally: Tally,
           tracer: Tracer, outlived: int) -> list[str]:
    """What makes the counts incomplete or uncertain, one sentence each."""
    unparsed = tracer.parser.unparsed if isinstance(tracer, Strace) else 0
    said = (
        (collect.lost, "{n:,} events lost ({tracer} could not read its buffers in time): counts are lower bounds"),
        (uncounted, "{n:,} lookups the kernel could not count (map full; OVLRUN_LEARN_MAP_KEYS raises the limit): "
                    "not in the table"),
        (resolver.untracked, "{n:,} processes the tracer could not follow (map full): their lookups are missing"),
        (collect.late, "{n:,} events arrived out of order by more than 2 s: relative paths near them may be "
                       "misresolved"),
        (resolver.unresolved, "{n:,} relative lookups could not be made absolute (descriptor or directory "
                              "unknown): counted as not attributed"),
        (resolver.unreadable, "{n:,} paths could not be read by the tracer: counted as not attributed"),
        (tally.truncated, "{n:,} paths longer than {tracer} reads were attributed by their beginning"),
        (outlived, "{n:,} processes were still running when CMD exited; their later lookups are not counted"),
        (unparsed, "{n:,} lines of strace output were not understood"),
    )
    return notes + [text.format(n=n, tracer=tracer.name) for n, text in said if n]
