"""Snapshot lifecycle: verify, refresh, gc (with in-use protection), deleted sources."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import World, requires_overlay, requires_root
from tests.faultfs import FaultFS

pytestmark = [requires_root, requires_overlay]


def snapshot_dirs(world: World) -> list[Path]:
    return sorted(p.parent for p in (world.store / "snapshots").glob("*/*/manifest.json"))


def current_dir(world: World, path: Path) -> Path:
    return world.store / json.loads((world.store / "index.json").read_text())["sources"][str(path)]


def verify_json(world: World, *args: str) -> tuple[int, list[dict[str, object]]]:
    r = world.ovlrun("snapshot", "verify", *args, "--json")
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, json.loads(r.stdout)


def start_holding_job(world: World, script: str, later: str = "true") -> subprocess.Popen[str]:
    """A job that runs ``script``, prints 'ready', runs ``later`` once a line arrives on its
    stdin, prints 'ready' again and sleeps."""
    proc = subprocess.Popen([sys.executable, "-m", "ovlrun", "--profile", "p", "--", "/bin/sh", "-c",
                             f"{script}; echo ready; read go; {later}; echo ready; exec sleep 600"], env=world.env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc


def read_until_ready(proc: subprocess.Popen[str]) -> list[str]:
    assert proc.stdout is not None
    lines = []
    while (line := proc.stdout.readline()) != "ready\n":
        assert line, f"job ended early: {proc.stderr.read() if proc.stderr else ''}"
        lines.append(line.rstrip("\n"))
    return lines


def test_verify_reports_missing_changed_and_new(world: World) -> None:
    rel = world.sw / "app" / "1.0"
    world.simple_profile(patterns=("app/*",))
    world.build()
    code, rows = verify_json(world, "--profile", "p")
    assert code == 0 and [r["status"] for r in rows] == ["clean", "clean"]
    (rel / "README").unlink()                          # a deleted file
    os.chmod(rel / "bin" / "tool", 0o700)              # metadata changed: not immutable after all
    (rel / "lib" / "python" / "late.py").write_text("x\n")  # a new entry
    code, rows = verify_json(world, "--all")
    assert code == 1
    by_path = {r["path"]: r for r in rows}
    drift = by_path[str(rel)]
    assert drift["status"] == "changed"
    assert drift["missing"] == ["/README"]
    assert drift["new"] == ["/lib/python/late.py"]
    # The directories whose entries changed show up as changed too (their mtime moved).
    assert set(drift["changed"]) == {"/", "/bin/tool", "/lib/python"}  # type: ignore[arg-type]
    assert drift["counts"] == {"missing": 1, "changed": 3, "new": 1}
    assert by_path[str(world.sw / "app" / "1.1")]["status"] == "clean"
    text = world.ovlrun("snapshot", "verify", "--profile", "p")
    assert text.returncode == 1 and "missing: /README" in text.stdout and "new: /lib/python/late.py" in text.stdout


def test_verify_deleted_release_and_usage_errors(world: World) -> None:
    world.simple_profile()
    world.build()
    shutil.rmtree(world.sw / "app" / "1.0")
    code, rows = verify_json(world, "--all")
    assert code == 1 and rows[0]["status"] == "source-missing"
    for args in ([], ["--all", "--profile", "p"]):
        r = world.ovlrun("snapshot", "verify", *args)
        assert r.returncode == 125 and "give either --profile NAME or --all" in r.stderr


def test_refresh_publishes_new_snapshot_running_job_keeps_old_and_gc_waits_for_it(world: World) -> None:
    rel = world.sw / "app" / "1.0"
    world.simple_profile()
    world.build()
    old = current_dir(world, rel)
    later = f"ls {rel}/lib/python; stat -c %s {rel}/README"
    holder = start_holding_job(world, f"cat {rel}/README", later)
    try:
        assert read_until_ready(holder) == ["app 1.0"]
        (rel / "README").write_text("app 1.0 fixed\n")  # a release that was not immutable after all
        (rel / "lib" / "python" / "late.py").write_text("x\n")
        # Until refresh, a new job sees the snapshot's metadata but the new data.
        assert world.job(f"stat -c %s {rel}/README; ls {rel}/lib/python").stdout == "8\nmod.py\n"
        assert world.job(f"head -c 8 {rel}/README").stdout == "app 1.0 "
        r = world.ovlrun("snapshot", "refresh", "--profile", "p")
        assert r.returncode == 0 and "rebuilt:" in r.stderr, r.stderr
        new = current_dir(world, rel)
        assert new != old and (new / "image.erofs").is_file() and (old / "image.erofs").is_file()
        # The next job gets the new snapshot (size matches the new data)...
        assert world.job(f"cat {rel}/README; stat -c %s {rel}/README; ls {rel}/lib/python").stdout == \
            "app 1.0 fixed\n14\nlate.py\nmod.py\n"
        # ...and refresh again finds nothing to do.
        again = world.ovlrun("snapshot", "refresh", "--profile", "p")
        assert again.returncode == 0 and "unchanged:" in again.stderr
        # gc never removes a snapshot a running job has mounted, even with no grace.
        gc = json.loads(world.ovlrun("snapshot", "gc", "--grace", "0", "--json").stdout)
        assert [(s["directory"], s["action"]) for s in gc["snapshots"]] == [(str(old), "kept: in use")]
        assert old.is_dir()
        # The running job still sees its snapshot's listing and metadata.
        assert holder.stdin is not None
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert read_until_ready(holder) == ["mod.py", "8"]
    finally:
        holder.kill()
        holder.wait(timeout=30)
    gc = json.loads(world.ovlrun("snapshot", "gc", "--grace", "0", "--json").stdout)
    assert [(s["directory"], s["reason"], s["action"]) for s in gc["snapshots"]] == [(str(old), "replaced", "removed")]
    assert snapshot_dirs(world) == [new]
    assert list((world.store / "tmp").iterdir()) == []


def test_gc_grace_and_dry_run(world: World) -> None:
    rel = world.sw / "app" / "1.0"
    world.simple_profile()
    world.build()
    old = current_dir(world, rel)
    (rel / "README").write_text("changed\n")
    assert world.ovlrun("snapshot", "refresh", "--all").returncode == 0
    r = json.loads(world.ovlrun("snapshot", "gc", "--json").stdout)  # default grace: 60 s
    assert [s["action"] for s in r["snapshots"]] == ["kept: grace"]
    r = json.loads(world.ovlrun("snapshot", "gc", "--dry-run", "--grace", "0", "--json").stdout)
    assert [(s["directory"], s["action"]) for s in r["snapshots"]] == [(str(old), "would remove")]
    assert old.is_dir()
    assert "removed: " in world.ovlrun("snapshot", "gc", "--grace", "0").stdout
    assert not old.exists()


def test_gc_removes_deleted_source_but_not_unmounted_tree(world: World) -> None:
    world.simple_profile(patterns=("app/*",))
    world.build()
    # The whole tree looks gone (an NFS mount point that is not mounted): keep everything.
    hidden = world.base / "sw.hidden"
    world.sw.rename(hidden)
    world.sw.mkdir()
    r = world.ovlrun("snapshot", "gc", "--grace", "0", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["snapshots"] == []
    world.sw.rmdir()
    hidden.rename(world.sw)
    # One release really deleted: its snapshot goes, index entry included.
    shutil.rmtree(world.sw / "app" / "1.0")
    r = json.loads(world.ovlrun("snapshot", "gc", "--json").stdout)
    assert [(s["path"], s["reason"], s["action"]) for s in r["snapshots"]] == [
        (str(world.sw / "app" / "1.0"), "source-gone", "removed")]
    index = json.loads((world.store / "index.json").read_text())["sources"]
    assert sorted(index) == [str(world.sw / "app" / "1.1")]
    assert len(snapshot_dirs(world)) == 1
    # Jobs of the profile still run; the deleted release is simply not localised.
    assert world.job(f"cat {world.sw}/app/1.1/README").stdout == "app 1.1\n"


def test_gc_cleans_leftovers_of_killed_builds(world: World) -> None:
    world.simple_profile()
    world.build()
    leftover = world.store / "tmp" / "somekey-abc.0123456789ab"
    (leftover / "tree" / "x").mkdir(parents=True)
    (world.store / "tmp" / "gc.feedfacecafe").mkdir()
    r = world.ovlrun("snapshot", "gc")
    assert r.returncode == 0 and "removed 1 leftover(s) of killed builds" in r.stdout
    assert list((world.store / "tmp").iterdir()) == []


def test_deleted_file_is_enoent_alone_and_deleted_release_breaks_nothing_else(world: World) -> None:
    rel = world.sw / "app" / "1.0"
    world.simple_profile(patterns=("app/*",))
    world.build()
    world.write_profile("other", f'[[tree]]\nroot = "{world.sw}"\nlocalise = ["app/1.1"]\n')
    (rel / "lib" / "python" / "mod.py").unlink()
    r = world.job(f"cat {rel}/lib/python/mod.py; echo rc=$?; cat {rel}/README; ls {rel}/lib/python")
    assert r.returncode == 0
    assert r.stdout.splitlines() == ["rc=1", "app 1.0", "mod.py"]  # listed (the snapshot's view), not openable
    assert "No such file or directory" in r.stderr
    shutil.rmtree(rel)
    r = world.job(f"cat {world.sw}/app/1.1/README")
    assert r.returncode == 0 and r.stdout == "app 1.1\n"
    assert f"{rel} (localised path {rel}) is missing on the shared tree; skipped" in r.stderr
    r = world.job(f"cat {world.sw}/app/1.1/README", profile="other")
    assert r.returncode == 0 and r.stdout == "app 1.1\n" and r.stderr == ""


def test_verify_costs_one_getattr_per_entry_and_one_readdir_per_directory(world: World) -> None:
    backing = world.base / "backing"
    shutil.copytree(world.sw, backing, symlinks=True)
    rel = backing / "app" / "1.0"
    dirs = 0
    for i in range(20):
        d = rel / "many" / f"d{i}"
        d.mkdir(parents=True)
        dirs += 1
        for j in range(10):
            (d / f"f{j}").write_text("x")
            (d / f"l{j}").symlink_to(f"f{j}")
    mnt = world.base / "mnt"
    world.write_profile("p", f'[[tree]]\nroot = "{mnt}"\nlocalise = ["app/1.0"]\n')
    with FaultFS(world.base, backing, mnt) as fs:
        r = fs.ovlrun("snapshot", "build", "--profile", "p", env=world.env)
        assert r.returncode == 0, r.stderr
    entries = sum(1 for _ in rel.rglob("*")) + 1
    directories = sum(1 for p in rel.rglob("*") if p.is_dir() and not p.is_symlink()) + 1
    # A fresh mount: nothing cached, as on a client that did not build the snapshot.
    with FaultFS(world.base, backing, mnt) as fs:
        before = fs.counters()
        r = fs.ovlrun("snapshot", "verify", "--profile", "p", env=world.env)
        after = fs.counters()
    assert r.returncode == 0, r.stdout + r.stderr
    used = {k: after[k] - before[k] for k in after}
    print(f"verify of {entries} entries / {directories} dirs: {used}")
    # Resolving the source path itself costs a few getattrs (mount root, app, app/1.0).
    assert used["getattr"] <= entries + 3, used
    assert used["opendir"] == directories, used
    assert used["readlink"] == 0, used  # unchanged symlinks are not read again
    assert used["open"] == used["read"] == 0, used
