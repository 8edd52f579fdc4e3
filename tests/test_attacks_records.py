"""Job records are nobody else's business (issue 18, item 5): another user on the node
must not read which profile a job asked for, its messages or its mounts, nor list whose
jobs run here; the job's own user still gets what is theirs (the TaskProlog's view files,
``ovlrun status`` in a Slurm job without the TaskProlog).  Every launch leaves a record
too (issue 15): checked here as root sees it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.attacks_support import (
    VICTIM_UID,
    VICTIM_USER,
    slurm_env,
    su,
    victim,  # noqa: F401 (fixture)
)
from tests.conftest import REPO, TEST_UID, TEST_USER, World, requires_overlay, requires_root

pytestmark = [requires_root, requires_overlay]

NODE = "attacknode"  # slurm_env's SLURMD_NODENAME: records in that node's directory


def _hook(name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ovlrun", "slurm", name], env=env, capture_output=True, text=True,
                          timeout=120, cwd="/")


def _reads(user: str, *paths: Path) -> dict[str, str]:
    """What ``user`` gets from ``cat`` (files) or ``ls`` (directories), per path."""
    out = {}
    for path in paths:
        tool = "ls" if path.is_dir() else "cat"
        r = su(user, f"{tool} {path} 2>&1; echo rc=$?")
        out[path.name] = r.stdout
    return out


@pytest.mark.usefixtures("victim")
def test_another_user_cannot_read_a_slurm_jobs_record(world: World, test_user: str) -> None:
    world.simple_profile()
    world.build()
    job_id = str(950_000_000 + os.getpid() % 1_000_000)
    env = slurm_env(world, job_id, uid=VICTIM_UID, user=VICTIM_USER)  # the victim's job
    r = _hook("prolog", env)
    try:
        assert r.returncode == 0 and "(create): 1 localised path(s)" in r.stderr, r.stderr
        node_dir = world.rundir / NODE
        record, view, notes = (node_dir / f"{job_id}{suffix}" for suffix in (".json", ".env", ".messages"))
        assert json.loads(record.read_text())["profile"] == "p"  # root reads it
        # The attack: another user reads the record, the job's view files, the listings.
        seen = _reads(TEST_USER, record, view, notes, node_dir, world.rundir)
        assert all("Permission denied" in out and "rc=0" not in out for out in seen.values()), seen
        assert "OVLRUN_PROFILE" not in "".join(seen.values())
        # Root-only record; the views are the job's user's alone.
        assert (record.stat().st_uid, record.stat().st_mode & 0o777) == (0, 0o600)
        for path in (view, notes):
            assert (path.stat().st_uid, path.stat().st_mode & 0o777) == (VICTIM_UID, 0o400)
        assert "OVLRUN_PROFILE=p" in su(VICTIM_USER, f"cat {view}").stdout
        assert "Permission denied" in su(VICTIM_USER, f"cat {record}").stderr
    finally:
        assert _hook("epilog", env).returncode == 0
    # The Epilog keeps the record in the node's history (ovlrun jobs), root's alone; the
    # views go with the job.
    ended = world.rundir / NODE / ".ended" / f"{job_id}.json"
    assert [p.relative_to(world.rundir) for p in world.rundir.glob(f"**/{job_id}*")] == [ended.relative_to(world.rundir)]
    assert (ended.stat().st_uid, ended.stat().st_mode & 0o777) == (0, 0o600)
    assert json.loads(ended.read_text())["ended"] is not None
    seen = _reads(TEST_USER, ended, ended.parent)
    assert all("Permission denied" in out and "rc=0" not in out for out in seen.values()), seen
    assert "Permission denied" in su(VICTIM_USER, f"cat {ended}").stderr


@pytest.mark.usefixtures("victim")
def test_status_in_a_slurm_job_reads_the_users_own_view(world: World, test_user: str) -> None:
    """Without the TaskProlog a Slurm job's environment names no profile: status takes it
    from the job's view file, as the job's user; another user's status finds nothing."""
    world.simple_profile()
    world.build()
    job_id = str(940_000_000 + os.getpid() % 1_000_000)
    env = slurm_env(world, job_id)  # the test user's job
    r = _hook("prolog", env)
    try:
        assert r.returncode == 0, r.stderr
        ns = json.loads((world.rundir / NODE / f"{job_id}.json").read_text())["ns_path"]
        variables = (f"PYTHONPATH={REPO} OVLRUN_STORE={world.store} OVLRUN_JOB_RUNDIR={world.rundir} "
                     f"SLURM_JOB_ID={job_id} SLURMD_NODENAME={NODE} LC_ALL=C.UTF-8")
        status = {}
        for user in (TEST_USER, VICTIM_USER):
            r = subprocess.run(["nsenter", f"--mount={ns}", "runuser", "-u", user, "--", "sh", "-c",
                                f"cd / && env -i {variables} {sys.executable} -m ovlrun status --json"],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr  # localised paths: inside a job
            status[user] = json.loads(r.stdout)
        assert status[TEST_USER]["profile"] == "p" and status[TEST_USER]["job_id"] == job_id
        assert [m["path"] for m in status[TEST_USER]["localised"]] == [str(world.sw / "app" / "1.0")]
        assert status[VICTIM_USER]["profile"] == "", status  # not their view
    finally:
        assert _hook("epilog", env).returncode == 0


@pytest.mark.usefixtures("victim")
def test_every_launch_leaves_a_root_only_record(world: World, test_user: str) -> None:
    world.simple_profile()
    world.build()
    r = world.as_sudo("--profile", "p", "--", "/bin/sh", "-c", 'echo "$OVLRUN_JOB_ID $$"', uid=VICTIM_UID)
    assert r.returncode == 0, r.stderr
    job_id, pid = r.stdout.split()
    record = world.rundir / f"{job_id}.json"
    data = json.loads(record.read_text())
    assert (data["kind"], data["user"], data["uid"], data["profile"], data["state"]) == (
        "launch", VICTIM_USER, VICTIM_UID, "p", "localised")
    assert data["localised"] == [str(world.sw / "app" / "1.0")] and data["messages"] == []
    # The command is the job process: the record names it (it has ended now).
    assert data["pid"] == int(pid) and job_id == f"launch-{pid}-{data['pid_start']}" and data["ns_ino"] > 0
    assert (record.stat().st_uid, record.stat().st_mode & 0o777) == (0, 0o600)
    seen = _reads(TEST_USER, record, world.rundir)
    assert all("Permission denied" in out and "rc=0" not in out for out in seen.values()), seen
    # What `ovlrun status` needs is in the job's environment and mount table, not the record.
    status_cmd = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from ovlrun.cli.main import main; "
                  "sys.exit(main(['status', '--json']))")
    # (A real sudo hands the job the caller's environment, without SUDO_UID: as_sudo has no
    # sudo parent to read it from, so the job gets sudo's.)
    r = world.as_sudo("--profile", "p", "--", "env", "-u", "SUDO_UID", sys.executable, "-I", "-c", status_cmd,
                      uid=TEST_UID)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["profile"] == "p" and status["job_id"].startswith("launch-")
    assert [m["path"] for m in status["localised"]] == [str(world.sw / "app" / "1.0")]
    assert (world.rundir / f"{status['job_id']}.json").exists()
