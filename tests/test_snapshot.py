"""Snapshot content and publishing, checked on the real files the builder writes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, World, requires_overlay, requires_root, snapshot_dir, snapshot_entries

pytestmark = [requires_root, requires_overlay]

ODD_NAMES = [b"new\nline", b"co:lon", b"com,ma", b"back\\slash", b"sp ace", b"latin1-\xe9\xff", b"x" * 255]


OPAQUE = b"trusted.overlay.opaque"
METACOPY = b"trusted.overlay.metacopy"
REDIRECT = b"trusted.overlay.redirect"


def test_snapshot_content(world: World) -> None:
    rel = world.sw / "app" / "1.0"
    tool = rel / "bin" / "tool"
    os.chown(tool, 1234, 5678)
    tool.chmod(0o4755)  # set-uid must survive (chown before chmod)
    os.utime(tool, ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    os.chown(rel / "lib" / "libfoo.so", 4321, 8765, follow_symlinks=False)
    os.mkfifo(rel / "fifo")
    (rel / "lib").chmod(0o750)
    for name in ODD_NAMES:
        with open(os.path.join(os.fsencode(rel), name), "wb") as f:
            f.write(b"odd " + name)
    world.simple_profile()
    result = world.build()
    assert "skipped FIFO /fifo" in result.stderr

    entries = snapshot_entries(world, rel)
    # Directories: opaque, metadata copied.
    for d in (b"", b"lib", b"lib/python", b"bin"):
        assert entries[d].xattrs[OPAQUE] == b"y"
    assert stat.S_IMODE(entries[b"lib"].mode) == 0o750
    # Files: data-less metacopy with an absolute redirect from the subtree root.
    st_src, tool_entry = os.stat(tool), entries[b"bin/tool"]
    assert (tool_entry.size, tool_entry.uid, tool_entry.gid) == (st_src.st_size, 1234, 5678)
    assert stat.S_IMODE(tool_entry.mode) == 0o4755
    assert tool_entry.mtime_ns == 1_500_000_000_987_654_321  # an image keeps one time, the mtime
    assert tool_entry.xattrs[REDIRECT] == b"/bin/tool" and tool_entry.xattrs[METACOPY] == b""
    lib = entries[b"lib/libfoo.so.1"]
    assert lib.size == os.stat(rel / "lib" / "libfoo.so.1").st_size > 0
    # Symlinks: copied as symlinks with owner.
    link = entries[b"lib/libfoo.so"]
    assert stat.S_ISLNK(link.mode) and link.target == b"libfoo.so.1"
    assert (link.uid, link.gid) == (4321, 8765)
    # Odd names survive byte for byte, redirect included.
    for name in ODD_NAMES:
        assert entries[name].xattrs[REDIRECT] == b"/" + name
    assert b"fifo" not in entries
    snap = snapshot_dir(world, rel)
    # No file data: the image holds metadata only (a few KiB for this release).
    assert (snap / "image.erofs").stat().st_size < 64 * 1024
    manifest = json.loads((snap / "manifest.json").read_text())
    assert manifest["source"] == str(rel) and manifest["counts"]["skipped"] == 1
    assert manifest["format"] == 2 and manifest["image_bytes"] == (snap / "image.erofs").stat().st_size
    assert len(manifest["image_sha256"]) == 64
    assert manifest["counts"]["files"] == 4 + len(ODD_NAMES)
    assert len(manifest["fingerprint"]) == 64
    # The unlocalised release has no snapshot.
    assert str(world.sw / "app" / "1.1") not in json.loads((world.store / "index.json").read_text())["sources"]


def test_odd_names_readable_through_overlay(world: World) -> None:
    rel = world.sw / "app" / "1.0"
    for name in ODD_NAMES:
        with open(os.path.join(os.fsencode(rel), name), "wb") as f:
            f.write(b"odd " + name)
    world.simple_profile()
    world.build()
    script = ("import os,sys\nd=os.fsencode(sys.argv[1])\n"
              "for n in sorted(os.listdir(d)):\n"
              "    p=os.path.join(d,n)\n"
              "    if os.path.isfile(p) and n not in (b'README',):\n"
              "        sys.stdout.buffer.write(repr(open(p,'rb').read()).encode()+b'\\n')\n")
    result = world.ovlrun("--profile", "p", "--", sys.executable, "-c", script, str(rel))
    assert result.returncode == 0, result.stderr
    for name in ODD_NAMES:
        assert repr(b"odd " + name) in result.stdout


def test_build_is_idempotent_and_list(world: World) -> None:
    world.simple_profile()
    world.build()
    first = sorted((world.store / "snapshots").rglob("manifest.json"))
    again = world.build()
    assert "exists:" in again.stderr and "'ovlrun snapshot refresh' rebuilds changed sources" in again.stderr
    assert sorted((world.store / "snapshots").rglob("manifest.json")) == first
    listed = json.loads(world.ovlrun("snapshot", "list", "--json").stdout)
    assert [row["path"] for row in listed] == [str(world.sw / "app" / "1.0")]
    assert listed[0]["current"] is True
    # --rebuild with an unchanged source publishes nothing new either.
    assert "source unchanged" in world.ovlrun("snapshot", "build", "--profile", "p", "--rebuild").stderr
    assert sorted((world.store / "snapshots").rglob("manifest.json")) == first


def test_glob_patterns_build_each_match(world: World) -> None:
    world.simple_profile(patterns=("app/*/lib",))
    world.build()
    index = json.loads((world.store / "index.json").read_text())["sources"]
    assert sorted(index) == [str(world.sw / "app" / "1.0" / "lib"), str(world.sw / "app" / "1.1" / "lib")]


def test_symlink_pattern_outside_root_is_refused(world: World, tmp_path: Path) -> None:
    outside = Path(world.base / "outside")
    outside.mkdir()
    (world.sw / "escape").symlink_to(outside)
    world.simple_profile(patterns=("escape",))
    result = world.ovlrun("snapshot", "build", "--profile", "p")
    assert result.returncode == 1
    assert "outside the tree root" in result.stderr and "Traceback" not in result.stderr
    assert not (world.store / "index.json").exists()


def test_concurrent_builds_end_with_one_snapshot(world: World) -> None:
    world.simple_profile()
    procs = [subprocess.Popen([sys.executable, "-m", "ovlrun", "snapshot", "build", "--profile", "p"],
                              env=world.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(6)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sum("built:" in err for _, err in outputs) == 1
    assert len(list((world.store / "snapshots").rglob("manifest.json"))) == 1
    assert list((world.store / "tmp").iterdir()) == []


def test_pattern_matching_nothing_warns(world: World) -> None:
    world.simple_profile(patterns=("app/1.0", "app/9.9"))
    result = world.ovlrun("snapshot", "build", "--profile", "p")
    assert result.returncode == 0
    assert f"{world.sw}/app/9.9 matches nothing" in result.stderr


@pytest.mark.parametrize("depth", [120])
def test_deep_nesting(world: World, depth: int) -> None:
    d = world.sw / "app" / "1.0"
    rel = []
    for i in range(depth):
        rel.append(f"d{i}")
    deep = d.joinpath(*rel)
    deep.mkdir(parents=True)
    (deep / "leaf").write_text("leaf\n")
    world.simple_profile()
    world.build()
    result = world.job(f"cat '{deep / 'leaf'}'")
    assert result.returncode == 0 and result.stdout == "leaf\n", result.stderr


def test_repo_demo_profile_is_valid() -> None:
    result = subprocess.run([sys.executable, "-m", "ovlrun", "profile", "check", str(REPO / "profiles" / "demo.toml")],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr


def test_world_writable_source_dir_is_not_writable_through_the_store(world: World) -> None:
    rel = world.sw / "app" / "1.0"
    (rel / "scratch").mkdir()
    (rel / "scratch").chmod(0o1777)  # a sloppy release: world-writable directory
    world.simple_profile()
    world.build()
    snap = snapshot_dir(world, rel)
    assert stat.S_IMODE(snapshot_entries(world, rel)[b"scratch"].mode) == 0o1777  # mode mirrored for jobs...
    assert stat.S_IMODE(os.stat(snap).st_mode) == 0o700  # ...but the snapshot is out of users' reach
    assert stat.S_IMODE(os.stat(snap / "image.erofs").st_mode) == 0o600  # and read-only to all but root
    # Jobs, as an unprivileged user, still read through the overlay (root's credentials reach the layers).
    result = world.as_sudo("--profile", "p", "--", "/bin/sh", "-c", f"ls -ld {rel}/scratch; cat {rel}/README",
                           uid=65534)
    assert result.returncode == 0 and result.stdout.startswith("drwxrwxrwt") and "app 1.0" in result.stdout
    # A snapshot directory opened up to others is refused at launch.
    snap.chmod(0o755)
    refused = world.job("true")
    assert refused.returncode == 125 and "lets other users reach its tree" in refused.stderr
