"""Which snapshots running jobs use, from the mount tables of live mount namespaces.

Chosen over a per-use lock because it needs no cooperation from the job and costs the
launch path nothing (launch overhead is the benchmark that matters).  A flock would have
to be an fd without O_CLOEXEC kept open in the job: the job (or a daemon it starts) can
close it or carry it past the job's end, and it leaks ovlrun state into every user
process.  A mount, in contrast, is exactly as alive as the job's namespace: it exists
while any job process does and vanishes with the last one, SIGKILL included.

Each job's overlay shows up in ``/proc/PID/mountinfo`` of its processes as
``lowerdir+=STORE/snapshots/KEY/ID/tree`` (legacy mount(2): ``lowerdir=TREE::DATA``;
:mod:`ovlrun.jobs.overlays` recognises them).  We read one mountinfo per distinct mount
namespace (identified by the inode of ``/proc/PID/ns/mnt``).

Namespaces with no process in them count too: the Slurm prolog pins a job's namespace
on a file (a bind mount of an nsfs file) before, and between, the job's steps.  Every
pinned mount namespace we can find -- nsfs mounts in our own mount table, and the
``ns_path`` of every Slurm job record -- is read by a forked child that joins it (setns) and
reads ``/proc/self/mountinfo`` there.  If a live pinned namespace cannot be read, gc
collects nothing (it cannot know what that namespace uses).

Only overlays ovlrun mounted count: source ``ovlrun``, in a mount namespace owned by
ovlrun's own (the host's) user namespace.  Anyone may mount an overlay in a user
namespace of their own, naming a directory tree that merely ends in
``snapshots/KEY/ID/tree``; believing it would let any user keep any snapshot from gc.
"""

from __future__ import annotations

import os

from ovlrun.errors import OvlrunError
from ovlrun.jobs.overlays import localised
from ovlrun.jobs.records import SLURM, JobRecord
from ovlrun.linux import mountinfo

NS_GET_USERNS = 0xB701  # _IO(0xb7, 0x1), <linux/nsfs.h>: an fd of the owning user namespace


def _owner_userns(ns_fd: int) -> int | None:
    """Inode of the user namespace owning the namespace ``ns_fd`` (None if unknown)."""
    import fcntl

    try:
        owner = fcntl.ioctl(ns_fd, NS_GET_USERNS)
    except OSError:
        return None
    try:
        return os.fstat(owner).st_ino
    finally:
        os.close(owner)


def _snapshots(mounts: list[mountinfo.Mount]) -> set[tuple[str, str]]:
    return {m.key_id for m in localised(mounts)}


def _read_mountinfo_in(ns_fd: int) -> list[mountinfo.Mount]:
    """The mount table of the (pinned) mount namespace ``ns_fd``, read by a forked child
    that joins it: a namespace with no process in it has no /proc/PID/mountinfo."""
    from ovlrun.linux import namespaces, syscalls

    def switch() -> None:
        syscalls.setns(ns_fd, syscalls.CLONE_NEWNS)  # a fresh child is single-threaded

    def read() -> dict[str, list[str]]:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            return {"lines": f.read().splitlines()}

    lines = namespaces.run_in_child(switch, read)["lines"]
    return [m for m in map(mountinfo.parse_line, lines) if m is not None]


def _pinned_namespace_files() -> list[str]:
    """Files that may pin a mount namespace: nsfs mounts in our mount table, and every job
    record's ns_path (prologs pin jobs' namespaces there)."""
    paths: list[str] = []
    try:
        paths = [m.point for m in mountinfo.read() if m.fstype == "nsfs"]
    except OSError:
        pass
    for record in JobRecord.all(SLURM):  # launches pin nothing
        if record.ns_path and record.ns_path not in paths:
            paths.append(record.ns_path)
    return paths


def _pinned_snapshots(holder: str, seen: set[int], own_userns: int) -> set[tuple[str, str]]:
    """The snapshots ovlrun's overlays use in the mount namespace pinned at ``holder``
    (nothing if it is not a mount namespace file, was already read, or belongs to a
    user's namespace)."""
    from ovlrun.linux import namespaces

    fd = namespaces.open_mount_ns(holder)
    if fd is None:
        return set()  # unpinned meanwhile, or not a mount namespace file (uts, net, a file...)
    try:
        ns = os.fstat(fd).st_ino
        if ns in seen:
            return set()
        seen.add(ns)
        owner = _owner_userns(fd)
        if owner is not None and owner != own_userns:
            return set()
        try:
            return _snapshots(_read_mountinfo_in(fd))
        except (OSError, OvlrunError) as e:
            # A live namespace we cannot look into may use any snapshot: collect nothing.
            raise OvlrunError(f"cannot inspect the mount namespace pinned at {holder} ({e}); "
                              "not collecting any snapshot") from None
    finally:
        os.close(fd)


def snapshot_ids_in_use() -> set[tuple[str, str]]:
    """(KEY, ID) of every store snapshot an ovlrun overlay uses in any live mount
    namespace: those of processes, and pinned ones without a process."""
    seen: set[int] = set()
    in_use: set[tuple[str, str]] = set()
    # ovlrun mounts as root of the host's user namespace, the one gc runs in;
    # /proc/1/ns/user may be closed to us (e.g. under a sandboxing init), so our own is
    # the reference.  A user's `unshare -U` namespace is a child of it.  An owner that
    # cannot be determined counts (fail safe: that only keeps snapshots longer).
    own_userns = os.stat("/proc/self/ns/user").st_ino
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # exited meanwhile (or a kernel thread): not using anything
            continue
        try:
            ns = os.fstat(fd).st_ino
            if ns in seen:
                continue
            seen.add(ns)
            owner = _owner_userns(fd)
            if owner is not None and owner != own_userns:
                continue  # a user's own mount namespace: nothing ovlrun mounted
            mounts = mountinfo.read(f"/proc/{pid}/mountinfo")
        except OSError:
            continue
        finally:
            os.close(fd)
        in_use |= _snapshots(mounts)
    for holder in _pinned_namespace_files():
        in_use |= _pinned_snapshots(holder, seen, own_userns)
    return in_use
