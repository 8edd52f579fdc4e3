"""Per-job mount namespaces that outlive the process that made them.

A batch system hook (Slurm's Prolog, CloneNSScript, ...) runs briefly as root, long
before and apart from the job's processes.  To give the job a localised view, the hook
creates (or joins) a mount namespace, mounts the overlays in it, and *pins* it by
bind-mounting ``/proc/<pid>/ns/mnt`` on a file (the "holder"); the job's processes are
later put into it with setns(2) (by Slurm's job_container/tmpfs, or ``ovlrun enter``).

Each step runs in a forked child, so the hook process itself never changes namespace
and a failure inside the namespace cannot leave the caller half-switched.

The job record (a small JSON file per job, root-owned, under ``/run/ovlrun/jobs``) says
which profile a job asked for, whose job it is, where its namespace is pinned and what
went wrong: ``ovlrun enter`` and the epilog rely on it instead of trusting anything the
user can influence.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ovlrun.errors import OvlrunError
from ovlrun.linux import syscalls

NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), <linux/nsfs.h>
DEFAULT_RUNDIR = "/run/ovlrun/jobs"


def rundir() -> Path:
    """Directory of job records; tests point it elsewhere with OVLRUN_JOB_RUNDIR."""
    return Path(os.environ.get("OVLRUN_JOB_RUNDIR", DEFAULT_RUNDIR))


@dataclass
class JobRecord:
    """What a hook decided for one job; written by root, read by epilog and enter."""

    job_id: str
    uid: int
    gid: int
    user: str
    profile: str | None = None  # profile name the job asked for (None: no request)
    # "requested": waiting for a later hook (CloneNSScript) to mount; "localised";
    # "unlocalised": the job runs on the plain shared tree, messages say why.
    state: str = "requested"
    ns_path: str | None = None  # pinned namespace file, once one exists
    ns_owned: bool = False  # True if ovlrun created the namespace (so it must remove it)
    localised: list[str] = field(default_factory=list)  # mounted paths
    messages: list[str] = field(default_factory=list)  # warnings for the user/admin

    @staticmethod
    def path_for(job_id: str) -> Path:
        if not job_id.isdigit():
            # Job ids come from the environment of a root hook or the command line of
            # `ovlrun enter`; never let them name a path outside the run directory.
            raise OvlrunError(f"invalid job id {job_id!r}: expected digits")
        return rundir() / f"{job_id}.json"

    @classmethod
    def messages_path(cls, job_id: str) -> Path:
        return cls.path_for(job_id).with_suffix(".messages")

    def save(self) -> None:
        directory = rundir()
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        target = self.path_for(self.job_id)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)  # readers never see a half-written record
        # The same messages as plain lines, for readers without Python: the optional
        # Slurm TaskProlog is a shell script running as the user, possibly unable to
        # reach the interpreter that runs ovlrun (e.g. a pyenv under /root).
        notes = self.messages_path(self.job_id)
        tmp = notes.with_suffix(".tmp")
        tmp.write_text("".join(m.replace("\n", " ") + "\n" for m in self.messages))
        os.chmod(tmp, 0o644)
        os.replace(tmp, notes)

    @classmethod
    def load(cls, job_id: str) -> JobRecord | None:
        path = cls.path_for(job_id)
        try:
            st = path.lstat()
        except FileNotFoundError:
            return None
        # Only trust a record root wrote: the run directory could be misconfigured.
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            raise OvlrunError(f"{path}: not a root-owned regular file; refusing to use it")
        data = json.loads(path.read_text())
        return cls(**data)

    @classmethod
    def remove(cls, job_id: str) -> None:
        cls.path_for(job_id).unlink(missing_ok=True)
        cls.messages_path(job_id).unlink(missing_ok=True)


# --------------------------------------------------------------------------- mounts


def mount_points() -> list[str]:
    """Mount points of the caller's namespace, in /proc/self/mountinfo order."""
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            # Field 5 is the mount point, with space, tab, newline and backslash
            # octal-escaped by the kernel.
            points.append(_unescape(line.split()[4]))
    return points


def _unescape(field_text: str) -> str:
    return (field_text.replace("\\040", " ").replace("\\011", "\t")
            .replace("\\012", "\n").replace("\\134", "\\"))


def is_ns_holder(path: str | Path) -> bool:
    """True if ``path`` is a pinned mount namespace (a bind mount of an nsfs file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        # NS_GET_NSTYPE answers only on nsfs files; on anything else it fails (ENOTTY).
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == syscalls.CLONE_NEWNS
    except OSError:
        return False
    finally:
        os.close(fd)


def detach_under(root: Path) -> list[str]:
    """Lazily unmount every mount at or below ``root`` (deepest first); return them."""
    prefix = str(root).rstrip("/") + "/"
    hits = [m for m in mount_points() if m == str(root) or m.startswith(prefix)]
    done = []
    for m in sorted(set(hits), key=len, reverse=True):
        # A mount point may be covered several times (bind on bind); loop until gone.
        while True:
            try:
                syscalls.umount2(m, syscalls.MNT_DETACH)
                done.append(m)
            except OSError:
                break
    return done


def make_private_bind(directory: Path) -> None:
    """Bind ``directory`` on itself with private propagation.

    The kernel refuses to bind a mount-namespace file on a mount that propagates
    (the copy could end up inside the namespace it pins, a reference loop), so the
    holder must live on a private mount whatever the host's propagation is.
    Slurm's job_container/tmpfs does exactly this for each job directory.
    """
    syscalls.mount(str(directory), str(directory), None, syscalls.MS_BIND)
    syscalls.mount(None, str(directory), None, syscalls.MS_PRIVATE | syscalls.MS_REC)


def make_rslave_root() -> None:
    """Stop mounts made here from propagating back to the host (host ones still come in)."""
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_SLAVE)


# ------------------------------------------------------------------ child processes


def _run_child(switch: Callable[[], None], rest: Callable[[], list[str]],
               before: Callable[[int], None] | None = None) -> list[str]:
    """Fork; run ``switch`` then ``rest`` in the child; return what ``rest`` returned.

    Failures in the child are re-raised here as OvlrunError with the child's message.

    ``before(pid)`` runs in the parent after the child reports (over a pipe) that
    ``switch`` (its namespace change) is done, while the child waits; that is how the
    parent pins the child's namespace.  No sleeps: every hand-over is a pipe read.
    """
    # child -> parent: b"u" (switched), then b"E<error>" or b"R<json list of notes>"
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()  # parent -> child: b"g" (continue) or EOF (abort)
    pid = os.fork()
    if pid == 0:  # child: never returns into the caller's code
        status = 1
        try:
            os.close(ready_r)
            os.close(go_w)
            switch()
            os.write(ready_w, b"u")
            if os.read(go_r, 1) == b"g":
                notes = rest()
                os.write(ready_w, b"R" + json.dumps(notes).encode())
                status = 0
        except (OvlrunError, OSError) as e:
            os.write(ready_w, b"E" + str(e).encode(errors="replace"))
        except BaseException:  # a bug: report it with its traceback, never unwind
            os.write(ready_w, b"E" + traceback.format_exc().encode(errors="replace"))
        finally:
            os._exit(status)
    os.close(ready_w)
    os.close(go_r)
    output = b""
    try:
        output = os.read(ready_r, 1)
        if output == b"u":
            try:
                if before is not None:
                    before(pid)
                os.write(go_w, b"g")
            finally:
                os.close(go_w)
                go_w = -1
        while chunk := os.read(ready_r, 65536):
            output += chunk
    finally:
        os.close(ready_r)
        if go_w != -1:
            os.close(go_w)
        _, wstatus = os.waitpid(pid, 0)
    output = output.removeprefix(b"u")
    if output.startswith(b"E"):
        raise OvlrunError(output[1:].decode(errors="replace").strip())
    code = os.waitstatus_to_exitcode(wstatus)
    if code != 0 or not output.startswith(b"R"):
        raise OvlrunError(f"namespace helper exited with status {code}")
    result: list[str] = json.loads(output[1:])
    return result


def create_pinned_namespace(holder: Path, setup: Callable[[], list[str]]) -> list[str]:
    """Create a new mount namespace, pin it on ``holder``, run ``setup`` inside it.

    ``holder`` must be an existing regular file on a private mount (see
    :func:`make_private_bind`).  ``/`` is made rslave inside before ``setup`` runs, so
    nothing ``setup`` mounts reaches the host.  On failure the holder is unpinned again
    and OvlrunError is raised.  Returns what ``setup`` returned (notes for the log).
    """

    def switch() -> None:
        syscalls.unshare(syscalls.CLONE_NEWNS)

    def rest() -> list[str]:
        make_rslave_root()
        return setup()

    def pin(pid: int) -> None:
        # The child is in its new namespace and waiting: pin it before it can exit.
        syscalls.mount(f"/proc/{pid}/ns/mnt", str(holder), None, syscalls.MS_BIND)

    try:
        return _run_child(switch, rest, before=pin)
    except OvlrunError:
        unpin(holder)
        raise


def run_in_namespace(ns_file: str | Path, body: Callable[[], list[str]]) -> list[str]:
    """Run ``body`` in a child that has joined the namespace pinned at ``ns_file``."""

    def switch() -> None:
        fd = os.open(ns_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            syscalls.setns(fd, syscalls.CLONE_NEWNS)
        finally:
            os.close(fd)

    def rest() -> list[str]:
        make_rslave_root()
        return body()

    return _run_child(switch, rest)


def unpin(holder: Path) -> None:
    """Release a pinned namespace; its mounts vanish once no process is left in it."""
    while is_ns_holder(holder):
        try:
            syscalls.umount2(str(holder), syscalls.MNT_DETACH)
        except OSError:
            break


def remove_tree(root: Path) -> None:
    """Detach everything mounted below ``root``, then delete it (never crossing mounts)."""
    if not root.exists():
        return
    detach_under(root)
    prefix = str(root).rstrip("/") + "/"
    left = [m for m in mount_points() if m == str(root) or m.startswith(prefix)]
    if left:
        # Deleting now could descend into a mounted filesystem: refuse.
        raise OSError(f"still mounted below {root}: {', '.join(left)}")
    shutil.rmtree(root, ignore_errors=True)
