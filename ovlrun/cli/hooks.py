"""``ovlrun slurm prolog|epilog|clone-ns`` and ``ovlrun enter JOBID [--] [CMD...]``.

typer commands like the admin ones (registered on :data:`ovlrun.cli.admin.app`).
``enter``'s command passes through untouched: everything after JOBID is the command's,
options included.  What typer's import costs a Prolog is measured in docs/slurm.md;
jobs that ask for no profile never start Python (contrib/slurm/ovlrun-prolog).
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from ovlrun.errors import OvlrunError

slurm_app = typer.Typer(no_args_is_help=True, help=(
    "Slurm hooks, run by slurmd as root (see docs/slurm.md for slurm.conf and job_container.conf). "
    "A job asks for a profile with: sbatch --comment=ovl:NAME.  Hooks exit 0 on a user's mistake "
    "(the job runs unlocalised; the log says why)."))


def _require_slurmd() -> None:
    if os.environ.get("SUDO_UID") or os.geteuid() != 0:
        # The sudoers rule for ovlrun lets users run it as root; the hooks trust their
        # environment (job id, owner) and are for slurmd alone.
        raise OvlrunError("Slurm hooks are run by slurmd as root, not by users or through sudo")


@slurm_app.command("prolog")
def slurm_prolog() -> None:
    """Prolog: prepare the job's namespace with the profile's overlays."""
    _require_slurmd()
    from ovlrun.hooks.slurm import prolog

    raise typer.Exit(prolog())


@slurm_app.command("epilog")
def slurm_epilog() -> None:
    """Epilog: remove what the prolog made."""
    _require_slurmd()
    from ovlrun.hooks.slurm import epilog

    raise typer.Exit(epilog())


@slurm_app.command("clone-ns")
def slurm_clone_ns() -> None:
    """CloneNSScript (Slurm 24.11+): mount the job's profile into $SLURM_NS."""
    _require_slurmd()
    from ovlrun.hooks.slurm import clone_ns_script

    raise typer.Exit(clone_ns_script())


# Everything after JOBID belongs to the command: no option parsing past it.
ENTER_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True, "allow_interspersed_args": False}


def enter(job_id: Annotated[str, typer.Argument(metavar="JOBID", help="The job's id (digits).")],
          command: Annotated[list[str] | None, typer.Argument(
              metavar="[--] [CMD [ARG...]]", help="The command; default: your shell.")] = None) -> None:
    """Run CMD as yourself in the mount namespace ovlrun's prolog prepared for job JOBID on
    this node, with that job's localised view (sudo ovlrun enter JOBID -- CMD).  Only the
    job's owner (or root) may enter it.  Exit status: CMD's own, or 125 (ovlrun failed),
    126 (CMD not executable), 127 (CMD not found)."""
    from ovlrun.hooks.enter import enter as enter_job

    raise typer.Exit(enter_job(job_id, command or []))


def register(app: typer.Typer) -> None:
    app.add_typer(slurm_app, name="slurm")
    app.command("enter", context_settings=ENTER_SETTINGS)(enter)
