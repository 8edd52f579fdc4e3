"""Fleets: publish images once, fetch them on every node (ovlrun/store/fleet/), the
site configuration (ovlrun/store/siteconfig.py) and the Prolog's fetch step."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ovlrun.errors import OvlrunError
from ovlrun.store.siteconfig import config_path, load_site_config
from tests.conftest import NOBODY, World, requires_overlay, requires_root
from tests.faultfs import FaultFS

pytestmark = [requires_root, requires_overlay]


class Fleet:
    """A build host (the world's store), a published directory, a second node's store."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.pub = world.base / "pub"
        self.pub.mkdir(mode=0o755)
        self.store2 = world.base / "store2"
        self.config = world.base / "ovlrun.toml"
        self.write_config("")
        self.node2 = {"OVLRUN_STORE": str(self.store2)}

    def write_config(self, text: str) -> None:
        self.config.write_text(text)
        self.config.chmod(0o644)
        self.world.env["OVLRUN_CONFIG"] = str(self.config)

    def run(self, *args: str, node2: bool = False) -> subprocess.CompletedProcess[str]:
        r = self.world.ovlrun(*args, env=self.node2 if node2 else None)
        assert "Traceback" not in r.stderr, r.stderr
        return r

    def publish(self, *extra: str, to: Path | None = None) -> list[dict[str, object]]:
        r = self.run("snapshot", "publish", "--to", str(to or self.pub), "--profile", "p", "--json", *extra)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    def fetch(self, *extra: str, src: Path | None = None) -> subprocess.CompletedProcess[str]:
        return self.run("snapshot", "fetch", "--from", str(src or self.pub), "--profile", "p", "--json", *extra,
                        node2=True)

    def index2(self) -> dict[str, str]:
        index = self.store2 / "index.json"
        return json.loads(index.read_text())["sources"] if index.exists() else {}  # type: ignore[no-any-return]

    def assert_nothing_partial(self) -> None:
        """Store 2 holds only complete snapshots, the index names only those, and no build
        leftovers remain."""
        for rel in self.index2().values():
            assert (self.store2 / rel / "manifest.json").is_file() and (self.store2 / rel / "image.erofs").is_file()
        for snap in (self.store2 / "snapshots").glob("*/*"):
            manifest = json.loads((snap / "manifest.json").read_text())
            assert sha(snap / "image.erofs") == manifest["image_sha256"], snap
        tmp = self.store2 / "tmp"
        assert not tmp.exists() or list(tmp.iterdir()) == []


@pytest.fixture
def fleet(world: World) -> Fleet:
    world.simple_profile()
    return Fleet(world)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def current(store: Path, path: Path) -> Path:
    return store / json.loads((store / "index.json").read_text())["sources"][str(path)]


def job_view(world: World, env: dict[str, str]) -> tuple[str, list[str]]:
    """(snapshot directory the job mounted on app/1.0, the release's top-level names)."""
    rel = world.sw / "app" / "1.0"
    r = world.ovlrun("--profile", "p", "--", sys.executable, "-c",
                     "import json,os,subprocess,sys;"
                     "s=json.loads(subprocess.run([sys.executable,'-m','ovlrun','status','--json'],"
                     "capture_output=True,text=True,check=True).stdout);"
                     f"print(json.dumps([[m['snapshot'] for m in s['localised']], sorted(os.listdir({str(rel)!r}))]))",
                     env=env)
    assert r.returncode == 0, r.stderr
    snaps, names = json.loads(r.stdout)
    assert len(snaps) == 1, (snaps, r.stderr)
    return snaps[0], names


# ------------------------------------------------------------------ publish and fetch


def test_publish_then_fetch_gives_identical_image_and_a_working_job(fleet: Fleet) -> None:
    world = fleet.world
    rel = world.sw / "app" / "1.0"
    world.build()
    rows = fleet.publish()
    assert [r["status"] for r in rows] == ["published"]
    snap = current(world.store, rel)
    key, snap_id = snap.parent.name, snap.name
    # The layout: DIR/index.json naming KEY/ID, the version's manifest and image.
    published = json.loads((fleet.pub / "index.json").read_text())
    entry = published["sources"][str(rel)]
    assert published["format"] == 1 and entry["snapshot"] == f"{key}/{snap_id}"
    assert sha(fleet.pub / key / snap_id / "image.erofs") == sha(snap / "image.erofs") == entry["image_sha256"]
    assert json.loads((fleet.pub / key / snap_id / "manifest.json").read_text()) == json.loads(
        (snap / "manifest.json").read_text())
    assert {p.name for p in fleet.pub.iterdir()} == {".lock", key, "index.json"}
    # Publishing the same snapshot again writes nothing.
    before = (fleet.pub / "index.json").stat()
    assert [r["status"] for r in fleet.publish()] == ["unchanged"]
    after = (fleet.pub / "index.json").stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)

    # A file added after the build: hidden by the snapshot, on both nodes.
    (rel / "late").write_text("x\n")
    r = fleet.fetch()
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["status"] == "fetched" and row["bytes"] == entry["image_bytes"]
    snap2 = current(fleet.store2, rel)
    assert snap2.relative_to(fleet.store2) == snap.relative_to(world.store)  # same KEY/ID
    assert sha(snap2 / "image.erofs") == sha(snap / "image.erofs")
    assert (snap2 / "manifest.json").read_bytes() == (snap / "manifest.json").read_bytes()
    assert oct(snap2.stat().st_mode & 0o777) == "0o700" and oct((snap2 / "image.erofs").stat().st_mode & 0o777) == "0o600"
    mounted, names = job_view(world, fleet.node2)
    assert mounted == str(snap2) and "late" not in names and "README" in names
    # The fetched snapshot is an ordinary one: verify finds the late file.
    v = fleet.run("snapshot", "verify", "--all", "--json", node2=True)
    assert v.returncode == 1 and json.loads(v.stdout)[0]["new"] == ["/late"]
    fleet.assert_nothing_partial()


def test_fetch_all_and_site_config_default_dir(fleet: Fleet) -> None:
    world = fleet.world
    world.simple_profile(patterns=("app/*",))
    world.build()
    fleet.publish()
    fleet.write_config(f'image_dir = "{fleet.pub}"\nfetch_timeout = 2\n')
    r = fleet.run("snapshot", "fetch", "--all", node2=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("fetched: ") == 2
    assert sorted(fleet.index2()) == [str(world.sw / "app" / "1.0"), str(world.sw / "app" / "1.1")]
    r = fleet.run("snapshot", "fetch", "--all", node2=True)
    assert r.returncode == 0 and r.stdout.count("up-to-date: ") == 2, r.stdout
    # Usage mistakes are one line, exit 125 or 2, no traceback.
    fleet.write_config("")
    r = fleet.run("snapshot", "fetch", "--all", node2=True)
    assert r.returncode == 125 and "no image directory: give --from DIR or set image_dir in" in r.stderr
    r = fleet.run("snapshot", "publish", "--to", str(fleet.pub))
    assert r.returncode == 125 and "give either --profile NAME or --all" in r.stderr


def _refusal_cases(pub: Path, key: str, snap_id: str) -> dict[str, tuple[str, object]]:
    version = f"{key}/{snap_id}"
    return {
        "dir owner": ("owned by uid 4242", lambda d: os.chown(d, 4242, -1)),
        "dir mode": ("is writable by group or others", lambda d: d.chmod(0o775)),
        "index owner": ("index.json: owned by uid 4242", lambda d: os.chown(d / "index.json", 4242, -1)),
        "version dir owner": (f"{version}: owned by uid 4242", lambda d: os.chown(d / version, 4242, -1)),
        "manifest owner": ("manifest.json: owned by uid 4242",
                           lambda d: os.chown(d / version / "manifest.json", 4242, -1)),
        "manifest mode": ("manifest.json: mode -rw-rw-rw- is writable by group or others",
                          lambda d: (d / version / "manifest.json").chmod(0o666)),
        "image owner": ("image.erofs: owned by uid 4242", lambda d: os.chown(d / version / "image.erofs", 4242, -1)),
        "image mode": ("image.erofs: mode -rw-r--rw- is writable by group or others",
                       lambda d: (d / version / "image.erofs").chmod(0o646)),
        "image symlink": ("image.erofs: it is a symlink", _symlink_image(version)),
        "key symlink": (f"{key}: it is a symlink", _symlink_key(key)),
        "flipped byte": ("sha256 does not match the manifest", _flip_byte(version)),
        "manifest source": (f"its source /etc is not where {pub.parent}/sw/app/1.0 is on this node",
                            _retarget_manifest(version)),
    }


def _symlink_image(version: str) -> object:
    def apply(d: Path) -> None:
        image = d / version / "image.erofs"
        shutil.copy2(image, d / "elsewhere.erofs")  # identical and root-owned: only the symlink is wrong
        image.unlink()
        image.symlink_to(d / "elsewhere.erofs")
    return apply


def _symlink_key(key: str) -> object:
    def apply(d: Path) -> None:
        (d / key).rename(d / "moved")
        (d / key).symlink_to("moved")
    return apply


def _flip_byte(version: str) -> object:
    def apply(d: Path) -> None:
        image = d / version / "image.erofs"
        data = bytearray(image.read_bytes())
        data[len(data) // 2] ^= 0x01
        image.write_bytes(bytes(data))
    return apply


def _retarget_manifest(version: str) -> object:
    def apply(d: Path) -> None:
        # The image owner must not be able to mount anywhere but where the path resolves:
        # a consistent manifest, index and KEY whose source is /etc.
        from ovlrun.store.layout import source_key

        snap_id = version.split("/")[1]
        m = d / version / "manifest.json"
        data = json.loads(m.read_text())
        data["source"] = "/etc"
        m.write_text(json.dumps(data))
        (d / source_key("/etc")).mkdir()
        (d / version).rename(d / source_key("/etc") / snap_id)
        index = json.loads((d / "index.json").read_text())
        for entry in index["sources"].values():
            entry["snapshot"] = f"{source_key('/etc')}/{snap_id}"
        (d / "index.json").write_text(json.dumps(index))
    return apply


def test_fetch_refuses_untrusted_or_corrupt_published_files_and_keeps_nothing(fleet: Fleet) -> None:
    world = fleet.world
    rel = world.sw / "app" / "1.0"
    world.build()
    fleet.publish()
    snap = current(world.store, rel)
    cases = _refusal_cases(fleet.pub, snap.parent.name, snap.name)
    for name, (message, mutate) in cases.items():
        case = world.base / f"pub-{name.replace(' ', '-')}"
        shutil.copytree(fleet.pub, case, symlinks=True)
        mutate(case)  # type: ignore[operator]
        r = fleet.fetch(src=case)
        assert r.returncode == 1, (name, r.stdout, r.stderr)
        assert "refusing" in r.stdout + r.stderr and message in r.stdout + r.stderr, (name, r.stdout, r.stderr)
        assert fleet.index2() == {}, name
        fleet.assert_nothing_partial()
    # And the untouched copy is fine.
    assert fleet.fetch().returncode == 0


def test_fetch_is_idempotent_and_costs_a_few_large_reads(fleet: Fleet) -> None:
    """Served through the counting FUSE stand-in: the second fetch opens only index.json.
    Also measures fetching one release against walking it (the report's numbers)."""
    world = fleet.world
    rel = world.sw / "app" / "1.0"
    for i in range(30):  # a release with some body: 30 dirs x 20 files
        d = rel / "bulk" / f"d{i:02}"
        d.mkdir(parents=True)
        for j in range(20):
            (d / f"f{j:02}.py").write_text("x = 1\n")
    world.build()
    fleet.publish()
    mnt = world.base / "mnt-pub"
    with FaultFS(world.base, fleet.pub, mnt) as fs:
        env = {**world.env, **fleet.node2}
        c0 = fs.counters()
        r = fs.ovlrun("snapshot", "fetch", "--from", str(mnt), "--profile", "p", "--json", env=env)
        assert r.returncode == 0, r.stderr
        first = {k: v - c0[k] for k, v in fs.counters().items()}
        assert json.loads(r.stdout)[0]["status"] == "fetched"
        c1 = fs.counters()
        r = fs.ovlrun("snapshot", "fetch", "--from", str(mnt), "--profile", "p", "--json", env=env)
        assert r.returncode == 0 and json.loads(r.stdout)[0]["status"] == "up-to-date", r.stderr
        second = {k: v - c1[k] for k, v in fs.counters().items()}
    assert second["open"] == 1 and second["readdir"] == 0, second  # index.json, nothing else
    assert first["open"] == 3, first  # index.json, manifest.json, image.erofs
    # Walking the same release through the stand-in, as `snapshot build` on a node does.
    backing = world.base / "sw-backing"
    shutil.copytree(world.sw, backing, symlinks=True)
    swmnt = world.base / "mnt-sw"
    world.write_profile("walk", f'[[tree]]\nroot = "{swmnt}"\nlocalise = ["app/1.0"]\n')
    with FaultFS(world.base, backing, swmnt) as fs:
        c0 = fs.counters()
        r = fs.ovlrun("snapshot", "build", "--profile", "walk", env={**world.env, "OVLRUN_STORE": str(world.base / "s3")})
        assert r.returncode == 0, r.stderr
        walk = {k: v - c0[k] for k, v in fs.counters().items()}
    total_first, total_walk = sum(first.values()), sum(walk.values())
    print(f"\nfetch (first): {first} = {total_first}\nfetch (again): {second} = {sum(second.values())}\n"
          f"walk (build): {walk} = {total_walk}")
    assert total_first * 20 < total_walk


def test_an_image_with_inlined_data_is_fetched_in_a_few_large_reads(fleet: Fleet) -> None:
    """Inlined data makes the image bigger, not the fetch chattier: the requests grow with
    the image's MiB (one READ per readahead window), not with its files."""
    world = fleet.world
    rel = world.sw / "app" / "1.0"
    for i in range(60):  # 60 x 100 KiB of .pyc data to inline
        (rel / "lib" / "python" / f"m{i:02}.cpython-311.pyc").write_bytes(os.urandom(100 << 10))
    world.write_profile("p", f'[[tree]]\nroot = "{world.sw}"\nlocalise = ["app/1.0"]\ninline = ["**/*.pyc"]\n')
    world.build()
    fleet.publish()
    mnt = world.base / "mnt-pub"
    with FaultFS(world.base, fleet.pub, mnt) as fs:
        c0 = fs.counters()
        r = fs.ovlrun("snapshot", "fetch", "--from", str(mnt), "--profile", "p", "--json",
                      env={**world.env, **fleet.node2})
        assert r.returncode == 0 and json.loads(r.stdout)[0]["status"] == "fetched", r.stderr
        got = {k: v - c0[k] for k, v in fs.counters().items()}
    (image,) = fleet.store2.glob("snapshots/*/*/image.erofs")
    size = image.stat().st_size
    assert size > 6_000_000
    print(f"\nfetch of a {size:,}-byte image with 60 inlined files: {got} = {sum(got.values())}")
    assert got["open"] == 3, got
    assert got["read"] <= size // (128 << 10) + 8, got  # FUSE's 128 KiB readahead: whole windows
    assert sum(got.values()) <= 100, got


def test_unreachable_or_stalled_dir_keeps_what_the_node_has(fleet: Fleet) -> None:
    world = fleet.world
    world.build()
    fleet.publish()
    assert fleet.fetch().returncode == 0
    before = fleet.index2()
    r = fleet.fetch(src=world.base / "not-mounted")
    assert r.returncode == 1 and "does not exist (not mounted?)" in r.stderr, r.stderr
    assert "the local store is unchanged" in r.stderr
    assert fleet.index2() == before
    job_view(world, fleet.node2)  # still localised
    # A stalled DIR: bounded by --timeout, the store untouched.
    mnt = world.base / "mnt-pub"
    with FaultFS(world.base, fleet.pub, mnt) as fs:
        fs.faults("open stall /index.json")
        started = time.monotonic()
        r = fs.ovlrun("snapshot", "fetch", "--from", str(mnt), "--all", "--timeout", "1",
                      env={**world.env, "OVLRUN_STORE": str(world.base / "store3")})
        took = time.monotonic() - started
        fs.release()
    assert r.returncode == 1 and "no answer from the shared tree within 1s" in r.stderr, r.stderr
    assert took < 20, took
    assert not (world.base / "store3" / "index.json").exists()


def test_stall_while_copying_leaves_nothing_partial(fleet: Fleet) -> None:
    world = fleet.world
    world.build()
    fleet.publish()
    snap = current(world.store, world.sw / "app" / "1.0")
    mnt = world.base / "mnt-pub"
    with FaultFS(world.base, fleet.pub, mnt) as fs:
        fs.faults(f"read stall /{snap.parent.name}/{snap.name}/image.erofs")
        r = fs.ovlrun("snapshot", "fetch", "--from", str(mnt), "--all", "--timeout", "2",
                      env={**world.env, **fleet.node2})
        fs.release()
    assert r.returncode == 1 and "failed: " in r.stdout and "within the fetch's 2s" in r.stdout, (r.stdout, r.stderr)
    assert fleet.index2() == {}
    fleet.assert_nothing_partial()


def test_concurrent_launches_during_fetch_see_old_or_new(fleet: Fleet) -> None:
    world = fleet.world
    rel = world.sw / "app" / "1.0"
    world.build()
    fleet.publish()
    assert fleet.fetch().returncode == 0
    old = current(fleet.store2, rel)
    (rel / "added").write_text("x\n")
    r = world.ovlrun("snapshot", "refresh", "--all")
    assert r.returncode == 0, r.stderr
    fleet.publish()
    new_rel = current(world.store, rel).relative_to(world.store)
    proc = subprocess.Popen([sys.executable, "-m", "ovlrun", "snapshot", "fetch", "--from", str(fleet.pub),
                             "--all"], env={**world.env, **fleet.node2}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    views = []
    while proc.poll() is None or len(views) < 3:
        views.append(job_view(world, fleet.node2))
        if proc.poll() is not None:
            views.append(job_view(world, fleet.node2))
    _out, err = proc.communicate()
    assert proc.returncode == 0, err
    for mounted, names in views:
        if mounted == str(old):
            assert "added" not in names
        else:
            assert mounted == str(fleet.store2 / new_rel) and "added" in names, (mounted, names)
    assert views[-1][0] == str(fleet.store2 / new_rel)
    fleet.assert_nothing_partial()


# ------------------------------------------------------------ image owner and gc of DIR


def test_publish_writes_as_the_image_owner_and_fetch_trusts_only_that_owner(fleet: Fleet) -> None:
    world = fleet.world
    world.build()
    os.chown(fleet.pub, NOBODY, -1)
    r = fleet.run("snapshot", "publish", "--to", str(fleet.pub), "--all")
    assert r.returncode == 125 and "owned by uid 65534, not by the image owner root (uid 0)" in r.stderr, r.stderr
    fleet.write_config(f"image_owner = {NOBODY}\n")
    fleet.publish()  # as nobody: what a root-squashing NFS export needs
    owners = {p.stat().st_uid for p in fleet.pub.rglob("*")}
    assert owners == {NOBODY}, owners
    r = fleet.fetch()
    assert r.returncode == 0, r.stderr
    fleet.write_config("")  # default owner: root
    r = fleet.run("snapshot", "fetch", "--from", str(fleet.pub), "--all", node2=True)
    assert r.returncode == 1 and "not by the image owner root" in r.stderr, r.stderr


def test_gc_published_keeps_current_and_recent_removes_old_and_leftovers(fleet: Fleet) -> None:
    world = fleet.world
    rel = world.sw / "app" / "1.0"
    world.build()
    fleet.publish()
    v1 = current(world.store, rel)
    (rel / "added").write_text("x\n")
    assert world.ovlrun("snapshot", "refresh", "--all").returncode == 0
    fleet.publish()
    v2 = current(world.store, rel)
    (fleet.pub / ".stage.leftover").mkdir()
    versions = sorted(p.name for p in (fleet.pub / v1.parent.name).iterdir())
    assert versions == sorted([v1.name, v2.name])
    r = fleet.run("snapshot", "gc", "--published", str(fleet.pub), "--json")
    assert r.returncode == 0, r.stderr
    actions = {Path(x["directory"]).name: x["action"] for x in json.loads(r.stdout)["published"]}
    assert actions == {v1.name: "kept: grace", ".stage.leftover": "removed"}
    r = fleet.run("snapshot", "gc", "--published", str(fleet.pub), "--grace", "0", "--dry-run")
    assert r.returncode == 0 and f"would remove: {fleet.pub}/{v1.parent.name}/{v1.name}  (replaced)" in r.stdout
    assert (fleet.pub / v1.parent.name / v1.name).is_dir()
    r = fleet.run("snapshot", "gc", "--published", str(fleet.pub), "--grace", "0")
    assert r.returncode == 0 and "removed: " in r.stdout, r.stderr
    assert sorted(p.name for p in (fleet.pub / v1.parent.name).iterdir()) == [v2.name]
    assert {p.name for p in fleet.pub.iterdir()} == {".lock", v1.parent.name, "index.json"}
    r = fleet.fetch()
    assert r.returncode == 0 and json.loads(r.stdout)[0]["snapshot"].endswith(v2.name)


# ------------------------------------------------------------------ the Prolog's step


PROLOG_STEP = """
import json, sys, time
from ovlrun.hooks.slurm import fetch_missing_images
from ovlrun.profile.parse import load_profile
from ovlrun.store.index import Store
log = []
started = time.monotonic()
notes = fetch_missing_images(load_profile("p"), Store.open(), lambda level, m: log.append([level, m]))
print(json.dumps({"notes": notes, "log": log, "took": time.monotonic() - started}))
"""


def test_prolog_fetches_missing_images_within_its_bound(fleet: Fleet) -> None:
    world = fleet.world
    world.build()
    fleet.publish()
    mnt = world.base / "mnt-pub"
    with FaultFS(world.base, fleet.pub, mnt) as fs:
        env = {**world.env, **fleet.node2}

        def step() -> dict[str, object]:
            r = fs.run([sys.executable, "-c", PROLOG_STEP], env=env)
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)  # type: ignore[no-any-return]

        # No image_dir configured: nothing happens, DIR is not contacted.
        assert step()["notes"] == [] and fs.counters()["open"] == 0
        fleet.write_config(f'image_dir = "{mnt}"\nfetch_timeout = 1\n')
        fs.faults("open stall /index.json")
        out = step()
        assert out["took"] < 10 and "no answer from the shared tree within 1s" in out["notes"][0], out  # type: ignore[index]
        assert fleet.index2() == {}
        fs.faults()
        fs.release()
        out = step()
        assert out["notes"] == [] and "fetched 1 snapshot image(s)" in json.dumps(out["log"]), out
        assert list(fleet.index2()) == [str(world.sw / "app" / "1.0")]
        opens = fs.counters()["open"]
        assert step()["log"] == [] and fs.counters()["open"] == opens  # present: DIR not contacted
    job_view(world, fleet.node2)


# ---------------------------------------------------------------- site configuration


def test_site_config_is_checked(tmp_path: Path) -> None:
    conf = tmp_path / "ovlrun.toml"
    assert load_site_config(str(conf)).image_dir is None  # no file: defaults

    def error(text: str, mode: int = 0o644, uid: int = 0) -> str:
        conf.write_text(text)
        conf.chmod(mode)
        os.chown(conf, uid, -1)
        with pytest.raises(OvlrunError) as e:
            load_site_config(str(conf))
        return e.value.message

    assert error('image_dirr = "/x"\n') == f"{conf}: image_dirr: unknown key (allowed: fetch_timeout, image_dir, image_owner, learn_tree, max_image_bytes)"
    assert error('image_dir = "x"\n') == f"{conf}: image_dir: must be an absolute path"
    assert error("fetch_timeout = 0\n").startswith(f"{conf}: fetch_timeout: must be a number of seconds")
    assert error('image_owner = "no-such-user-here"\n') == f"{conf}: image_owner: no such account 'no-such-user-here'"
    assert error("image_owner = true\n") == f"{conf}: image_owner: must be an account name or a uid"
    assert "TOML syntax error" in error("image_dir = \n")
    assert error('learn_tree = "/sw"\n').startswith(f"{conf}: learn_tree: must be tables")
    assert error('[[learn_tree]]\nroot = "/sw"\ndepth = 2\n') == (f"{conf}: learn_tree #1: depth: unknown key "
                                                                "(allowed: root, release_depth)")
    assert error("[[learn_tree]]\nrelease_depth = 2\n") == f"{conf}: learn_tree #1: root: missing"
    assert error('[[learn_tree]]\nroot = "sw"\n') == f"{conf}: learn_tree #1: root: must be an absolute path"
    assert "'..' components" in error('[[learn_tree]]\nroot = "/sw/../etc"\n')
    assert "cannot be a software tree" in error('[[learn_tree]]\nroot = "/"\n')
    for depth in ("0", "33", "true", '"2"', "1.5"):
        assert error(f'[[learn_tree]]\nroot = "/sw"\nrelease_depth = {depth}\n') == (
            f"{conf}: learn_tree #1: release_depth: must be a whole number from 1 to 32"), depth
    assert error('[[learn_tree]]\nroot = "/sw"\n[[learn_tree]]\nroot = "/sw/"\n') == (
        f"{conf}: learn_tree #2: root: /sw is named twice")
    assert "group/other-writable" in error('image_dir = "/x"\n', mode=0o664)
    assert "owned by uid 4242, not root" in error('image_dir = "/x"\n', uid=4242)
    conf.unlink()
    conf.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OvlrunError, match="cannot read site configuration"):
        load_site_config(str(conf))
    conf.unlink()
    conf.write_text('image_dir = "/sw/.ovlrun-images/"\nimage_owner = "nobody"\nfetch_timeout = 2\n')
    conf.chmod(0o644)
    config = load_site_config(str(conf))
    assert (config.image_dir, config.image_owner.uid, config.fetch_timeout) == ("/sw/.ovlrun-images", NOBODY, 2.0)
    assert config.learn_trees == ()
    conf.write_text('[[learn_tree]]\nroot = "/sw/"\nrelease_depth = 2\n[[learn_tree]]\nroot = "/opt/sw"\n')
    assert [tuple(t) for t in load_site_config(str(conf)).learn_trees] == [("/sw", 2), ("/opt/sw", None)]
    assert config_path({"OVLRUN_CONFIG": str(conf)}) == str(conf)
    with pytest.raises(OvlrunError, match="OVLRUN_CONFIG is only honoured for root callers"):
        config_path({"OVLRUN_CONFIG": str(conf), "SUDO_UID": "4242"})
    assert config_path({}) == "/etc/ovlrun/ovlrun.toml"


def test_local_gc_grace_starts_when_a_fetched_snapshot_became_current(fleet: Fleet) -> None:
    """A fetched snapshot keeps the build host's (old) build time; gc's grace for the local
    snapshot it replaced must count from the fetch, not from that build."""
    world = fleet.world
    rel = world.sw / "app" / "1.0"
    world.build()
    fleet.publish()
    old_manifest = json.loads((current(world.store, rel) / "manifest.json").read_text())
    # Node 2 built its own snapshot of the same path earlier.
    assert world.ovlrun("snapshot", "build", "--profile", "p", env=fleet.node2).returncode == 0
    own = current(fleet.store2, rel)
    # Publish a snapshot "built" an hour ago (as a long-published one would be).
    index = json.loads((fleet.pub / "index.json").read_text())
    version = fleet.pub / index["sources"][str(rel)]["snapshot"]
    old_manifest["built"] -= 3600
    (version / "manifest.json").write_text(json.dumps(old_manifest, indent=1, sort_keys=True))
    assert json.loads(fleet.fetch().stdout)[0]["status"] == "fetched"
    assert current(fleet.store2, rel) != own
    r = fleet.run("snapshot", "gc", "--json", node2=True)  # default grace: 60 s
    assert [(s["directory"], s["action"]) for s in json.loads(r.stdout)["snapshots"]] == [(str(own), "kept: grace")]


def test_slurm_prolog_fetches_missing_images_then_localises(fleet: Fleet) -> None:
    """The real Prolog (no job_container plugin, as tests/slurm/test_hooks.py runs it
    without slurmd): the node has no snapshot, the Prolog fetches it and mounts it."""
    world = fleet.world
    world.build()
    fleet.publish()
    fleet.write_config(f'image_dir = "{fleet.pub}"\nfetch_timeout = 10\n')
    job_id = str(980_000_000 + os.getpid() % 1_000_000)
    env = {**fleet.node2, "SLURM_JOB_ID": job_id, "SLURM_JOB_UID": "0", "SLURM_JOB_GID": "0",
           "SLURM_JOB_USER": "root", "SLURM_JOB_COMMENT": "ovl:p", "OVLRUN_SLURM_JC_CONF": "/nonexistent",
           "OVLRUN_JOB_RUNDIR": str(world.base / "run" / "jobs"), "OVLRUN_SLURM_LOG": str(world.base / "slurm.log")}
    try:
        r = world.ovlrun("slurm", "prolog", env=env)
        assert r.returncode == 0, r.stderr
        assert "fetched 1 snapshot image(s)" in r.stderr and "(create): 1 localised path(s)" in r.stderr, r.stderr
    finally:
        assert world.ovlrun("slurm", "epilog", env=env).returncode == 0
    assert list(fleet.index2()) == [str(world.sw / "app" / "1.0")]


def test_fetch_waits_for_a_running_build_of_the_path_only_until_its_deadline(fleet: Fleet) -> None:
    world = fleet.world
    world.build()
    fleet.publish()
    from ovlrun.store.layout import source_key

    lock = fleet.store2 / "locks" / f"{source_key(str(world.sw / 'app' / '1.0'))}.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl,sys;f=open(sys.argv[1],'w');"
                               "fcntl.flock(f,fcntl.LOCK_EX);print('locked',flush=True);sys.stdin.read()", str(lock)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        started = time.monotonic()
        r = fleet.fetch("--timeout", "1")
        assert time.monotonic() - started < 10
        assert r.returncode == 1 and "a build or fetch of" in r.stdout and "gave up waiting" in r.stdout, r.stdout
    finally:
        holder.communicate("")
    assert fleet.fetch().returncode == 0
    fleet.assert_nothing_partial()


def test_publish_worker_drops_to_the_image_owner_the_verified_way() -> None:
    """The worker that writes DIR becomes the image owner with the launch's own verified
    drop (no capabilities, no_new_privs, no groups) and still dies with its parent."""
    import signal

    from ovlrun.store.bounded import run_bounded
    from ovlrun.store.fleet.directory import become
    from ovlrun.store.siteconfig import Owner

    def work() -> tuple[dict[str, str], int]:
        import prctl

        become(Owner("nobody", NOBODY, NOBODY))
        with open("/proc/self/status") as f:
            fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        return {k: fields[k].strip() for k in ("Uid", "Gid", "Groups", "NoNewPrivs", "CapBnd", "CapEff")}, \
            prctl.get_pdeathsig()

    status, death = run_bounded(work, timeout=60, what="dropping to the image owner")
    assert status["Uid"].split() == [str(NOBODY)] * 4 and status["Gid"].split() == [str(NOBODY)] * 4
    assert (status["Groups"], status["NoNewPrivs"], int(status["CapBnd"], 16), int(status["CapEff"], 16)) == (
        "", "1", 0, 0)
    assert death == signal.SIGKILL
