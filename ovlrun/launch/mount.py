"""Mounting a plan's overlays in the job's private namespace.

Every snapshot is trust-checked first (only root may have written what the overlay
serves) and its image opened, then each localised path gets one read-only overlay
(:mod:`ovlrun.linux.overlay`) whose lower layer is the snapshot's EROFS image, mounted
(:mod:`ovlrun.linux.erofs`) at ``SNAPSHOT_DIR/tree`` on a small tmpfs over the store's
``snapshots/``, in this namespace only.  Once the overlays exist that tmpfs is detached
again: overlayfs holds private clones of its layers, so the image mount lives exactly
as long as the overlay (a loop device, where one is needed, is autoclear), while the
overlay's options keep naming ``.../snapshots/KEY/ID/tree``, which is how gc and
``status`` recognise a snapshot in use.

One path that cannot be localised (deleted, replaced, unreadable to root, behind a mount
a user made, its image unusable) stays unlocalised with a warning while the rest is
mounted; ``--strict`` refuses instead.  A missing tree root is an error unless the
profile allows running unlocalised.  The mounts run in a worker process the launch waits
for within a bound (a stalled tree cannot hold it), unless every tree root and image is
on a local file system (:func:`_can_stall`).  On the launch path: imports nothing heavy,
and everything before the first mount.
"""

from __future__ import annotations

import _thread
import os
import resource
import sys

from ovlrun.errors import OvlrunError
from ovlrun.launch.mountworker import mount_timeout, run_here, run_in_worker
from ovlrun.linux import syscalls
from ovlrun.linux.erofs import ImageMountError, mount_image
from ovlrun.linux.files import UntrustedError, open_trusted
from ovlrun.linux.kernel import Features, probe
from ovlrun.linux.mountinfo import mounts_local
from ovlrun.linux.overlay import (
    RESOURCE_ERRNOS,
    OverlaySetupError,
    OverlaySpec,
    PathFailure,
    SourceChanged,
    SourceMissing,
    SourceStale,
    SourceUnreachable,
    mount_overlay,
)
from ovlrun.store.layout import check_snapshot_trusted

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from ovlrun.launch.plan import JobPlan, MountItem

    Warn = Callable[[str], None]
    from ovlrun.launch.mountworker import Report


class TreeRootMissing(OvlrunError):
    """A profile tree's root is missing or empty (not mounted), and the profile does not
    allow running without it: the launch refuses to run the job (a Slurm job, which a
    hook cannot stop without draining the node, runs unlocalised and is told why)."""


def warn_stderr(message: str) -> None:
    print(f"ovlrun: warning: {message}", file=sys.stderr)


def report_missing(plan: JobPlan, *, strict: bool, warn: Warn) -> None:
    """One line per localised path with no snapshot; an error with ``strict``."""
    for path in plan.missing:
        message = (f"no snapshot for {path}; it stays unlocalised "
                   f"(build it with: ovlrun snapshot build --profile {plan.name})")
        if strict:
            raise OvlrunError(message.replace("; it stays unlocalised", ""))
        warn(message)


def mount_items(items: list[MountItem], store: str, *, strict: bool, warn: Warn,
                missing_root: str = "fail", features: Features | None = None,
                timeout: float | None = None) -> list[MountItem]:
    """Trust-check and mount every planned overlay in the current (private) namespace.

    One path that cannot be localised (its source missing, replaced, unreadable to root,
    behind a mount a user made, or its snapshot image unusable; see
    :class:`~ovlrun.linux.overlay.PathFailure`) stays unlocalised with a warning and the
    rest is mounted; with ``strict`` any of them refuses the launch (fail closed).  What
    concerns the whole launch (the store's trust, resources, a stalled tree: see
    :func:`mount_all`) is an error either way.
    """
    features = features or probe()
    if not features.overlay:
        raise OvlrunError("this kernel has no overlayfs (modprobe overlay)")
    trusted: set[str] = set()
    for item in items:
        check_snapshot_trusted(store, item.snapshot_dir, trusted)
    unverifiable = [item for item in items if not item.source_ino]
    items = [item for item in items if item.source_ino]
    for item in unverifiable:
        # Built before source identities were recorded: whether the path is still the
        # directory it was built from cannot be told, so it is not mounted.
        _unlocalised(f"snapshot of {item.path} predates source identity checks "
                     "(rebuild it: ovlrun snapshot refresh --all)", strict, warn)
    image_fds: list[int] = []
    openable: list[MountItem] = []
    try:
        for item in items:
            try:
                image_fds.append(open_image(item.image))
                openable.append(item)
            except SnapshotUnusable as e:
                _unlocalised(e.message, strict, warn)
        failures = mount_all(openable, image_fds, features, timeout)
    finally:
        for fd in image_fds:
            os.close(fd)
    mounted = []
    absent_roots: set[str] = set()
    for item, failure in zip(openable, failures, strict=True):
        if failure is None:
            mounted.append(item)
        elif not isinstance(failure, PathFailure):
            raise failure
        elif not isinstance(failure, SourceMissing):
            # Nothing was mounted anywhere; the path is served by the plain shared tree.
            hint = " (rebuild it: ovlrun snapshot refresh --all)" if isinstance(failure, SourceChanged) else ""
            _unlocalised(failure.message + hint, strict, warn)
        elif item.root not in absent_roots:
            if not _tree_root_available(item, failure.root_problem, missing_root, strict, warn):
                absent_roots.add(item.root)
                continue
            message = f"{item.source} (localised path {item.path}) is missing on the shared tree"
            if strict:
                raise OvlrunError(message)
            warn(message + "; skipped")
    return mounted


def _unlocalised(message: str, strict: bool, warn: Warn) -> None:
    """One path stays unlocalised: a warning, or with ``strict`` the launch's error."""
    if strict:
        raise OvlrunError(message)
    warn(f"{message}; it stays unlocalised")


class SnapshotUnusable(PathFailure):
    """This path's snapshot image cannot be opened or mounted (removed by a concurrent gc,
    not a valid image, no loop device free): the path stays unlocalised."""


class OverlayRefused(PathFailure):
    """The kernel refused this path's overlay (its layers, or its mount point)."""


def open_image(path: str) -> int:
    """The snapshot image, opened without following symlinks and trust-checked on the fd
    that is then mounted (no window to swap the file)."""
    try:
        return open_trusted(path)
    except OSError as e:
        if e.errno in RESOURCE_ERRNOS:
            raise OvlrunError(f"snapshot image {path}: {e.strerror}") from None
        raise SnapshotUnusable(f"snapshot image {path}: {e.strerror}") from None
    except UntrustedError as e:
        raise OvlrunError(f"refusing snapshot image {path}: {e.problem}") from None


def mount_all(items: list[MountItem], image_fds: list[int], features: Features,
              timeout: float | None = None) -> list[BaseException | None]:
    """Mount every item (image fd ``image_fds[i]``); return each one's failure, in order.

    Where something on the way may stall (a remote file system: :func:`_can_stall`), the
    work runs from a few threads in a worker process sharing this mount namespace, which
    this process waits for at most ``timeout`` seconds (:mod:`ovlrun.launch.mountworker`:
    a stalled tree cannot hold the launch); past that, :class:`MountStalled`.  Otherwise
    it runs here, from this thread: no round trip to wait for, so neither a worker nor
    threads would pay (measured, 20 paths on a local disk: the worker and its 8 threads
    cost a launch ~4 ms of CPU; see BENCHMARKS.md).
    """
    if not items:
        return []
    timeout = mount_timeout() if timeout is None else timeout
    roots: dict[str, str] = {}
    lock = _thread.allocate_lock()
    remote = _can_stall(items, image_fds)

    def work(report: Report) -> None:
        def report_item(i: int, failure: BaseException | None) -> None:
            if isinstance(failure, SourceMissing):
                failure.root_problem = _root_problem(items[i].root, roots, lock)
            report(i, failure)
        _mount_all(items, image_fds, features, report_item, remote)

    labels = [item.path for item in items]
    if not remote:
        return run_here(labels, work, _FAILURES)
    return run_in_worker(labels, work, _FAILURES, timeout)


def _can_stall(items: list[MountItem], image_fds: list[int]) -> bool:
    """Whether mounting ``items`` may wait on another machine: True unless every image
    and every tree root is on a local file system, and so is every mount those hang on
    (the mounts a walk from ``/`` to them crosses).  Decided on opened files, not on
    paths: each tree root is opened the way the mounts will open it (from ``/``,
    following no symlink) but with RESOLVE_CACHED, which fails rather than ask any file
    system, and the mount each fd is on is looked up in this process's mount table
    (:func:`ovlrun.linux.mountinfo.mounts_local`), which asks no file system either:
    fstatfs would, and would wait on a stalled NFS or FUSE tree.  Anything unsure (an
    older kernel, a root not in the dentry cache, a profile root that is not the real
    one: listing it for a missing path would follow its symlinks) counts as remote.
    """
    roots: set[str] = set()
    for item in items:
        if item.root.rstrip("/") != item.source_root.rstrip("/") or not item.source_root.startswith("/"):
            return True
        roots.add(item.source_root)
    mount_ids: set[int] = set()
    try:
        for fd in image_fds:
            mount_ids.add(syscalls.mount_id(fd))
        for root in roots:
            fd = syscalls.openat2(syscalls.AT_FDCWD, root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
                                  syscalls.RESOLVE_NO_SYMLINKS | syscalls.RESOLVE_NO_MAGICLINKS
                                  | syscalls.RESOLVE_CACHED)
            try:
                mount_ids.add(syscalls.mount_id(fd))
            finally:
                os.close(fd)
    except OSError:
        return True
    return not mounts_local(mount_ids)


# What crosses from the worker as a class name is rebuilt as that class.
_FAILURES: dict[str, type[OvlrunError]] = {cls.__name__: cls for cls in (
    SourceMissing, SourceStale, SourceChanged, SourceUnreachable, OverlayRefused, SnapshotUnusable)}


def _root_problem(root: str, cache: dict[str, str], lock: _thread.LockType) -> str:
    """Why ``root`` (a missing path's tree root) looks unmounted; "" if it looks fine.

    Only on that failure path, once per root, so a normal launch pays nothing for it.
    """
    if not root:
        return ""
    with lock:
        if root in cache:
            return cache[root]
    try:
        problem = "is empty (not mounted?)" if not os.listdir(root) else ""
    except OSError as e:
        problem = f"is not available ({e.strerror}; not mounted?)"
    with lock:
        cache[root] = problem
    return problem


def _mount_all(items: list[MountItem], image_fds: list[int], features: Features, report: Report,
               threads: bool) -> None:
    """In the worker from ``threads`` (or in the launch itself, one by one, where nothing
    can stall): one tmpfs over each store's ``snapshots/`` (one store per launch,
    normally), with a ``KEY/ID/tree`` directory per item where its image is attached
    while its overlay is made; detached (with the image mounts on it) once all are made.
    One tmpfs for all paths, not one each: a launch of 20 paths saves 38 mount and
    umount calls."""
    areas = sorted({os.path.dirname(os.path.dirname(item.snapshot_dir)) for item in items})
    mounted: list[str] = []
    try:
        for area in areas:
            flags = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
            try:
                syscalls.mount("ovlrun", area, "tmpfs", flags, f"mode=0700,size=64k,nr_inodes={3 * len(items) + 8}")
            except OSError as e:
                raise OvlrunError(f"cannot prepare {area} for the snapshot images: {e}") from None
            mounted.append(area)
        for item in items:
            os.makedirs(item.tree, 0o700)
        if threads:
            _mount_concurrently(items, image_fds, features, report)
        else:
            for i, item in enumerate(items):
                failure: BaseException | None = None
                try:
                    mount_localised(item, image_fds[i], features)
                except Exception as e:  # reported, in the launch's own order
                    failure = e
                report(i, failure)
    finally:
        for area in mounted:
            syscalls.umount2(area, syscalls.MNT_DETACH)


def mount_localised(item: MountItem, image_fd: int, features: Features) -> None:
    """Mount the image (fd ``image_fd``) at ``item.tree`` (made by :func:`mount_all`) and
    the overlay on ``item.source``."""
    try:
        image_mount = mount_image(image_fd)
    except ImageMountError as e:
        message = f"cannot mount the snapshot image {item.image} of {item.path}: {e}"
        if e.errno in RESOURCE_ERRNOS:
            raise OvlrunError(message) from None  # the launch's shortage, not this snapshot's fault
        raise SnapshotUnusable(message) from None
    try:
        try:
            syscalls.move_mount(image_mount, item.tree)
        except OSError as e:
            raise OvlrunError(f"cannot attach snapshot image {item.image}: {e}") from None
        # Resolves the source once, from / without following symlinks, and checks it is
        # the directory the snapshot was built from (a PathFailure otherwise: nothing is
        # mounted for it).  The context of a kernel refusal is added here, once.
        try:
            mount_overlay(OverlaySpec(target=item.source, snapshot_tree=item.tree, data=item.source,
                                      source_root=item.source_root, source_ino=item.source_ino), features)
        except OverlaySetupError as e:
            raise _refused(e, f"cannot set up overlay for {item.source}: {e}") from None
        except OSError as e:
            raise _refused(e, f"cannot mount localised overlay on {item.source}: {e}") from None
    finally:
        os.close(image_mount)


def _refused(e: OSError, message: str) -> OvlrunError:
    """The kernel refused one path's overlay: that path's failure, unless it is a shortage
    of the launch's own (an error of the whole launch)."""
    return OvlrunError(message) if e.errno in RESOURCE_ERRNOS else OverlayRefused(message)


MAX_MOUNT_THREADS = 8
# Descriptors one mount thread holds at most at once (the image's own, the erofs and
# overlay contexts and mounts, /, the tree root, the source, the snapshot layer).
FDS_PER_THREAD = 8


def _thread_count(n_items: int) -> int:
    """Mount threads to start besides the calling one: as many as fit in the descriptors
    left under RLIMIT_NOFILE (a caller may have set it low), at most MAX_MOUNT_THREADS in
    all."""
    wanted = min(MAX_MOUNT_THREADS, n_items) - 1
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if wanted <= 0 or soft == resource.RLIM_INFINITY:
        return max(0, wanted)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0
    free = soft - in_use - FDS_PER_THREAD  # room for the calling thread first
    return max(0, min(wanted, free // FDS_PER_THREAD))


def _mount_concurrently(items: list[MountItem], image_fds: list[int], features: Features, report: Report) -> None:
    """Mount every item; report each one's failure (or None) as soon as it is known.

    Each mount waits for round trips to the shared tree (resolving the source, the data
    layer's statfs when the superblock is created): at NFS latencies, 20 sequential
    mounts cost 20+ ms of waiting.  The mounts are independent (localised paths never
    nest), so they run from a few threads (ctypes and os calls release the GIL), in the
    mount worker, in the job's new mount namespace; this thread mounts too, so all are
    mounted even if no other thread can start.  ``_thread``, not ``threading.Thread``:
    the latter's start() waits for the new thread to say it runs, for ever if it died on
    the way (seen under RLIMIT_DATA: a MemoryError in its bootstrap).
    """
    # Every thread's walk starts at its tree root, so all would wait for the same first
    # lookups anyway; walking into each root once first spares a cold NFS client the
    # same ACCESS sent by several threads at once (each missing its access cache).
    # Measured on kernel NFS, 21 paths cold: 26-33 ACCESS with the threads, 24 with this.
    # (Only a stat: the roots are opened, without symlinks, by each mount.)
    if len(items) > 1:
        for root in {item.source_root for item in items if item.source_root}:
            try:
                os.stat(os.path.join(root, "."))
            except OSError:
                pass  # each mount then fails, or not, on its own, as without this
    pending = list(range(len(items)))
    lock = _thread.allocate_lock()
    # Held until the last item is reported (by whichever thread reports it).
    all_done = _thread.allocate_lock()
    all_done.acquire()
    left = [len(items)]

    def mount_next() -> bool:
        with lock:
            if not pending:
                return False
            i = pending.pop()
        failure: BaseException | None = None
        try:
            mount_localised(items[i], image_fds[i], features)
        except BaseException as e:  # reported, in the launch's own order
            failure = e
        try:
            report(i, failure)
        finally:
            with lock:
                left[0] -= 1
                if not left[0]:
                    all_done.release()
        return True

    def mount_all_pending() -> None:
        while mount_next():
            pass

    def helper(started: _thread.LockType) -> None:
        started.release()
        mount_all_pending()

    for _ in range(_thread_count(len(items))):
        started = _thread.allocate_lock()
        started.acquire()
        try:
            _thread.start_new_thread(helper, (started,))
        except RuntimeError:  # "can't start new thread": fewer threads, or none
            break
        # One at a time, as threading does (the first lookups of the paths' common parents
        # are then not all sent at once), but never waiting for ever.
        started.acquire(timeout=1.0)
    # The threads mostly wait in syscalls; between them they need the GIL only briefly.
    # With the default 5 ms switch interval a thread ready to run can wait that long.
    sys.setswitchinterval(0.0001)
    mount_all_pending()
    all_done.acquire()


def _tree_root_available(item: MountItem, problem: str, missing_root: str, strict: bool, warn: Warn) -> bool:
    """A localised source is missing: was the release deleted, or is the tree not there?

    ``problem`` is what the mount worker found listing the tree root ("": it is fine).  A
    missing or empty root (an unmounted NFS mount point) is an error even without
    --strict: every path of the tree would be missing and the job could only fail later,
    less clearly.  A profile with ``missing_root = "unlocalised"`` runs the job without
    that tree's overlays instead (returns False after a warning); ``strict`` refuses.
    """
    if not problem:
        return True
    if missing_root != "unlocalised":
        raise TreeRootMissing(f"shared tree root {item.root} {problem}")
    if strict:
        raise OvlrunError(f"shared tree root {item.root} {problem}; --strict: refusing to run the job unlocalised")
    warn(f"shared tree root {item.root} {problem}; running without localising it")
    return False
