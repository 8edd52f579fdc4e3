"""``ovlrun``'s entry point: dispatch, and the only place errors meet the user.

Two shapes share one program:
- ``ovlrun --profile NAME [--user U] [--strict] [--] [CMD ARGS...]`` launches a job
  (:mod:`ovlrun.cli.launch`, parsed by hand: it is the hot path, and imports neither
  typer nor the command table);
- ``ovlrun COMMAND ...`` runs one of the commands of the table
  (:data:`ovlrun.cli.commands.COMMANDS`, typer: :mod:`ovlrun.cli.app`).

:class:`OvlrunError` is caught here and only here (pipx style): a message, never a
traceback, and its exit status.  An ``OSError``, ``MemoryError`` or ``RecursionError``
that no code path turned into one is caught here too, as one line and 125.
"""

from __future__ import annotations

import sys

from ovlrun.errors import EXIT_OVLRUN, OvlrunError

HELP_FLAGS = ("-h", "--help", "--version")


def sudo_gate(name: str) -> None:
    """Refuse command ``name`` to a non-root caller who came through sudo unless the table
    allows it (``enter``).

    They need no root (``profile check``, ``status``, ``learn``: run them without sudo), or
    are the administrator's alone (``snapshot``: root writing what every job trusts;
    ``doctor``; ``jobs``: every user's jobs; ``slurm``: slurmd's).  The shipped sudoers
    drop-in allows only launches and ``enter`` too; this is the first line of defence,
    sudoers the second.
    """
    import os

    from ovlrun.cli.commands import SUDO_ALLOWED, SUDO_AS_YOURSELF, find

    command = find(name)
    if not os.environ.get("SUDO_UID", "0").strip("0") or command is None or command.sudo == SUDO_ALLOWED:
        return
    raise OvlrunError(f"'ovlrun {name}' is not available through sudo: "
                      + ("run it without sudo, as yourself" if command.sudo == SUDO_AS_YOURSELF
                         else "it is for the administrator (root) only")
                      + (f" ({command.sudo_hint})" if command.sudo_hint else ""))


def dispatch(args: list[str]) -> int:
    # Command names never start with '-'; a launch's command line always does (--profile).
    if args and (args[0] in HELP_FLAGS or not args[0].startswith("-")):
        from ovlrun.cli.commands import find

        if args[0] in HELP_FLAGS or find(args[0]) is not None:
            sudo_gate(args[0])
            from ovlrun.cli.app import run

            return run(args)
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
        # The reader went away (``ovlrun snapshot list | head``).
        _quiet_stdout()
        return EXIT_OVLRUN
    except (OSError, MemoryError, RecursionError) as e:
        # The safety net: a failure no code path turned into an OvlrunError (stdout on a
        # full disk, a resource the caller's limits withheld, ...).  One line and 125,
        # never a traceback: a user of a root tool must not learn its internals from one.
        _quiet_stdout()
        try:
            print(f"ovlrun: unexpected error: {e or type(e).__name__}", file=sys.stderr)
        except (OSError, ValueError):
            pass
        return EXIT_OVLRUN


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush of what could not be
    written does not fail (and complain) once more."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no stdout at all
        pass


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())
