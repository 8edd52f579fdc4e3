"""The typer application of every subcommand, derived from the command table
(:data:`ovlrun.cli.commands.COMMANDS`), and ``ovlrun --help``.

typer through its public API only: typer >= 0.26 vendors its own click, so importing
click would find another copy (or none).
"""

from __future__ import annotations

import importlib
import sys

import typer

from ovlrun import __version__
from ovlrun.cli.commands import COMMANDS, find
from ovlrun.cli.launch import LAUNCH_HELP, LAUNCH_USAGE
from ovlrun.errors import EXIT_OVLRUN, EXIT_USAGE, OvlrunError


def build() -> tuple[typer.Typer, dict[str, list[str]]]:
    """The typer app with every command of the table registered, and each command's
    subcommands (empty for a single command)."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, help="ovlrun administration.",
                      context_settings={"help_option_names": ["-h", "--help"]})
    subcommands = {c.name: importlib.import_module(c.module).register(app, c.name) for c in COMMANDS}
    return app, subcommands


def help_text(subcommands: dict[str, list[str]]) -> str:
    """``ovlrun --help``: the launch's usage and options, then the table's commands."""
    lines = []
    for c in COMMANDS:
        usage = " ".join(part for part in (c.name, "|".join(subcommands[c.name]), c.arguments) if part)
        lines.append((usage, c.summary))
    width = max(len(usage) for usage, _ in lines)
    commands = "".join(f"  {usage:{width}}  {summary}\n" for usage, summary in lines)
    return (f"Usage: {LAUNCH_USAGE}\n       ovlrun COMMAND [ARGS...]\n\n{LAUNCH_HELP}\n"
            f"Other commands (see ovlrun COMMAND --help):\n{commands}"
            "Environment (root callers only): OVLRUN_PROFILE_PATH (profile directories,\n"
            "colon-separated), OVLRUN_STORE (snapshot store, default /var/lib/ovlrun),\n"
            "OVLRUN_MOUNT_TIMEOUT (seconds a launch waits for the shared tree while\n"
            "mounting, default 60; then it exits 125).\n")


def _usage_error(e: Exception) -> int | None:
    """Report typer's usage error ``e`` in one line; None if ``e`` is not one.

    typer raises its (vendored) click's ``ClickException`` subclasses for bad usage; they
    are recognised by click's documented interface (``exit_code``, ``format_message``,
    ``ctx``) rather than by class, which would mean importing click.
    """
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


def run(args: list[str]) -> int:
    """Run a subcommand (or ``--help``, ``--version``): its own status, 0 for --help, 2
    for bad usage (one line; 125 for a wrapper's, see the table)."""
    if args and args[0] == "--version":
        print(f"ovlrun {__version__}")
        return 0
    app, subcommands = build()
    if args and args[0] in ("-h", "--help"):
        print(help_text(subcommands), end="")
        return 0
    try:
        result = app(args=args, prog_name="ovlrun", standalone_mode=False)
    except (typer.Exit, typer.Abort) as e:
        return getattr(e, "exit_code", 1)
    except OvlrunError:
        raise
    except Exception as e:
        code = _usage_error(e)
        if code is None:
            raise
        command = find(args[0]) if args else None
        return EXIT_OVLRUN if command is not None and command.wrapper else code
    return result if isinstance(result, int) else 0
