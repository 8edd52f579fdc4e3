"""What the running kernel's overlayfs supports, probed without mounting anything.

- The new mount API (fsopen/fsconfig, Linux 5.2) avoids mount(2)'s one-page option
  limit, which can silently drop layers past the cut.
- ``lowerdir+``/``datadir+`` (Linux 6.8) append one layer per fsconfig call, unescaped.
- Data-only lower layers (``lowerdir=A::B``, Linux 6.5) let a metacopy file's data come
  from a layer that is never looked up by name: stat() of a localised file then costs no
  request to the shared tree.
"""

from __future__ import annotations

import errno
import os

from ovlrun.linux import syscalls

REDIRECT_MAX_PARAM = "/sys/module/overlay/parameters/redirect_max"
DEFAULT_REDIRECT_MAX = 256


def redirect_max() -> int:
    """overlayfs' redirect_max module parameter (bytes), 256 if unreadable."""
    try:
        with open(REDIRECT_MAX_PARAM) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return DEFAULT_REDIRECT_MAX


def _kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release.split("-")[0].split(".")
    try:
        return (int(release[0]), int(release[1])) >= (major, minor)
    except (IndexError, ValueError):
        return False


# Plain classes, not NamedTuple/dataclass: this module is on every launch's path, and
# ``typing`` alone costs ~10 ms to import on a -I -S interpreter.
class Features:
    __slots__ = ("data_only_layers", "layer_append", "new_mount_api", "overlay", "redirect_max")

    def __init__(self, overlay: bool, new_mount_api: bool, layer_append: bool, data_only_layers: bool,
                 redirect_max: int) -> None:
        self.overlay = overlay
        self.new_mount_api = new_mount_api
        self.layer_append = layer_append  # lowerdir+ / datadir+
        self.data_only_layers = data_only_layers
        self.redirect_max = redirect_max

    def __repr__(self) -> str:
        return (f"Features(overlay={self.overlay}, new_mount_api={self.new_mount_api}, "
                f"layer_append={self.layer_append}, data_only_layers={self.data_only_layers}, "
                f"redirect_max={self.redirect_max})")

    @property
    def mount_method(self) -> str:
        if self.new_mount_api and self.layer_append:
            return "fsconfig lowerdir+/datadir+"
        return "mount(2) lowerdir= option string"


def _overlay_registered() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == "overlay" for line in f if line.strip())
    except OSError:
        return False


_probed: list[Features] = []


def probe() -> Features:
    """Probe once per process (a launch mounts several overlays)."""
    if not _probed:
        _probed.append(_probe())
    return _probed[0]


def _probe() -> Features:
    overlay = _overlay_registered()
    new_api = append = False
    if overlay:
        try:
            fd = syscalls.fsopen("overlay")
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EPERM, errno.ENODEV):
                raise
        else:
            new_api = True
            try:
                # Unknown parameters fail with EINVAL; "/" is a harmless valid layer.
                syscalls.fsconfig_set_string(fd, "datadir+", "/")
                append = True
            except OSError:
                append = False
            finally:
                os.close(fd)
    data_only = append or _kernel_at_least(6, 5)
    return Features(overlay, new_api, append, overlay and data_only, redirect_max())
