#!/usr/bin/env python3
"""Remote requests of a stat of every entry of one localised release, per mount method.

What the Supported kernels table in README.md reports: with a data-only layer (fd,
string and mount(2) ``::`` methods) stats of localised files stay local; in the
fallback (``lowerdir=SNAPSHOT:SHARED``, the only method Linux 6.1 has) the shared tree
is a regular lower layer and a stat of a metacopy file walks its redirect there.  Each
method is measured here, on this host's kernel, by forcing it (``kernel.forced``), over
the counting FUSE stand-in of the tests (``tests/faultfs``: a LOOKUP and a GETATTR both
count as "getattr"), each with a fresh FUSE mount (cold client caches).

    sudo .venv/bin/python bench/stat_modes.py [RELEASE_DIR]    # default: this Python's stdlib
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ovlrun.linux.kernel import METHODS, probe  # noqa: E402
from tests.faultfs import FaultFS  # noqa: E402

CHILD = r"""
import json, os, sys
from ovlrun.launch.mount import mount_all, open_image
from ovlrun.launch.plan import MountItem
from ovlrun.linux.kernel import forced
from ovlrun.linux.namespaces import enter_private_namespace
method, source, snapshot_dir, root, ino = sys.argv[1:6]
enter_private_namespace()
if method != "direct":
    item = MountItem(source, source, snapshot_dir, root, root, int(ino))
    (failure,) = mount_all([item], [open_image(item.image)], forced(method))
    if failure is not None:
        raise failure
n = 0
for top, dirs, files in os.walk(source):
    for name in dirs + files:
        os.lstat(os.path.join(top, name))
        n += 1
print(n)
"""


def main() -> int:
    release = Path(sys.argv[1] if len(sys.argv) > 1 else sysconfig.get_paths()["stdlib"])
    base = Path(tempfile.mkdtemp(prefix="ovlrun-statmodes-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        backing = base / "backing"
        shutil.copytree(release, backing / "rel", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        mnt, store, profiles = base / "sw", base / "store", base / "profiles"
        profiles.mkdir()
        (profiles / "p.toml").write_text(f'[[tree]]\nroot = "{mnt}"\nlocalise = ["rel"]\n')
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "OVLRUN_STORE": str(store),
               "OVLRUN_PROFILE_PATH": str(profiles)}
        with FaultFS(base, backing, mnt) as fs:
            r = fs.ovlrun("snapshot", "build", "--profile", "p", env=env, timeout=600)
            assert r.returncode == 0, r.stderr
        index = json.loads((store / "index.json").read_text())["sources"]
        snapshot_dir = store / index[str(mnt / "rel")]
        manifest = json.loads((snapshot_dir / "manifest.json").read_text())
        best = probe().method
        rows = []
        for method in ("direct", *METHODS[METHODS.index(best):]):
            with FaultFS(base, backing, mnt) as fs:
                cells = []
                for _ in ("cold", "warm"):
                    before = fs.counters()
                    r = fs.run([sys.executable, "-c", CHILD, method, str(mnt / "rel"), str(snapshot_dir),
                                manifest.get("source_root", str(mnt)), str(manifest.get("source_ino", 0))],
                               env=env, timeout=600)
                    assert r.returncode == 0, r.stderr
                    after = fs.counters()
                    cells.append((int(r.stdout), sum(after.values()) - sum(before.values())))
            rows.append((method, cells))
        print(f"kernel {os.uname().release}, release {release} ({rows[0][1][0][0]} entries), "
              "remote requests for a stat of every entry (each method on a fresh FUSE mount):\n")
        print("| method | cold | warm (same mount, 2nd walk) |")
        print("|---|---|---|")
        for method, ((_, cold), (_, warm)) in rows:
            print(f"| {method} | {cold:,} | {warm:,} |")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
