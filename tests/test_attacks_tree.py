"""Issue 9, attack 3 and 5a-5c: a release maintainer (can write a release directory of
the shared tree, is not root) against the launch.

A snapshot is built from one directory; at launch the localised path must still be that
directory, reached without following symlinks below the tree root, or it stays
unlocalised (nothing is mounted anywhere else).  Nothing the root phase needs is loaded
from the shared tree after the first mount, and the command is looked up with the
user's rights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.attacks_support import sudo_env, user_dir
from tests.conftest import NOBODY, TEST_UID, World, requires_overlay, requires_root

pytestmark = [requires_root, requires_overlay]


def _mount_points(world: World, profile: str = "p", **kw: object) -> list[str]:
    r = world.ovlrun("--profile", profile, "--", "sh", "-c",
                     "grep ' overlay ovlrun ' /proc/self/mountinfo | cut -d' ' -f5", **kw)
    return r.stdout.split()


def _built_with_secret(world: World, name: str) -> tuple[Path, Path]:
    """app/1.0 built into the store, and a directory the user may traverse whose file
    ``name`` is root's alone (mode 0600): what a swapped release must never reach."""
    world.simple_profile()
    world.build()
    secret = world.base / "secret"
    secret.mkdir()
    (secret / name).write_text("TOPSECRET\n")
    (secret / name).chmod(0o600)
    return world.sw / "app" / "1.0", secret


def test_release_swapped_for_a_symlink_after_its_build_is_not_mounted_elsewhere(world: World,
                                                                               test_user: str) -> None:
    rel, secret = _built_with_secret(world, "README")
    rel.rename(rel.with_name(".1.0.orig"))  # what a maintainer of app/ can do
    rel.symlink_to(secret)
    r = world.as_sudo("--profile", "p", "--", "sh", "-c", f"cat {rel}/README; cut -d' ' -f5 /proc/self/mountinfo",
                      uid=TEST_UID)
    assert "TOPSECRET" not in r.stdout, r
    assert str(secret) not in r.stdout.split()  # nothing mounted there
    assert f"{rel} is not the directory its snapshot was built from" in r.stderr, r.stderr
    assert "stays unlocalised" in r.stderr
    strict = world.as_sudo("--profile", "p", "--strict", "--", "cat", f"{rel}/README", uid=TEST_UID)
    assert strict.returncode == 125 and "TOPSECRET" not in strict.stdout
    assert f"{rel} is not the directory its snapshot was built from" in strict.stderr


def test_release_replaced_by_another_directory_stays_unlocalised(world: World) -> None:
    rel = world.sw / "app" / "1.0"
    world.simple_profile()
    world.build()
    shutil.copytree(rel, rel.with_name("1.0.new"), symlinks=True)
    rel.rename(rel.with_name(".1.0.orig"))
    rel.with_name("1.0.new").rename(rel)
    (rel / "added").write_text("in the new directory\n")
    r = world.job(f"cat {rel}/added")
    assert r.returncode == 0 and r.stdout == "in the new directory\n", r  # the plain tree
    assert f"{rel} is not the directory its snapshot was built from" in r.stderr
    assert _mount_points(world) == []
    # A rebuild makes it localised again.
    assert world.ovlrun("snapshot", "refresh", "--all").returncode == 0
    assert _mount_points(world) == [str(rel)]


def test_release_path_through_a_symlinked_parent_is_not_followed_at_launch(world: World) -> None:
    app = world.sw / "app"
    world.simple_profile()
    world.build()
    # The parent of the release becomes a symlink to a copy: same names, other inodes.
    shutil.copytree(app, world.sw / "app.copy", symlinks=True)
    app.rename(world.sw / ".app.orig")
    app.symlink_to("app.copy")
    r = world.job("true")
    assert "is not the directory its snapshot was built from" in r.stderr, r.stderr
    assert _mount_points(world) == []


def test_network_none_launch_loads_nothing_from_the_shared_tree_after_mounting(world: World,
                                                                              test_user: str) -> None:
    pyroute2 = pytest.importorskip("pyroute2")
    assert pyroute2.__file__ is not None
    site = Path(pyroute2.__file__).parent.parent
    marker = world.base / "PWNED"
    evil = world.base / "evil" / "pyroute2"
    evil.mkdir(parents=True)
    (evil / "__init__.py").write_text(f"import os\nopen({str(marker)!r}, 'w').write(str(os.getuid()))\n")
    release = world.sw / "app" / "2.0"
    release.mkdir()
    (release / "pyroute2").symlink_to(evil)
    world.write_profile("net", f'network = "none"\n[[tree]]\nroot = "{world.sw}"\nlocalise = ["app/2.0"]\n')
    world.build("net")
    release.rename(release.with_name(".2.0.orig"))
    release.symlink_to(site)  # the launcher's own site-packages
    r = world.as_sudo("--profile", "net", "--", "true", uid=TEST_UID)
    assert not marker.exists(), f"root imported code from the release: {marker.read_text()} {r}"
    assert r.returncode == 0, r.stderr
    assert "is not the directory its snapshot was built from" in r.stderr


def test_release_symlink_to_an_ancestor_is_not_localised(world: World) -> None:
    tool = world.sw / "apps" / "tool"
    (tool / "5.0").mkdir(parents=True)
    (tool / "5.0" / "README").write_text("tool 5.0\n")
    (tool / "6.0").symlink_to("..")  # a maintainer's "release" that is all of apps/
    world.simple_profile(patterns=("apps/tool/*",))
    r = world.ovlrun("snapshot", "build", "--profile", "p")
    assert r.returncode == 0, r.stderr
    index = json.loads((world.store / "index.json").read_text())["sources"]
    assert sorted(index) == [str(tool / "5.0")]
    sources = [json.loads(m.read_text())["source"] for m in world.store.glob("snapshots/*/*/manifest.json")]
    assert sources == [str(tool / "5.0")]
    assert _mount_points(world) == [str(tool / "5.0")]
    # Named literally, it is an error, not a silent snapshot of the parent.
    world.simple_profile("lit", patterns=("apps/tool/6.0",))
    r = world.ovlrun("snapshot", "build", "--profile", "lit")
    assert r.returncode == 1 and "symlink" in r.stderr and "Traceback" not in r.stderr, r
    assert len(list(world.store.glob("snapshots/*/*/manifest.json"))) == 1


def test_permissions_tightened_after_the_build_are_flagged_by_verify(world: World) -> None:
    """Documented rule: a job sees the snapshot's modes until refresh; verify reports it."""
    rel = world.sw / "app" / "1.0"
    world.simple_profile()
    world.build()
    (rel / "README").chmod(0o600)
    (rel / "lib").chmod(0o700)
    v = world.ovlrun("snapshot", "verify", "--all")
    assert v.returncode == 1 and "changed: /README" in v.stdout and "changed: /lib" in v.stdout, v.stdout
    assert world.ovlrun("snapshot", "refresh", "--all").returncode == 0
    r = world.ovlrun("--profile", "p", "--user", "nobody", "--", "sh", "-c", f"cat {rel}/README; ls {rel}/lib",
                     cwd="/")
    assert "app 1.0" not in r.stdout and r.stderr.count("Permission denied") == 2, r
    assert os.stat(rel).st_uid != NOBODY


def test_command_is_looked_up_with_the_users_rights(world: World, test_user: str) -> None:
    world.simple_profile()
    world.build()
    hidden = world.base / "hidden"
    hidden.mkdir(mode=0o700)
    (hidden / "probe").write_text("not executable\n")
    user_dir(world.base / "mine")
    env = {**sudo_env(), "PATH": f"{hidden}:/usr/bin:/bin"}
    results = {}
    for name in ("probe", "nothere"):
        r = world.as_sudo("--profile", "p", "--", name, uid=TEST_UID, extra_env=env, cwd="/")
        results[name] = (r.returncode, r.stderr.replace(name, "NAME").splitlines()[-1])
    # Whether a file exists in a directory the user cannot search must not show.
    assert results["probe"] == results["nothere"] == (127, "ovlrun: NAME: command not found"), results


def test_identity_checks_cost_no_extra_round_trips(world: World) -> None:
    """Each localised path is opened once, without following symlinks, and its inode is
    compared with fstat: at most one request per localised path reaches the shared tree
    (measured through the counting FUSE stand-in), and no listing or data read."""
    from tests.faultfs import FaultFS

    n = 20
    backing = world.base / "backing"
    for i in range(n):
        (backing / "r" / f"rel{i:02d}" / "lib").mkdir(parents=True)
        (backing / "r" / f"rel{i:02d}" / "lib" / "f").write_text("x")
    mnt = world.base / "mnt"
    world.write_profile("fs", f'[[tree]]\nroot = "{mnt}"\nlocalise = ["r/*"]\n')
    env = {**world.env, "PATH": "/usr/bin:/bin"}
    with FaultFS(world.base, backing, mnt) as fs:
        assert fs.ovlrun("snapshot", "build", "--profile", "fs", env=env, timeout=300).returncode == 0
        for _ in range(4):
            before = fs.counters()
            r = fs.ovlrun("--profile", "fs", "--", "sh", "-c", "grep -c ' overlay ovlrun ' /proc/self/mountinfo",
                          env=env)
            after = fs.counters()
            assert r.returncode == 0 and r.stdout.strip() == str(n) and "warning" not in r.stderr, r
            used = {k: after[k] - before[k] for k in after if after[k] != before[k]}
            assert set(used) <= {"getattr"} and used.get("getattr", 0) <= n + 3, used


def test_snapshot_without_source_identity_is_not_mounted_until_rebuilt(world: World) -> None:
    """Snapshots built before identities were recorded: a warning, no mount; a plain
    'snapshot build' (no --rebuild) rebuilds them."""
    rel = world.sw / "app" / "1.0"
    world.simple_profile()
    world.build()
    (manifest,) = world.store.glob("snapshots/*/*/manifest.json")
    data = json.loads(manifest.read_text())
    for key in ("source_root", "source_ino"):
        data.pop(key)
    manifest.write_text(json.dumps(data))
    shutil.rmtree(world.store / "plans", ignore_errors=True)
    r = world.job("true")
    assert r.returncode == 0 and "predates source identity checks" in r.stderr, r
    assert _mount_points(world) == []
    assert "built:" in world.build().stderr
    assert _mount_points(world) == [str(rel)]


def test_subdirectory_swapped_for_a_symlink_serves_no_data_from_its_target(world: World, test_user: str) -> None:
    """Inside a release (same inode, so it is mounted) a maintainer swaps lib/ for a
    symlink to a directory with a root-only file of the same name: the metacopy file's
    data is looked up beneath the data-only layer without following symlinks, so the job
    gets an error, never the target's data."""
    rel, secret = _built_with_secret(world, "libfoo.so.1")
    (rel / "lib").rename(rel / ".lib.orig")
    (rel / "lib").symlink_to(secret)
    r = world.as_sudo("--profile", "p", "--", "sh", "-c", f"cat {rel}/lib/libfoo.so.1; ls {rel}/lib", uid=TEST_UID)
    assert "TOPSECRET" not in r.stdout, r
    assert "python" in r.stdout.split()  # the snapshot's listing: the release is localised


METHOD_CHILD = r"""
import json, sys
from ovlrun.launch.mount import mount_items
from ovlrun.launch.planner import plan_job
from ovlrun.linux.kernel import forced
from ovlrun.linux.namespaces import enter_private_namespace
from ovlrun.profile.locate import open_profile
profile, store, method = sys.argv[1:4]
job = plan_job(open_profile(profile), store)
enter_private_namespace()
warnings = []
mounted = mount_items(job.items, store, strict=False, warn=warnings.append, features=forced(method))
points = [l.split(" ")[4] for l in open("/proc/self/mountinfo") if " - overlay ovlrun " in l]
print(json.dumps({"mounted": [i.source for i in mounted], "warnings": warnings, "points": points}))
"""


def test_identity_check_holds_for_every_mount_method(world: World) -> None:
    """The checked fd is what gets mounted, whichever way the kernel mounts: fsconfig with
    fds or strings, or mount(2) (which gets /proc/self/fd/N)."""
    from ovlrun.linux.kernel import METHODS
    from tests.conftest import REPO

    rel = world.sw / "app" / "1.0"
    profile = world.simple_profile()
    world.build()

    def run(method: str) -> dict[str, list[str]]:
        r = subprocess.run([sys.executable, "-c", METHOD_CHILD, str(profile), str(world.store), method],
                           capture_output=True, text=True, env={"PYTHONPATH": str(REPO)}, timeout=60)
        assert r.returncode == 0, (method, r.stderr)
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    for method in METHODS:
        seen = run(method)
        assert seen["mounted"] == [str(rel)] and seen["points"] == [str(rel)] and not seen["warnings"], (method, seen)
    secret = world.base / "secret"
    secret.mkdir()
    rel.rename(rel.with_name(".1.0.orig"))
    rel.symlink_to(secret)
    for method in METHODS:
        seen = run(method)
        assert seen["mounted"] == [] and seen["points"] == [], (method, seen)
        assert any("is not the directory its snapshot was built from" in w for w in seen["warnings"]), seen
