"""``ovlrun slurm prolog|epilog|clone-ns``: the Slurm hooks, run by slurmd as root.

What typer's import costs a Prolog is measured in docs/slurm.md; jobs that ask for no
profile never start Python (contrib/slurm/ovlrun-prolog).
"""

from __future__ import annotations

import os

import typer

from ovlrun.errors import OvlrunError

app = typer.Typer(no_args_is_help=True, help=(
    "Slurm hooks, run by slurmd as root (see docs/slurm.md for slurm.conf and job_container.conf). "
    "A job asks for a profile with: sbatch --comment=ovl:NAME.  Hooks exit 0 on a user's mistake "
    "(the job runs unlocalised; the log says why)."))


def register(parent: typer.Typer, name: str) -> list[str]:
    parent.add_typer(app, name=name)
    return [c.name for c in app.registered_commands if c.name]


def _require_slurmd() -> None:
    if os.environ.get("SUDO_UID") or os.geteuid() != 0:
        # The sudoers rule for ovlrun lets users run it as root; the hooks trust their
        # environment (job id, owner) and are for slurmd alone.
        raise OvlrunError("Slurm hooks are run by slurmd as root, not by users or through sudo")


@app.command("prolog")
def slurm_prolog() -> None:
    """Prolog: prepare the job's namespace with the profile's overlays."""
    _require_slurmd()
    from ovlrun.hooks.slurm import prolog

    raise typer.Exit(prolog())


@app.command("epilog")
def slurm_epilog() -> None:
    """Epilog: remove what the prolog made."""
    _require_slurmd()
    from ovlrun.hooks.slurm import epilog

    raise typer.Exit(epilog())


@app.command("clone-ns")
def slurm_clone_ns() -> None:
    """CloneNSScript (Slurm 24.11+): mount the job's profile into $SLURM_NS."""
    _require_slurmd()
    from ovlrun.hooks.slurm import clone_ns_script

    raise typer.Exit(clone_ns_script())
