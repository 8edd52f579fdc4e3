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
from functools import cache
from typing import NamedTuple

from ovlrun import syscalls

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


class Features(NamedTuple):
    overlay: bool
    new_mount_api: bool
    layer_append: bool  # lowerdir+ / datadir+
    data_only_layers: bool
    redirect_max: int

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


@cache
def probe() -> Features:
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
