"""What the running kernel's overlayfs supports, found by behaviour, never by version.

Measured under qemu on Debian's own kernels (``tests/vm``, table in the README):

- 6.1: overlay has no fs_context parser of its own.  The generic legacy parser accepts
  *any* key (``fsconfig("no_such_key")`` succeeds) and refuses fd values (EOPNOTSUPP),
  so an accepted key proves nothing.  No data-only layers (``::`` is EINVAL).
- 6.5+: overlay's own parser rejects unknown keys with EINVAL and knows ``::``;
  ``lowerdir+``/``datadir+`` strings from 6.8 (6.12 measured); layers as fds from 6.13
  and as ``O_PATH`` fds from 6.15 (6.12: EBADF for O_PATH, EINVAL for O_RDONLY).

So the probe first checks that an unknown key is *rejected*, and only then trusts keys
it accepts; fd layers are tried with an O_PATH fd of ``/`` on a throwaway context.  It
costs a handful of syscalls (fsopen, 2-4 fsconfig, open/close) and mounts nothing.
``fsopen("overlay")`` itself autoloads overlay.ko (request_module): reading
``/proc/filesystems`` first would call a stock, freshly booted machine overlay-less.
"""

from __future__ import annotations

import errno
import os

from ovlrun.linux import syscalls

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: typing costs ~10 ms to import on the launch path
    from collections.abc import Callable

REDIRECT_MAX_PARAM = "/sys/module/overlay/parameters/redirect_max"
DEFAULT_REDIRECT_MAX = 256

# Mount methods, best first.  Every kernel that has one also has all those after it.
FD = "fd"  # fsconfig lowerdir+/datadir+ as O_PATH fds: no length limit, no escaping
STRING = "string"  # fsconfig lowerdir+/datadir+ as strings (<= 255 bytes each)
MOUNT_DATA_ONLY = "mount-data-only"  # mount(2) lowerdir=SNAP::DATA (one page of options)
MOUNT_FALLBACK = "mount-fallback"  # mount(2) lowerdir=SNAP:DATA: shared tree is a regular layer
METHODS = (FD, STRING, MOUNT_DATA_ONLY, MOUNT_FALLBACK)
DESCRIPTIONS = {
    FD: "fsopen/fsconfig lowerdir+ and datadir+ as O_PATH fds",
    STRING: "fsopen/fsconfig lowerdir+ and datadir+ as strings",
    MOUNT_DATA_ONLY: "mount(2) lowerdir=SNAPSHOT::SHARED",
    MOUNT_FALLBACK: "mount(2) lowerdir=SNAPSHOT:SHARED (no data-only layers)",
}


def redirect_max() -> int:
    """overlayfs' redirect_max module parameter (bytes), 256 if unreadable."""
    try:
        with open(REDIRECT_MAX_PARAM) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return DEFAULT_REDIRECT_MAX


# Plain classes, not NamedTuple/dataclass: this module is on every launch's path, and
# ``typing`` alone costs ~10 ms to import on a -I -S interpreter.
class Features:
    __slots__ = ("findings", "method", "overlay", "redirect_max")

    def __init__(self, overlay: bool, method: str, redirect_max: int,
                 findings: dict[str, str] | None = None) -> None:
        self.overlay = overlay
        self.method = method  # one of METHODS
        self.redirect_max = redirect_max
        self.findings = findings or {}  # what the probe saw, for doctor

    def __repr__(self) -> str:
        return f"Features(overlay={self.overlay}, method={self.method!r}, redirect_max={self.redirect_max})"

    @property
    def data_only_layers(self) -> bool:
        return self.method != MOUNT_FALLBACK

    @property
    def new_mount_api(self) -> bool:
        return self.method in (FD, STRING)

    @property
    def mount_method(self) -> str:
        return DESCRIPTIONS[self.method]


def _overlay_registered() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == "overlay" for line in f if line.strip())
    except OSError:
        return False


def _accepts(call: Callable[..., None], *args: object) -> str:
    """"accepted" or the errno name of ``call(*args)`` (an fsconfig on a probe context)."""
    try:
        call(*args)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "accepted"


_probed: list[Features] = []


def probe() -> Features:
    """Probe once per process (a launch mounts several overlays)."""
    if not _probed:
        _probed.append(_probe())
    return _probed[0]


def _probe() -> Features:
    findings: dict[str, str] = {}
    try:
        fs = syscalls.fsopen("overlay")  # autoloads overlay.ko if needed
    except OSError as e:
        if e.errno == errno.ENODEV:
            findings["fsopen"] = "ENODEV: no overlay filesystem (even after module autoload)"
            return Features(False, MOUNT_FALLBACK, DEFAULT_REDIRECT_MAX, findings)
        if e.errno not in (errno.ENOSYS, errno.EPERM):
            raise
        # No new mount API (< 5.2) or not root: nothing can be probed without mounting;
        # mount(2) without data-only layers works on every overlayfs with metacopy.
        findings["fsopen"] = errno.errorcode[e.errno or 0]
        return Features(_overlay_registered(), MOUNT_FALLBACK, redirect_max(), findings)
    try:
        findings["unknown key"] = _accepts(syscalls.fsconfig_set_string, fs, "ovlrun_no_such_key", "/")
        if findings["unknown key"] == "accepted":
            # The legacy parser (overlay without its own, i.e. without data-only layers):
            # it accepts every key, so nothing else it accepts means anything.
            method = MOUNT_FALLBACK
        else:
            method = _best_with_own_parser(fs, findings)
    finally:
        os.close(fs)
    return Features(True, method, redirect_max(), findings)


def _best_with_own_parser(fs: int, findings: dict[str, str]) -> str:
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        findings["O_PATH fd layer"] = _accepts(syscalls.fsconfig_set_fd, fs, "lowerdir+", root)
    finally:
        os.close(root)
    if findings["O_PATH fd layer"] == "accepted":
        return FD
    findings["lowerdir+ string"] = _accepts(syscalls.fsconfig_set_string, fs, "lowerdir+", "/")
    if findings["lowerdir+ string"] == "accepted":
        findings["datadir+ string"] = _accepts(syscalls.fsconfig_set_string, fs, "datadir+", "/")
        if findings["datadir+ string"] == "accepted":
            return STRING
    # overlay's own parser resolves "lowerdir=" when it is set: "::" is checked here.
    findings["lowerdir=/::/"] = _accepts(syscalls.fsconfig_set_string, fs, "lowerdir", "/::/")
    return MOUNT_DATA_ONLY if findings["lowerdir=/::/"] == "accepted" else MOUNT_FALLBACK


def forced(method: str) -> Features:
    """Features that make :func:`ovlrun.linux.overlay.mount_overlay` use ``method`` (tests, doctor)."""
    if method not in METHODS:
        raise ValueError(f"unknown mount method {method!r}")
    return Features(True, method, redirect_max())
