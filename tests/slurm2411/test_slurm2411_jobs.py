"""End to end on a real Slurm 24.11 (Debian trixie): the RunInJob and CloneNSScript paths.

Every test runs twice (``slurm`` is parametrised): with ``PrologFlags=Contain,RunInJob``
(the Prolog runs in the extern step after job_container/tmpfs pinned the job's namespace
and mounts into it) and with ``CloneNSScript=`` in job_container.conf (the Prolog records
the request; the script mounts into ``$SLURM_NS``).  The checks mirror
tests/slurm/test_slurm_jobs.py (22.05), plus: the localised view is read-only, a name
added to the release after the snapshot fails with ENOENT, a release created after the
snapshot is visible.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from .conftest import ROOT_ENV, Job, Slurm, in_root
from .world import BASE, REPO, ROOT, STATE_IN, UID, USER, mounts_under, parse, poll

JC = STATE_IN / "jc"  # job_container BasePath, inside the root


def assert_view(job: Job, localised: str | None) -> None:
    """Both the batch script and its srun step saw ``localised`` (and only it) localised."""
    assert job.returncode == 0, job
    assert job.out.get("done") == "1", job
    for who in ("batch", "step"):
        assert job.out[f"{who}.uid"] == str(UID), job.out
        for v in ("1.0", "2.0"):
            mine = v == localised
            assert job.out[f"{who}.{v}.added"] == ("hidden" if mine else "visible"), (who, v, job.out)
            assert job.out[f"{who}.{v}.added_err"] == ("No such file or directory" if mine else ""), job.out
            assert job.out[f"{who}.{v}.find"] == ("0" if mine else "2"), (who, v, job.out)
            assert ("added-lib.so" in job.out[f"{who}.{v}.lib"]) == (not mine), job.out
            assert job.out[f"{who}.{v}.read"] == f"data of app/{v}", job.out
            assert job.out[f"{who}.{v}.write"] == ("Read-only file system" if mine else "ok"), job.out
        assert job.out[f"{who}.new_release"] == "data of app/3.0", job.out
        # The private /tmp job_container/tmpfs gives every job is still there.
        assert job.out[f"{who}.tmp_owner"] == "ovltest", job.out
    # One namespace for the whole job.
    assert job.out["batch.ns"] == job.out["step.ns"], job.out
    assert job.out["batch.overlays"] == ("1" if localised else "0"), job.out


def assert_clean(slurm: Slurm, job: Job) -> None:
    """After the Epilog: no record, no job directory, nothing mounted anywhere, node usable."""
    slurm.wait_job_gone(job.job_id)
    jc_on_host = ROOT / str(JC).lstrip("/")
    poll("job directory removal", lambda: not any(jc_on_host.glob(f"*/{job.job_id}")), timeout=10)
    assert not slurm.record_path(job.job_id).with_suffix(".messages").exists()
    # The host: nothing of the job (jobs mount only in the root's private namespace).
    assert mounts_under(BASE) == []
    assert mounts_under(ROOT / str(JC).lstrip("/")) == []
    # The root's namespace (slurmd's): no job directory bind, no .ns, no overlay.
    info = slurm.slurmd_mountinfo()
    assert mounts_under(JC, info) == []
    assert [m for m in mounts_under(BASE, info) if m != str(BASE)] == []  # only the test bind
    assert " - overlay " not in info.read_text()
    state = slurm.node_state()
    assert state in ("idle", "mixed"), f"node is {state}"


def test_batch_and_step_see_localised_view(slurm: Slurm) -> None:
    log_before = len(slurm.hook_log())
    job = slurm.run("ovl:slurmtest-a", "single")
    assert_view(job, "1.0")
    log = slurm.hook_log()[log_before:]
    if slurm.mode == "runinjob":
        assert f"job={job.job_id} info: profile 'slurmtest-a' (join): 1 localised path(s) for ovltest" in log
    else:
        assert f"job={job.job_id} info: profile 'slurmtest-a' (record): 0 localised path(s)" in log, log
        assert f"clone-ns job={job.job_id} info: profile 'slurmtest-a': 1 localised path(s)" in log, log
    assert_clean(slurm, job)


def test_two_concurrent_jobs_with_different_profiles(slurm: Slurm) -> None:
    rendezvous = slurm.world.out / f"rendezvous-{slurm.mode}"
    rendezvous.mkdir(exist_ok=True)
    for f in rendezvous.iterdir():
        f.unlink()
    Path(rendezvous).chmod(0o777)
    procs = {name: slurm.sbatch(f"ovl:{profile}", name, rendezvous=rendezvous, tag=name)
             for name, profile in (("conc-a", "slurmtest-a"), ("conc-b", "slurmtest-b"))}
    jobs = {name: slurm.finish(sub) for name, sub in procs.items()}
    assert jobs["conc-a"].out.get("batch.peers") == "2", "jobs did not overlap"
    assert_view(jobs["conc-a"], "1.0")
    assert_view(jobs["conc-b"], "2.0")
    assert jobs["conc-a"].out["batch.ns"] != jobs["conc-b"].out["batch.ns"]
    for job in jobs.values():
        assert_clean(slurm, job)


def test_unknown_profile_runs_unlocalised_and_says_why(slurm: Slurm) -> None:
    job = slurm.run("ovl:slurmtest-typo", "typo")
    assert_view(job, None)
    reason = "job runs unlocalised: no profile named 'slurmtest-typo'"
    assert reason in slurm.hook_log()
    assert f"ovlrun: {reason}" in job.stdout  # via the TaskProlog
    assert job.stdout.count("ovlrun:") == 1  # only the batch step prints it
    assert_clean(slurm, job)  # includes: the node is idle again, not drained


def test_broken_profile_runs_unlocalised_and_says_why(slurm: Slurm) -> None:
    broken = slurm.world.profiles / "slurmtest-broken.toml"
    broken.write_text("[[tree]\nroot = \n")
    try:
        job = slurm.run("ovl:slurmtest-broken", "broken")
    finally:
        broken.unlink()
    assert_view(job, None)
    assert "ovlrun: job runs unlocalised: " in job.stdout and "slurmtest-broken" in job.stdout, job.stdout
    assert_clean(slurm, job)


def test_missing_snapshot_runs_unlocalised_and_says_why(slurm: Slurm) -> None:
    """The profile is fine but its snapshot is not in the store: a warning, not a failure."""
    store = slurm.world.store
    hidden = store.with_name("store.hidden")
    store.rename(hidden)
    store.mkdir(mode=0o755)
    try:
        job = slurm.run("ovl:slurmtest-b", "nosnap")
    finally:
        store.rmdir()
        hidden.rename(store)
    assert_view(job, None)
    assert "ovlrun: no snapshot for " in job.stdout and "stays unlocalised" in job.stdout, job.stdout
    assert_clean(slurm, job)


def test_job_without_request_is_left_to_slurm(slurm: Slurm) -> None:
    job = slurm.run(None, "plain")
    assert_view(job, None)
    assert "ovlrun:" not in job.stdout
    assert_clean(slurm, job)


def test_enter_a_running_job(slurm: Slurm) -> None:
    """`sudo ovlrun enter JOBID` (e.g. from ssh on the node) joins a live 24.11 job."""
    sync = slurm.world.out / f"hold-{slurm.mode}"
    sync.mkdir(exist_ok=True)
    for f in sync.iterdir():
        f.unlink()
    sync.chmod(0o777)
    r = subprocess.run(in_root("runuser", "-u", USER, "--", "sbatch", "--parsable", "-n1", "-c1",
                               "--comment=ovl:slurmtest-b", "-o", str(sync / "out"),
                               str(slurm.world.base / "hold.sh"), str(sync)),
                       capture_output=True, text=True, env=ROOT_ENV, cwd=slurm.world.out, timeout=60)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    try:
        poll("held job to start", lambda: (sync / "ready").exists(), timeout=60)
        # As sudo would run it for the user: the root's python3, this checkout (from the
        # working directory: ovlrun refuses a PYTHONPATH under sudo).
        env = [f"SUDO_UID={UID}", f"SUDO_GID={UID}", f"SUDO_USER={USER}",
               *(f"{k}={v}" for k, v in slurm.world.job_env().items())]
        cmd = in_root("sh", "-c", 'cd "$0" && exec "$@"', str(REPO), "env", *env, "/usr/bin/python3", "-m",
                      "ovlrun", "enter", job_id, "--", "bash", str(slurm.world.base / "probe.sh"), "x")
        r = subprocess.run(cmd,
                           capture_output=True, text=True, env=ROOT_ENV, cwd=slurm.world.out, timeout=60)
        assert r.returncode == 0, r.stderr
        view = parse(r.stdout)
        assert view["x.uid"] == str(UID), view
        assert view["x.2.0.added"] == "hidden" and view["x.1.0.added"] == "visible", (view, slurm.hook_log())
        assert view["x.2.0.write"] == "Read-only file system", view
        assert view["x.tmp_owner"] == USER, view  # the job's private /tmp: same namespace
    finally:
        (sync / "release").touch()
    slurm.wait_job_gone(job_id)
    assert (sync / "out").read_text().strip().endswith("done=1")
    assert mounts_under(BASE) == []
