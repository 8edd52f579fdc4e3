"""24.11 with the 22.05 configuration (``PrologFlags=Contain``, no RunInJob, no CloneNSScript).

Since Slurm 23.02.5 job_container/tmpfs fails a job whose directory exists, so the
Prolog's 22.05 way (prepare the job directory and namespace before the plugin) would get
every job that asks for a profile requeued and held.  The Prolog recognises the slurmd
and lets the job run unlocalised, saying what to configure.  It switches the daemons to
this configuration (the other tests switch them back).
"""

from __future__ import annotations

from .conftest import Cluster, Slurm, _setup
from .test_slurm2411_jobs import assert_clean, assert_view


def test_contain_only_runs_unlocalised_and_says_what_to_configure(cluster: Cluster) -> None:
    _setup("contain")
    slurm = Slurm(cluster.world, "contain")
    job = slurm.run("ovl:slurmtest-a", "contain")
    assert_view(job, None)
    assert "ovlrun: job runs unlocalised: slurmd 24.11" in job.stdout, (job.stdout, slurm.squeue())
    assert "PrologFlags=Contain,RunInJob" in job.stdout
    assert_clean(slurm, job)
