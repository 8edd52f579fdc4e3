"""Fixtures for the Slurm tests: a real single-node Slurm 22.05, started once.

``slurm`` runs ci/slurm-setup.sh (installs the packages if missing, starts munged,
slurmctld and slurmd with ovlrun's Prolog/Epilog/TaskProlog) and ci/slurm-stop.sh at
the end of the session.  Tests skip only when not root (Slurm daemons, mounts and
namespaces need it); any other failure to start Slurm is an error, not a skip.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .harness import REPO, STATE, USER, SlurmWorld, make_world, parse, poll

SETUP_TIMEOUT = 600  # includes apt-get install on a fresh machine
JOB_TIMEOUT = 90


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("Slurm tests need root (they run slurmd and mount overlays)")


@pytest.fixture(scope="session")
def slurm_world() -> SlurmWorld:
    _require_root()
    return make_world()


@dataclass
class Job:
    job_id: str
    returncode: int
    out: dict[str, str]  # key=value lines the job wrote
    stdout: str  # the job's Slurm output file (-o)


class Slurm:
    def __init__(self, world: SlurmWorld, node: str) -> None:
        self.world = world
        self.node = node

    def sbatch(self, comment: str | None, name: str, *, rendezvous: Path | None = None,
               tag: str = "") -> subprocess.Popen[str]:
        """Submit ``job.sh`` as the test user with ``--wait``; returns the running sbatch."""
        out = self.world.out / f"{name}.kv"
        out.unlink(missing_ok=True)
        args = ["sbatch", "--wait", "--parsable", "-n1", "-c1", "-J", name,
                "-o", str(self.world.out / f"{name}.slurm-out"),
                f"--export=ALL,{','.join(f'{k}={v}' for k, v in self.world.job_env().items())}"]
        if comment is not None:
            args.append(f"--comment={comment}")
        args += [str(self.world.base / "job.sh"), str(out), str(rendezvous or ""), tag]
        cmd = ["timeout", str(JOB_TIMEOUT), "runuser", "-u", USER, "--", *args]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=self.world.out)

    def finish(self, proc: subprocess.Popen[str], name: str) -> Job:
        stdout, stderr = proc.communicate(timeout=JOB_TIMEOUT + 10)
        job_id = stdout.strip().split(";")[0].splitlines()[0] if stdout.strip() else "?"
        assert proc.returncode != 124, f"job {name} timed out: {stderr}"
        out_file = self.world.out / f"{name}.kv"
        slurm_out = self.world.out / f"{name}.slurm-out"
        return Job(job_id, proc.returncode,
                   parse(out_file.read_text()) if out_file.exists() else {},
                   slurm_out.read_text() if slurm_out.exists() else "")

    def run(self, comment: str | None, name: str) -> Job:
        return self.finish(self.sbatch(comment, name), name)

    def node_state(self) -> str:
        return subprocess.run(["sinfo", "-h", "-n", self.node, "-o", "%T"], capture_output=True,
                              text=True, check=True).stdout.strip()

    def wait_job_gone(self, job_id: str) -> None:
        """Wait until the Epilog is done with ``job_id`` (its record is removed last)."""
        from ovlrun.hooks.records import JobRecord

        poll(f"epilog of job {job_id}", lambda: not JobRecord.path_for(job_id).exists()
             and "JobState=COMPLETING" not in _scontrol_job(job_id), timeout=30)

    def hook_log(self) -> str:
        path = Path(self.world.env()["OVLRUN_SLURM_LOG"])
        return path.read_text() if path.exists() else ""


def _scontrol_job(job_id: str) -> str:
    return subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                          text=True).stdout


@pytest.fixture(scope="session")
def slurm(slurm_world: SlurmWorld) -> Iterator[Slurm]:
    _require_root()
    STATE.mkdir(parents=True, exist_ok=True)
    # The generated hooks source this: it points them at the test profiles and store.
    (STATE / "hook.env").write_text("".join(f"{k}={shlex.quote(v)}; export {k}\n"
                                            for k, v in slurm_world.env().items()))
    env = dict(os.environ, OVLRUN_SLURM_PYTHON=sys.executable, OVLRUN_SLURM_STATE=str(STATE))
    started = time.monotonic()
    subprocess.run(["bash", str(REPO / "ci" / "slurm-setup.sh")], env=env, check=True,
                   timeout=SETUP_TIMEOUT)
    print(f"slurm started in {time.monotonic() - started:.1f}s", file=sys.stderr)
    node = os.uname().nodename.split(".")[0]
    try:
        yield Slurm(slurm_world, node)
    finally:
        subprocess.run(["bash", str(REPO / "ci" / "slurm-stop.sh")], env=env, timeout=120)
        (STATE / "hook.env").unlink(missing_ok=True)
