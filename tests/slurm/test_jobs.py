"""End to end: jobs submitted by an unprivileged user to a real slurmd, for every Slurm
instance and mode (``slurm`` is parametrised: tests/slurm/conftest.py).

Each job's batch script and an ``srun`` step in it run the probe (tests/slurm/world.py)
against the shared tree: a localised release must show its snapshot (a name added to the
shared tree afterwards is ENOENT for ls, stat and find; the view is read-only), everything
else the live tree (a release created after the snapshot is visible).  After each job:
no record, no job directory, nothing mounted on the host or in slurmd's namespace, and
the node is idle.

Where versions and modes differ, it is said where: the Prolog's log line (``create``
before 23.02.5 with PrologFlags=Contain, ``join`` with RunInJob, ``record`` plus the
CloneNSScript's line with CloneNSScript), and PrologFlags=Contain alone on 23.02.5+
(the job runs unlocalised and says what to configure).
"""

from __future__ import annotations

import pytest

from ..conftest import TEST_UID, TEST_USER
from .cluster import Job, Slurm
from .world import mounts_under, parse, poll


@pytest.fixture
def localising(slurm: Slurm) -> Slurm:
    """The instance in a mode where ovlrun localises jobs."""
    if not slurm.localises():
        pytest.skip(f"slurmd {slurm.version_text} with PrologFlags=Contain only: jobs run unlocalised "
                    "(test_contain_only_runs_unlocalised_and_says_what_to_configure)")
    return slurm


def assert_view(job: Job, localised: str | None) -> None:
    """Both the batch script and its srun step saw ``localised`` (and only it) localised."""
    assert job.returncode == 0, job
    assert job.out.get("done") == "1", job
    for who in ("batch", "step"):
        assert job.out[f"{who}.uid"] == str(TEST_UID), job.out
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
        assert job.out[f"{who}.tmp_owner"] == TEST_USER, job.out
    # One namespace for the whole job.
    assert job.out["batch.ns"] == job.out["step.ns"], job.out
    assert job.out["batch.overlays"] == ("1" if localised else "0"), job.out


def assert_clean(slurm: Slurm, job: Job) -> None:
    """After the Epilog: no record, no job directory, nothing mounted anywhere, node usable."""
    instance = slurm.instance
    slurm.wait_job_gone(job.job_id)
    jc = instance.state / "jc"  # the job_container BasePath
    info = instance.slurmd_mountinfo()

    def job_directory() -> list[object]:
        """The job directory, and its binds on the host and in slurmd's namespace (no
        .ns either).  The plugin removes them after the Epilog (24.11: the extern step's
        teardown), so they may still be going when the Epilog is done."""
        return [*instance.host_path(jc).glob(f"*/{job.job_id}"), *mounts_under(instance.host_path(jc)),
                *mounts_under(jc, info)]

    poll("the job directory and its mounts to go", lambda: not job_directory(), timeout=10)
    assert not instance.record_path(job.job_id).with_suffix(".messages").exists()
    # The host: nothing of the job (in a root, jobs mount only in its private namespace).
    assert mounts_under(slurm.world.base) == []
    # slurmd's namespace: nothing in the world, no overlay it did not have before.
    assert mounts_under(slurm.world.base, info) == []
    assert slurm.overlays_in_slurmd_ns() == slurm.overlays_at_start
    state = slurm.node_state()
    assert state in ("idle", "mixed"), f"node is {state}: a job must not drain the node"


def prolog_log_lines(slurm: Slurm, job_id: str) -> list[str]:
    """What the hooks log for a job localised with slurmtest-a, by mode."""
    if slurm.mode == "contain":  # before 23.02.5: the Prolog makes the job's namespace
        return [f"slurm prolog job={job_id} info: profile 'slurmtest-a' (create): 1 localised path(s) for ovltest"]
    if slurm.mode == "runinjob":  # the Prolog joins the namespace the plugin pinned
        return [f"slurm prolog job={job_id} info: profile 'slurmtest-a' (join): 1 localised path(s) for ovltest"]
    # CloneNSScript: the Prolog records the request, the script mounts into $SLURM_NS.
    return [f"slurm prolog job={job_id} info: profile 'slurmtest-a' (record): 0 localised path(s)",
            f"slurm clone-ns job={job_id} info: profile 'slurmtest-a': 1 localised path(s)"]


def test_batch_and_step_see_localised_view(localising: Slurm) -> None:
    slurm = localising
    log_before = len(slurm.hook_log())
    job = slurm.run("ovl:slurmtest-a", "single")
    assert_view(job, "1.0")
    for who in ("batch", "step"):  # as after a launch: the TaskProlog exports it, status shows it
        assert job.out[f"{who}.profile_env"] == "slurmtest-a", job.out
        assert job.out[f"{who}.status"] == "profile: slurmtest-a", job.out
    log = slurm.hook_log()[log_before:]
    for line in prolog_log_lines(slurm, job.job_id):
        assert line in log, log
    assert_clean(slurm, job)


def test_two_concurrent_jobs_with_different_profiles(localising: Slurm) -> None:
    slurm = localising
    rendezvous = slurm.shared_dir("rendezvous")
    procs = {name: slurm.sbatch(f"ovl:{profile}", name, rendezvous=rendezvous, tag=name)
             for name, profile in (("conc-a", "slurmtest-a"), ("conc-b", "slurmtest-b"))}
    jobs = {name: slurm.finish(sub) for name, sub in procs.items()}
    assert jobs["conc-a"].out.get("batch.peers") == "2", "jobs did not overlap"
    assert_view(jobs["conc-a"], "1.0")
    assert_view(jobs["conc-b"], "2.0")
    assert jobs["conc-a"].out["batch.ns"] != jobs["conc-b"].out["batch.ns"]
    for job in jobs.values():
        assert_clean(slurm, job)


def test_unknown_profile_runs_unlocalised_and_says_why(localising: Slurm) -> None:
    slurm = localising
    log_before = len(slurm.hook_log())
    job = slurm.run("ovl:slurmtest-typo", "typo")
    assert_view(job, None)
    reason = "job runs unlocalised: no profile named 'slurmtest-typo'"
    assert reason in slurm.hook_log()[log_before:]
    assert f"ovlrun: {reason}" in job.stdout  # via the TaskProlog
    assert job.stdout.count("ovlrun:") == 1  # only the batch step prints it
    assert_clean(slurm, job)  # includes: the node is idle again, a user's typo does not drain it


def test_broken_profile_runs_unlocalised_and_says_why(localising: Slurm) -> None:
    slurm = localising
    broken = slurm.world.profiles / "slurmtest-broken.toml"
    broken.write_text("[[tree]\nroot = \n")
    try:
        job = slurm.run("ovl:slurmtest-broken", "broken")
    finally:
        broken.unlink()
    assert_view(job, None)
    assert "ovlrun: job runs unlocalised: " in job.stdout and "slurmtest-broken" in job.stdout, job.stdout
    assert_clean(slurm, job)


def test_missing_snapshot_runs_unlocalised_and_says_why(localising: Slurm) -> None:
    """The profile is fine but its snapshot is not in the store: a warning, not a failure."""
    slurm = localising
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


def test_job_without_request_is_left_to_slurm(localising: Slurm) -> None:
    slurm = localising
    job = slurm.run(None, "plain")
    assert_view(job, None)
    assert "ovlrun:" not in job.stdout
    assert_clean(slurm, job)


def test_enter_a_running_job(localising: Slurm) -> None:
    """`sudo ovlrun enter JOBID` (e.g. from ssh on the node) joins a live job."""
    slurm = localising
    sync = slurm.shared_dir("hold")
    sub = slurm.sbatch("ovl:slurmtest-b", "hold", script="hold.sh", args=(str(sync),))
    try:
        poll("held job to start", lambda: (sync / "ready").exists(), timeout=60)
        r = slurm.instance.enter(slurm.world, sub.job_id, TEST_UID, "bash", str(slurm.world.base / "probe.sh"), "x")
        assert r.returncode == 0, r.stderr
        view = parse(r.stdout)
        assert view["x.uid"] == str(TEST_UID), view
        assert view["x.2.0.added"] == "hidden" and view["x.1.0.added"] == "visible", (view, slurm.hook_log())
        assert view["x.2.0.write"] == "Read-only file system", view
        assert view["x.tmp_owner"] == TEST_USER, view  # the job's private /tmp: same namespace
    finally:
        (sync / "release").touch()
    job = slurm.finish(sub)
    assert job.returncode == 0 and job.stdout.strip().endswith("done=1"), job
    assert_clean(slurm, job)


def test_contain_only_runs_unlocalised_and_says_what_to_configure(slurm: Slurm) -> None:
    """PrologFlags=Contain alone (the 22.05 configuration) on a slurmd of 23.02.5 or later.

    Since 23.02.5 job_container/tmpfs fails a job whose directory exists, so the Prolog's
    22.05 way (prepare the job directory and namespace before the plugin) would get every
    job that asks for a profile requeued and held.  The Prolog recognises the slurmd and
    lets the job run unlocalised, saying what to configure."""
    if slurm.mode != "contain" or slurm.localises():
        pytest.skip(f"slurmd {slurm.version_text}, mode {slurm.mode}: ovlrun localises jobs here")
    job = slurm.run("ovl:slurmtest-a", "contain")
    assert_view(job, None)
    assert f"ovlrun: job runs unlocalised: slurmd {slurm.version_text}" in job.stdout, job.stdout
    assert "PrologFlags=Contain,RunInJob" in job.stdout
    assert_clean(slurm, job)
