"""Every subcommand but the launch, with typer: snapshot, profile, doctor, status, and
(from :mod:`ovlrun.cli.hooks`) slurm and enter.

typer through its public API only: typer >= 0.26 vendors its own click, so importing
click would find another copy (or none).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Annotated, Any

import typer

from ovlrun import __version__
from ovlrun.cli.hooks import register as register_hooks
from ovlrun.errors import EXIT_OVLRUN, EXIT_USAGE, OvlrunError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="ovlrun administration.",
                  context_settings={"help_option_names": ["-h", "--help"]})
snapshot_app = typer.Typer(no_args_is_help=True, help="Build and inspect metadata snapshots.")
profile_app = typer.Typer(no_args_is_help=True, help="Inspect profiles.")
app.add_typer(snapshot_app, name="snapshot")
app.add_typer(profile_app, name="profile")
register_hooks(app)

ProfileOpt = Annotated[str, typer.Option("--profile", "-p", help="Profile name (searched in OVLRUN_PROFILE_PATH, "
                                         "else /etc/ovlrun/profiles) or path to a .toml file.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the shared tree per source "
                                           "before giving up on it (a stalled server).")]
SelectProfileOpt = Annotated[str | None, typer.Option("--profile", "-p", help="Only the paths this profile localises.")]
AllOpt = Annotated[bool, typer.Option("--all", help="Every current snapshot in the store.")]


def _require_root(what: str, why: str = "trusted.overlay.* xattrs can only be written by root") -> None:
    if os.geteuid() != 0:
        raise OvlrunError(f"{what} must run as root ({why})")


@snapshot_app.command("build")
def snapshot_build(profile: ProfileOpt,
                   rebuild: Annotated[bool, typer.Option(help="Re-walk sources that already have a snapshot and "
                                                         "publish a new one if they changed.")] = False,
                   timeout: TimeoutOpt = 300.0) -> None:
    """Build a snapshot for every directory the profile localises (idempotent).

    Sources that already have a snapshot are left alone (releases are immutable); use
    --rebuild to re-walk them.  Exits 1 if any source failed.
    """
    from ovlrun.profile.parse import load_profile
    from ovlrun.store.build import build_profile
    from ovlrun.store.index import Store

    _require_root("snapshot build")
    results = build_profile(load_profile(profile), Store.open(), rebuild=rebuild, timeout=timeout)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise OvlrunError(f"{len(failed)} of {len(results)} snapshots failed", status=1)


@snapshot_app.command("list")
def snapshot_list(as_json: JsonOpt = False) -> None:
    """List the snapshots in the store and which path each serves."""
    from ovlrun.store.index import Store, format_time

    _require_root("snapshot list", "snapshot directories are readable by root only")
    store = Store.open()
    index = store.read_index()
    serving = {rel: path for path, rel in index.items()}
    rows: list[dict[str, Any]] = []
    for snap in store.all_snapshots():
        rel = str(snap.directory.relative_to(store.path))
        m = snap.manifest
        rows.append({"path": m.path, "source": m.source, "id": m.id, "current": rel in serving,
                     "built": m.built, "counts": m.counts, "directory": str(snap.directory),
                     "fingerprint": m.fingerprint, "max_redirect": m.max_redirect,
                     "long_redirects": m.long_redirects, "image_bytes": m.image_bytes,
                     "image_sha256": m.image_sha256, "format": "image" if snap.is_image else "directory (retired)"})
    if as_json:
        json.dump(rows, sys.stdout, indent=1)
        print()
        return
    if not rows:
        print(f"no snapshots in {store.path}")
        return
    for r in rows:
        counts = r["counts"]
        entries = counts.get("dirs", 0) + counts.get("files", 0) + counts.get("symlinks", 0) + 1
        built = format_time(r["built"])
        mark = "*" if r["current"] else " "
        print(f"{mark} {r['path']}  {r['id']}  {entries} entries  built {built}")
    print("(* = current snapshot for its path)")


def _selected_profile(profile: str | None, all_: bool) -> Any:
    from ovlrun.profile.parse import load_profile

    if (profile is None) == (not all_):
        raise OvlrunError("give either --profile NAME or --all")
    return load_profile(profile) if profile is not None else None


@snapshot_app.command("verify")
def snapshot_verify(profile: SelectProfileOpt = None, all_: AllOpt = False, as_json: JsonOpt = False,
                    timeout: TimeoutOpt = 300.0) -> None:
    """Compare current snapshots with their sources: entries missing in the source, entries
    whose metadata changed, new entries.  Exits 0 if all are clean, 1 otherwise.

    Costs the server one readdir per directory and one getattr per entry."""
    from ovlrun.store.index import Store
    from ovlrun.store.lifecycle import verify

    drifts = verify(Store.open(), _selected_profile(profile, all_), timeout=timeout)
    if as_json:
        json.dump([d.to_json() for d in drifts], sys.stdout, indent=1)
        print()
    else:
        if not drifts:
            print("no current snapshots to verify")
        for d in drifts:
            c = d.counts
            detail = f" ({d.message})" if d.message else ""
            print(f"{d.status}: {d.path}  {d.snapshot}  missing {c['missing']}, changed {c['changed']}, "
                  f"new {c['new']}{detail}")
            for kind in ("missing", "changed", "new"):
                names = getattr(d, kind)
                for name in names:
                    print(f"  {kind}: {name!r}" if not name.isprintable() else f"  {kind}: {name}")
                if c[kind] > len(names):
                    print(f"  ... and {c[kind] - len(names)} more {kind}")
    if any(not d.clean for d in drifts):
        raise OvlrunError(f"{sum(not d.clean for d in drifts)} of {len(drifts)} snapshots are not clean", status=1)


@snapshot_app.command("refresh")
def snapshot_refresh(profile: SelectProfileOpt = None, all_: AllOpt = False, timeout: TimeoutOpt = 300.0) -> None:
    """Rebuild the snapshots whose source changed (as verify reports) and publish them
    atomically; running jobs keep the snapshot they mounted.  Exits 1 if any failed."""
    from ovlrun.store.index import Store
    from ovlrun.store.lifecycle import refresh

    _require_root("snapshot refresh")
    results = refresh(Store.open(), _selected_profile(profile, all_), timeout=timeout)
    for r in results:
        c = r.drift.counts
        what = f"missing {c['missing']}, changed {c['changed']}, new {c['new']}"
        print(f"{r.status}: {r.drift.path}  {r.snapshot or r.drift.snapshot}  ({what})"
              + (f" {r.message}" if r.message else ""), file=sys.stderr)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise OvlrunError(f"{len(failed)} of {len(results)} snapshots could not be refreshed", status=1)


@snapshot_app.command("gc")
def snapshot_gc(dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
                grace: Annotated[float | None, typer.Option("--grace", min=0, help="Keep a replaced snapshot until "
                                                            "its successor is this many seconds old (default 60; "
                                                            "3600 with --published).")] = None,
                published: Annotated[str | None, typer.Option("--published", metavar="DIR", help="Collect old "
                                                              "versions in a published image directory instead "
                                                              "of the local store.")] = None,
                as_json: JsonOpt = False, timeout: TimeoutOpt = 300.0) -> None:
    """Remove snapshots a newer one replaced and those whose source is gone, never one a
    running job uses; clean up leftovers of killed builds.  With --published DIR: remove
    published versions DIR's index stopped naming at least --grace seconds ago."""
    from ovlrun.jobs import records
    from ovlrun.jobs.inuse import snapshot_ids_in_use
    from ovlrun.store.index import Store
    from ovlrun.store.lifecycle import gc

    if not dry_run:
        _require_root("snapshot gc")
    if published is not None:
        _gc_published(published, grace, dry_run, as_json, timeout)
        return
    # Which snapshots running jobs use is the jobs' business (ovlrun.jobs.inuse), not the
    # store's: handed in, and asked under the store's index lock.
    report, leftovers = gc(Store.open(), snapshot_ids_in_use, dry_run=dry_run,
                           grace=60.0 if grace is None else grace, timeout=timeout)
    # The node's other garbage: records of launches that ended a while ago (a launch
    # execs its command, so nobody else removes them).
    pruned = 0 if dry_run else records.prune_ended(records.LAUNCH_RECORD_KEEP, time.time())
    if as_json:
        json.dump({"snapshots": [r.__dict__ for r in report], "leftovers_removed": leftovers,
                   "launch_records_removed": pruned}, sys.stdout, indent=1)
        print()
        return
    for r in report:
        print(f"{r.action}: {r.directory}  ({r.reason}: {r.path})")
    if leftovers:
        print(f"removed {leftovers} leftover(s) of killed builds")
    if pruned:
        print(f"removed {pruned} record(s) of ended launches")
    if not report and not leftovers and not pruned:
        print("nothing to collect")


def _gc_published(directory: str, grace: float | None, dry_run: bool, as_json: bool, timeout: float) -> None:
    from ovlrun.store.fleet import DEFAULT_PUBLISHED_GRACE, gc_published
    from ovlrun.store.siteconfig import load_site_config

    owner = load_site_config().image_owner
    report = gc_published(directory, owner, grace=DEFAULT_PUBLISHED_GRACE if grace is None else grace,
                          dry_run=dry_run, timeout=timeout)
    if as_json:
        json.dump({"published": [r.__dict__ for r in report]}, sys.stdout, indent=1)
        print()
        return
    for r in report:
        print(f"{r.action}: {r.directory}  ({r.reason})")
    if not report:
        print("nothing to collect")


def _image_dir(given: str | None, option: str) -> tuple[str, Any]:
    """The image directory (``given``, else the site config's) and the trusted owner."""
    from ovlrun.store.siteconfig import config_path, load_site_config

    config = load_site_config()
    directory = given or config.image_dir
    if directory is None:
        raise OvlrunError(f"no image directory: give {option} DIR or set image_dir in {config.path or config_path()}")
    return directory, config.image_owner


def _print_outcomes(outcomes: list[Any], as_json: bool) -> None:
    if as_json:
        json.dump([o.__dict__ for o in outcomes], sys.stdout, indent=1)
        print()
        return
    for o in outcomes:
        size = f"  {o.bytes} bytes" if o.bytes else ""
        print(f"{o.status}: {o.path}  {o.snapshot}{size}" + (f"  ({o.message})" if o.message else ""))
    if not outcomes:
        print("nothing selected")


@snapshot_app.command("publish")
def snapshot_publish(to: Annotated[str | None, typer.Option("--to", metavar="DIR", help="Published image "
                                                            "directory (default: image_dir of the site "
                                                            "configuration).")] = None,
                     profile: SelectProfileOpt = None, all_: AllOpt = False, as_json: JsonOpt = False,
                     timeout: TimeoutOpt = 300.0) -> None:
    """Copy the current snapshot images (and manifests) of the selected paths into DIR
    for nodes to fetch; atomic, idempotent, older versions kept until
    'ovlrun snapshot gc --published DIR'.  Writes as the site's image_owner."""
    from ovlrun.store.fleet import publish
    from ovlrun.store.index import Store

    _require_root("snapshot publish", "the store is readable by root only")
    selected = _selected_profile(profile, all_)
    directory, owner = _image_dir(to, "--to")
    outcomes = publish(Store.open(), directory, selected, owner, timeout=timeout)
    _print_outcomes(outcomes, as_json)
    skipped = [o for o in outcomes if o.status == "skipped"]
    if skipped:
        raise OvlrunError(f"{len(skipped)} of {len(outcomes)} snapshots could not be published", status=1)


@snapshot_app.command("fetch")
def snapshot_fetch(from_: Annotated[str | None, typer.Option("--from", metavar="DIR", help="Published image "
                                                             "directory (default: image_dir of the site "
                                                             "configuration).")] = None,
                   profile: Annotated[str | None, typer.Option("--profile", "-p", help="Only the published paths "
                                                               "this profile localises.")] = None,
                   all_: Annotated[bool, typer.Option("--all", help="Every path in DIR's index.")] = False,
                   as_json: JsonOpt = False,
                   timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds the whole fetch may "
                                                          "take (a stalled DIR).")] = 300.0) -> None:
    """Copy the published images this node lacks into the local store (checked against
    their manifests' sha256) and make them current, as if built here.  Idempotent; a DIR
    that cannot be reached leaves the store as it is.  Exits 1 if anything failed."""
    from ovlrun.store.fleet import fetch
    from ovlrun.store.index import Store

    _require_root("snapshot fetch")
    selected = _selected_profile(profile, all_)
    directory, owner = _image_dir(from_, "--from")
    try:
        outcomes = fetch(Store.open(), directory, owner, selected, timeout=timeout)
    except OvlrunError as e:
        raise OvlrunError(f"{e.message}; nothing fetched, the local store is unchanged", status=1) from None
    _print_outcomes(outcomes, as_json)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise OvlrunError(f"{len(failed)} of {len(outcomes)} snapshots could not be fetched", status=1)


@profile_app.command("check")
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


@app.command("doctor")
def doctor(as_json: JsonOpt = False) -> None:
    """Report what the running kernel's overlayfs supports and how launches will mount."""
    from ovlrun.linux.kernel import METHODS, probe

    f = probe()
    info: dict[str, Any] = {
        "kernel": os.uname().release, "overlay": f.overlay,
        "probe": f.findings,  # what each probe call returned ("accepted" or the errno)
        "method": f.method, "mount_method": f.mount_method,
        "usable_methods": list(METHODS[METHODS.index(f.method):]) if f.overlay else [],
        "data_only_layers": f.data_only_layers,
        "layout": "lowerdir=SNAPSHOT::SHARED (data-only: lookups and stats stay local)" if f.data_only_layers
        else "lowerdir=SNAPSHOT:SHARED (fallback: stat of localised files walks the shared tree)",
        "long_layer_paths": "O_PATH fds (no limit)" if f.method == "fd" else
        "store-relative snapshot path after chdir, /proc/self/fd/N for the shared subtree",
        "redirect_max": f.redirect_max}
    if as_json:
        print(json.dumps(info, indent=1))
    else:
        for k, v in info.items():
            if isinstance(v, dict):
                for pk, pv in v.items():
                    print(f"{'probe ' + pk:28} {pv}")
            else:
                print(f"{k:28} {v}")
    if f.findings.get("fsopen") == "EPERM":
        raise OvlrunError("probing overlayfs needs root (fsopen: EPERM); run doctor as root", status=1)
    if not f.overlay:
        raise OvlrunError("overlayfs is not available (no overlay filesystem, even after module autoload)", status=1)


@app.command("status")
def status(as_json: JsonOpt = False) -> None:
    """Inside a job: the profile and each localised path with its snapshot.  Exits 1
    outside a job."""
    from ovlrun.jobs.status import job_status

    info = job_status()
    inside = bool(info["profile"] or info["localised"])
    if as_json:
        print(json.dumps(info, indent=1))
    elif not inside:
        print("not inside an ovlrun job (no localised paths, OVLRUN_PROFILE unset)")
    else:
        print(f"profile: {info['profile'] or '(unknown)'}")
        for m in info["localised"]:  # type: ignore[attr-defined]
            print(f"  {m['path']}  <- {m['snapshot']}  ({m['mode']})")
    if not inside:
        raise typer.Exit(1)


def _usage_error(e: Exception) -> int | None:
    """Report typer's usage error ``e`` in one line; None if ``e`` is not one.

    typer raises its (vendored) click's ``ClickException`` subclasses for bad usage; they
    are recognised by click's documented interface (``exit_code``, ``format_message``,
    ``ctx``) rather than by class, which would mean importing click.
    """
    exit_code = getattr(e, "exit_code", None)
    format_message = getattr(e, "format_message", None)
    if not isinstance(exit_code, int) or not callable(format_message):
        return None
    if type(e).__name__ == "NoArgsIsHelpError":  # help was printed already
        return EXIT_USAGE
    ctx = getattr(e, "ctx", None)
    where = getattr(ctx, "command_path", "ovlrun")
    print(f"{where}: {format_message()} (see '{where} --help')", file=sys.stderr)
    return exit_code


def run_typer(args: list[str]) -> int:
    """Run a subcommand: its own status, 0 for --help, 2 for bad usage (one line)."""
    if args and args[0] in ("-h", "--help"):
        from ovlrun.cli.launch import LAUNCH_HELP

        print("Usage: ovlrun --profile NAME [--user USER] [--strict] [--login] [--] [CMD [ARGS...]]\n"
              "       ovlrun COMMAND [ARGS...]\n")
        print(LAUNCH_HELP)
        return 0
    if args and args[0] == "--version":
        print(f"ovlrun {__version__}")
        return 0
    try:
        result = app(args=args, prog_name="ovlrun", standalone_mode=False)
    except (typer.Exit, typer.Abort) as e:
        return getattr(e, "exit_code", 1)
    except OvlrunError:
        raise
    except Exception as e:
        code = _usage_error(e)
        if code is None:
            raise
        # `enter` is a wrapper like the launch and env(1): its own failures are 125.
        return EXIT_OVLRUN if args[0] == "enter" else code
    return result if isinstance(result, int) else 0
