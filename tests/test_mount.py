"""The mount methods (O_PATH fd layers, string layers, mount(2) with ``::``, the
non-data-only fallback), each exercised in a child process's own namespace on every
method the running kernel supports, with odd and with long layer paths.  The same file
runs in the VM tests (tests/vm) on Debian's 6.1 and 6.12 kernels."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ovlrun.errors import OvlrunError
from ovlrun.linux.kernel import METHODS, MOUNT_FALLBACK, probe
from ovlrun.linux.overlay import OverlaySpec, escape_layer, legacy_options
from tests.conftest import REPO, World, requires_overlay, requires_root

CHILD = r"""
import json, os, sys
from ovlrun.launch.mount import mount_all, open_image
from ovlrun.launch.plan import MountItem
from ovlrun.linux.kernel import forced
from ovlrun.linux.namespaces import enter_private_namespace
from ovlrun.linux.overlay import OverlaySpec
spec = OverlaySpec(**json.loads(sys.argv[1]))
features = forced(sys.argv[2])
enter_private_namespace()
item = MountItem(spec.target, spec.data, os.path.dirname(spec.snapshot_tree), "")
(failure,) = mount_all([item], [open_image(item.image)], features)
if failure is not None:
    raise failure
options = [l.split(" - ")[1] for l in open("/proc/self/mountinfo") if " - overlay " in l
           and l.split(" ")[4].startswith("/var/tmp/ovlrun-test-")]  # ours only
names = sorted(os.listdir(spec.target))
data = open(os.path.join(spec.target, "lib", "mod.py")).read()
try:
    os.stat(os.path.join(spec.target, "lib", "absent"))
    absent = "exists"
except FileNotFoundError:
    absent = "ENOENT"
from ovlrun.jobs.inuse import snapshot_ids_in_use
print(json.dumps({"options": options, "names": names, "data": data, "absent": absent,
                  "in_use": sorted(snapshot_ids_in_use())}))
"""


def mount_in_child(spec: OverlaySpec, method: str) -> dict[str, object]:
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"target": spec.target, "snapshot_tree": spec.snapshot_tree, "data": spec.data}), method],
                            capture_output=True, text=True, env={"PYTHONPATH": str(REPO)}, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def snapshot_of(world: World, rel: Path) -> str:
    index = json.loads((world.store / "index.json").read_text())["sources"]
    return str(world.store / index[str(rel)] / "tree")


@pytest.fixture
def odd_release(world: World) -> Path:
    """A release whose path has every character the legacy option string must escape."""
    odd = world.sw / "we:ird,rel\\ease"
    (odd / "lib").mkdir(parents=True)
    (odd / "lib" / "mod.py").write_text("odd = True\n")
    world.write_profile("odd", f'[[tree]]\nroot = "{world.sw}"\nlocalise = ["we:ird,rel\\\\ease"]\n')
    world.build("odd")
    return odd


def supported(method: str) -> None:
    """Skip a method better than the best one the running kernel has (probed by behaviour)."""
    best = probe().method
    if METHODS.index(method) < METHODS.index(best):
        pytest.skip(f"kernel {os.uname().release} lacks {method} (best: {best})")


def snapshot_key_id(tree: str) -> list[str]:
    return tree.split("/")[-3:-1]


@requires_root
@requires_overlay
@pytest.mark.parametrize("method", METHODS)
def test_mount_methods(world: World, odd_release: Path, method: str) -> None:
    supported(method)
    spec = OverlaySpec(target=str(odd_release), snapshot_tree=snapshot_of(world, odd_release), data=str(odd_release))
    (odd_release / "lib" / "later.py").write_text("")  # hidden by the opaque snapshot in every layout
    out = mount_in_child(spec, method)
    assert out["data"] == "odd = True\n" and out["names"] == ["lib"] and out["absent"] == "ENOENT"
    (options,) = out["options"]  # type: ignore[misc]
    if method != MOUNT_FALLBACK:
        assert "datadir+=" in options or "::" in options
    else:
        assert "datadir+=" not in options and "::" not in options
    assert snapshot_key_id(spec.snapshot_tree) in out["in_use"]  # type: ignore[operator]


def long_dir(base: Path, total: int) -> Path:
    """A directory below ``base`` whose path is at least ``total`` bytes (0755 all the way)."""
    d = base
    while len(str(d)) < total:
        d = d / ("d" * 200)
        d.mkdir()
        d.chmod(0o755)
    return d


@requires_root
@requires_overlay
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("length", [300, 2200])
def test_long_layer_paths(world: World, method: str, length: int) -> None:
    """Store and release paths over fsconfig's 255-byte string cap (300), and both together
    over mount(2)'s one page (2 x 2200): every method mounts them, data reads, and gc still
    sees the snapshot as in use (mountinfo names snapshots/KEY/ID/tree)."""
    supported(method)
    (world.base / "st").mkdir(mode=0o755)
    store = long_dir(world.base / "st", length) / "store"
    release = long_dir(world.sw, length) / "rel"
    (release / "lib").mkdir(parents=True)
    (release / "lib" / "mod.py").write_text("long = True\n")
    rel = release.relative_to(world.sw)
    world.write_profile("long", f'[[tree]]\nroot = "{world.sw}"\nlocalise = ["{rel}"]\n')
    built = world.ovlrun("snapshot", "build", "--profile", "long", env={"OVLRUN_STORE": str(store)})
    assert built.returncode == 0, built.stderr
    index = json.loads((store / "index.json").read_text())["sources"]
    tree = str(store / index[str(release)] / "tree")
    out = mount_in_child(OverlaySpec(target=str(release), snapshot_tree=tree, data=str(release)), method)
    assert out["data"] == "long = True\n" and out["names"] == ["lib"] and out["absent"] == "ENOENT"
    assert snapshot_key_id(tree) in out["in_use"]  # type: ignore[operator]


@requires_root
@requires_overlay
def test_launch_with_store_path_over_the_string_limit(world: World) -> None:
    """A whole launch of two localised paths (mounted from two threads, so the shortened
    layers' chdir is contended) from a ~650-byte store: data reads, and ``ovlrun status``
    inside the job names both snapshots, whichever way the kernel was given the layers."""
    (world.base / "st").mkdir(mode=0o755)
    store = long_dir(world.base / "st", 600) / "store"
    world.simple_profile(patterns=("app/1.0", "app/1.1"))
    env = {"OVLRUN_STORE": str(store)}
    assert world.ovlrun("snapshot", "build", "--profile", "p", env=env).returncode == 0
    apps = world.sw / "app"
    result = world.job(f"cat {apps}/1.0/lib/python/mod.py {apps}/1.1/lib/python/mod.py; "
                       f"{sys.executable} -m ovlrun status --json", env=env)
    assert result.returncode == 0, result.stderr
    one, other, status = result.stdout.split("\n", 2)
    assert [one, other] == ["VERSION = '1.0'", "VERSION = '1.1'"]
    items = sorted(json.loads(status)["localised"], key=lambda m: m["path"])
    assert [m["path"] for m in items] == [str(apps / "1.0"), str(apps / "1.1")]
    assert all(m["snapshot"].startswith(f"{store}/snapshots/") for m in items)


def test_escape_layer() -> None:
    assert escape_layer("/a:b,c\\d") == "/a\\:b\\,c\\\\d"


def test_legacy_options_refuse_more_than_a_page() -> None:
    spec = OverlaySpec(target="/sw/x", snapshot_tree="/store/" + "a/" * 2100, data="/sw/x")
    with pytest.raises(OvlrunError, match="exceed one page"):
        legacy_options(spec, data_only=True)
    short = OverlaySpec(target="/sw/x", snapshot_tree="/st:ore", data="/sw/x")
    assert legacy_options(short, data_only=True) == "lowerdir=/st\\:ore::/sw/x,metacopy=on,redirect_dir=follow"


# --- files stored whole (inline) --------------------------------------------------------

READ_CHILD = r"""
import hashlib, json, os, sys
from ovlrun.launch.mount import mount_all, open_image
from ovlrun.launch.plan import MountItem
from ovlrun.linux.kernel import forced
from ovlrun.linux.namespaces import enter_private_namespace
from ovlrun.linux.overlay import OverlaySpec
spec = OverlaySpec(**json.loads(sys.argv[1]))
enter_private_namespace()
item = MountItem(spec.target, spec.data, os.path.dirname(spec.snapshot_tree), "")
(failure,) = mount_all([item], [open_image(item.image)], forced(sys.argv[2]))
if failure is not None:
    raise failure
out = {}
for rel in json.loads(sys.argv[3]):
    path = os.path.join(spec.target, rel)
    with open(path, "rb") as f:
        data = f.read()
    st = os.stat(path)
    out[rel] = [hashlib.sha256(data).hexdigest(), len(data), st.st_size, st.st_mtime_ns, st.st_mode]
print(json.dumps(out))
"""

# Sizes around every boundary of the stored layouts: tail inline beside a compact or an
# extended inode, whole blocks only (FLAT_PLAIN), tails too big to sit beside the inode.
INLINE_SIZES = (1, 100, 4031, 4032, 4063, 4064, 4095, 4096, 4097, 8192, 12000, 70_000, 262_144)


def inline_release(world: World) -> tuple[Path, dict[str, bytes]]:
    """app/2.0 with .pyc and .so files to inline, and files that must stay metacopy."""
    rel = world.sw / "app" / "2.0"
    files: dict[str, bytes] = {}
    for i, size in enumerate(INLINE_SIZES):
        files[f"lib/python/pkg/__pycache__/m{i}.cpython-311.pyc"] = os.urandom(size)
    files["lib/libbar.so.1.2"] = os.urandom(9000)
    files["lib/python/pkg/_ext.cpython-311-x86_64-linux-gnu.so"] = os.urandom(5000)
    files["lib/python/pkg/big.pyc"] = os.urandom(262_145)  # over inline_max: metacopy
    files["lib/python/pkg/mod.py"] = b"x = 1\n"  # not matched: metacopy
    files["lib/python/pkg/__init__.py"] = b""  # empty: always stored
    files["top.pyc"] = b"top level\n"  # '**' matches no directory too
    for name, data in files.items():
        (rel / name).parent.mkdir(parents=True, exist_ok=True)
        (rel / name).write_bytes(data)
    os.chown(rel / "lib" / "libbar.so.1.2", 70000, 70001)  # 32-bit ids: an extended inode
    world.write_profile("inl", f'[[tree]]\nroot = "{world.sw}"\nlocalise = ["app/2.0"]\n'
                               'inline = ["**/*.pyc", "**/*.so*"]\ninline_max = "256KiB"\n')
    built = world.build("inl")
    assert f"{len(files) - len(STAYS_METACOPY) - 1} files stored whole" in built.stderr, built.stderr
    return rel, files


STAYS_METACOPY = ("lib/python/pkg/big.pyc", "lib/python/pkg/mod.py")


@requires_root
@requires_overlay
@pytest.mark.parametrize("method", METHODS)
def test_inlined_files_read_the_same_with_every_method(world: World, method: str) -> None:
    """Files stored whole in the image read byte for byte as their sources through every
    mount method (the VM tests run this on 6.1 and 6.12 too), with the source's stat."""
    supported(method)
    rel, files = inline_release(world)
    spec = OverlaySpec(target=str(rel), snapshot_tree=snapshot_of(world, rel), data=str(rel))
    result = subprocess.run([sys.executable, "-c", READ_CHILD, json.dumps({"target": spec.target,
                             "snapshot_tree": spec.snapshot_tree, "data": spec.data}), method, json.dumps(list(files))],
                            capture_output=True, text=True, env={"PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    for name, data in files.items():
        st = os.stat(rel / name)
        assert seen[name] == [hashlib.sha256(data).hexdigest(), len(data), st.st_size, st.st_mtime_ns,
                              st.st_mode], name
