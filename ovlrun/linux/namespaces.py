"""Mount namespaces: the job's private one, and per-job ones that outlive their creator.

A launch makes its own process the only member of a new mount namespace
(:func:`enter_private_namespace`).  A batch system hook (Slurm's Prolog,
CloneNSScript, ...) instead runs briefly as root, long before and apart from the job's
processes: it creates (or joins) a mount namespace, mounts the overlays in it, and
*pins* it by bind-mounting ``/proc/<pid>/ns/mnt`` on a file (the "holder"); the job's
processes are later put into it with setns(2) (by Slurm's job_container/tmpfs, or
``ovlrun enter``).

Each hook step runs in a forked child, so the hook process itself never changes
namespace and a failure inside the namespace cannot leave the caller half-switched.
"""

from __future__ import annotations

import errno
import os
import stat

from ovlrun.errors import OvlrunError
from ovlrun.linux import syscalls
from ovlrun.linux.children import outcome, result
from ovlrun.linux.files import write_all

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: this module is on the launch path
    from collections.abc import Callable
    from pathlib import Path

    # What a step run inside a namespace reports back (crosses a pipe, pickled).
    Notes = dict[str, list[str]]

NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), <linux/nsfs.h>


def enter_private_namespace() -> int:
    """Become the only member of a new mount namespace that cannot affect the host;
    return the new namespace's inode (``/proc/self/ns/mnt``: what identifies the job's
    namespace in its record).

    MS_SLAVE (not private) so mounts the host makes later (e.g. automounted NFS
    releases) still appear in the job, while nothing the job mounts propagates out.
    Raises the failing call's OSError; the caller says what it was for.
    """
    syscalls.unshare(syscalls.CLONE_NEWNS)
    ino = os.stat("/proc/self/ns/mnt").st_ino  # before anything is mounted in it
    make_rslave_root()
    return ino


def mount_points() -> list[str]:
    """Mount points of the caller's namespace, in /proc/self/mountinfo order."""
    from ovlrun.linux import mountinfo  # hooks only: a launch never reads its mount table

    return [m.point for m in mountinfo.read()]


def open_mount_ns(path: str | Path) -> int | None:
    """An fd of the mount namespace file at ``path`` (a bind mount of an nsfs file), or
    None if ``path`` is not one: missing, a symlink, another kind of namespace, a file."""
    import fcntl  # hooks and gc only

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        # NS_GET_NSTYPE answers only on nsfs files; on anything else it fails (ENOTTY).
        if fcntl.ioctl(fd, NS_GET_NSTYPE) == syscalls.CLONE_NEWNS:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def is_ns_holder(path: str | Path) -> bool:
    """True if ``path`` is a pinned mount namespace (a bind mount of an nsfs file)."""
    fd = open_mount_ns(path)
    if fd is None:
        return False
    os.close(fd)
    return True


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


def _child_side(switch: Callable[[], None], rest: Callable[[], Notes], ready_w: int, go_r: int) -> None:
    """The forked child: switch namespace, report, wait for the go, run ``rest``, report.

    Messages to the parent: b"u" (switched), then b"R" and the pickled outcome of the
    whole step (:func:`ovlrun.linux.children.outcome`: the notes, or the exception with
    its class).  Never returns into the caller's code (see run_in_child).
    """

    def step() -> Notes:
        switch()
        os.write(ready_w, b"u")
        if os.read(go_r, 1) != b"g":
            os._exit(1)  # the parent gave up (EOF): abort before doing anything
        return rest()

    write_all(ready_w, b"R" + outcome(step))


def _parent_side(pid: int, ready_r: int, go_w: int, before: Callable[[int], None] | None) -> bytes:
    """Wait for the child to switch, run ``before(pid)``, let it go on; return its report."""
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
    return output.removeprefix(b"u")


def run_in_child(switch: Callable[[], None], rest: Callable[[], Notes],
                 before: Callable[[int], None] | None = None) -> Notes:
    """Fork; run ``switch`` then ``rest`` in the child; return what ``rest`` returned.

    A failure in the child is raised here as the child raised it: an OvlrunError with its
    class and status, an OSError (e.g. :class:`~ovlrun.linux.syscalls.SyscallError`) with
    its class, errno, call and path; a bug as
    :class:`~ovlrun.linux.children.ChildFailed` with its traceback.  ``before(pid)``
    runs in the parent after the child reports that ``switch`` (its namespace change) is
    done, while the child waits; that is how the parent pins the child's namespace.  No
    sleeps: every hand-over is a pipe read.
    """
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()  # parent -> child: b"g" (continue) or EOF (abort)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.close(go_w)
            _child_side(switch, rest, ready_w, go_r)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    try:
        output = _parent_side(pid, ready_r, go_w, before)
    finally:
        _, wstatus = os.waitpid(pid, 0)
    if not output.startswith(b"R"):
        raise OvlrunError(f"namespace helper exited with status {os.waitstatus_to_exitcode(wstatus)}")
    notes: Notes = result(output[1:], "namespace helper")  # type: ignore[assignment]
    return notes


def create_pinned_namespace(holder: Path, setup: Callable[[], Notes]) -> Notes:
    """Create a new mount namespace, pin it on ``holder``, run ``setup`` inside it.

    ``holder`` must be an existing regular file on a private mount (see
    :func:`make_private_bind`).  ``/`` is made rslave inside before ``setup`` runs, so
    nothing ``setup`` mounts reaches the host.  On failure the holder is unpinned again
    and the failure raised (as :func:`run_in_child` does).  Returns what ``setup``
    returned.
    """

    def switch() -> None:
        syscalls.unshare(syscalls.CLONE_NEWNS)

    def rest() -> Notes:
        make_rslave_root()
        return setup()

    def pin(pid: int) -> None:
        # The child is in its new namespace and waiting: pin it before it can exit.
        syscalls.mount(f"/proc/{pid}/ns/mnt", str(holder), None, syscalls.MS_BIND)

    try:
        return run_in_child(switch, rest, before=pin)
    except BaseException:
        unpin(holder)
        raise


def run_in_namespace(ns_file: str | Path, body: Callable[[], Notes]) -> Notes:
    """Run ``body`` in a child that has joined the namespace pinned at ``ns_file``."""

    def switch() -> None:
        fd = os.open(ns_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            syscalls.setns(fd, syscalls.CLONE_NEWNS)
        finally:
            os.close(fd)

    def rest() -> Notes:
        make_rslave_root()
        return body()

    return run_in_child(switch, rest)


def unpin(holder: Path) -> None:
    """Release a pinned namespace; its mounts vanish once no process is left in it."""
    while is_ns_holder(holder):
        try:
            syscalls.umount2(str(holder), syscalls.MNT_DETACH)
        except OSError:
            break


REMOVE_TIMEOUT = 60.0  # seconds an Epilog may spend deleting one job directory


def remove_tree(root: Path, timeout: float = REMOVE_TIMEOUT) -> None:
    """Detach everything mounted below ``root``, then delete it (never crossing mounts,
    never following a symlink), giving up with OSError after ``timeout`` seconds.

    A job owns what is in its private /tmp (it lives in the job directory): any depth, any
    number of entries.  So no recursion (a 1,200-deep chain made shutil.rmtree raise
    RecursionError and the Epilog fail, draining the node) and no descriptor per level:
    a directory found inside a subdirectory is first renamed up into ``root`` (same file
    system: one rename), so at most two directories are open at any time and the walk
    never goes deeper than one level.  An entry that cannot be deleted is skipped; the
    caller learns it from the OSError naming how many are left.
    """
    if not os.path.lexists(root):
        return
    detach_under(root)
    prefix = str(root).rstrip("/") + "/"
    left = [m for m in mount_points() if m == str(root) or m.startswith(prefix)]
    if left:
        # Deleting now could descend into a mounted filesystem: refuse.
        raise OSError(f"still mounted below {root}: {', '.join(left)}")
    import time

    deadline = time.monotonic() + timeout
    try:
        top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):  # a file or a symlink: just the name
            os.unlink(root)
            return
        raise
    try:
        _empty(top, os.fstat(top).st_dev, deadline, root)
    finally:
        os.close(top)
    os.rmdir(root)


def _empty(top: int, dev: int, deadline: float, root: Path) -> None:
    """Delete everything in the directory ``top`` (see :func:`remove_tree`)."""
    import time

    def check_time() -> None:
        if time.monotonic() > deadline:
            raise OSError(f"gave up removing {root} after its time limit "
                          f"({len(os.listdir(top))} entries left at its top)")

    skipped: set[str] = set()  # names in ``top`` that cannot be removed
    while names := [n for n in os.listdir(top) if n not in skipped]:
        for name in names:
            check_time()
            st = os.stat(name, dir_fd=top, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                if not _unlink(name, top):
                    skipped.add(name)
                continue
            if st.st_dev != dev:  # another file system (none per mountinfo): never entered
                skipped.add(name)
                continue
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=top)
            try:
                for child in os.listdir(sub):
                    check_time()
                    cst = os.stat(child, dir_fd=sub, follow_symlinks=False)
                    if stat.S_ISDIR(cst.st_mode) and cst.st_dev == dev:
                        _move_up(child, sub, top)
                    else:
                        _unlink(child, sub)
            finally:
                os.close(sub)
            try:
                os.rmdir(name, dir_fd=top)
            except OSError:
                skipped.add(name)
    if skipped:
        raise OSError(f"could not remove {len(skipped)} entries of {root}")


def _move_up(name: str, sub: int, top: int) -> None:
    """Rename directory ``name`` of ``sub`` into ``top`` under a fresh, unguessable name
    (a job could have planted the guessable ones)."""
    while True:
        try:
            os.rename(name, f".ovlrun-rm.{os.urandom(8).hex()}", src_dir_fd=sub, dst_dir_fd=top)
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise


def _unlink(name: str, dir_fd: int) -> bool:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True
