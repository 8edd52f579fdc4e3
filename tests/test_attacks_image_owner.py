# ruff: noqa: F811  (pytest fixtures imported from tests.attacks_support are redefined as arguments)
"""Issue 18, items 0, 3 and 4: what the image owner (the account that owns DIR, and,
as README recommends, the shared tree) can make every node do, and what a stalled DIR
costs a node's Prologs.

The image owner is the test user here: it owns the tree ``sw`` and DIR, publishes
versions of its own making (manifests and images are just files it writes) and then
launches jobs through real sudo with the shipped drop-in.  Root fetches on the node.
"""

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

from ovlrun.store.layout import source_key
from tests.attacks_support import (
    shipped_sudoers,  # noqa: F401 (fixture)
    slurm_env,
    su,
)
from tests.conftest import TEST_UID, World, requires_overlay, requires_root
from tests.faultfs import FaultFS

pytestmark = [requires_root, requires_overlay]


class Node:
    """The node (the world's store, what the sudo entry launches from), a build host's
    store, and DIR owned by the image owner (the test user), per the site configuration."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.pub = world.base / "pub"
        self.pub.mkdir(mode=0o755)
        os.chown(self.pub, TEST_UID, TEST_UID)
        self.buildhost = world.base / "buildhost"
        self.config = world.base / "ovlrun.toml"
        self.config.write_text(f'image_dir = "{self.pub}"\nimage_owner = {TEST_UID}\nfetch_timeout = 10\n')
        world.env["OVLRUN_CONFIG"] = str(self.config)

    def ovlrun(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.world.ovlrun(*args, **kw)

    def fetch(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.ovlrun("snapshot", "fetch", "--from", str(self.pub), *args, "--json")

    def index(self) -> dict[str, str]:
        path = self.world.store / "index.json"
        return json.loads(path.read_text())["sources"] if path.exists() else {}  # type: ignore[no-any-return]

    def image_of(self, directory: Path, root: Path | None = None) -> dict[str, object]:
        """Build ``directory``'s snapshot on the build host (root; the image owner can
        write the same bytes with ovlrun's image writer), as a profile with tree root
        ``root`` (default: its parent) would: its manifest, with the image's path added."""
        root = root or directory.parent
        name = f"b{hashlib.sha256(str(directory).encode()).hexdigest()[:8]}"
        self.world.write_profile(name, f'[[tree]]\nroot = "{root}"\nlocalise = ["{directory.relative_to(root)}"]\n')
        r = self.ovlrun("snapshot", "build", "--profile", name, env={"OVLRUN_STORE": str(self.buildhost)})
        assert r.returncode == 0, r.stderr
        (self.world.profiles / f"{name}.toml").unlink()
        index = json.loads((self.buildhost / "index.json").read_text())["sources"]
        snap = self.buildhost / index[str(directory)]
        return {**json.loads((snap / "manifest.json").read_text()), "_image": str(snap / "image.erofs")}

    def publish(self, manifest: dict[str, object], image: bytes | Path | None = None, *,
                snapshot: str | None = None) -> str:
        """Write a version into DIR as the image owner would, and make it current in DIR's
        index: its manifest (fields as given), its image (the build's, or ``image``)."""
        data = dict(manifest)
        source = Path(str(data.pop("_image")))
        key, snap_id = (snapshot or f"{source_key(str(data['source']))}/{data['id']}").split("/")
        version = self.pub / key / snap_id
        version.mkdir(parents=True)
        if isinstance(image, Path):
            image_file = image
        else:
            image_file = version / "image.erofs"
            image_file.write_bytes(source.read_bytes() if image is None else image)
        if image_file != version / "image.erofs":
            os.link(image_file, version / "image.erofs")
        if image is not None and not isinstance(image, Path):
            data["image_sha256"] = hashlib.sha256(image).hexdigest()
            data["image_bytes"] = len(image)
        (version / "manifest.json").write_text(json.dumps(data, indent=1, sort_keys=True))
        index_file = self.pub / "index.json"
        index = json.loads(index_file.read_text()) if index_file.exists() else {"format": 1, "sources": {}}
        index["sources"][str(data["path"])] = {"snapshot": f"{key}/{snap_id}", "image_sha256": data["image_sha256"],
                                               "image_bytes": data["image_bytes"], "published": time.time()}
        index_file.write_text(json.dumps(index))
        self.own_dir()
        return f"{key}/{snap_id}"

    def own_dir(self) -> None:
        for p in [self.pub, *self.pub.rglob("*")]:
            os.lchown(p, TEST_UID, TEST_UID)
            if not p.is_symlink():
                p.chmod(0o755 if p.is_dir() else 0o644)


@pytest.fixture
def node(world: World) -> Node:
    return Node(world)


# ------------------------------------------------------------------------------ item 0


def _etc_version(node: Node) -> tuple[Path, str]:
    """The image owner's version of its own release sw/app/etc: an image listing
    ``shadow`` (mode 0644, the size of /etc/shadow), whose manifest names the parent
    sw/app as the source's tree root (source_root) and the inode of /etc (source_ino).
    Everything else is what a local build of sw/app/etc would record.  Returns the
    release and the published KEY/ID."""
    world = node.world
    lookalike = world.base / "lookalike" / "etc"
    lookalike.mkdir(parents=True)
    (lookalike / "shadow").write_bytes(b"x" * os.stat("/etc/shadow").st_size)
    (lookalike / "shadow").chmod(0o644)
    release = world.sw / "app" / "etc"
    release.mkdir()
    for p in [world.sw, *world.sw.rglob("*")]:  # the image owner owns the shared tree
        os.lchown(p, TEST_UID, TEST_UID)
    manifest = node.image_of(lookalike)
    manifest.update(path=str(release), source=str(release), root=str(world.sw), source_root=str(world.sw / "app"),
                    source_ino=os.stat("/etc").st_ino)
    return release, node.publish(manifest)


def _swap_parent_for_root(world: World, test_user: str) -> None:
    """What the tree's owner can do to its own tree: sw/app becomes a symlink to /."""
    app = world.sw / "app"
    r = su(test_user, f"mv {app} {world.sw}/.app.orig && ln -s / {app}")
    assert r.returncode == 0, r.stderr


def _reads_shadow(r: subprocess.CompletedProcess[str]) -> str:
    """Whether a job printed /etc/shadow (never shows its content)."""
    with open("/etc/shadow") as f:
        real = f.read()
    return "READ /etc/shadow" if real and real in r.stdout else ""


def _plant(node: Node, snapshot: str) -> None:
    """The published version ``snapshot`` (KEY/ID) in the node's store and index, as a
    fetch before issue 18's checks left it (today's fetch refuses it: see below): the
    launch side must stop the attack on its own."""
    store = node.world.store
    key, snap_id = snapshot.split("/")
    target = store / "snapshots" / key / snap_id
    target.parent.mkdir(parents=True, mode=0o755)
    shutil.copytree(node.pub / key / snap_id, target)
    for p in [store, store / "snapshots", target.parent, target, *target.iterdir()]:
        os.chown(p, 0, 0)
        p.chmod(0o700 if p == target else 0o755 if p.is_dir() else 0o600)
    manifest = json.loads((target / "manifest.json").read_text())
    (store / "index.json").write_text(json.dumps({"format": 2, "sources": {manifest["path"]: f"snapshots/{snapshot}"}}))


@pytest.mark.parametrize("via", ["sudo-launch", "prolog-enter"])
def test_image_owner_cannot_read_etc_shadow_through_a_crafted_source_identity(
        node: Node, test_user: str, shipped_sudoers: Path, via: str) -> None:
    """Item 0, the whole chain: a version whose manifest carries a source_root and
    source_ino of the image owner's choosing is in the node's store (fetched by an
    earlier ovlrun); the owner then swaps a parent directory of the release for a
    symlink to /; any user's `cat /etc/shadow` in a job (a launch through sudo, or a
    Prolog's namespace joined with `enter`)."""
    world = node.world
    world.simple_profile(patterns=("app/*",))
    _, snapshot = _etc_version(node)
    _plant(node, snapshot)
    entry = world.admin_entry()
    job_id = str(975_000_000 + os.getpid() % 1_000_000)
    env = {**slurm_env(world, job_id), "OVLRUN_CONFIG": str(node.config)}
    _swap_parent_for_root(world, test_user)
    if via == "sudo-launch":
        r = su(test_user, f"sudo -n {entry} -p p -- cat /etc/shadow")
        mounts = su(test_user, f"sudo -n {entry} -p p -- cut -d' ' -f5 /proc/self/mountinfo")
    else:
        prolog = world.ovlrun("slurm", "prolog", env=env)
        try:
            assert prolog.returncode == 0, prolog.stderr
            r = su(test_user, f"sudo -n {entry} enter {job_id} -- cat /etc/shadow")
            mounts = su(test_user, f"sudo -n {entry} enter {job_id} -- cut -d' ' -f5 /proc/self/mountinfo")
        finally:
            world.ovlrun("slurm", "epilog", env=env)
        r.stderr += prolog.stderr
    leaked = _reads_shadow(r)
    r.stdout = f"<{len(r.stdout)} bytes, not shown>"
    assert not leaked, f"the job read /etc/shadow (exit {r.returncode}); stderr: {r.stderr}"
    assert "/etc" not in mounts.stdout.split(), "an overlay was mounted on /etc"
    assert "is not the directory its snapshot was built from" in r.stderr, r.stderr


@pytest.mark.parametrize("via", ["fetch", "prolog"])
def test_fetch_refuses_a_source_identity_other_than_the_nodes_own(node: Node, via: str) -> None:
    """Item 0, the fleet side: a fetched manifest's tree root and source must be the
    node's own resolution of the profile's tree root and path (realpath, no symlink), by
    `snapshot fetch` and by a Prolog's own fetch for its job."""
    world = node.world
    world.simple_profile(patterns=("app/*",))
    release, _ = _etc_version(node)
    if via == "fetch":
        r = node.fetch("--profile", "p")
        assert r.returncode == 1, r
    else:
        env = {**slurm_env(world, str(977_000_000 + os.getpid() % 1_000_000)), "OVLRUN_CONFIG": str(node.config)}
        r = world.ovlrun("slurm", "prolog", env=env)
        world.ovlrun("slurm", "epilog", env=env)
        assert r.returncode == 0, r
    assert "refusing" in r.stdout + r.stderr and "source_root" in r.stdout + r.stderr, r
    assert str(release) not in node.index()


# ------------------------------------------------------------------------------ item 3


def test_fetch_all_takes_tree_roots_only_from_the_nodes_profiles(node: Node) -> None:
    """A manifest's own `root` must not decide what enters the node's index: /etc/ssl."""
    world = node.world
    world.simple_profile()
    manifest = node.image_of(world.sw / "app" / "1.0", world.sw)
    manifest.update(path="/etc/ssl", source="/etc/ssl", root="/etc", source_root="/etc",
                    source_ino=os.stat("/etc/ssl").st_ino)
    node.publish(manifest)
    r = node.fetch("--all")
    assert "/etc/ssl" not in node.index(), r.stdout
    assert r.returncode == 1 and "refusing" in r.stdout + r.stderr, r


def test_fetch_checks_size_and_free_space_before_copying(node: Node) -> None:
    """A 4 GiB sparse image (index and manifest agree on its size) must be refused before
    a byte of it is copied when the store cannot hold it (here a 64 MiB tmpfs)."""
    world = node.world
    world.simple_profile()
    manifest = node.image_of(world.sw / "app" / "1.0", world.sw)
    sparse = world.base / "sparse.erofs"
    with open(sparse, "wb") as f:
        f.truncate(4 << 30)
    manifest.update(image_bytes=4 << 30, image_sha256="0" * 64)
    node.publish(manifest, image=sparse)
    mnt = world.base / "mnt-pub"
    small = world.base / "small-store"
    small.mkdir(mode=0o755)
    with FaultFS(world.base, node.pub, mnt) as fs:
        before = fs.counters()["read"]
        r = fs.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                    f'mount -t tmpfs -o size=64m,mode=0755 ovlrun-test-small {small} && exec "$@"', "sh",
                    sys.executable, "-m", "ovlrun", "snapshot", "fetch", "--from", str(mnt), "--all", "--json"],
                   env={**world.env, "OVLRUN_STORE": str(small)}, timeout=300)
        reads = fs.counters()["read"] - before
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 1 and reads < 8, (reads, r.stdout, r.stderr)
    assert "free" in r.stdout, r.stdout


def test_fetch_refuses_an_image_that_is_not_erofs(node: Node) -> None:
    """Consistent sha256 and size, but not an image: refused before it enters the index
    (otherwise every launch of the profile fails, or mounts whatever it is)."""
    world = node.world
    world.simple_profile()
    manifest = node.image_of(world.sw / "app" / "1.0", world.sw)
    node.publish(manifest, image=os.urandom(64 << 10))
    r = node.fetch("--profile", "p")
    assert r.returncode == 1 and "refusing" in r.stdout + r.stderr, r
    assert node.index() == {}


def test_deeply_nested_published_index_is_a_one_line_error(node: Node) -> None:
    depth = 100_000
    (node.pub / "index.json").write_text('{"format": 1, "sources": ' + "[" * depth + "]" * depth + "}")
    node.own_dir()
    node.world.simple_profile()
    r = node.fetch("--all")
    assert "Traceback" not in r.stderr, r.stderr[-500:]
    assert r.returncode in (1, 125) and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_fetch_never_rolls_a_node_back_to_an_older_version(node: Node) -> None:
    """A node fetched v1, then v2.  The image owner points DIR's index back at v1 (still
    in the node's store, within gc's grace): the node must keep v2."""
    world = node.world
    rel = world.sw / "app" / "1.0"
    world.simple_profile()
    v1 = node.image_of(rel, world.sw)
    v1_rel = node.publish(v1)
    assert node.fetch("--profile", "p").returncode == 0
    (rel / "added").write_text("v2\n")
    shutil.rmtree(node.buildhost)
    v2 = node.image_of(rel, world.sw)
    node.publish(v2)
    assert node.fetch("--profile", "p").returncode == 0
    current = node.index()[str(rel)]
    index = json.loads((node.pub / "index.json").read_text())
    index["sources"][str(rel)].update(snapshot=v1_rel, image_sha256=v1["image_sha256"], image_bytes=v1["image_bytes"])
    (node.pub / "index.json").write_text(json.dumps(index))
    node.own_dir()
    r = node.fetch("--profile", "p")
    assert node.index()[str(rel)] == current, r.stdout


def test_published_dir_is_opened_without_following_symlinks_in_its_parents(node: Node) -> None:
    world = node.world
    world.simple_profile()
    node.publish(node.image_of(world.sw / "app" / "1.0", world.sw))
    (world.base / "via").symlink_to(world.base)
    r = node.ovlrun("snapshot", "fetch", "--from", str(world.base / "via" / "pub"), "--all")
    assert r.returncode in (1, 125) and "symlink" in r.stderr, r
    assert node.index() == {}


# ------------------------------------------------------------------------------ item 4


def _stuck_workers(fs: FaultFS) -> list[int]:
    """Processes left in the stand-in's mount namespace other than its daemon: fetch
    workers of Prologs that have long returned."""
    assert fs.proc is not None
    ns = os.readlink(f"/proc/{fs.proc.pid}/ns/mnt")
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == fs.proc.pid:
            continue
        try:
            if os.readlink(f"/proc/{pid}/ns/mnt") == ns:
                out.append(int(pid))
        except OSError:
            continue
    return out


def test_stalled_dir_costs_a_node_at_most_one_fetch_worker(node: Node) -> None:
    """DIR stalls while 8 jobs start on a node lacking their images: each Prolog returns
    within its bound (0), and at most one fetch is stuck on DIR, not one per Prolog."""
    world = node.world
    world.simple_profile()
    node.publish(node.image_of(world.sw / "app" / "1.0", world.sw))
    mnt = world.base / "mnt-pub"
    node.config.write_text(f'image_dir = "{mnt}"\nimage_owner = {TEST_UID}\nfetch_timeout = 1\n')
    with FaultFS(world.base, node.pub, mnt) as fs:
        fs.faults("open stall /index.json")
        took = []
        for n in range(8):
            env = {**slurm_env(world, str(976_000_000 + n)), "OVLRUN_CONFIG": str(node.config),
                   "OVLRUN_SLURM_JC_CONF": "/nonexistent", "OVLRUN_JOB_RUNDIR": str(world.base / "run" / "jobs")}
            started = time.monotonic()
            r = fs.run([sys.executable, "-m", "ovlrun", "slurm", "prolog"], env=env)
            took.append(time.monotonic() - started)
            assert r.returncode == 0, r.stderr
            fs.run([sys.executable, "-m", "ovlrun", "slurm", "epilog"], env=env)
        stuck = _stuck_workers(fs)
        fs.release()
    assert max(took) < 10, took
    assert len(stuck) <= 1, stuck
