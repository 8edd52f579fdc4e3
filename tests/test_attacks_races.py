# ruff: noqa: F811  (pytest fixtures imported from tests.attacks_support are redefined as arguments)
"""Issue 9, attacks 2 and 4 (and 5d): races on the working directory, and gc against
namespaces it cannot see or must not believe.

The working-directory race: the caller starts in a directory it owns; a racer child
swaps that directory's name with a symlink to another user's 0700 directory
(renameat2 RENAME_EXCHANGE) while ovlrun launches.  ovlrun re-enters the working
directory by path; if it does so as root, the job can land in the other user's
directory.  A hit is a job whose working directory is the victim's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.attacks_support import (
    Racer,
    race_dirs,
    shipped_sudoers,  # noqa: F401 (fixture)
    slurm_env,
    su,
    sudo_env,
    user_dir,
    victim,  # noqa: F401 (fixture)
)
from tests.conftest import TEST_UID, World, requires_overlay, requires_root

pytestmark = [requires_root, requires_overlay]

ROUNDS = 100


def _as_test_user_in(fd: int) -> None:
    """preexec_fn: start in the directory ``fd`` as the test user (the attacker), who then
    runs sudo.  Runs in the child only."""
    os.fchdir(fd)
    os.setgroups([])
    os.setresgid(TEST_UID, TEST_UID, TEST_UID)
    os.setresuid(TEST_UID, TEST_UID, TEST_UID)


def _race(world: World, victim: Path, argv: list[str]) -> tuple[int, dict[str, int]]:
    """Run ``sudo -n entry ARGV... readlink /proc/self/cwd`` ROUNDS times as the test user
    (real sudo, the shipped drop-in) from the user's own directory while a racer swaps its
    name with a symlink to the victim's directory; count jobs that ran in the victim's."""
    real, link, fd = race_dirs(world.base / "race", victim)
    entry = str(world.admin_entry())
    seen: dict[str, int] = {}
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/home/ovltest", "USER": "ovltest"}
    racer = Racer(real, link)
    try:
        for _ in range(ROUNDS):
            r = subprocess.run(["sudo", "-n", entry, *argv, "--", "readlink", "/proc/self/cwd"], env=env,
                               capture_output=True, text=True, timeout=60, preexec_fn=lambda: _as_test_user_in(fd))
            where = r.stdout.strip() or f"rc={r.returncode}: {r.stderr.strip()[-200:]}"
            seen[where] = seen.get(where, 0) + 1
    finally:
        racer.stop()
        os.close(fd)
    print(f"{argv[0]}: where {ROUNDS} jobs ran: {seen}")  # shown with pytest -s
    return seen.get(str(victim), 0), seen


def test_cwd_swap_race_launch(world: World, test_user: str, victim: Path, shipped_sudoers: Path) -> None:
    world.simple_profile()
    world.build()
    hits, seen = _race(world, victim, ["--profile", "p"])
    assert hits == 0, seen
    # The job still runs every time: in its directory (under either name), or at home.
    assert all(where.startswith((str(world.base / "race"), "/home/ovltest")) for where in seen), seen


def _prolog(world: World, base: int) -> tuple[str, dict[str, str], subprocess.CompletedProcess[str]]:
    """A Slurm Prolog for a job id of this test run (``base`` keeps tests apart)."""
    job_id = str(base + os.getpid() % 1_000_000)
    env = slurm_env(world, job_id)
    r = subprocess.run([sys.executable, "-m", "ovlrun", "slurm", "prolog"], env=env, capture_output=True,
                       text=True, timeout=120, cwd="/")
    return job_id, env, r


def test_cwd_swap_race_enter(world: World, test_user: str, victim: Path, shipped_sudoers: Path) -> None:
    world.simple_profile()
    world.build()
    job_id, env, r = _prolog(world, 970_000_000)
    try:
        assert r.returncode == 0, r.stderr
        hits, seen = _race(world, victim, ["enter", job_id])
    finally:
        subprocess.run([sys.executable, "-m", "ovlrun", "slurm", "epilog"], env=env, capture_output=True,
                       timeout=120, cwd="/")
    assert hits == 0, seen
    assert all(where.startswith((str(world.base / "race"), "/home/ovltest")) for where in seen), seen


def test_cwd_the_user_cannot_enter_falls_back_to_home_with_one_warning(world: World, test_user: str,
                                                                       victim: Path) -> None:
    world.simple_profile()
    world.build()
    entry = str(world.admin_entry())
    # Started (by root's doing) in a directory the user may not enter: the job must not run there.
    r = subprocess.run([entry, "--profile", "p", "--", "readlink", "/proc/self/cwd"], env=sudo_env(),
                       capture_output=True, text=True, timeout=60, cwd=victim)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "/home/ovltest"
    assert [line for line in r.stderr.splitlines() if "working directory" in line] == [
        f"ovlrun: warning: cannot enter working directory {victim}: Permission denied; starting in /home/ovltest"]


def _snapshot_ids(world: World) -> set[str]:
    return {p.name for p in (world.store / "snapshots").glob("*/*")}


def test_gc_keeps_snapshots_mounted_in_pinned_namespaces(world: World, test_user: str) -> None:
    rel = world.sw / "app" / "1.0"
    world.simple_profile()
    world.build()
    old = _snapshot_ids(world)
    job_id, env, r = _prolog(world, 960_000_000)
    try:
        assert r.returncode == 0, r.stderr
        # SLURMD_NODENAME is not this host's name: the record is in that node's directory
        # (jobs/records.py record_dir), which gc reads too.
        ns = json.loads((world.rundir / "attacknode" / f"{job_id}.json").read_text())["ns_path"]
        (rel / "README").write_text("app 1.0, patched in place\n")
        assert world.ovlrun("snapshot", "refresh", "--all").returncode == 0
        gc = world.ovlrun("snapshot", "gc", "--grace", "0")
        assert gc.returncode == 0, gc.stderr
        assert "kept: in use" in gc.stdout, gc.stdout
        assert old <= _snapshot_ids(world)
        # The job's namespace (no process in it) still has its release.
        view = subprocess.run(["nsenter", f"--mount={ns}", "ls", str(rel)], capture_output=True, text=True,
                              timeout=60)
        assert view.stdout.split() == ["README", "bin", "lib"], view
    finally:
        subprocess.run([sys.executable, "-m", "ovlrun", "slurm", "epilog"], env=env, capture_output=True,
                       timeout=120, cwd="/")
    # Once the job is gone, the replaced snapshot goes.
    gc = world.ovlrun("snapshot", "gc", "--grace", "0")
    assert "removed" in gc.stdout and not (old & _snapshot_ids(world)), gc.stdout


def test_fake_overlay_in_a_user_namespace_does_not_pin_a_snapshot(world: World, test_user: str) -> None:
    rel = world.sw / "app" / "1.0"
    world.simple_profile()
    world.build()
    (snap_dir,) = (world.store / "snapshots").glob("*/*")
    key, snap_id = snap_dir.parent.name, snap_dir.name
    fake = user_dir(world.base / "fake")
    script = (f"mkdir -p {fake}/snapshots/{key}/{snap_id}/tree {fake}/l2 {fake}/mnt && "
              f"exec unshare -Urm sh -c 'mount -t overlay ovlrun -o lowerdir={fake}/snapshots/{key}/{snap_id}/tree:"
              f"{fake}/l2 {fake}/mnt && echo ready && read x'")
    holder = subprocess.Popen(["su", test_user, "-s", "/bin/sh", "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        assert holder.stdout is not None
        if holder.stdout.readline() != "ready\n":
            holder.wait()
            pytest.skip(f"unprivileged overlay in a user namespace unavailable: {holder.stderr.read() if holder.stderr else ''}")
        (rel / "README").write_text("app 1.0, patched in place\n")
        assert world.ovlrun("snapshot", "refresh", "--all").returncode == 0
        gc = world.ovlrun("snapshot", "gc", "--grace", "0")
        assert gc.returncode == 0, gc.stderr
        assert "kept: in use" not in gc.stdout and f"removed: {snap_dir}" in gc.stdout, gc.stdout
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(timeout=60)


def test_race_helpers_sanity(world: World, test_user: str, victim: Path) -> None:
    """The attack is real: the user cannot enter the victim's directory by itself."""
    r = su(test_user, f"cd {victim} && echo inside")
    assert r.returncode != 0 and "inside" not in r.stdout
    assert os.stat(victim).st_uid != TEST_UID
