"""``ovlrun``'s entry point: dispatch, and the only place errors meet the user.

Two shapes share one program:
- ``ovlrun --profile NAME [--user U] [--strict] [--] [CMD ARGS...]`` launches a job
  (:mod:`ovlrun.cli.launch`, parsed by hand: it is the hot path);
- ``ovlrun SUBCOMMAND ...`` administers (:mod:`ovlrun.cli.admin`, typer), or runs the
  scheduler hooks and ``enter`` (:mod:`ovlrun.cli.hooks`).

:class:`OvlrunError` is caught here and only here (pipx style): a message, never a
traceback, and its exit status.
"""

from __future__ import annotations

import sys

from ovlrun.errors import EXIT_OVLRUN, OvlrunError

ADMIN_COMMANDS = ("snapshot", "doctor", "profile", "status")
HELP_FLAGS = ("-h", "--help", "--version")


def dispatch(args: list[str]) -> int:
    if args and args[0] == "slurm":
        from ovlrun.cli.hooks import slurm_main

        return slurm_main(args[1:])
    if args and args[0] == "enter":
        from ovlrun.cli.hooks import enter_main

        return enter_main(args[1:])
    if args and (args[0] in ADMIN_COMMANDS or args[0] in HELP_FLAGS):
        from ovlrun.cli.admin import run_typer

        return run_typer(args)
    from ovlrun.cli.launch import launch

    return launch(args)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        return dispatch(args)
    except OvlrunError as e:
        print(f"ovlrun: {e.message}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OVLRUN


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())
