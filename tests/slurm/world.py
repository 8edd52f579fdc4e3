"""The Slurm tests' world: a shared tree, profiles and a snapshot store, made once per
session and used by every Slurm instance (the host's own, Debian 13's 24.11 in a root).

Each session makes its own world, a new directory below WORLDS (OVLRUN_SLURM_TEST_DIR,
default /var/tmp/ovlrun-slurm-worlds), so two suites never share one.  WORLDS itself
stays: ci/slurm2411-setup.sh binds it into the trixie root at the same path.  Never
under /tmp: Slurm jobs get a private /tmp (pytest's tmp_path is under /tmp).

The snapshots are built through the CLI (``python -m ovlrun snapshot build``), as an
admin would; this package reads mount tables with ovlrun.linux.mountinfo and imports
nothing else of ovlrun.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ovlrun.linux import mountinfo

from ..conftest import REPO, TEST_UID

WORLDS = Path(os.environ.get("OVLRUN_SLURM_TEST_DIR", "/var/tmp/ovlrun-slurm-worlds"))
PROFILES = {"slurmtest-a": "app/1.0", "slurmtest-b": "app/2.0"}
ADDED = "added-after-snapshot"
NEW_RELEASE = "app/3.0"  # created after the snapshots: never localised, must be visible

# Run by jobs (batch script and srun step), in namespaces the hooks tests pin, and by
# `ovlrun enter`: key=value lines about what the process sees of the shared tree.
PROBE = r"""#!/bin/bash
who="$1"
echo "$who.uid=$(id -u)"
echo "$who.ns=$(readlink /proc/self/ns/mnt)"
for v in 1.0 2.0; do
    d="$OVLRUN_TEST_SW/app/$v"
    if [ -e "$d/ADDED" ]; then echo "$who.$v.added=visible"; else echo "$who.$v.added=hidden"; fi
    echo "$who.$v.added_err=$(cat "$d/ADDED" 2>&1 >/dev/null | sed 's/.*: //')"
    echo "$who.$v.read=$(cat "$d/share/data.txt")"
    echo "$who.$v.find=$(find "$d" -name 'added-*' | wc -l)"
    echo "$who.$v.lib=$(ls "$d/lib" | tr '\n' ' ')"
    # share/ is world-writable in the shared tree: only a read-only view refuses.
    w="$d/share/written-by-$who-$$"
    if err="$(touch "$w" 2>&1)"; then echo "$who.$v.write=ok"; rm -f "$w"; else echo "$who.$v.write=${err##*: }"; fi
done
echo "$who.new_release=$(cat "$OVLRUN_TEST_SW/NEW/share/data.txt" 2>&1)"
echo "$who.overlays=$(grep -c ' - overlay ' /proc/self/mountinfo)"
echo "$who.tmp_owner=$(stat -c %U /tmp)"
echo "$who.profile_env=${OVLRUN_PROFILE:-unset}"
echo "$who.status=$("$OVLRUN_TEST_PYTHON" -m ovlrun status 2>&1 | head -1)"
""".replace("ADDED", ADDED).replace("NEW", NEW_RELEASE)

JOB = r"""#!/bin/bash
# $1 = output file, $2 = rendezvous directory (optional), $3 = this job's tag
out="$1"
if [ -n "${2:-}" ]; then
    # Two concurrent jobs: each announces itself, then waits (bounded) for the other,
    # so both are provably running at the same time.
    touch "$2/$3"
    for _ in $(seq 600); do [ "$(ls "$2" | wc -l)" -ge 2 ] && break; sleep 0.1; done
    echo "batch.peers=$(ls "$2" | wc -l)" >>"$out"
fi
bash "$OVLRUN_TEST_DIR/probe.sh" batch >>"$out"
srun -n1 bash "$OVLRUN_TEST_DIR/probe.sh" step >>"$out"
echo "done=1" >>"$out"
"""

# A job that stays up until the test lets it go (for `ovlrun enter` into a live job).
HOLD = r"""#!/bin/bash
# $1 = directory: announce "ready", wait (bounded) for "release"
touch "$1/ready"
for _ in $(seq 600); do [ -e "$1/release" ] && break; sleep 0.1; done
echo "done=1"
"""


@dataclass(frozen=True)
class World:
    base: Path
    sw: Path
    profiles: Path
    store: Path
    out: Path  # writable by the test user

    def hook_env(self, log: Path) -> dict[str, str]:
        """Environment for the hooks (root) to find the test profiles and store."""
        return {"OVLRUN_PROFILE_PATH": str(self.profiles), "OVLRUN_STORE": str(self.store),
                "OVLRUN_SLURM_LOG": str(log)}

    def job_env(self, python: str) -> dict[str, str]:
        """What the probe needs: the tree, this directory, the interpreter that runs ovlrun."""
        return {"OVLRUN_TEST_SW": str(self.sw), "OVLRUN_TEST_DIR": str(self.base), "OVLRUN_TEST_PYTHON": python}

    def ovlrun(self, *args: str) -> subprocess.CompletedProcess[str]:
        """This checkout's CLI as root, on this world's profiles and store."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OVLRUN_", "SUDO_"))}
        env.update(OVLRUN_PROFILE_PATH=str(self.profiles), OVLRUN_STORE=str(self.store), PYTHONPATH=str(REPO))
        return subprocess.run([sys.executable, "-m", "ovlrun", *args], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=300)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def make_world() -> World:
    """A fresh tree, profiles and snapshots; then what the snapshots must hide (files
    added to the releases) and must not (a new release)."""
    WORLDS.mkdir(mode=0o755, parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="world-", dir=WORLDS))
    base.chmod(0o755)
    world = World(base, base / "sw", base / "profiles", base / "store", base / "out")
    for rel in PROFILES.values():
        d = world.sw / rel
        _write(d / "share" / "data.txt", f"data of {rel}\n")
        (d / "share").chmod(0o777)
        _write(d / "bin" / "tool", "#!/bin/sh\necho tool\n", 0o755)
        for i in range(3):
            _write(d / "lib" / f"libx{i}.so", "x" * 100)
    _write(world.sw / "other" / "README", "not localised\n")
    for name, rel in PROFILES.items():
        _write(world.profiles / f"{name}.toml",
               f'description = "slurm test {name}"\n[[tree]]\nroot = "{world.sw}"\nlocalise = ["{rel}"]\n')
    world.store.mkdir(mode=0o755)
    for name, rel in PROFILES.items():
        r = world.ovlrun("snapshot", "build", "--profile", name)
        assert r.returncode == 0 and f"built: {world.sw / rel} " in r.stdout + r.stderr, r
    for rel in PROFILES.values():
        _write(world.sw / rel / ADDED, "too new\n")
        _write(world.sw / rel / "lib" / "added-lib.so", "too new\n")
    _write(world.sw / NEW_RELEASE / "share" / "data.txt", f"data of {NEW_RELEASE}\n")
    _write(base / "probe.sh", PROBE, 0o755)
    _write(base / "job.sh", JOB, 0o755)
    _write(base / "hold.sh", HOLD, 0o755)
    world.out.mkdir(mode=0o755)
    os.chown(world.out, TEST_UID, TEST_UID)
    return world


def remove_world(world: World) -> None:
    assert mounts_under(world.base) == [], "a Slurm test left mounts in its world"
    shutil.rmtree(world.base)


def poll(what: str, check: Callable[[], bool], timeout: float = 20.0, interval: float = 0.1) -> None:
    """Wait until ``check()`` is true, at most ``timeout`` seconds (no blind sleeps)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def parse(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def mounts_under(path: Path | str, table: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points at or below ``path`` in the mount table ``table`` (default: the
    caller's, i.e. the host's)."""
    prefix = str(path).rstrip("/") + "/"
    return [m.point for m in mountinfo.read(table) if m.point == str(path) or m.point.startswith(prefix)]


def overlays(table: str) -> list[str]:
    """Mount points of every overlay in the mount table ``table``."""
    return [m.point for m in mountinfo.read(table) if m.fstype == "overlay"]
