"""``ovlrun learn [OPTIONS] -- CMD``, ``ovlrun learn watch``, ``ovlrun learn propose``
(:mod:`ovlrun.learn`).

Everything after ``learn`` is learn's own command line, parsed by learn's typer apps
(:func:`ovlrun.learn.cli.app_for`), help included; usage errors are reported as every
command's are (:func:`ovlrun.cli.options.run_typer`): learn itself is a wrapper, like a
launch (125; CMD's status is CMD's), ``watch`` and ``propose`` are not (2).
"""

from __future__ import annotations

from typing import Annotated

import typer

from ovlrun.cli.options import run_typer

# Nothing is parsed here: options, --help and CMD all go to learn's own apps.
SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True, "allow_interspersed_args": False,
            "help_option_names": []}


def register(parent: typer.Typer, name: str) -> list[str]:
    parent.command(name, context_settings=SETTINGS, add_help_option=False)(learn)
    return []


def learn(args: Annotated[list[str] | None, typer.Argument(
        metavar="[watch|propose] [OPTIONS] [-- CMD [ARGS...]]")] = None) -> None:
    """Trace CMD's lookups and propose a profile; see ovlrun learn --help."""
    from ovlrun.learn.cli import app_for

    argv = args or []
    app, wrapper = app_for(argv)
    raise typer.Exit(run_typer(app, argv, "ovlrun learn", wrapper=wrapper))
