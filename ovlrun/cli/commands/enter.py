"""``ovlrun enter JOBID [--] [CMD...]``: join a job's prepared namespace (sudo).

The command passes through untouched: everything after JOBID is the command's, options
included.
"""

from __future__ import annotations

from typing import Annotated

import typer

# Everything after JOBID belongs to the command: no option parsing past it.
SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True, "allow_interspersed_args": False}


def register(parent: typer.Typer, name: str) -> list[str]:
    parent.command(name, context_settings=SETTINGS)(enter)
    return []


def enter(job_id: Annotated[str, typer.Argument(metavar="JOBID", help="The job's id (digits).")],
          command: Annotated[list[str] | None, typer.Argument(
              metavar="[--] [CMD [ARG...]]", help="The command; default: your shell.")] = None) -> None:
    """Run CMD as yourself in the mount namespace ovlrun's prolog prepared for job JOBID on
    this node, with that job's localised view (sudo ovlrun enter JOBID -- CMD).  Only the
    job's owner (or root) may enter it.  Exit status: CMD's own, or 125 (ovlrun failed),
    126 (CMD not executable), 127 (CMD not found)."""
    from ovlrun.hooks.enter import enter as enter_job

    argv = command or []
    if argv[:1] == ["--"]:  # option parsing stopped at JOBID, so the "--" is still here
        argv = argv[1:]
    raise typer.Exit(enter_job(job_id, argv))
