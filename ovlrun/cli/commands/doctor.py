"""``ovlrun doctor``: what the running kernel supports and how launches mount (root)."""

from __future__ import annotations

import os
from typing import Any

import typer

from ovlrun.cli.options import JsonOpt, print_json
from ovlrun.errors import OvlrunError


def register(parent: typer.Typer, name: str) -> list[str]:
    parent.command(name)(doctor)
    return []


def doctor(as_json: JsonOpt = False) -> None:
    """Report what the running kernel's overlayfs supports and how launches will mount."""
    from ovlrun.linux.kernel import METHODS, probe

    f = probe()
    info: dict[str, Any] = {
        "kernel": os.uname().release, "overlay": f.overlay,
        "probe": f.findings,  # what each probe call returned ("accepted" or the errno)
        "method": f.method, "mount_method": f.mount_method,
        "usable_methods": list(METHODS[METHODS.index(f.method):]) if f.overlay else [],
        "data_only_layers": f.data_only_layers,
        "layout": "lowerdir=SNAPSHOT::SHARED (data-only: lookups and stats stay local)" if f.data_only_layers
        else "lowerdir=SNAPSHOT:SHARED (fallback: stat of localised files walks the shared tree)",
        "long_layer_paths": "O_PATH fds (no limit)" if f.method == "fd" else
        "store-relative snapshot path after chdir, /proc/self/fd/N for the shared subtree",
        "redirect_max": f.redirect_max}
    if as_json:
        print_json(info)
    else:
        for k, v in info.items():
            if isinstance(v, dict):
                for pk, pv in v.items():
                    print(f"{'probe ' + pk:28} {pv}")
            else:
                print(f"{k:28} {v}")
    if f.findings.get("fsopen") == "EPERM":
        raise OvlrunError("probing overlayfs needs root (fsopen: EPERM); run doctor as root", status=1)
    if not f.overlay:
        raise OvlrunError("overlayfs is not available (no overlay filesystem, even after module autoload)", status=1)
