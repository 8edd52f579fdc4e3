"""Mounting a plan's overlays in the job's private namespace.

Every snapshot is trust-checked first (only root may have written what the overlay
serves) and its image opened, then each localised path gets one read-only overlay
(:mod:`ovlrun.linux.overlay`) whose lower layer is the snapshot's EROFS image, mounted
(:mod:`ovlrun.linux.erofs`) at ``SNAPSHOT_DIR/tree`` on a small tmpfs over the store's
``snapshots/``, in this namespace only.  Once the overlays exist that tmpfs is detached
again: overlayfs holds private clones of its layers, so the image mount lives exactly
as long as the overlay (a loop device, where one is needed, is autoclear), while the
overlay's options keep naming ``.../snapshots/KEY/ID/tree``, which is how gc and
``status`` recognise a snapshot in use.  A vanished release is skipped with a warning;
a missing tree root is an error unless the profile allows running unlocalised.  On the
launch path: imports nothing heavy.
"""

from __future__ import annotations

import os
import sys

from ovlrun.errors import OvlrunError
from ovlrun.linux import syscalls
from ovlrun.linux.erofs import ImageMountError, mount_image
from ovlrun.linux.files import UntrustedError, open_trusted
from ovlrun.linux.kernel import Features, probe
from ovlrun.linux.overlay import OverlaySetupError, OverlaySpec, SourceChanged, SourceMissing, mount_overlay
from ovlrun.store.layout import check_snapshot_trusted

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from ovlrun.launch.plan import JobPlan, MountItem

    Warn = Callable[[str], None]


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
                missing_root: str = "fail", features: Features | None = None) -> list[MountItem]:
    """Trust-check and mount every planned overlay in the current (private) namespace.

    A vanished source is skipped with a warning (fatal with ``strict``), and so is one
    that is not the directory its snapshot was built from (replaced, or a symlink on the
    way below the tree root; see :func:`ovlrun.linux.overlay.open_source`): nothing is
    mounted for it anywhere.
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
        message = (f"snapshot of {item.path} predates source identity checks "
                   "(rebuild it: ovlrun snapshot refresh --all)")
        if strict:
            raise OvlrunError(message)
        warn(message + "; it stays unlocalised")
    image_fds = [open_image(item.image) for item in items]
    try:
        failures = mount_all(items, image_fds, features)
    finally:
        for fd in image_fds:
            os.close(fd)
    mounted = []
    absent_roots: set[str] = set()
    for item, failure in zip(items, failures, strict=True):
        if isinstance(failure, SourceChanged):
            # Nothing was mounted anywhere; the path is served by the plain shared tree.
            if strict:
                raise failure
            warn(f"{failure.message}; it stays unlocalised (rebuild it: ovlrun snapshot refresh --all)")
            continue
        if failure is not None and not isinstance(failure, SourceMissing):
            raise failure
        if failure is not None:
            if item.root in absent_roots:
                continue
            if not _tree_root_available(item, missing_root, warn):
                absent_roots.add(item.root)
                continue
            message = f"{item.source} (localised path {item.path}) is missing on the shared tree"
            if strict:
                raise OvlrunError(message) from None
            warn(message + "; skipped")
            continue
        mounted.append(item)
    return mounted


MAX_MOUNT_THREADS = 8


def open_image(path: str) -> int:
    """The snapshot image, opened without following symlinks and trust-checked on the fd
    that is then mounted (no window to swap the file)."""
    try:
        return open_trusted(path)
    except OSError as e:
        raise OvlrunError(f"snapshot image {path}: {e.strerror}") from None
    except UntrustedError as e:
        raise OvlrunError(f"refusing snapshot image {path}: {e.problem}") from None


def mount_all(items: list[MountItem], image_fds: list[int], features: Features) -> list[BaseException | None]:
    """Mount every item (image fd ``image_fds[i]``); return each one's failure, in order.

    One tmpfs over each store's ``snapshots/`` (one store per launch, normally), with a
    ``KEY/ID/tree`` directory per item where its image is attached while its overlay is
    made; detached (with the image mounts on it) once all are made.  One tmpfs for all
    paths, not one each: a launch of 20 paths saves 38 mount and umount calls.
    """
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
        return _mount_concurrently(items, image_fds, features)
    finally:
        for area in mounted:
            syscalls.umount2(area, syscalls.MNT_DETACH)


def mount_localised(item: MountItem, image_fd: int, features: Features) -> None:
    """Mount the image (fd ``image_fd``) at ``item.tree`` (made by :func:`mount_all`) and
    the overlay on ``item.source``."""
    try:
        image_mount = mount_image(image_fd)
    except ImageMountError as e:
        raise OvlrunError(f"cannot mount snapshot image {item.image}: {e}") from None
    try:
        try:
            syscalls.move_mount(image_mount, item.tree)
        except OSError as e:
            raise OvlrunError(f"cannot attach snapshot image {item.image}: {e}") from None
        # Resolves the source once, below its tree root without following symlinks, and
        # checks it is the directory the snapshot was built from (SourceChanged: nothing
        # is mounted for it).
        try:
            mount_overlay(OverlaySpec(target=item.source, snapshot_tree=item.tree, data=item.source,
                                      source_root=item.source_root, source_ino=item.source_ino), features)
        except OverlaySetupError as e:
            raise OvlrunError(f"cannot set up overlay for {item.source}: {e}") from None
        except OSError as e:
            raise OvlrunError(f"cannot mount localised overlay on {item.source}: {e}") from None
    finally:
        os.close(image_mount)


def _mount_concurrently(items: list[MountItem], image_fds: list[int],
                        features: Features) -> list[BaseException | None]:
    """Mount every item; return each one's failure (or None), in order.

    Each mount waits for round trips to the shared tree (resolving the source, the data
    layer's statfs when the superblock is created): at NFS latencies, 20 sequential
    mounts cost 20+ ms of waiting.  The mounts are independent (localised paths never
    nest), so they run from a few threads; ctypes and os calls release the GIL.  The
    threads are started after unshare() (they share the job's new mount namespace) and
    are all joined before anything else (the privilege drop) happens.
    """
    failures: list[BaseException | None] = [None] * len(items)

    def mount_one(i: int) -> None:
        try:
            mount_localised(items[i], image_fds[i], features)
        except BaseException as e:  # re-raised by the caller, in order
            failures[i] = e

    if len(items) < 2:
        for i in range(len(items)):
            mount_one(i)
        return failures
    # Every thread's walk starts at its tree root, so all would wait for the same first
    # lookups anyway; walking into each root once first spares a cold NFS client the
    # same ACCESS sent by several threads at once (each missing its access cache).
    # Measured on kernel NFS, 21 paths cold: 26-33 ACCESS with the threads, 24 with this.
    for root in {item.source_root for item in items if item.source_root}:
        try:
            os.stat(os.path.join(root, "."))
        except OSError:
            pass  # each mount then fails, or not, on its own, as without this
    import threading

    pending = list(range(len(items)))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                i = pending.pop()
            mount_one(i)

    threads = [threading.Thread(target=worker) for _ in range(min(MAX_MOUNT_THREADS, len(items)))]
    # The workers mostly wait in syscalls; between them they need the GIL only briefly.
    # With the default 5 ms switch interval a worker ready to run can wait that long.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0001)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    return failures


def _tree_root_available(item: MountItem, missing_root: str, warn: Warn) -> bool:
    """A localised source is missing: was the release deleted, or is the tree not there?

    Only reached on that failure path, so a normal launch pays nothing for it.  A missing
    or empty root (an unmounted NFS mount point) is an error even without --strict: every
    path of the tree would be missing and the job could only fail later, less clearly.
    A profile with ``missing_root = "unlocalised"`` runs the job without that tree's
    overlays instead (returns False after a warning).
    """
    if not item.root:
        return True
    try:
        problem = "is empty (not mounted?)" if not os.listdir(item.root) else ""
    except OSError as e:
        problem = f"is not available ({e.strerror}; not mounted?)"
    if not problem:
        return True
    if missing_root == "unlocalised":
        warn(f"shared tree root {item.root} {problem}; running without localising it")
        return False
    raise TreeRootMissing(f"shared tree root {item.root} {problem}")
