"""Hostile and odd source trees, symlink tricks, store tampering.

(Names with newline, ':', ',', '\\', spaces, non-UTF-8 bytes and 255 bytes, and deep
nesting, are covered in test_snapshot.py: test_snapshot_content,
test_odd_names_readable_through_overlay, test_deep_nesting.)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

from tests.conftest import NOBODY, World, requires_overlay, requires_root

pytestmark = [requires_root, requires_overlay]


def snapshot_tree(world: World, path: Path) -> Path:
    index = json.loads((world.store / "index.json").read_text())["sources"]
    return world.store / index[str(path)] / "tree"


def as_nobody(world: World, script: str) -> subprocess.CompletedProcess[str]:
    return world.ovlrun("--profile", "p", "--user", "nobody", "--", "/bin/sh", "-c", script, cwd="/")


def test_special_files_hard_links_and_setuid(world: World) -> None:
    rel = world.sw / "app" / "1.0"
    os.link(rel / "README", rel / "README.hardlink")
    os.mkfifo(rel / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(rel / "sock"))
    os.mknod(rel / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    shutil.copy("/usr/bin/id", rel / "bin" / "suid-id")
    os.chmod(rel / "bin" / "suid-id", 0o4755)  # root-owned set-uid: must not grant root in a job
    world.simple_profile()
    r = world.build()
    sock.close()
    for kind, name in (("FIFO", "fifo"), ("socket", "sock"), ("character device", "null")):
        assert f"skipped {kind} /{name} (not represented in snapshots)" in r.stderr
    manifest = json.loads((snapshot_tree(world, rel).parent / "manifest.json").read_text())
    assert manifest["counts"]["skipped"] == 3 and manifest["counts"]["hardlinked"] == 2
    snap = snapshot_tree(world, rel)
    assert stat.S_IMODE(os.stat(snap / "bin" / "suid-id").st_mode) == 0o4755  # faithful metadata...
    r = as_nobody(world, f"cat {rel}/README.hardlink; {rel}/bin/suid-id -u; for f in fifo sock null; do "
                  f"test -e {rel}/$f && echo $f present || echo $f absent; done")
    assert r.returncode == 0, r.stderr
    # ...but the overlay is nosuid: the set-uid file runs as the user; special files are absent.
    assert r.stdout.splitlines() == ["app 1.0", str(NOBODY), "fifo absent", "sock absent", "null absent"]


def test_long_redirects_and_255_byte_names(world: World) -> None:
    rel = world.sw / "app" / "1.0"
    deep = rel / ("a" * 255) / ("b" * 255)
    deep.mkdir(parents=True)
    (deep / ("c" * 255)).write_text("far away\n")
    world.simple_profile()
    r = world.build()
    assert "exceeds redirect_max" in r.stderr
    manifest = json.loads((snapshot_tree(world, rel).parent / "manifest.json").read_text())
    assert manifest["long_redirects"] == 1 and manifest["max_redirect"] == 3 * 256
    r = world.job(f"cat {deep / ('c' * 255)}")
    assert r.returncode == 0 and r.stdout == "far away\n", r.stderr


def test_files_and_directories_the_user_cannot_read(world: World) -> None:
    rel = world.sw / "app" / "1.0"
    (rel / "secret").write_text("s\n")
    os.chmod(rel / "secret", 0o000)
    (rel / "private").mkdir()
    (rel / "private" / "inside").write_text("i\n")
    os.chmod(rel / "private", 0o000)
    world.simple_profile()
    world.build()  # the builder reads no file data; root lists a 0000 directory on a local fs
    r = as_nobody(world, f"cat {rel}/secret; echo rc=$?; ls {rel}/private; echo rc=$?; cat {rel}/README")
    assert r.stdout.splitlines() == ["rc=1", "rc=2", "app 1.0"]  # permissions are kept, not widened
    assert r.stderr.count("Permission denied") == 2
    assert world.job(f"cat {rel}/secret {rel}/private/inside").stdout == "s\ni\n"  # root may


def test_symlinks_pointing_outside_the_tree_stay_symlinks(world: World) -> None:
    rel = world.sw / "app" / "1.0"
    outside = world.base / "outside"
    outside.mkdir()
    (outside / "target-file").write_text("outside\n")
    (rel / "abs-out").symlink_to(outside)
    (rel / "rel-out").symlink_to("../../../outside")
    (rel / "lib" / "up").symlink_to("../..")
    world.simple_profile()
    world.build()
    snap = snapshot_tree(world, rel)
    # The builder never follows them: no copy of anything outside the release.
    assert os.readlink(snap / "abs-out") == str(outside)
    assert not any(p.name == "target-file" for p in snap.rglob("*"))
    manifest = json.loads((snap.parent / "manifest.json").read_text())
    assert manifest["counts"]["symlinks"] == 4  # 3 + lib/libfoo.so
    # In a job they resolve exactly as on the plain tree: the overlay is mounted on the
    # release only, and nothing else is mounted.
    r = world.job(f"cat {rel}/abs-out/target-file {rel}/rel-out/target-file; readlink {rel}/lib/up; "
                  "grep -c ' overlay ovlrun ' /proc/self/mountinfo; "
                  f"grep ' overlay ovlrun ' /proc/self/mountinfo | cut -d' ' -f5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["outside", "outside", "../..", "1", str(rel)]


def test_pattern_through_symlinked_parent_outside_root_is_refused(world: World) -> None:
    outside = world.base / "elsewhere"
    (outside / "1.0").mkdir(parents=True)
    (world.sw / "vendor").symlink_to(outside)
    world.simple_profile(patterns=("vendor/*",))
    r = world.ovlrun("snapshot", "build", "--profile", "p")
    assert r.returncode == 1 and "outside the tree root" in r.stderr and "Traceback" not in r.stderr
    assert world.job("true").returncode == 0


def test_verify_handles_odd_names(world: World) -> None:
    rel = world.sw / "app" / "1.0"
    odd = b"new\nline:co,ma\\ sp\xff"
    os.mkdir(os.path.join(os.fsencode(rel), odd))
    world.simple_profile()
    world.build()
    assert world.ovlrun("snapshot", "verify", "--all").returncode == 0
    with open(os.path.join(os.fsencode(rel), odd, odd), "wb") as f:
        f.write(b"x")
    r = world.ovlrun("snapshot", "verify", "--all", "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout)[0]["new"] == ["/" + os.fsdecode(odd + b"/" + odd)]
    text = world.ovlrun("snapshot", "verify", "--all")
    assert "new: '/new\\nline" in text.stdout and "Traceback" not in text.stderr


def _tamper_cases(world: World, rel: Path) -> list[tuple[Path, str]]:
    snap = snapshot_tree(world, rel).parent
    # snap/tree itself is not checked: it mirrors the source root's mode, and the 0700
    # snapshot directory above it keeps everyone but root out (test_snapshot.py checks that).
    return [(world.store, "owner"), (world.store / "snapshots", "mode"), (snap, "mode"), (snap, "group"),
            (snap.parent, "owner")]


def test_tampered_store_is_refused_at_launch(world: World) -> None:
    rel = world.sw / "app" / "1.0"
    world.simple_profile()
    world.build()
    for path, how in _tamper_cases(world, rel):
        st = os.lstat(path)
        try:
            if how == "owner":
                os.chown(path, NOBODY, -1)
            elif how == "mode":
                os.chmod(path, stat.S_IMODE(st.st_mode) | 0o002)
            else:
                os.chmod(path, stat.S_IMODE(st.st_mode) | 0o020)
            r = world.job("echo ran")
            assert r.returncode == 125 and r.stdout == "", (path, how, r)
            assert f"refusing snapshot store path {path}: it must be owned by root and not group/other-writable" \
                in r.stderr, r.stderr
        finally:
            os.chown(path, st.st_uid, st.st_gid)
            os.chmod(path, stat.S_IMODE(st.st_mode))
    # A snapshot directory replaced by a symlink is refused too.
    snap = snapshot_tree(world, rel).parent
    moved = snap.with_name(snap.name + ".real")
    snap.rename(moved)
    snap.symlink_to(moved)
    r = world.job("echo ran")
    assert r.returncode == 125 and "is not a directory (symlink or tampering?)" in r.stderr
    snap.unlink()
    moved.rename(snap)
    assert world.job("echo ran").stdout == "ran\n"
