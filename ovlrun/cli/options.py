"""What several command modules share: typer option types and the root check.

typer through its public API only: typer >= 0.26 vendors its own click, so importing
click would find another copy (or none).
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from ovlrun.errors import EXIT_OVLRUN, EXIT_USAGE, OvlrunError

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


def usage_error(e: Exception) -> int | None:
    """Report typer's usage error ``e`` in one line; None if ``e`` is not one.

    typer raises its (vendored) click's ``ClickException`` subclasses for bad usage; they
    are recognised by click's documented interface (``exit_code``, ``format_message``,
    ``ctx``) rather than by class, which would mean importing click.
    """
    import sys

    exit_code = getattr(e, "exit_code", None)
    format_message = getattr(e, "format_message", None)
    if not isinstance(exit_code, int) or not callable(format_message):
        return None
    if type(e).__name__ == "NoArgsIsHelpError":  # help was printed already
        return EXIT_USAGE
    ctx = getattr(e, "ctx", None)
    where = getattr(ctx, "command_path", "ovlrun")
    print(f"{where}: {format_message()} (see '{where} --help')", file=sys.stderr)
    return exit_code


def run_typer(app: typer.Typer, args: list[str], prog: str, *, wrapper: bool) -> int:
    """Run a typer app on ``args``: its own status, 0 for --help, 2 for bad usage (one
    line; 125 for a ``wrapper``'s, as env(1)), OvlrunError passed on to the CLI edge."""
    try:
        result = app(args=args, prog_name=prog, standalone_mode=False)
    except (typer.Exit, typer.Abort) as e:
        return getattr(e, "exit_code", 1)
    except OvlrunError:
        raise
    except Exception as e:
        code = usage_error(e)
        if code is None:
            raise
        return EXIT_OVLRUN if wrapper else code
    return result if isinstance(result, int) else 0
