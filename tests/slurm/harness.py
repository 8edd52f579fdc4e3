"""Test world for the Slurm tests: a user, a shared tree, profiles, a snapshot store.

Everything lives under /var/tmp/ovlrun-slurm-test, never /tmp: Slurm jobs get a
private /tmp, so files there are invisible to them (pytest's tmp_path is under /tmp).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASE = Path(os.environ.get("OVLRUN_SLURM_TEST_DIR", "/var/tmp/ovlrun-slurm-test"))
STATE = Path(os.environ.get("OVLRUN_SLURM_STATE", "/var/spool/ovlrun-slurm"))
USER, UID = "ovltest", 4242
PROFILES = {"slurmtest-a": "app/1.0", "slurmtest-b": "app/2.0"}
ADDED = "added-after-snapshot"

# The probe run by jobs (batch script and srun step) and by `ovlrun enter` tests:
# key=value lines about what the process sees of the shared tree.
PROBE = r"""#!/bin/bash
who="$1"
echo "$who.uid=$(id -u)"
echo "$who.ns=$(readlink /proc/self/ns/mnt)"
for v in 1.0 2.0; do
    d="$OVLRUN_TEST_SW/app/$v"
    if [ -e "$d/ADDED" ]; then echo "$who.$v.added=visible"; else echo "$who.$v.added=hidden"; fi
    echo "$who.$v.read=$(cat "$d/share/data.txt")"
    echo "$who.$v.find=$(find "$d" -name 'added-*' | wc -l)"
    echo "$who.$v.lib=$(ls "$d/lib" | tr '\n' ' ')"
done
echo "$who.overlays=$(grep -c ' - overlay ' /proc/self/mountinfo)"
echo "$who.tmp_owner=$(stat -c %U /tmp)"
""".replace("ADDED", ADDED)

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
class SlurmWorld:
    base: Path
    sw: Path
    profiles: Path
    store: Path
    out: Path  # writable by the test user

    def env(self) -> dict[str, str]:
        """Environment for the hooks (root) to find the test profiles and store."""
        return {"OVLRUN_PROFILE_PATH": str(self.profiles), "OVLRUN_STORE": str(self.store),
                "OVLRUN_SLURM_LOG": str(self.base / "slurm-hooks.log")}

    def job_env(self) -> dict[str, str]:
        return {"OVLRUN_TEST_SW": str(self.sw), "OVLRUN_TEST_DIR": str(self.base)}


def ensure_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--uid", str(UID), "--shell", "/bin/bash", USER],
                       check=True)
        return pwd.getpwnam(USER)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def make_world() -> SlurmWorld:
    """Fresh tree, profiles and snapshots; then files added to the shared tree that
    the snapshots must hide."""
    from ovlrun.profile.parse import load_profile
    from ovlrun.store.build import build_profile
    from ovlrun.store.index import Store

    user = ensure_user()
    if BASE.exists():
        shutil.rmtree(BASE)
    BASE.mkdir(mode=0o755, parents=True)
    BASE.chmod(0o755)
    world = SlurmWorld(BASE, BASE / "sw", BASE / "profiles", BASE / "store", BASE / "out")
    for rel in PROFILES.values():
        d = world.sw / rel
        _write(d / "share" / "data.txt", f"data of {rel}\n")
        _write(d / "bin" / "tool", "#!/bin/sh\necho tool\n", 0o755)
        for i in range(3):
            _write(d / "lib" / f"libx{i}.so", "x" * 100)
    _write(world.sw / "other" / "README", "not localised\n")
    for name, rel in PROFILES.items():
        _write(world.profiles / f"{name}.toml",
               f'description = "slurm test {name}"\n[[tree]]\nroot = "{world.sw}"\nlocalise = ["{rel}"]\n')
    world.store.mkdir(mode=0o755)
    store = Store.open(world.store)
    store.ensure()
    for name in PROFILES:
        results = build_profile(load_profile(name, [world.profiles]), store, report=lambda m: None)
        assert all(r.status == "built" for r in results), results
    for rel in PROFILES.values():
        _write(world.sw / rel / ADDED, "too new\n")
        _write(world.sw / rel / "lib" / "added-lib.so", "too new\n")
    _write(BASE / "probe.sh", PROBE, 0o755)
    _write(BASE / "job.sh", JOB, 0o755)
    _write(BASE / "hold.sh", HOLD, 0o755)
    world.out.mkdir(mode=0o755)
    os.chown(world.out, user.pw_uid, user.pw_gid)
    return world


def poll(what: str, check: Callable[[], bool], timeout: float = 20.0, interval: float = 0.1) -> None:
    """Wait until ``check()`` is true, at most ``timeout`` seconds (no blind sleeps)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def parse(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in the caller's (the host's) namespace."""
    from ovlrun.linux.namespaces import mount_points

    prefix = str(path).rstrip("/") + "/"
    return [m for m in mount_points() if m == str(path) or m.startswith(prefix)]
