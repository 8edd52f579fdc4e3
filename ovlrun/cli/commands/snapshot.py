"""``ovlrun snapshot build|list|verify|refresh|gc|publish|fetch``: the snapshot store (root)."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer

from ovlrun.cli.options import JsonOpt, TimeoutOpt, print_json, require_root
from ovlrun.errors import OvlrunError

app = typer.Typer(no_args_is_help=True, help="Build and inspect metadata snapshots.")
ProfileOpt = Annotated[str, typer.Option("--profile", "-p", help="Profile name (searched in OVLRUN_PROFILE_PATH, "
                                         "else /etc/ovlrun/profiles) or path to a .toml file.")]
SelectProfileOpt = Annotated[str | None, typer.Option("--profile", "-p", help="Only the paths this profile localises.")]
AllOpt = Annotated[bool, typer.Option("--all", help="Every current snapshot in the store.")]


def register(parent: typer.Typer, name: str) -> list[str]:
    parent.add_typer(app, name=name)
    return [c.name for c in app.registered_commands if c.name]


@app.command("build")
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

    require_root("snapshot build")
    results = build_profile(load_profile(profile), Store.open(), rebuild=rebuild, timeout=timeout)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise OvlrunError(f"{len(failed)} of {len(results)} snapshots failed", status=1)


@app.command("list")
def snapshot_list(as_json: JsonOpt = False) -> None:
    """List the snapshots in the store and which path each serves."""
    from ovlrun.store.index import Store, format_time

    require_root("snapshot list", "snapshot directories are readable by root only")
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
        print_json(rows)
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


@app.command("verify")
def snapshot_verify(profile: SelectProfileOpt = None, all_: AllOpt = False, as_json: JsonOpt = False,
                    timeout: TimeoutOpt = 300.0) -> None:
    """Compare current snapshots with their sources: entries missing in the source, entries
    whose metadata changed, new entries.  Exits 0 if all are clean, 1 otherwise.

    Costs the server one readdir per directory and one getattr per entry."""
    from ovlrun.store.index import Store
    from ovlrun.store.lifecycle import verify

    drifts = verify(Store.open(), _selected_profile(profile, all_), timeout=timeout)
    if as_json:
        print_json([d.to_json() for d in drifts])
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


@app.command("refresh")
def snapshot_refresh(profile: SelectProfileOpt = None, all_: AllOpt = False, timeout: TimeoutOpt = 300.0) -> None:
    """Rebuild the snapshots whose source changed (as verify reports) and publish them
    atomically; running jobs keep the snapshot they mounted.  Exits 1 if any failed."""
    from ovlrun.store.index import Store
    from ovlrun.store.lifecycle import refresh

    require_root("snapshot refresh")
    results = refresh(Store.open(), _selected_profile(profile, all_), timeout=timeout)
    for r in results:
        c = r.drift.counts
        what = f"missing {c['missing']}, changed {c['changed']}, new {c['new']}"
        print(f"{r.status}: {r.drift.path}  {r.snapshot or r.drift.snapshot}  ({what})"
              + (f" {r.message}" if r.message else ""), file=sys.stderr)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise OvlrunError(f"{len(failed)} of {len(results)} snapshots could not be refreshed", status=1)


@app.command("gc")
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
        require_root("snapshot gc")
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
        print_json({"snapshots": [r.__dict__ for r in report], "leftovers_removed": leftovers,
                    "launch_records_removed": pruned})
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
    from ovlrun.store.fleet.publish import DEFAULT_PUBLISHED_GRACE, gc_published
    from ovlrun.store.siteconfig import load_site_config

    owner = load_site_config().image_owner
    report = gc_published(directory, owner, grace=DEFAULT_PUBLISHED_GRACE if grace is None else grace,
                          dry_run=dry_run, timeout=timeout)
    if as_json:
        print_json({"published": [r.__dict__ for r in report]})
        return
    for r in report:
        print(f"{r.action}: {r.directory}  ({r.reason})")
    if not report:
        print("nothing to collect")


def _image_dir(given: str | None, option: str) -> tuple[str, Any]:
    """The image directory (``given``, else the site config's) and the site config."""
    from ovlrun.store.siteconfig import config_path, load_site_config

    config = load_site_config()
    directory = given or config.image_dir
    if directory is None:
        raise OvlrunError(f"no image directory: give {option} DIR or set image_dir in {config.path or config_path()}")
    return directory, config


def _print_outcomes(outcomes: list[Any], as_json: bool) -> None:
    if as_json:
        print_json([o.__dict__ for o in outcomes])
        return
    for o in outcomes:
        size = f"  {o.bytes} bytes" if o.bytes else ""
        print(f"{o.status}: {o.path}  {o.snapshot}{size}" + (f"  ({o.message})" if o.message else ""))
    if not outcomes:
        print("nothing selected")


@app.command("publish")
def snapshot_publish(to: Annotated[str | None, typer.Option("--to", metavar="DIR", help="Published image "
                                                            "directory (default: image_dir of the site "
                                                            "configuration).")] = None,
                     profile: SelectProfileOpt = None, all_: AllOpt = False, as_json: JsonOpt = False,
                     timeout: TimeoutOpt = 300.0) -> None:
    """Copy the current snapshot images (and manifests) of the selected paths into DIR
    for nodes to fetch; atomic, idempotent, older versions kept until
    'ovlrun snapshot gc --published DIR'.  Writes as the site's image_owner."""
    from ovlrun.store.fleet.publish import publish
    from ovlrun.store.index import Store

    require_root("snapshot publish", "the store is readable by root only")
    selected = _selected_profile(profile, all_)
    directory, config = _image_dir(to, "--to")
    outcomes = publish(Store.open(), directory, selected, config.image_owner, timeout=timeout)
    _print_outcomes(outcomes, as_json)
    skipped = [o for o in outcomes if o.status == "skipped"]
    if skipped:
        raise OvlrunError(f"{len(skipped)} of {len(outcomes)} snapshots could not be published", status=1)


@app.command("fetch")
def snapshot_fetch(from_: Annotated[str | None, typer.Option("--from", metavar="DIR", help="Published image "
                                                             "directory (default: image_dir of the site "
                                                             "configuration).")] = None,
                   profile: Annotated[str | None, typer.Option("--profile", "-p", help="Only the published paths "
                                                               "this profile localises.")] = None,
                   all_: Annotated[bool, typer.Option("--all", help="Every path in DIR's index below a tree "
                                                      "root of this node's profiles (any other path is "
                                                      "refused).")] = False,
                   as_json: JsonOpt = False,
                   timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds the whole fetch may "
                                                          "take (a stalled DIR).")] = 300.0) -> None:
    """Copy the published images this node lacks into the local store and make them
    current, as if built here.  Each is checked first: its manifest against this node's
    own view of the tree (tree root, source path and inode), its size against the free
    space and max_image_bytes, its sha256, and that it is an image ovlrun writes; a
    version older than the node's current one is kept out.  One fetch per node at a
    time.  Idempotent; a DIR that cannot be reached leaves the store as it is.  Exits 1
    if anything failed."""
    from ovlrun.store.fleet.fetch import fetch
    from ovlrun.store.index import Store

    require_root("snapshot fetch")
    selected = _selected_profile(profile, all_)
    directory, config = _image_dir(from_, "--from")
    try:
        outcomes = fetch(Store.open(), directory, config.image_owner, selected, timeout=timeout,
                         max_image_bytes=config.max_image_bytes)
    except OvlrunError as e:
        raise OvlrunError(f"{e.message}; nothing fetched, the local store is unchanged", status=1) from None
    _print_outcomes(outcomes, as_json)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise OvlrunError(f"{len(failed)} of {len(outcomes)} snapshots could not be fetched", status=1)
