"""bpftrace on the syscall tracepoints: the programs learn runs, and reading what they print.

Measured on this project's machines: kprobes and fentry may be blocked where syscall
tracepoints are not, so only ``tracepoint:syscalls:*`` and ``tracepoint:sched:*`` are
used.  Each lookup syscall gets an entry probe that remembers the path pointer (and
directory fd and flags) per thread and an exit probe that reads the path *then*: the
kernel has copied it from user memory by the time the syscall returns, so the page is
faulted in (read at entry, a not-yet-touched page reads as an empty string).  A
successful exec replaced that memory: its path comes from ``sched_process_exec``, which
carries the kernel's own copy.

Limits, each accounted for rather than hidden:

- strings: bpftrace before 0.21 caps ``str()`` at 200 bytes (BPFTRACE_STRLEN); a path
  that fills the buffer is marked truncated and attributed by its prefix.  From 0.21 on
  the cap is set to PATH_MAX (BPFTRACE_MAX_STRLEN).
- maps: hash maps are preallocated with a maximum number of keys (4,096 by default,
  BPFTRACE_MAP_KEYS_MAX/BPFTRACE_MAX_MAP_KEYS); an insert into a full map fails
  silently.  learn sizes them (:data:`MAP_KEYS`) and detects every failure: a child that
  could not be added to the job's set prints ``U`` (the per-thread syscall map ``@a``
  never holds more keys than the job's set, so it cannot fill first); lookups counted in
  the kernel are also counted in ``@n``, and a difference is what did not fit.
- the perf buffer: events bpftrace could not read in time are reported by bpftrace
  (``lost_events``) and summed.

The job is followed by its process tree, not a cgroup: moving a job into a cgroup of our
own would take it out of the scheduler's (Slurm's limits and accounting).  The first
process adds itself to ``@job``: once the tracer is attached it calls getpgid(2) with
a mark no process can have (:func:`mark`; ESRCH), which a probe recognises.  Not its
pid written into the program: bpftrace's ``pid``/``tid`` (and the sched tracepoints')
are the initial PID namespace's, learn's may not be (a container, a job step with a
namespace of its own, the suite's fresh Debian roots).  ``sched_process_fork`` adds
every child of a member, ``sched_process_exit`` removes it.  bpftrace attaches BEGIN first and the other
probes afterwards, so readiness is its ``__BPFTRACE_NOTIFY_PROBES_ATTACHED`` line on
stderr (printed once every probe is attached, since 0.12, still in 0.23).

tracefs: bpftrace reads the tracepoints' formats there.  If it is not mounted, the
child that becomes bpftrace mounts it in a mount namespace of its own (a slave of the
host's), so the mount exists exactly as long as bpftrace and never on the host.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
from collections.abc import Callable
from typing import NamedTuple

from ovlrun.errors import OvlrunError
from ovlrun.learn.events import AT_EMPTY_PATH, LOOKUP_SYSCALLS, O_CLOEXEC, O_DIRECTORY, O_PATH, Raw
from ovlrun.linux import syscalls
from ovlrun.linux.namespaces import enter_private_namespace

TRACEFS_PATHS = ("/sys/kernel/debug/tracing", "/sys/kernel/tracing")  # bpftrace's own order
MOUNT_AT = "/sys/kernel/tracing"
KERNEL_NAME = {"stat": "newstat", "lstat": "newlstat"}
AT_FLAGS = ("newfstatat", "statx", "faccessat2", "execveat")  # their flags are AT_*, not O_*
MAP_KEYS = 1 << 16  # threads of one job at once; in-flight syscalls; distinct paths per interval
PERF_PAGES = 1024  # per CPU: 4 MiB absorbs bursts while bpftrace writes its output
READY = "__BPFTRACE_NOTIFY_PROBES_ATTACHED"
ENOENT = 2


class Fields(NamedTuple):
    """Where one syscall's tracepoint keeps what learn needs (names vary by syscall)."""

    code: int  # index in LOOKUP_SYSCALLS (or -1: fchdir), printed instead of the name
    syscall: str  # as strace names it
    tracepoint: str  # the kernel's name
    path: str | None
    dirfd: str | None
    flags: str | None  # an expression over args


def version(program: str) -> tuple[int, ...]:
    """bpftrace's version, e.g. (0, 17, 0); (0,) if it does not say."""
    try:
        out = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return (0,)
    found = re.search(r"v?(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x) for x in found.groups() if x is not None) if found else (0,)


def strlen_for(ver: tuple[int, ...]) -> int:
    # 0.21 lifted the 200-byte cap; 512 bytes keep the kernel-side map keys (and their hashing) small,
    # and a longer path is still attributed by its beginning.
    return 512 if ver >= (0, 21) else 200


def environment(ver: tuple[int, ...], map_keys: int = MAP_KEYS) -> dict[str, str]:
    """bpftrace's settings, under the names this version reads (renamed in 0.20)."""
    # OVLRUN_LEARN_OF: which learn started it (ps e shows it); OVLRUN_LEARN_PERF_PAGES:
    # a smaller buffer, to see lost events counted (tests).
    pages = os.environ.get("OVLRUN_LEARN_PERF_PAGES", "")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", READY: "1", "OVLRUN_LEARN_OF": str(os.getpid()),
           "BPFTRACE_PERF_RB_PAGES": pages if pages.isdigit() and int(pages) > 0 else str(PERF_PAGES)}
    if ver >= (0, 20):
        env.update(BPFTRACE_MAX_STRLEN=str(strlen_for(ver)), BPFTRACE_MAX_MAP_KEYS=str(map_keys))
    else:
        env.update(BPFTRACE_STRLEN=str(strlen_for(ver)), BPFTRACE_MAP_KEYS_MAX=str(map_keys))
    if ver >= (0, 19):
        env["BPFTRACE_STR_TRUNC_TRAILER"] = ""  # a truncated path is recognised by its length
    return env


# ------------------------------------------------------------------ in the child


def ensure_tracefs() -> str:
    """The tracefs directory bpftrace will use; mounted here if absent.  Runs in the
    tracer's child, which is alone in a fresh mount namespace (see module docstring)."""
    for path in TRACEFS_PATHS:
        if os.path.isdir(os.path.join(path, "events")):
            return path
    try:
        syscalls.mount("tracefs", MOUNT_AT, "tracefs", syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC)
    except OSError as e:
        raise OvlrunError(f"cannot mount tracefs on {MOUNT_AT} (bpftrace reads tracepoints there): "
                          f"{e.strerror}; use --tracer strace") from None
    if not os.path.isdir(os.path.join(MOUNT_AT, "events", "syscalls")):
        raise OvlrunError("this kernel has no syscall tracepoints (CONFIG_FTRACE_SYSCALLS); use --tracer strace")
    return MOUNT_AT


def _format_fields(tracing: str, event: str) -> dict[str, str] | None:
    """field name -> C type of a tracepoint, from its format file; None if it has none."""
    try:
        with open(os.path.join(tracing, "events", event, "format")) as f:
            text = f.read()
    except OSError:
        return None
    out = {}
    for decl in re.findall(r"field:([^;]+);", text):
        name = decl.split()[-1].lstrip("*")
        out[name] = decl[: -len(name)].strip()
    return out


F_DUPFD, F_DUPFD_CLOEXEC = 0, 1030


def dup_probes(tracing: str) -> list[str]:
    """Probes for the calls that copy a descriptor (fts walks a tree through
    ``fcntl(F_DUPFD_CLOEXEC)`` copies of directory fds): ``P`` lines let the resolver
    know what a copy names."""
    lines = []
    for name, old, cloexec in (("dup", "fildes", "0"), ("dup2", "oldfd", "0"),
                               ("dup3", "oldfd", f"(args->flags & {O_CLOEXEC}) != 0"),
                               ("fcntl", "fd", f"args->cmd == {F_DUPFD_CLOEXEC}")):
        fields = _format_fields(tracing, f"syscalls/sys_enter_{name}")
        if fields is None or old not in fields:
            continue
        only = f" && (args->cmd == {F_DUPFD} || args->cmd == {F_DUPFD_CLOEXEC})" if name == "fcntl" else ""
        lines.append(f"tracepoint:syscalls:sys_enter_{name} /@job[tid]{only}/ {{ @d[tid] = ((int64)1, "
                     f"(int64)args->{old}, (int64)({cloexec})); }}")
        lines.append(f"tracepoint:syscalls:sys_exit_{name} /@job[tid] && @d[tid].0/ {{ $d = @d[tid]; delete(@d[tid]); "
                     "if (args->ret >= 0) { printf(\"P %llu %d %d %d %d %d\\n\", nsecs, pid, tid, $d.1, args->ret, "
                     "$d.2); } }")
    return lines


def read_fields(tracing: str) -> list[Fields]:
    """The lookup syscalls this kernel has tracepoints for, with their argument names."""
    found = []
    for code, sc in enumerate((*LOOKUP_SYSCALLS, None)):
        name = sc.name if sc else "fchdir"
        tp = KERNEL_NAME.get(name, name)
        fields = _format_fields(tracing, f"syscalls/sys_enter_{tp}")
        if fields is None:
            continue  # e.g. faccessat2 before 5.8, openat2 before 5.6
        path = next((f for f in ("filename", "pathname", "path") if f in fields), None)
        dirfd = next((f for f in ("dfd", "fd") if f in fields), None)
        flags = next((f"(int64)args->{f}" for f in ("flags", "flag") if f in fields), None)
        if name == "openat2" and "how" in fields:
            flags = "(int64)*(uint64 *)args->how"  # struct open_how starts with the flags
        if (path is None) != (name == "fchdir"):
            continue
        found.append(Fields(code if sc else -1, name, tp, path, dirfd, flags))
    if not found:
        raise OvlrunError("this kernel has no syscall tracepoints (CONFIG_FTRACE_SYSCALLS); use --tracer strace")
    return found


def _enter(f: Fields, guard: str) -> str:
    pointer = f"(uint64)args->{f.path}" if f.path else "(uint64)1"
    dirfd = f"(int64)args->{f.dirfd}" if f.dirfd else "(int64)-100"
    return (f"tracepoint:syscalls:sys_enter_{f.tracepoint} {guard}{{ @a[tid] = ({pointer}, {dirfd}, "
            f"{f.flags or '(int64)0'}, (int64){f.code}); }}")


def _not_fd_only(f: Fields) -> str:
    # fstat(fd) is newfstatat(fd, "", AT_EMPTY_PATH): not a lookup, and frequent.
    # Its first byte is read on its own: a second string on the BPF stack would not fit.
    return f"($a.2 & {AT_EMPTY_PATH}) == 0 || *(uint8 *)$a.0 != 0"


EXECVE = next(i for i, s in enumerate(LOOKUP_SYSCALLS) if s.name == "execve")


def mark() -> int:
    """A getpgid(2) argument that names this learn's job to its program: above
    PID_MAX_LIMIT (2**22), so no process has it, and random, so concurrent learns
    (each with its own bpftrace) do not take each other's jobs."""
    return (1 << 30) | secrets.randbits(29)


def job_program(fields: list[Fields], mark: int, extra: list[str] | None = None) -> str:
    """The lookups of the process that calls getpgid(``mark``) and its descendants.

    A lookup of an absolute path is counted in the kernel, per (syscall, result, path),
    in ``@l`` (``@n`` counts them all, so a full map shows), and printed at the end: a
    lookup storm then costs the job a map update per lookup, not a wake-up of bpftrace.
    What the resolver needs in order (relative lookups, chdir, directory opens that a
    later ``openat(dirfd, ...)`` may name, forks, exits) is printed as it happens, one
    line each (see :func:`parse`).
    """
    def aggregate(code: str, result: str, path: str) -> str:
        return f"@n = count(); @l[{code}, {result}, {path}] = count();"

    lines = [f"tracepoint:syscalls:sys_enter_getpgid /args->pid == {mark}/ {{ @job[tid] = 1; "
             "printf(\"J %llu %d\\n\", nsecs, tid); }",
             "tracepoint:sched:sched_process_fork /@job[args->parent_pid]/ { @job[args->child_pid] = 1; "
             "if (@job[args->child_pid]) { printf(\"F %llu %d %d %d\\n\", nsecs, pid, args->parent_pid, "
             "args->child_pid); } else { printf(\"U %llu %d %d\\n\", nsecs, pid, args->child_pid); } }",
             "tracepoint:sched:sched_process_exit /@job[tid]/ { delete(@job[tid]); delete(@a[tid]); "
             "printf(\"X %llu %d %d\\n\", nsecs, pid, tid); }",
             f"tracepoint:sched:sched_process_exec /@job[tid]/ {{ $a = @a[tid]; delete(@a[tid]); "
             f"$c = $a.0 != 0 ? $a.3 : {EXECVE}; if (strncmp(str(args->filename), \"/\", 1) == 0) {{ "
             f"{aggregate('$c', '0', 'str(args->filename)')} }} else {{ printf(\"E %llu %d %d %d %s\\n\", nsecs, $c, "
             f"pid, tid, str(args->filename)); }} }}"]
    for f in fields:
        lines.append(_enter(f, "/@job[tid]/ "))
        if f.syscall == "fchdir":
            lines.append("tracepoint:syscalls:sys_exit_fchdir /@job[tid]/ { $a = @a[tid]; "
                         "printf(\"C %llu %d %d %d %d\\n\", nsecs, pid, tid, args->ret, $a.1); }")
            continue
        exec_ok = " && args->ret != 0" if f.syscall in ("execve", "execveat") else ""
        event = (f"printf(\"L %llu {f.code} %d %d %d %d %d %s\\n\", nsecs, pid, tid, args->ret, $a.1, $a.2, "
                 "str($a.0));")
        if f.syscall == "chdir":
            counted = "0"  # the resolver follows every working directory
        elif f.syscall in ("open", "openat", "openat2", "creat"):
            counted = f"(args->ret < 0 || ($a.2 & {O_DIRECTORY | O_PATH}) == 0)"  # a directory opened: an event
        else:
            counted = "1"
        # @a holds an entry for every thread of the job (the entry probe overwrites it,
        # sched_process_exit deletes it) and none for others: no delete at every exit.
        # (Shallow blocks: LLVM gives each nesting level stack of its own, and the BPF
        # stack is 512 bytes.)
        body = (f"if (*(uint8 *)$a.0 == 47 && {counted}) {{ "
                f"{aggregate(str(f.code), 'args->ret < 0 ? args->ret : 0', 'str($a.0)')} }} else {{ {event} }}")
        if f.syscall in AT_FLAGS:
            body = f"if ({_not_fd_only(f)}) {{ {body} }}"
        lines.append(f"tracepoint:syscalls:sys_exit_{f.tracepoint} /@a[tid].0{exec_ok}/ {{ $a = @a[tid]; {body} }}")
    lines += extra or []
    lines.append("END { clear(@job); clear(@a); clear(@d); print(@l); print(@n); clear(@l); clear(@n); }")
    return "\n".join(lines) + "\n"


WATCH_MAPS = ("ok", "open", "noent", "err")  # per path: answered from metadata, file data opened, ENOENT, other


def watch_program(fields: list[Fields], prefixes: list[str], interval: int) -> str:
    """Node-wide counts of lookups under ``prefixes``, aggregated in the kernel per path
    and class (:data:`WATCH_MAPS`) and printed every ``interval`` seconds, then ``D``.
    ``@n`` counts what matched, so a map that filled up shows as a difference."""
    def matches(var: str) -> str:
        return " || ".join(f"strncmp({var}, {json.dumps(p)}, {len(p.encode())}) == 0" for p in prefixes)

    def count(var: str, open_class: str) -> str:
        return (f"@n = count(); if (args->ret >= 0) {{ {open_class} }} else {{ if (args->ret == -{ENOENT}) "
                f"{{ @noent[{var}] = count(); }} else {{ @err[{var}] = count(); }} }}")

    # @a: one entry per thread that made a traced syscall, overwritten by the next, deleted
    # when the thread exits (cheaper than a delete at every syscall's exit).
    lines = ["tracepoint:sched:sched_process_exec { $p = str(args->filename); "
             f"if ({matches('$p')}) {{ @n = count(); @open[$p] = count(); }} }}",
             "tracepoint:sched:sched_process_exit { delete(@a[tid]); }"]
    dump = " ".join(f"print(@{m}); clear(@{m});" for m in (*WATCH_MAPS, "n", "rel", "missed"))
    for f in fields:
        if f.syscall == "fchdir":
            continue
        lines.append(_enter(f, ""))
        exec_ok = " && args->ret != 0" if f.syscall in ("execve", "execveat") else ""
        if f.syscall in ("open", "openat", "openat2", "creat"):
            opened = f"if ($a.2 & {O_DIRECTORY | O_PATH}) {{ @ok[$p] = count(); }} else {{ @open[$p] = count(); }}"
        else:
            opened = "@ok[$p] = count();"
        lookup = _not_fd_only(f) if f.syscall in AT_FLAGS else "1"
        lines.append(
            f"tracepoint:syscalls:sys_exit_{f.tracepoint} /tid{exec_ok}/ {{ $a = @a[tid]; "
            f"if ($a.0 == 0) {{ @missed = count(); }} else {{ $p = str($a.0); if ({lookup}) {{ "
            f"if ({matches('$p')}) {{ {count('$p', opened)} }} else {{ if (strncmp($p, \"/\", 1) != 0) "
            f"{{ @rel = count(); }} }} }} }} }}")
    lines.append(f"interval:s:{interval} {{ {dump} printf(\"D %llu\\n\", nsecs); }}")
    lines.append(f"END {{ clear(@a); {dump} printf(\"D %llu\\n\", nsecs); }}")
    return "\n".join(lines) + "\n"


def child_setup(program: str, make: Callable[[list[Fields], str], str],
                before: Callable[[], None] | None = None) -> Callable[[], list[str]]:
    """What the tracer's child does before it execs bpftrace (see :mod:`ovlrun.learn.spawn`):
    ``make`` gets the kernel's syscalls and the tracefs directory, and writes the program."""
    def setup() -> list[str]:
        if before is not None:
            before()
        enter_private_namespace()
        tracing = ensure_tracefs()
        return [program, "-f", "json", "-e", make(read_fields(tracing), tracing)]
    return setup


# ------------------------------------------------------------------ reading its output


class Control(NamedTuple):
    """Not a lookup: lost events, an interval's maps, the end of a dump, a message."""

    what: str  # lost, map, dump, other
    data: object = None


def parse(line: bytes, strlen: int) -> tuple[int, Raw | Control]:
    """One line of ``bpftrace -f json`` output, from :func:`job_program` or
    :func:`watch_program`, with the kernel time it was printed at (0 if none): the
    per-CPU buffers bpftrace reads are not in order across CPUs.  Paths are bytes from
    the kernel, decoded with surrogateescape so any name survives the round trip."""
    record = json.loads(line.decode(errors="surrogateescape"), strict=False)
    kind = record.get("type")
    data = record.get("data")
    if kind == "lost_events":
        return 0, Control("lost", int(data.get("events", 0)) if isinstance(data, dict) else 0)
    if kind == "map":
        return 0, Control("map", data)
    if kind != "printf" or not isinstance(data, str):
        return 0, Control("other", record)
    text = data[:-1] if data.endswith("\n") else data
    tag, _, rest = text.partition(" ")
    if tag == "D":
        return 0, Control("dump")
    if tag not in ("L", "E", "F", "X", "C", "U", "P", "J"):
        return 0, Control("other", data)
    ns, _, rest = rest.partition(" ")
    return int(ns), _record(tag, rest, strlen)


def _record(tag: str, rest: str, strlen: int) -> Raw | Control:
    if tag == "L":
        code, pid, tid, ret, dirfd, flags, path = rest.split(" ", 6)
        return Raw("lookup", LOOKUP_SYSCALLS[int(code)].name, int(pid), int(tid), int(ret), int(dirfd), int(flags),
                   path, truncated=len(os.fsencode(path)) >= strlen - 1)
    if tag == "E":
        code, pid, tid, path = rest.split(" ", 3)
        name = LOOKUP_SYSCALLS[int(code)].name if int(code) >= 0 else "execve"
        return Raw("lookup", name, int(pid), int(tid), 0, path=path, truncated=len(os.fsencode(path)) >= strlen - 1)
    fields = [int(x) for x in rest.split(" ")]
    if tag == "F":
        return Raw("fork", "clone", fields[0], fields[0], fields[2])
    if tag == "X":
        return Raw("exit", "exit", fields[0], fields[1], 0)
    if tag == "C":
        return Raw("fchdir", "fchdir", fields[0], fields[1], fields[2], fields[3])
    if tag == "J":  # the job's first process, by its id in the tracer's PID namespace
        return Raw("first", "getpgid", fields[0], fields[0], 0)
    if tag == "U":
        return Raw("untracked", "clone", fields[0], fields[0], fields[1])
    if tag == "P":  # a descriptor copied: pid tid old new close-on-exec
        return Raw("dup", "dup", fields[0], fields[1], fields[3], fields[2], O_CLOEXEC if fields[4] else 0)
    raise ValueError(f"unknown record {tag}")
