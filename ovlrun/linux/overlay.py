"""Mounting one read-only localising overlay.

Layers: the snapshot tree as the only regular lower layer, the shared subtree as a
data-only layer (``lowerdir=SNAPSHOT::SHARED``), ``metacopy=on,redirect_dir=follow``.
Lookups stop in the snapshot (its directories are opaque); only opening a metacopy file
follows its absolute redirect into the data-only layer.  Measured with a counting stand-in
for NFS: stat of 1.8k localised files costs 4 remote requests this way and 6,261 with the
shared tree as a regular lower layer (then every metacopy lookup walks its redirect).

Mount flags ro,nosuid,nodev: jobs only read software, and a snapshot must never turn a
release file into a set-uid or device entry point.
"""

from __future__ import annotations

import errno
import os

from ovlrun.errors import OvlrunError
from ovlrun.linux import layerpaths, syscalls
from ovlrun.linux.files import TreeRootError, open_release
from ovlrun.linux.kernel import FD, MOUNT_DATA_ONLY, STRING, Features

# fsconfig(2) string values are capped (syscalls.FSCONFIG_STRING_MAX); longer layer paths
# are passed as O_PATH fds (FSCONFIG_SET_FD) where the kernel takes them, else shortened
# (ovlrun.linux.layerpaths).
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# Plain classes, not NamedTuple/dataclass: this module is on every launch's path, and
# ``typing`` alone costs ~10 ms to import on a -I -S interpreter.
class OverlaySpec:
    __slots__ = ("data", "snapshot_tree", "source_ino", "source_root", "target")

    def __init__(self, target: str, snapshot_tree: str, data: str, source_root: str = "",
                 source_ino: int = 0) -> None:
        self.target = target  # mount point = the shared subtree's real path
        self.snapshot_tree = snapshot_tree
        self.data = data  # the shared subtree (data-only layer)
        # Which directory the snapshot was built from (launches always pass it; see
        # open_source): the tree root's real path and the source directory's inode.
        self.source_root = source_root
        self.source_ino = source_ino


def escape_layer(path: str) -> str:
    """Escape a layer path for the legacy ``lowerdir=`` option string.

    overlayfs splits layers on ':' and the option string on ',' ; a backslash escapes
    both and itself (fs/overlayfs/params.c: ovl_parse_param_split_lowerdirs).
    """
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


class OverlaySetupError(syscalls.SyscallError):
    """The kernel refused the overlay's configuration (an fsconfig call); ``detail`` holds
    what overlayfs logged on the context, which explains most refusals."""


class PathFailure(OvlrunError):
    """One localised path cannot be localised (its source, or its snapshot, is not usable):
    that path stays unlocalised with a warning and the rest of the launch goes on
    (``--strict`` refuses).  Never raised for what concerns the whole launch (resources,
    the store's trust, the kernel)."""


class SourceMissing(PathFailure):
    """The shared subtree to localise is not there (release deleted, tree not mounted)."""

    # Set by the launch: why the path's tree root looks unmounted ("": it looks fine).
    root_problem = ""


class SourceStale(SourceMissing):
    """NFS said ESTALE: the release was deleted on the server while this client still
    had it cached.  Opened once more (the handle is then looked up afresh); if that is
    stale too, it is missing."""


class SourceChanged(PathFailure):
    """The localised path is not the directory its snapshot was built from (replaced, or
    a symlink now on the way from / to it): mounting there could serve the snapshot's
    names, with root's access to their data, over any directory."""


class SourceUnreachable(PathFailure):
    """The shared subtree cannot be opened by root: permission denied (root squashed, a
    user's FUSE mount without allow_other), another file system mounted on the way below
    the tree root, an I/O error."""


# Failures of the launch itself, not of one path: never turned into a per-path warning
# (under tight resource limits a path must not silently stay unlocalised).
RESOURCE_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.ENOSPC))


def _source_failure(e: OSError, spec: OverlaySpec, where: str) -> Exception:
    """What an error opening ``spec``'s source means for that path (``where``: "to" or
    "below" its tree root); a shortage of the launch's own (RESOURCE_ERRNOS) stays the
    OSError it is."""
    code = e.errno
    if code in (errno.ENOENT, errno.ENOTDIR):
        return SourceMissing(f"{spec.data} is missing on the shared tree")
    if code == errno.ESTALE:
        return _stale(spec)
    if code == errno.ELOOP:
        return SourceChanged(f"{spec.data} is not the directory its snapshot was built from "
                             f"(a symlink on the way {where} its tree root {spec.source_root})")
    if code == errno.EXDEV:
        return SourceUnreachable(f"{spec.data}: another file system is mounted on the way below its tree root "
                                 f"{spec.source_root} (a user's FUSE mount?); only the tree's own directories "
                                 "are localised")
    if code in RESOURCE_ERRNOS:
        return e
    return SourceUnreachable(f"{spec.data} cannot be opened on the shared tree: {os.strerror(code or 0)}")


def open_source(spec: OverlaySpec) -> int:
    """O_PATH fd of the shared subtree: the data layer and the mount point in one walk.

    Resolving the path once (instead of once for a check, once for ``datadir+`` and once
    for the mount target) saves remote lookups per localised path on a high-latency
    tree and leaves no window for the path to change between the steps.

    With the snapshot's source identity (every launch) the path is opened the one way
    root trusts a release directory (:func:`ovlrun.linux.files.open_release`: the tree
    root from / following no symlink, the rest below it following no symlink and
    crossing no mount -- the same lookups as a plain open of the whole path, so no extra
    round trip to the shared tree), and the directory found must have the inode the
    snapshot was built from (fstat: attributes the lookup just fetched).  Otherwise a
    :class:`PathFailure`: a release (or a parent of the tree root) swapped for a symlink
    to /etc or to the launcher's own site-packages, or a FUSE mount a user made on the
    way, must not get the overlay.  The fd is then both the data layer and the mount
    target, so nothing is resolved by path again.
    """
    if not spec.source_ino:
        # Callers without an identity (tests of the mount itself); launches always pass one.
        try:
            return os.open(spec.data, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise SourceMissing(f"{spec.data} is missing on the shared tree") from None
    changed = f"{spec.data} is not the directory its snapshot was built from"
    prefix = spec.source_root.rstrip("/") + "/"
    if not spec.data.startswith(prefix) or not spec.source_root.startswith("/"):
        raise SourceChanged(f"{changed} (not below its tree root {spec.source_root})")
    try:
        fd = open_release(spec.source_root, spec.data[len(prefix):])
    except TreeRootError as e:
        raise _source_failure(e, spec, "to") from None
    except OSError as e:
        raise _source_failure(e, spec, "below") from None
    try:
        ino = os.fstat(fd).st_ino
    except OSError as e:
        os.close(fd)
        raise _source_failure(e, spec, "below") from None
    if ino != spec.source_ino:
        os.close(fd)
        raise SourceChanged(f"{changed} (another directory under that name)")
    return fd


def _open_dir(path: str) -> int:
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _set_string_layer(fs_fd: int, key: str, path: str, path_fd: int | None) -> None:
    """``key`` = ``path`` as an fsconfig string, shortened if over the 255-byte cap.

    A snapshot tree becomes ``snapshots/KEY/ID/tree`` relative to the store root (so
    mountinfo still names it for gc); anything else ``/proc/self/fd/N`` (see layerpaths).
    """
    if len(os.fsencode(path)) <= syscalls.FSCONFIG_STRING_MAX:
        syscalls.fsconfig_set_string(fs_fd, key, path)
        return
    relative = layerpaths.store_relative(path) if key == "lowerdir+" else None
    if relative is not None:
        with layerpaths.InDirectory(relative[0]):
            syscalls.fsconfig_set_string(fs_fd, key, relative[1])  # resolved now, against the cwd
        return
    fd = _open_dir(path) if path_fd is None else path_fd
    try:
        syscalls.fsconfig_set_string(fs_fd, key, layerpaths.fd_path(fd))
    finally:
        if path_fd is None:
            os.close(fd)


def _mount_new_api(spec: OverlaySpec, fd_layers: bool) -> None:
    data_fd = open_source(spec)
    try:
        _mount_new_api_at(spec, fd_layers, data_fd)
    finally:
        os.close(data_fd)


def _mount_new_api_at(spec: OverlaySpec, fd_layers: bool, data_fd: int) -> None:
    fs_fd = syscalls.fsopen("overlay")
    try:
        try:
            # "ovlrun" as the mount source makes our mounts easy to find in mountinfo.
            syscalls.fsconfig_set_string(fs_fd, "source", "ovlrun")
            if fd_layers:  # Linux 6.15+: O_PATH fds, no length limit, nothing to escape
                snapshot_fd = _open_dir(spec.snapshot_tree)
                try:
                    syscalls.fsconfig_set_fd(fs_fd, "lowerdir+", snapshot_fd, spec.snapshot_tree)
                finally:
                    os.close(snapshot_fd)
                syscalls.fsconfig_set_fd(fs_fd, "datadir+", data_fd, spec.data)
            else:
                _set_string_layer(fs_fd, "lowerdir+", spec.snapshot_tree, None)
                _set_string_layer(fs_fd, "datadir+", spec.data, data_fd)
            syscalls.fsconfig_set_string(fs_fd, "metacopy", "on")
            syscalls.fsconfig_set_string(fs_fd, "redirect_dir", "follow")
            syscalls.fsconfig_create(fs_fd)
        except OSError as e:
            log = "; ".join(syscalls.read_fs_log(fs_fd))
            raise OverlaySetupError(e.errno or 0, getattr(e, "call", "fsconfig"), e.filename, log) from None
        attrs = syscalls.MOUNT_ATTR_RDONLY | syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV
        mnt_fd = syscalls.fsmount(fs_fd, syscalls.FSMOUNT_CLOEXEC, attrs)
    finally:
        os.close(fs_fd)
    try:
        if spec.target == spec.data:
            syscalls.move_mount_onto_fd(mnt_fd, data_fd, spec.target)
        else:
            syscalls.move_mount(mnt_fd, spec.target)
    finally:
        os.close(mnt_fd)


def _options(snapshot: str, data: str, data_only: bool) -> str:
    sep = "::" if data_only else ":"
    return f"lowerdir={escape_layer(snapshot)}{sep}{escape_layer(data)},metacopy=on,redirect_dir=follow"


def _fits_a_page(options: str) -> bool:
    # mount(2) copies one page of options; overlayfs would then see a truncated layer
    # list and may mount without some layers, silently.
    return len(options.encode()) + 1 <= PAGE_SIZE


def legacy_options(spec: OverlaySpec, data_only: bool) -> str:
    options = _options(spec.snapshot_tree, spec.data, data_only)
    if not _fits_a_page(options):
        raise OvlrunError(f"overlay options for {spec.target} exceed one page ({len(options)} bytes)")
    return options


def _mount_legacy(spec: OverlaySpec, data_only: bool) -> None:
    data_fd = open_source(spec)  # a clear error for a missing or changed source
    try:
        if spec.source_ino:
            # mount(2) takes paths: name the checked directory through its fd (the magic
            # link resolves to exactly that dentry), for the data layer and the mount point.
            by_fd = layerpaths.fd_path(data_fd)
            spec = OverlaySpec(by_fd, spec.snapshot_tree, by_fd)
        flags = syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV
        options = _options(spec.snapshot_tree, spec.data, data_only)
        if _fits_a_page(options):
            syscalls.mount("ovlrun", spec.target, "overlay", flags, options)
            return
        # Too long for one page: short names for both layers (see layerpaths), checked again.
        relative = layerpaths.store_relative(spec.snapshot_tree)
        snapshot_fd = _open_dir(spec.snapshot_tree) if relative is None else -1
        try:
            snapshot = layerpaths.fd_path(snapshot_fd) if relative is None else relative[1]
            spec_short = OverlaySpec(spec.target, snapshot, layerpaths.fd_path(data_fd))
            options = legacy_options(spec_short, data_only)
            if relative is None:
                syscalls.mount("ovlrun", spec.target, "overlay", flags, options)
            else:
                with layerpaths.InDirectory(relative[0]):
                    syscalls.mount("ovlrun", spec.target, "overlay", flags, options)
        finally:
            if snapshot_fd >= 0:
                os.close(snapshot_fd)
    finally:
        os.close(data_fd)


def _mount(spec: OverlaySpec, features: Features) -> None:
    if features.method in (FD, STRING):
        _mount_new_api(spec, fd_layers=features.method == FD)
    else:
        _mount_legacy(spec, data_only=features.method == MOUNT_DATA_ONLY)


def _revalidate(spec: OverlaySpec) -> None:
    """Make an NFS client ask the server whether ``spec``'s source is still there.

    An open for reading (not O_PATH) makes the client check a directory's attributes with
    the server (close-to-open); a stale handle then makes it drop its cached entry, so
    the next lookup asks the server again.  Opened as :func:`open_source` opens it (no
    symlink, no other mount on the way); the fd is closed unused: the source is then
    opened again, checked, by :func:`open_source`.
    """
    prefix = spec.source_root.rstrip("/") + "/"
    try:
        if spec.source_ino and spec.data.startswith(prefix):
            fd = open_release(spec.source_root, spec.data[len(prefix):], os.O_RDONLY | os.O_DIRECTORY)
        else:  # callers without an identity (tests of the mount itself)
            fd = os.open(spec.data, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        os.close(fd)
    except OSError:
        pass


def mount_overlay(spec: OverlaySpec, features: Features) -> None:
    """Mount ``spec`` in the current mount namespace, best method the kernel offers.

    Raises a :class:`PathFailure` for what concerns this path's source (see
    :func:`open_source`), :class:`OverlaySetupError` if the kernel refused the overlay's
    configuration, and the failing call's OSError otherwise; the caller says which
    localised path it was.

    A source deleted on an NFS server while this client still caches it resolves from
    the cache, and the open or the mount then fails with ESTALE (the server no longer
    knows the handle).  That is a missing source (:class:`SourceStale`, a
    :class:`SourceMissing`), after one more try once the client has checked the path
    with the server.
    """
    try:
        _mount(spec, features)
        return
    except (SourceStale, OSError) as e:
        if not isinstance(e, SourceStale) and e.errno != errno.ESTALE:
            raise
    _revalidate(spec)
    try:
        _mount(spec, features)  # SourceMissing from open_source if it is gone now
    except OSError as e:
        if e.errno == errno.ESTALE:
            raise _stale(spec) from None
        raise


def _stale(spec: OverlaySpec) -> SourceStale:
    return SourceStale(f"{spec.data} is missing on the shared tree (stale NFS file handle: deleted on the server)")
