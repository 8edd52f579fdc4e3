"""Mounting a plan's overlays in the job's private namespace.

Every snapshot is trust-checked first (only root may have written what the overlay
serves), then each localised path gets one read-only overlay (:mod:`ovlrun.linux.overlay`).
A vanished release is skipped with a warning; a missing tree root is an error unless
the profile allows running unlocalised.  On the launch path: imports nothing heavy.
"""

from __future__ import annotations

import os
import sys

from ovlrun.errors import OvlrunError
from ovlrun.linux.kernel import Features, probe
from ovlrun.linux.overlay import OverlaySpec, SourceMissing, mount_overlay
from ovlrun.store.layout import check_snapshot_trusted

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from ovlrun.launch.plan import JobPlan, MountItem

    Warn = Callable[[str], None]


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

    A vanished source is skipped with a warning (fatal with ``strict``).
    """
    features = features or probe()
    if not features.overlay:
        raise OvlrunError("this kernel has no overlayfs (modprobe overlay)")
    trusted: set[str] = set()
    for item in items:
        check_snapshot_trusted(store, item.snapshot_dir, trusted)
    specs = [OverlaySpec(target=item.source, snapshot_tree=item.tree, data=item.source) for item in items]
    failures = _mount_concurrently(specs, features)
    mounted = []
    absent_roots: set[str] = set()
    for item, failure in zip(items, failures, strict=True):
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


def _mount_concurrently(specs: list[OverlaySpec], features: Features) -> list[BaseException | None]:
    """Mount every spec; return each one's failure (or None), in order.

    Each mount waits for round trips to the shared tree (resolving the source, the data
    layer's statfs when the superblock is created): at NFS latencies, 20 sequential
    mounts cost 20+ ms of waiting.  The mounts are independent (localised paths never
    nest), so they run from a few threads; ctypes and os calls release the GIL.  The
    threads are started after unshare() (they share the job's new mount namespace) and
    are all joined before anything else (the privilege drop) happens.
    """
    failures: list[BaseException | None] = [None] * len(specs)

    def mount_one(i: int) -> None:
        try:
            mount_overlay(specs[i], features)  # resolves the source once; no separate existence check
        except BaseException as e:  # re-raised by the caller, in order
            failures[i] = e

    if len(specs) < 2:
        for i in range(len(specs)):
            mount_one(i)
        return failures
    import threading

    pending = list(range(len(specs)))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                i = pending.pop()
            mount_one(i)

    threads = [threading.Thread(target=worker) for _ in range(min(MAX_MOUNT_THREADS, len(specs)))]
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
    raise OvlrunError(f"shared tree root {item.root} {problem}; refusing to run the job there "
                      "(profiles may allow it with missing_root = \"unlocalised\")")
