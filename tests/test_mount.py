"""The mount paths: new API with long (fd-passed) layers, legacy mount(2) with escaping,
and the non-data-only fallback, each exercised in a child process's own namespace."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ovlrun.errors import OvlrunError
from ovlrun.linux.overlay import OverlaySpec, escape_layer, legacy_options
from tests.conftest import REPO, World, requires_overlay, requires_root

CHILD = r"""
import json, os, sys
from ovlrun.launch.mount import mount_localised, open_image
from ovlrun.launch.plan import MountItem
from ovlrun.linux.kernel import Features
from ovlrun.linux.namespaces import enter_private_namespace
from ovlrun.linux.overlay import OverlaySpec
spec = OverlaySpec(**json.loads(sys.argv[1]))
features = Features(overlay=True, new_mount_api=sys.argv[2] == "new", layer_append=sys.argv[2] == "new",
                    data_only_layers=sys.argv[3] == "data-only", redirect_max=256)
enter_private_namespace()
item = MountItem(spec.target, spec.data, os.path.dirname(spec.snapshot_tree), "")
mount_localised(item, open_image(item.image), features)
base = "/".join(spec.snapshot_tree.split("/")[:4])  # /var/tmp/ovlrun-test-XXXX: ours only
options = [l.split(" - ")[1] for l in open("/proc/self/mountinfo") if " - overlay " in l and base in l]
names = sorted(os.listdir(spec.target))
data = open(os.path.join(spec.target, "lib", "mod.py")).read()
try:
    os.stat(os.path.join(spec.target, "lib", "absent"))
    absent = "exists"
except FileNotFoundError:
    absent = "ENOENT"
print(json.dumps({"options": options, "names": names, "data": data, "absent": absent}))
"""


def mount_in_child(spec: OverlaySpec, api: str, layout: str) -> dict[str, object]:
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"target": spec.target, "snapshot_tree": spec.snapshot_tree, "data": spec.data}), api, layout],
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


@requires_root
@requires_overlay
@pytest.mark.parametrize(("api", "layout"), [("new", "data-only"), ("legacy", "data-only"), ("legacy", "fallback"),
                                             ("new", "fallback")])
def test_mount_methods(world: World, odd_release: Path, api: str, layout: str) -> None:
    spec = OverlaySpec(target=str(odd_release), snapshot_tree=snapshot_of(world, odd_release), data=str(odd_release))
    (odd_release / "lib" / "later.py").write_text("")  # hidden by the opaque snapshot in every layout
    out = mount_in_child(spec, api, layout)
    assert out["data"] == "odd = True\n" and out["names"] == ["lib"] and out["absent"] == "ENOENT"
    (options,) = out["options"]  # type: ignore[misc]
    if layout == "data-only":
        assert "datadir+=" in options or "::" in options
    else:
        assert "datadir+=" not in options and "::" not in options


@requires_root
@requires_overlay
def test_layer_paths_longer_than_fsconfig_string_limit(world: World) -> None:
    # fsconfig string values are capped at 256 bytes: the store path here is ~330 bytes, so
    # the snapshot layer must be passed as an O_PATH fd.
    long_store = world.base / ("s" * 200) / ("t" * 100)
    long_store.parent.mkdir()
    long_store.parent.chmod(0o755)
    world.simple_profile()
    env = {"OVLRUN_STORE": str(long_store)}
    assert world.ovlrun("snapshot", "build", "--profile", "p", env=env).returncode == 0
    result = world.job(f"cat {world.sw}/app/1.0/lib/python/mod.py; grep ' overlay ' /proc/self/mountinfo | grep -c '{world.base}'", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["VERSION = '1.0'", "1"]


def test_escape_layer() -> None:
    assert escape_layer("/a:b,c\\d") == "/a\\:b\\,c\\\\d"


def test_legacy_options_refuse_more_than_a_page() -> None:
    spec = OverlaySpec(target="/sw/x", snapshot_tree="/store/" + "a/" * 2100, data="/sw/x")
    with pytest.raises(OvlrunError, match="exceed one page"):
        legacy_options(spec, data_only=True)
    short = OverlaySpec(target="/sw/x", snapshot_tree="/st:ore", data="/sw/x")
    assert legacy_options(short, data_only=True) == "lowerdir=/st\\:ore::/sw/x,metacopy=on,redirect_dir=follow"
