"""The launch plan cache: used when valid, invalidated by any profile or store change,
ignored when anyone but root could have written it, never a way around trust checks."""

from __future__ import annotations

import marshal
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import NOBODY, REPO, World, requires_overlay, requires_root

pytestmark = [requires_root, requires_overlay]


def cache_files(world: World) -> list[Path]:
    return sorted((world.store / "plans").glob("*.plan"))


def mounted_snapshots(world: World, profile: str = "p") -> list[str]:
    """(mount point) of ovlrun overlays in a job, and which snapshot serves each."""
    r = world.job("grep ' overlay ovlrun ' /proc/self/mountinfo", profile=profile)
    assert r.returncode in (0, 1), r.stderr
    return sorted(line.split()[4] + " " + line.split("lowerdir+=")[1].split(",")[0] for line in r.stdout.splitlines())


def importtime_modules(world: World) -> set[str]:
    """Modules a launch imports, started as the installed launcher starts it: -I -S (no
    site processing: a development venv's editable-install finder would import pathlib,
    re and typing before ovlrun runs a line), the checkout and site-packages appended."""
    import sysconfig

    code = (f"import sys; sys.path += [{str(REPO)!r}, {sysconfig.get_paths()['purelib']!r}]; "
            "from ovlrun.cli.main import main; sys.exit(main())")
    r = subprocess.run([sys.executable, "-X", "importtime", "-I", "-S", "-c", code, "--profile", "p", "--", "true"],
                       env=world.env, text=True, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}


def test_second_launch_skips_profile_parsing(world: World) -> None:
    world.simple_profile()
    world.build()
    first = importtime_modules(world)
    assert "tomllib" in first and "ovlrun.launch.planner" in first
    assert len(cache_files(world)) == 1
    (cache,) = cache_files(world)
    assert (os.stat(cache).st_mode & 0o777, os.stat(cache).st_uid) == (0o600, 0)
    second = importtime_modules(world)
    assert "tomllib" not in second and "ovlrun.launch.planner" not in second and "json" not in second
    # What a cached launch must not pay for (each costs milliseconds on a -I -S interpreter).
    assert not {"typing", "dataclasses", "pathlib", "re", "typer", "ovlrun.store.index"} & second
    assert world.job(f"cat {world.sw}/app/1.0/README").stdout == "app 1.0\n"


def test_profile_edit_invalidates(world: World) -> None:
    world.simple_profile(patterns=("app/1.0", "app/1.1"))
    world.build()
    assert [m.split()[0] for m in mounted_snapshots(world)] == [str(world.sw / "app/1.0"), str(world.sw / "app/1.1")]
    world.simple_profile(patterns=("app/1.1",))  # same size or not: mtime/ctime change
    assert [m.split()[0] for m in mounted_snapshots(world)] == [str(world.sw / "app/1.1")]


def test_store_change_invalidates(world: World) -> None:
    world.simple_profile()
    world.build()
    before = mounted_snapshots(world)
    (world.sw / "app" / "1.0" / "README").write_text("app 1.0, touched\n")
    assert world.ovlrun("snapshot", "build", "--profile", "p", "--rebuild").returncode == 0
    after = mounted_snapshots(world)
    assert len(after) == 1 and after != before  # the new snapshot serves the next job


def test_cache_written_by_others_is_ignored(world: World) -> None:
    world.simple_profile()
    world.build()
    world.job("true")
    (cache,) = cache_files(world)
    data = marshal.loads(cache.read_bytes())
    # A forged plan: mount a snapshot of "/etc" elsewhere.  Written by a non-root owner,
    # and then by root but readable by others: both are ignored and replaced.
    data["items"] = [(str(world.sw / "app/1.0"), "/etc", str(world.base), "/")]
    for owner, mode in ((NOBODY, 0o600), (0, 0o644)):
        cache.write_bytes(marshal.dumps(data))
        os.chown(cache, owner, -1)
        cache.chmod(mode)
        r = world.job("grep ' overlay ovlrun ' /proc/self/mountinfo")
        assert r.returncode == 0 and " /etc " not in r.stdout and str(world.sw / "app/1.0") in r.stdout
        st = os.stat(cache)
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)  # replaced by a fresh plan


def test_cached_plan_still_checks_snapshot_trust(world: World) -> None:
    world.simple_profile()
    world.build()
    assert world.job("true").returncode == 0  # plan cached
    index_rel = next(iter((world.store / "snapshots").glob("*/*")))
    index_rel.chmod(0o755)
    r = world.job("true")
    assert r.returncode == 125 and "lets other users reach its tree" in r.stderr


def test_read_only_store_just_means_no_cache(world: World) -> None:
    world.simple_profile()
    world.build()
    # Root ignores directory modes, so make the cache directory impossible instead.
    (world.store / "plans").write_text("not a directory")
    r = world.ovlrun("--profile", "p", "--", sys.executable, "-c", "print('ran')")
    assert r.returncode == 0 and r.stdout == "ran\n" and r.stderr == ""
