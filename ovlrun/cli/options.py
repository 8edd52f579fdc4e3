"""What several command modules share: typer option types and the root check.

typer through its public API only: typer >= 0.26 vendors its own click, so importing
click would find another copy (or none).
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from ovlrun.errors import OvlrunError

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the shared tree per source "
                                           "before giving up on it (a stalled server).")]


def require_root(what: str, why: str = "trusted.overlay.* xattrs can only be written by root") -> None:
    if os.geteuid() != 0:
        raise OvlrunError(f"{what} must run as root ({why})")


def print_json(data: Any) -> None:
    import json
    import sys

    json.dump(data, sys.stdout, indent=1)
    print()
