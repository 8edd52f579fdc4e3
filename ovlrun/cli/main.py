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

SUBCOMMANDS = ("snapshot", "doctor", "profile", "status", "slurm", "enter")
HELP_FLAGS = ("-h", "--help", "--version")
# What a sudo caller may run as root: a job, and entering their own job.
SUDO_ALLOWED = ("enter",)


def sudo_gate(args: list[str]) -> None:
    """Refuse every subcommand but ``enter`` to a non-root caller who came through sudo.

    They need no root (``profile check``, ``status``: run them without sudo), or are the
    administrator's alone (``snapshot``: root writing what every job trusts; ``doctor``;
    ``slurm``: slurmd's).  The shipped sudoers drop-in allows only launches and ``enter``
    too; this is the first line of defence, sudoers the second.
    """
    import os

    if not os.environ.get("SUDO_UID", "0").strip("0") or not args or args[0] in SUDO_ALLOWED:
        return
    if args[0] in SUBCOMMANDS:
        raise OvlrunError(f"'ovlrun {args[0]}' is not available through sudo: "
                          + ("run it without sudo, as yourself" if args[0] in ("profile", "status")
                             else "it is for the administrator (root) only"))


def dispatch(args: list[str]) -> int:
    sudo_gate(args)
    if args and (args[0] in SUBCOMMANDS or args[0] in HELP_FLAGS):
        from ovlrun.cli.admin import run_typer

        return run_typer(args)
    from ovlrun.cli.launch import launch

    return launch(args)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        status = dispatch(args)
        # Flushed here, not at interpreter exit, so a reader that went away is a
        # BrokenPipeError below rather than an "Exception ignored" message.
        sys.stdout.flush()
        return status
    except OvlrunError as e:
        print(f"ovlrun: {e.message}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``ovlrun snapshot list | head``): point stdout at
        # /dev/null so the interpreter's final flush does not complain again.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OVLRUN


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())
