"""End-to-end: jobs submitted by an unprivileged user to a real slurmd (22.05).

Each job's batch script and an ``srun`` step in it run the probe (tests/slurm/harness.py)
against the shared tree: a localised release must show its snapshot (files added to
the shared tree afterwards are invisible to ls, stat and find), everything else the
live tree.  After each job nothing may be left mounted on the host.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import Job, Slurm
from .harness import BASE, REPO, STATE, UID, USER, mounts_under, parse, poll


def assert_view(job: Job, localised: str | None) -> None:
    """Both the batch script and its srun step saw ``localised`` (and only it) localised."""
    assert job.returncode == 0, job
    assert job.out.get("done") == "1", job
    for who in ("batch", "step"):
        assert job.out[f"{who}.uid"] == str(UID), job.out
        for v in ("1.0", "2.0"):
            expect = "hidden" if v == localised else "visible"
            assert job.out[f"{who}.{v}.added"] == expect, (who, v, job.out)
            assert job.out[f"{who}.{v}.find"] == ("0" if v == localised else "2"), (who, v, job.out)
            assert ("added-lib.so" in job.out[f"{who}.{v}.lib"]) == (v != localised), job.out
            assert job.out[f"{who}.{v}.read"] == f"data of app/{v}", job.out
        # The private /tmp job_container/tmpfs gives every job is still there.
        assert job.out[f"{who}.tmp_owner"] == "ovltest", job.out
    # One namespace for the whole job.
    assert job.out["batch.ns"] == job.out["step.ns"], job.out
    assert job.out["batch.overlays"] == ("1" if localised else "0"), job.out


def assert_host_clean(slurm: Slurm, job: Job) -> None:
    slurm.wait_job_gone(job.job_id)
    assert mounts_under(BASE) == []
    assert mounts_under(STATE / "jc") == []
    poll("job directory removal", lambda: not any((STATE / "jc").glob(f"*/{job.job_id}")), timeout=10)


def test_batch_and_step_see_localised_view(slurm: Slurm) -> None:
    job = slurm.run("ovl:slurmtest-a", "single")
    assert_view(job, "1.0")
    for who in ("batch", "step"):  # as after a launch: the TaskProlog exports it, status shows it
        assert job.out[f"{who}.profile_env"] == "slurmtest-a", job.out
        assert job.out[f"{who}.status"] == "profile: slurmtest-a", job.out
    assert_host_clean(slurm, job)
    assert "profile 'slurmtest-a' (create): 1 localised path(s) for ovltest" in slurm.hook_log()


def test_two_concurrent_jobs_with_different_profiles(slurm: Slurm) -> None:
    rendezvous = slurm.world.out / "rendezvous"
    rendezvous.mkdir(exist_ok=True)
    for f in rendezvous.iterdir():
        f.unlink()
    Path(rendezvous).chmod(0o777)
    procs = {name: slurm.sbatch(f"ovl:{profile}", name, rendezvous=rendezvous, tag=name)
             for name, profile in (("conc-a", "slurmtest-a"), ("conc-b", "slurmtest-b"))}
    jobs = {name: slurm.finish(p, name) for name, p in procs.items()}
    assert jobs["conc-a"].out.get("batch.peers") == "2", "jobs did not overlap"
    assert_view(jobs["conc-a"], "1.0")
    assert_view(jobs["conc-b"], "2.0")
    assert jobs["conc-a"].out["batch.ns"] != jobs["conc-b"].out["batch.ns"]
    for job in jobs.values():
        assert_host_clean(slurm, job)


def test_unknown_profile_runs_unlocalised_and_says_why(slurm: Slurm) -> None:
    job = slurm.run("ovl:slurmtest-typo", "typo")
    assert_view(job, None)
    reason = "job runs unlocalised: no profile named 'slurmtest-typo'"
    assert reason in slurm.hook_log()
    assert f"ovlrun: {reason}" in job.stdout  # via the TaskProlog
    assert job.stdout.count("ovlrun:") == 1  # only the batch step prints it
    assert_host_clean(slurm, job)
    # Once the job is over the node is idle again: not drained, not down.
    state = slurm.node_state()
    assert state in ("idle", "mixed"), f"node is {state}: a user's typo must not drain the node"


def test_job_without_request_is_left_to_slurm(slurm: Slurm) -> None:
    job = slurm.run(None, "plain")
    assert_view(job, None)
    assert_host_clean(slurm, job)


def test_enter_a_running_job(slurm: Slurm) -> None:
    """`sudo ovlrun enter JOBID` (e.g. from ssh on the node) joins a live 22.05 job."""
    sync = slurm.world.out / "hold"
    sync.mkdir(exist_ok=True)
    for f in sync.iterdir():
        f.unlink()
    sync.chmod(0o777)
    out = slurm.world.out / "hold.slurm-out"
    proc = subprocess.Popen(["timeout", "90", "runuser", "-u", USER, "--", "sbatch", "--wait", "--parsable",
                             "-n1", "-c1", "--comment=ovl:slurmtest-b", "-o", str(out),
                             str(slurm.world.base / "hold.sh"), str(sync)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=slurm.world.out)
    try:
        assert proc.stdout is not None
        job_id = proc.stdout.readline().strip()  # --parsable prints it at submission
        assert job_id.isdigit(), job_id
        poll("held job to start", lambda: (sync / "ready").exists(), timeout=60)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LD_", "OVLRUN_"))}
        env.update(slurm.world.job_env(), SUDO_UID=str(UID), SUDO_GID=str(UID), SUDO_USER=USER)
        r = subprocess.run([sys.executable, "-m", "ovlrun", "enter", job_id, "--", "bash",
                            str(slurm.world.base / "probe.sh"), "x"],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        view = parse(r.stdout)
        assert view["x.uid"] == str(UID), view
        assert view["x.2.0.added"] == "hidden" and view["x.1.0.added"] == "visible", (view, slurm.hook_log())
        assert view["x.tmp_owner"] == USER, view  # the job's private /tmp: same namespace
    finally:
        (sync / "release").touch()
        _, stderr = proc.communicate(timeout=100)
    assert proc.returncode == 0, (stderr, out.read_text() if out.exists() else "")
    slurm.wait_job_gone(job_id)
    assert mounts_under(BASE) == []
