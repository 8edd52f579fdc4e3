"""``ovlrun status``: inside a job, what is localised (the user, no sudo)."""

from __future__ import annotations

import typer

from ovlrun.cli.options import JsonOpt, print_json


def register(parent: typer.Typer, name: str) -> list[str]:
    parent.command(name)(status)
    return []


def status(as_json: JsonOpt = False) -> None:
    """Inside a job: the profile and each localised path with its snapshot.  Exits 1
    outside a job."""
    from ovlrun.jobs.status import job_status

    info = job_status()
    inside = bool(info["profile"] or info["localised"])
    if as_json:
        print_json(info)
    elif not inside:
        print("not inside an ovlrun job (no localised paths, OVLRUN_PROFILE unset)")
    else:
        print(f"profile: {info['profile'] or '(unknown)'}")
        for m in info["localised"]:  # type: ignore[attr-defined]
            print(f"  {m['path']}  <- {m['snapshot']}  ({m['mode']})")
    if not inside:
        raise typer.Exit(1)
