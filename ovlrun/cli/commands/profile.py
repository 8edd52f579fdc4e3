"""``ovlrun profile check NAME|PATH``: validate a profile (anyone, no sudo)."""

from __future__ import annotations

from typing import Annotated

import typer

from ovlrun.errors import OvlrunError

app = typer.Typer(no_args_is_help=True, help="Inspect profiles.")


def register(parent: typer.Typer, name: str) -> list[str]:
    parent.add_typer(app, name=name)
    return [c.name for c in app.registered_commands if c.name]


@app.command("check")
def profile_check(name: Annotated[str, typer.Argument(help="Profile name or path.")]) -> None:
    """Validate a profile (the submit-time check) as launches and Slurm jobs would use it;
    prints what it would localise.  Exits 1 if sudo launches and Slurm jobs would refuse
    it.  Needs no root: run it as yourself."""
    from pathlib import Path

    from ovlrun.profile.locate import is_path_spec, open_profile
    from ovlrun.profile.parse import parse_profile
    from ovlrun.store.index import Store

    # Runs with the caller's own rights (users run it directly, never through sudo): the
    # profile and the store index are read as whoever asks.  The trust rule is applied
    # to the very file that was parsed.
    located = open_profile(name)
    try:
        path = Path(located.path)
        profile = parse_profile(path, path.stem, fd=located.fd)
    finally:
        located.close()
    print(f"{profile.name}: {profile.file} OK ({profile.description or 'no description'})")
    for tree in profile.trees:
        if tree.inline:
            print(f"  {tree.root}: {tree.inline.describe()}")
    try:
        index = Store.open().read_index()
    except OvlrunError as e:
        print(f"  (snapshots unknown: {e.message})")
        return
    for tree, pattern, built in profile.select(index):
        print(f"  {tree.path_of(pattern.text)}: {len(built)} snapshot(s) built")
    if is_path_spec(name):
        print("  (a profile file by path: only root launches with it; sudo users and Slurm jobs name installed ones)")
        return
    # The same trust rule a sudo launch and the Slurm prolog apply: a pass here must
    # not be a refusal there.
    problem = located.trust_problem()
    if problem:
        raise OvlrunError(f"sudo launches and Slurm jobs would refuse it: refusing profile {located.path}: "
                          f"{problem}", status=1)
