"""The typer application of every subcommand, derived from the command table
(:data:`ovlrun.cli.commands.COMMANDS`), and ``ovlrun --help``.

typer through its public API only: typer >= 0.26 vendors its own click, so importing
click would find another copy (or none).
"""

from __future__ import annotations

import importlib

import typer

from ovlrun import __version__
from ovlrun.cli.commands import COMMANDS, find
from ovlrun.cli.launch import LAUNCH_HELP, LAUNCH_USAGE
from ovlrun.cli.options import run_typer


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
    command = find(args[0]) if args else None
    return run_typer(app, args, "ovlrun", wrapper=command is not None and command.wrapper)
