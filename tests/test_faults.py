"""Faults of the shared tree: I/O errors, stalls, permission refusals, a missing root."""

from __future__ import annotations

import json
import shutil
import time

from tests.conftest import World, requires_overlay, requires_root
from tests.faultfs import FaultFS

pytestmark = [requires_root, requires_overlay]


def fuse_world(world: World, patterns: tuple[str, ...] = ("app/*",)) -> FaultFS:
    backing = world.base / "backing"
    shutil.copytree(world.sw, backing, symlinks=True)
    mnt = world.base / "mnt"
    items = ", ".join(f'"{p}"' for p in patterns)
    world.write_profile("p", f'[[tree]]\nroot = "{mnt}"\nlocalise = [{items}]\n')
    return FaultFS(world.base, backing, mnt)


def published(world: World) -> list[str]:
    index = world.store / "index.json"
    return sorted(json.loads(index.read_text())["sources"]) if index.exists() else []


def test_stalled_source_fails_that_snapshot_within_the_timeout(world: World) -> None:
    with fuse_world(world) as fs:
        fs.faults("getattr stall /app/1.0/lib/libfoo.so.1")
        started = time.monotonic()
        r = fs.ovlrun("snapshot", "build", "--profile", "p", "--timeout", "2", env=world.env, timeout=60)
        took = time.monotonic() - started
        assert r.returncode == 1, r.stderr
        assert "building snapshot of" in r.stderr and "no answer from the shared tree within 2s" in r.stderr
        assert "Traceback" not in r.stderr
        assert took < 20, took
        # The other release (served by other daemon threads) was built; nothing partial.
        assert published(world) == [str(fs.mountpoint / "app" / "1.1")]
        assert list((world.store / "tmp").iterdir()) == []
        # Jobs still run (the stalled path is simply unlocalised).
        fs.faults()
        fs.release()
        r = fs.ovlrun("--profile", "p", "--", "cat", f"{fs.mountpoint}/app/1.1/README", env=world.env)
        assert r.returncode == 0 and r.stdout == "app 1.1\n", r.stderr


def test_stall_during_verify_is_reported_as_an_error(world: World) -> None:
    with fuse_world(world, ("app/1.0",)) as fs:
        assert fs.ovlrun("snapshot", "build", "--profile", "p", env=world.env).returncode == 0
    with fuse_world_again(world) as fs:  # fresh mount: nothing cached
        fs.faults("readdir stall /app/1.0/bin")
        started = time.monotonic()
        r = fs.ovlrun("snapshot", "verify", "--all", "--json", "--timeout", "1", env=world.env)
        assert time.monotonic() - started < 20
        rows = json.loads(r.stdout)
        assert r.returncode == 1 and rows[0]["status"] == "error"
        assert "no answer from the shared tree within 1s" in rows[0]["message"]


def fuse_world_again(world: World) -> FaultFS:
    return FaultFS(world.base, world.base / "backing", world.base / "mnt")


def test_io_error_fails_that_snapshot_with_a_clear_message(world: World) -> None:
    with fuse_world(world) as fs:
        fs.faults("getattr eio /app/1.0/lib/python/mod.py")
        r = fs.ovlrun("snapshot", "build", "--profile", "p", env=world.env)
        assert r.returncode == 1
        line = next(x for x in r.stderr.splitlines() if x.startswith("failed:"))
        assert str(fs.mountpoint / "app" / "1.0") in line and "Input/output error" in line and "mod.py" in line
        assert "Traceback" not in r.stderr
        assert published(world) == [str(fs.mountpoint / "app" / "1.1")]
        assert list((world.store / "tmp").iterdir()) == []
        # Once the server recovers, the next build completes the set.
        fs.faults()
        assert fs.ovlrun("snapshot", "build", "--profile", "p", env=world.env).returncode == 0
        assert len(published(world)) == 2


def test_unlistable_directory_fails_rather_than_an_empty_snapshot(world: World) -> None:
    # Root squash on NFS: the builder (root) may not list a directory users can.
    with fuse_world(world, ("app/1.0",)) as fs:
        fs.faults("readdir eacces /app/1.0/lib")
        r = fs.ovlrun("snapshot", "build", "--profile", "p", env=world.env)
        assert r.returncode == 1 and "cannot list '/lib' in the source: permission denied" in r.stderr
        assert published(world) == []


def test_io_error_expanding_patterns_is_clear(world: World) -> None:
    with fuse_world(world) as fs:
        fs.faults("readdir eio /app")
        r = fs.ovlrun("snapshot", "build", "--profile", "p", env=world.env)
        assert r.returncode == 125 and "Traceback" not in r.stderr
        assert f"cannot list {fs.mountpoint}/app while expanding 'app/*': Input/output error" in r.stderr
        assert "matches nothing" not in r.stderr


def test_tree_root_missing_or_unmounted_at_launch_is_a_clear_error(world: World) -> None:
    world.simple_profile()
    world.build()
    hidden = world.base / "sw.hidden"
    world.sw.rename(hidden)
    try:
        r = world.job("echo ran")  # root missing altogether
        assert r.returncode == 125 and r.stdout == ""
        assert f"shared tree root {world.sw} is not available" in r.stderr and "not mounted?" in r.stderr
        world.sw.mkdir()  # an empty mount point: the NFS tree is not mounted
        r = world.job("echo ran")
        assert r.returncode == 125 and f"shared tree root {world.sw} is empty (not mounted?)" in r.stderr
        assert "refusing to run the job there" in r.stderr
        r = world.ovlrun("snapshot", "build", "--profile", "p", timeout=30)
        assert r.returncode == 1 or "matches nothing" in r.stderr
        assert "Traceback" not in r.stderr
        world.sw.rmdir()
        r = world.ovlrun("snapshot", "build", "--profile", "p", timeout=30)
        assert r.returncode == 125 and f"tree root {world.sw} is missing or not a directory (not mounted?)" in r.stderr
    finally:
        if world.sw.is_dir() and not any(world.sw.iterdir()):
            world.sw.rmdir()
        if not world.sw.exists():
            hidden.rename(world.sw)


def test_missing_root_may_run_unlocalised_when_the_profile_allows(world: World) -> None:
    world.write_profile("p", f'missing_root = "unlocalised"\n[[tree]]\nroot = "{world.sw}"\n'
                             'localise = ["app/1.0", "app/1.1"]\n')
    world.build()
    hidden = world.base / "sw.hidden"
    world.sw.rename(hidden)
    try:
        r = world.job("echo ran; grep -c ' overlay ovlrun ' /proc/self/mountinfo || true")
        assert r.returncode == 0 and r.stdout.split() == ["ran", "0"], r
        warnings = [line for line in r.stderr.splitlines() if "warning" in line]
        assert len(warnings) == 1 and f"shared tree root {world.sw} is not available" in warnings[0]
        assert "running without localising it" in warnings[0]
    finally:
        hidden.rename(world.sw)


def test_unrelated_release_missing_only_warns(world: World) -> None:
    world.simple_profile(patterns=("app/1.0", "app/1.1"))
    world.build()
    shutil.rmtree(world.sw / "app" / "1.1")
    r = world.job(f"cat {world.sw}/app/1.0/README")
    assert r.returncode == 0 and r.stdout == "app 1.0\n"
    assert "app/1.1 (localised path" in r.stderr and "skipped" in r.stderr
    r = world.ovlrun("--profile", "p", "--strict", "--", "true")
    assert r.returncode == 125 and "is missing on the shared tree" in r.stderr


