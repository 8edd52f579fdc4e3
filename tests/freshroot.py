"""A fresh Debian root running the README's quick start (tests/test_quickstart.py).

What a new user does on a fresh Debian 12 or 13 machine, as root: get a checkout, then
``make demo`` and ``make test``.  Here, per run:

1. A minimal root (``debootstrap --variant=minbase``) is debootstrapped once per suite
   and cached pristine as ``/var/cache/ovlrun-fresh/SUITE.tar.zst``; every run unpacks a
   new copy into ``/var/tmp/ovlrun-fresh-SUITE-*`` (installed state is always fresh).
2. ``git archive`` of a commit (HEAD by default: what is committed is what a user
   clones, not the working tree) is unpacked to ``/usr/local/src/ovlrun`` in the root.
3. The root gets what the site gives every machine: the host's /etc/resolv.conf and its
   local CA certificates (/usr/local/share/ca-certificates, for the egress proxy); a host
   name (``ovlfreshNN``) in /etc/hostname and /etc/hosts as the Debian installer writes
   them.  Nothing of the host's Python or packages.  Downloaded ``.deb`` files are kept
   between runs (bound in: :func:`cache_binds`), nothing installed is.
4. It runs in its own mount, UTS and PID namespaces (the host's network), made by
   ``unshare --kill-child`` and entered with pivot_root(2), not chroot(2): Slurm puts job
   steps into a job's namespace with setns(2), which would escape a chroot.  PID 1 of the
   namespace is :func:`init` (it reaps orphans, as a real init does); when it exits, or
   when the test dies, the kernel kills every process left and drops every mount.
5. As root, with Debian's PATH and an otherwise empty environment: :data:`PREREQUISITE`
   (README's first line: a minimal Debian has no make), then ``make demo``, then ``make
   test`` with ``OVLRUN_NESTED=1`` (VM kernels, the Slurm 24.11 root and this test skip
   inside: they run on the host in the same CI run) and the root's own Slurm ports and
   state directory.

Command line (e.g. to run an older commit)::

    python -m tests.freshroot [--commit REV] [--no-test] [--command CMD] [--echo] bookworm|trixie ...
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("OVLRUN_FRESH_CACHE", "/var/cache/ovlrun-fresh"))
SCRATCH = Path("/var/tmp")
SCRATCH_PREFIX = "ovlrun-fresh-"
LOGS = SCRATCH / "ovlrun-fresh-logs"
DEBIAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
SUITES = {"bookworm": 12, "trixie": 13}
# What README's quick start has a new user type before `make demo`: a minimal Debian
# (debootstrap, cloud and container images) has no make.
PREREQUISITE = "apt-get update && apt-get install -y make"
QUICK_START = ("make demo", "make test")
# Where README says a checkout goes (readable by the tests' unprivileged user).
CHECKOUT = "/usr/local/src/ovlrun"
# The root's Slurm 22.05 test instance, beside the host's (6817/6818) and the 24.11
# root's (6917/6918): ports and state from the environment (PLAN.md).
SLURM_PORT_BASE = {"bookworm": 7017, "trixie": 7027}
SLURM_STATE = "/var/spool/ovlrun-slurm-fresh"
RUN_TIMEOUT = 3600
MARK = "@@ovlrun-fresh@@"
NS_GET_MNTNS_ID = 0x8008B705

# Where each stage of the quick start begins, recognised in make's echo of a recipe line
# (make prints each command before it runs it).  A stage lasts until the next one begins.
STAGE_STARTS = (
    ("make demo: apt", re.compile(r"^apt-get update")),
    ("make demo: pip (ovlrun venv)", re.compile(r"^rm -rf build/wheel")),
    ("make demo: launcher, sudoers", re.compile(r"^install -d -m 0755 ")),
    ("make demo: demo", re.compile(r"demo/build_tree\.py")),
    ("make test: pip (dev venv)", re.compile(r" -m venv \.venv$")),
    ("make test: pytest", re.compile(r" -m pytest")),
)


@dataclass
class Step:
    command: str
    status: int | None = None  # None: never ran
    seconds: float = 0.0


@dataclass
class Result:
    suite: str
    commit: str
    steps: list[Step]
    stages: list[tuple[str, float]] = field(default_factory=list)  # (name, seconds) in order
    log: Path = Path()
    tail: str = ""

    @property
    def ok(self) -> bool:
        return all(s.status == 0 for s in self.steps)

    def report(self) -> str:
        lines = [f"fresh {self.suite} at {self.commit}: " + ", ".join(
            f"{s.command!r} -> {'not run' if s.status is None else s.status} ({s.seconds:.0f}s)" for s in self.steps)]
        lines += [f"  {name:<44} {secs:7.1f}s" for name, secs in self.stages]
        lines.append(f"  full log: {self.log}")
        return "\n".join(lines)


def log(msg: str) -> None:
    print(f"freshroot: {msg}", file=sys.stderr, flush=True)


# --- the pristine root, cached ---------------------------------------------------------

def host_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in sources:
        for line in path.read_text().splitlines():
            if line.startswith("URIs:"):
                for uri in line.split()[1:]:
                    if "security" not in uri and "debian" in uri:
                        return uri
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]:
        if path.exists():
            for line in path.read_text().splitlines():
                words = line.split()
                if words[:1] == ["deb"] and "security" not in line:
                    for word in words[1:]:
                        if "://" in word and "debian" in word:
                            return word
    return "http://deb.debian.org/debian"


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def pristine(suite: str) -> tuple[Path, float | None]:
    """The cached minbase tarball of ``suite``; debootstraps it first if missing.  Returns
    (tarball, seconds the debootstrap took or None when it was cached)."""
    tarball = CACHE / f"{suite}.tar.zst"
    with cache_lock():
        if tarball.exists():
            return tarball, None
        if shutil.which("debootstrap") is None or shutil.which("zstd") is None:
            raise RuntimeError("needs debootstrap and zstd (make's TEST_PACKAGES)")
        started = time.monotonic()
        partial = CACHE / f"{suite}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        mirror = host_mirror()
        log(f"debootstrapping {suite} (minbase) from {mirror}")
        out = CACHE / f"{suite}-debootstrap.log"
        with open(out, "w") as f:
            r = subprocess.run(["debootstrap", "--variant=minbase", "--components=main", suite, str(partial),
                                mirror], stdout=f, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            raise RuntimeError(f"debootstrap {suite} failed: {out.read_text()[-2000:]}")
        # debootstrap copies the host's name and resolver: each run writes its own.
        for name in ("etc/hostname", "etc/resolv.conf"):
            (partial / name).unlink(missing_ok=True)
        tmp = tarball.with_suffix(".tmp")
        subprocess.run(f"tar -C {shlex.quote(str(partial))} --numeric-owner --xattrs -cf - . | zstd -q -T0 -3 "
                       f"-o {shlex.quote(str(tmp))} -f", shell=True, check=True)
        tmp.rename(tarball)
        shutil.rmtree(partial)
        return tarball, time.monotonic() - started


def source_archive(commit: str, dest: Path) -> str:
    """Unpack ``git archive COMMIT`` into ``dest``; returns the commit's short id."""
    if not (REPO / ".git").exists():
        raise FileNotFoundError(f"{REPO} is not a git checkout")
    short = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", f"{commit}^{{commit}}"],
                           capture_output=True, text=True, check=True).stdout.strip()
    dest.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", "--format=tar", short], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-C", str(dest), "-xf", "-"], stdin=archive.stdout, check=True)
    assert archive.stdout is not None
    archive.stdout.close()
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {commit} failed")
    return short


# --- scratch roots ---------------------------------------------------------------------

def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in the caller's mount namespace."""
    prefix = str(path).rstrip("/") + "/"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == str(path) or point.startswith(prefix):
                out.append(point)
    return out


def processes_in(pid_ns: str) -> list[int]:
    """Processes in the PID namespace ``pid_ns`` (``pid:[INODE]``, as /proc/PID/ns/pid reads).
    (Their /proc/PID/root cannot say: in another mount namespace it reads "/".)"""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/pid") == pid_ns:
                    pids.append(int(entry))
    return pids


def remove_scratch(path: Path) -> None:
    """Delete a scratch root; refuses while anything is mounted below it."""
    left = mounts_under(path)
    if left:
        raise RuntimeError(f"still mounted under {path}: {left}")
    shutil.rmtree(path)


def remove_stale_scratch() -> None:
    """Scratch roots of runs that died without cleaning up (their owner pid is gone)."""
    for path in SCRATCH.glob(f"{SCRATCH_PREFIX}*-pid*"):
        m = re.search(r"-pid(\d+)-", path.name)
        if m and not Path(f"/proc/{m.group(1)}").exists() and not mounts_under(path):
            log(f"removing stale {path}")
            shutil.rmtree(path, ignore_errors=True)


def prepare_root(root: Path, suite: str, tarball: Path) -> None:
    root.mkdir()
    subprocess.run(["tar", "-C", str(root), "--numeric-owner", "--xattrs", "-xpf", str(tarball),
                    "--use-compress-program=zstd"], check=True)
    name = f"ovlfresh{SUITES[suite]}"
    (root / "etc" / "hostname").write_text(name + "\n")
    (root / "etc" / "hosts").write_text(
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n")
    shutil.copyfile(os.path.realpath("/etc/resolv.conf"), root / "etc" / "resolv.conf")
    # The site's own CAs (here: the egress proxy's): ca-certificates, when apt installs it,
    # adds them to /etc/ssl/certs as on any machine of the site.
    local_cas = Path("/usr/local/share/ca-certificates")
    if local_cas.is_dir():
        shutil.copytree(local_cas, root / local_cas.relative_to("/"), dirs_exist_ok=True)
    (root / ".oldroot").mkdir()


def host_codename() -> str:
    with open("/etc/os-release") as f:
        for line in f:
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip().strip('"')
    return ""


def cache_binds(suite: str) -> list[tuple[str, str]]:
    """(host dir, path in the root) of download caches: the .deb files apt fetched (the
    host's own archive when the suite is the host's, else one per suite).  Not pip's: the
    egress proxy here serves PyPI without cache headers, so pip caches no downloads (only
    the wheels it builds, and python-prctl must build in every run)."""
    debs = Path("/var/cache/apt/archives") if suite == host_codename() else CACHE / suite / "archives"
    (debs / "partial").mkdir(parents=True, exist_ok=True)
    return [(str(debs), "/var/cache/apt/archives")]


def mntns_id(path: str = "/proc/self/ns/mnt") -> int:
    import struct

    fd = os.open(path, os.O_RDONLY)
    try:
        return int(struct.unpack("Q", fcntl.ioctl(fd, NS_GET_MNTNS_ID, bytes(8)))[0])
    finally:
        os.close(fd)


def next_mntns_ids() -> dict[int, int]:
    """CPU -> the id a mount namespace made on that CPU gets now."""
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from tests.freshroot import mntns_id; print(mntns_id())"
    ids = {}
    for cpu in sorted(os.sched_getaffinity(0)):
        r = subprocess.run(["taskset", "-c", str(cpu), "unshare", "--mount", sys.executable, "-I", "-c", code],
                           capture_output=True, text=True, check=True)
        ids[cpu] = int(r.stdout)
    return ids


# --- the run ----------------------------------------------------------------------------

def _die_with_parent() -> Callable[[], None]:
    """For preexec_fn: unshare dies with the test runner (even a SIGKILLed one);
    --kill-child then kills our init, and with it the whole PID namespace."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_pdeathsig() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return set_pdeathsig


def run(suite: str, commit: str = "HEAD", commands: tuple[str, ...] = QUICK_START, *,
        prerequisite: bool = True, echo: bool = False) -> Result:
    """Unpack a fresh ``suite`` root, run :data:`PREREQUISITE` and ``commands`` in it; clean up.
    ``echo``: copy the root's output to our stdout as it comes (the log gets it anyway)."""
    if os.geteuid() != 0:
        raise PermissionError("needs root")
    LOGS.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch()
    t0 = time.monotonic()
    tarball, debootstrap_s = pristine(suite)
    stages: list[tuple[str, float]] = []
    if debootstrap_s is not None:
        stages.append(("debootstrap (cold)", debootstrap_s))
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{suite}-pid{os.getpid()}-", dir=SCRATCH))
    seen: dict[str, str] = {}  # "pid_ns": the root's PID namespace, once its init said
    try:
        root = scratch / "root"
        t1 = time.monotonic()
        prepare_root(root, suite, tarball)
        short = source_archive(commit, root / CHECKOUT.lstrip("/"))
        stages.append(("unpack root + git archive", time.monotonic() - t1))
        steps = [Step(c) for c in ((PREREQUISITE,) if prerequisite else ()) + commands]
        spec = {
            "root": str(root), "hostname": f"ovlfresh{SUITES[suite]}", "binds": cache_binds(suite),
            "tmpfs_tmp": SUITES[suite] >= 13,  # Debian 13 mounts a tmpfs on /tmp
            "steps": [s.command for s in steps], "cwd": CHECKOUT,
            "env": {"PATH": DEBIAN_PATH},
            "test_env": {"PATH": DEBIAN_PATH, "OVLRUN_NESTED": "1",
                         "OVLRUN_SLURM_PORT_BASE": str(SLURM_PORT_BASE[suite]), "OVLRUN_SLURM_STATE": SLURM_STATE},
        }
        # Other commands (a test's, a developer's) get a log of their own: the quick
        # start's is what a failed CI run points to.
        logfile = LOGS / f"{suite}-{short}{'' if commands == QUICK_START else f'-pid{os.getpid()}'}.log"
        _run_in_namespaces(spec, steps, stages, logfile, seen, echo)
        result = Result(suite, short, steps, stages, logfile)
        # Progress lines redrawn with \r (dpkg's "Reading database ...") count once.
        lines = [line.rsplit("\r", 1)[-1] for line in logfile.read_bytes().decode(errors="replace").split("\n")]
        result.tail = "\n".join(lines[-40:])
    finally:
        # Init has exited or been killed: the kernel kills the rest of its PID namespace
        # (asynchronously), and with the last process the mount namespace and its mounts go.
        if "pid_ns" in seen:
            deadline = time.monotonic() + 60
            while (left := processes_in(seen["pid_ns"])) and time.monotonic() < deadline:
                time.sleep(0.05)
            if left:
                raise RuntimeError(f"processes of the fresh root still alive: {left}")
        remove_scratch(scratch)
    stages.append(("total", time.monotonic() - t0))
    return result


def _run_in_namespaces(spec: dict[str, object], steps: list[Step], stages: list[tuple[str, float]],
                       logfile: Path, seen: dict[str, str], echo: bool) -> None:
    # Linux hands out mount namespace ids from per-CPU batches, and mount(2) refuses to
    # bind a namespace file whose id is not larger than the caller's namespace's: the
    # namespaces Slurm's job_container/tmpfs and the tests pin inside the root must all
    # get larger ids than the root's own.  So it is made on the CPU that hands out the
    # smallest ids now; init then runs on every CPU again.
    ids = next_mntns_ids()
    cpu = min(ids, key=lambda c: ids[c])
    spec["cpus"] = sorted(os.sched_getaffinity(0))
    cmd = ["taskset", "-c", str(cpu), "unshare", "--mount", "--uts", "--pid", "--fork", "--kill-child",
           "--propagation", "private", "--", sys.executable, "-I", "-S", __file__, "--init", json.dumps(spec)]
    started = time.monotonic()
    marks: list[tuple[str, float]] = []
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_die_with_parent())
    assert proc.stdout is not None
    try:
        with open(logfile, "wb") as out:
            buf = b""
            step_started = 0.0
            while True:
                left = RUN_TIMEOUT - (time.monotonic() - started)
                if left <= 0:
                    raise TimeoutError(f"the fresh root ran longer than {RUN_TIMEOUT}s (log: {logfile})")
                ready, _, _ = select.select([proc.stdout], [], [], left)
                if not ready:
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                out.write(chunk)
                if echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                out.flush()
                buf += chunk
                *lines, buf = buf.split(b"\n")
                now = time.monotonic()
                for raw in lines:
                    line = raw.decode(errors="replace")
                    if line.startswith(MARK):
                        words = line.split()
                        if words[1] == "pidns":
                            seen["pid_ns"] = words[2]
                            continue
                        i = int(words[2])
                        if words[1] == "start":
                            step_started = now
                            marks.append((steps[i].command, now))
                        elif words[1] == "end":
                            steps[i].status = int(words[3])
                            steps[i].seconds = now - step_started
                            marks.append(("(end)", now))
                        continue
                    for name, pattern in STAGE_STARTS:
                        if pattern.search(line) and not any(m[0] == name for m in marks):
                            marks.append((name, now))
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()  # unshare; --kill-child takes init and the namespace with it
            proc.wait()
    # A step's own row, then its parts (indented) as far as make's output showed them.
    for (name, at), (_, until) in itertools.pairwise(marks):
        step = next((s for s in steps if s.command == name), None)
        if step is not None:
            stages.append((name, step.seconds))
        elif name != "(end)":
            stages.append(("  " + name.split(": ", 1)[-1], until - at))
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"the fresh root's init failed with {proc.returncode} (log: {logfile})")


# --- PID 1 in the root's namespaces ---------------------------------------------------------

def init(spec: dict[str, object]) -> int:
    """PID 1 of the fresh root: mount, pivot_root, run the steps, reap every orphan.

    Runs the host's interpreter: everything it needs is imported before pivot_root (after
    it, only ``os`` calls)."""
    import ctypes
    import socket

    libc = ctypes.CDLL(None, use_errno=True)
    root = str(spec["root"])
    os.sched_setaffinity(0, spec["cpus"])  # type: ignore[arg-type]

    def sh(*argv: str) -> None:
        subprocess.run(argv, check=True)

    def say(text: str) -> None:
        os.write(1, f"\n{MARK} {text}\n".encode())

    say(f"pidns {os.readlink('/proc/self/ns/pid')}")  # the host checks it is empty at the end
    sh("mount", "--bind", root, root)  # pivot_root needs a mount point
    sh("mount", "-t", "proc", "-o", "nosuid,nodev,noexec", "proc", f"{root}/proc")
    sh("mount", "--rbind", "/sys", f"{root}/sys")
    sh("mount", "--rbind", "/dev", f"{root}/dev")
    sh("mount", "-t", "tmpfs", "-o", "nosuid,nodev,mode=0755", "tmpfs", f"{root}/run")
    if spec["tmpfs_tmp"]:
        sh("mount", "-t", "tmpfs", "-o", "nosuid,nodev,mode=1777", "tmpfs", f"{root}/tmp")
    for host, inside in spec["binds"]:  # type: ignore[attr-defined]
        os.makedirs(root + inside, exist_ok=True)
        sh("mount", "--bind", host, root + inside)
    socket.sethostname(str(spec["hostname"]))
    os.chdir(root)
    if libc.syscall(155, b".", b".oldroot") != 0:  # SYS_pivot_root (x86_64)
        raise OSError(ctypes.get_errno(), "pivot_root")
    if libc.umount2(b"/.oldroot", 2) != 0:  # MNT_DETACH
        raise OSError(ctypes.get_errno(), "umount /.oldroot")
    os.rmdir("/.oldroot")
    os.chdir("/")

    status = 0
    for i, command in enumerate(spec["steps"]):  # type: ignore[attr-defined]
        env = spec["test_env"] if command == "make test" else spec["env"]
        say(f"start {i} {command}")
        pid = os.fork()
        if pid == 0:
            try:
                os.chdir(str(spec["cwd"]))
                fd = os.open("/dev/null", os.O_RDONLY)
                os.dup2(fd, 0)
                os.execve("/bin/sh", ["/bin/sh", "-c", command], env)  # type: ignore[arg-type]
            finally:
                os._exit(127)
        while True:  # reap orphans too, until the step's shell ends
            done, wstatus = os.waitpid(-1, 0)
            if done == pid:
                status = os.waitstatus_to_exitcode(wstatus)
                break
        say(f"end {i} {status}")
        if status != 0:
            break
    # Exiting kills whatever the steps left running (PID namespace) and drops the mounts.
    return 0 if status == 0 else 1


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--init":
        return init(json.loads(sys.argv[2]))
    parser = argparse.ArgumentParser(description="Run README's quick start in fresh Debian roots.")
    parser.add_argument("suites", nargs="+", choices=sorted(SUITES))
    parser.add_argument("--commit", default="HEAD", help="the commit to git archive (default HEAD)")
    parser.add_argument("--no-test", action="store_true", help="only make demo")
    parser.add_argument("--command", action="append", help="run this instead of make demo/test, without the "
                        "prerequisite (repeatable)")
    parser.add_argument("--echo", action="store_true", help="show the root's output as it comes")
    args = parser.parse_args()
    ok = True
    for suite in args.suites:
        commands = tuple(args.command) if args.command else QUICK_START[:1] if args.no_test else QUICK_START
        result = run(suite, args.commit, commands, prerequisite=not args.command, echo=args.echo)
        print(result.tail)
        print(result.report())
        ok = ok and result.ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
