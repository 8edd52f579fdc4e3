"""Fixtures for the Slurm 24.11 tests: Debian trixie's slurmd in a cached root.

``cluster`` (session) builds the world and runs ci/slurm2411-setup.sh once;
ci/slurm2411-stop.sh runs at the end of the session.  ``slurm`` is parametrised over the
two ways job_container/tmpfs can hand ovlrun the job's namespace on 24.11 (RunInJob,
CloneNSScript); switching re-runs the setup script, which restarts the daemons with the
other configuration.  Tests skip only when not root; a Slurm that does not start is an
error, not a skip.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .world import NODE, NSDIR, REPO, ROOT, STATE_IN, USER, World, ensure_user, make_world, parse, poll

SETUP_TIMEOUT = 900  # a cold debootstrap + apt-get install on a fresh machine
JOB_TIMEOUT = 90
MODES = ("runinjob", "clonens")


def in_root(*cmd: str) -> list[str]:
    """A command line running ``cmd`` in the root's mount and UTS namespaces."""
    return ["nsenter", f"--mount={NSDIR / 'mnt'}", f"--uts={NSDIR / 'uts'}", "--", *cmd]


ROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


@dataclass
class Submitted:
    name: str
    job_id: str


@dataclass
class Job:
    job_id: str
    returncode: int
    out: dict[str, str]  # key=value lines the job wrote
    stdout: str  # the job's Slurm output file (-o)
    state: str  # Slurm's final JobState


@dataclass
class Cluster:
    world: World
    started: dict[str, float]  # mode -> seconds the setup script took


class Slurm:
    def __init__(self, world: World, mode: str) -> None:
        self.world = world
        self.mode = mode

    def sbatch(self, comment: str | None, name: str, *, rendezvous: Path | None = None,
               tag: str = "") -> Submitted:
        """Submit ``job.sh`` as the test user; returns at once (see :meth:`finish`)."""
        name = f"{self.mode}-{name}"
        (self.world.out / f"{name}.kv").unlink(missing_ok=True)
        args = ["sbatch", "--parsable", "-n1", "-c1", "-J", name,
                "-o", str(self.world.out / f"{name}.slurm-out"),
                f"--export=ALL,{','.join(f'{k}={v}' for k, v in self.world.job_env().items())}"]
        if comment is not None:
            args.append(f"--comment={comment}")
        args += [str(self.world.base / "job.sh"), str(self.world.out / f"{name}.kv"), str(rendezvous or ""), tag]
        r = subprocess.run(in_root("runuser", "-u", USER, "--", *args), capture_output=True, text=True,
                           cwd=self.world.out, env=ROOT_ENV, timeout=60)
        assert r.returncode == 0, f"sbatch {name}: {r.stderr}"
        return Submitted(name, r.stdout.strip().split(";")[0])

    def finish(self, sub: Submitted) -> Job:
        """Wait for the job to end by polling its state (``sbatch --wait`` polls at 2, 4, 8 s...)."""
        fields: dict[str, str] = {}

        def ended() -> bool:
            text = self.run_cmd("scontrol", "-o", "show", "job", sub.job_id)
            fields.update(tok.partition("=")[::2] for tok in text.split() if "=" in tok)
            state = fields.get("JobState", "")
            assert not (state == "PENDING" and "held" in fields.get("Reason", "")), \
                f"job {sub.name} cannot start: {text}"
            return state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")

        poll(f"job {sub.name} ({sub.job_id}) to end", ended, timeout=JOB_TIMEOUT, interval=0.2)
        code = int(fields.get("ExitCode", "1:0").split(":")[0])
        out_file = self.world.out / f"{sub.name}.kv"
        slurm_out = self.world.out / f"{sub.name}.slurm-out"
        return Job(sub.job_id, code if fields["JobState"] == "COMPLETED" else code or 1,
                   parse(out_file.read_text()) if out_file.exists() else {},
                   slurm_out.read_text() if slurm_out.exists() else "", fields["JobState"])

    def run(self, comment: str | None, name: str) -> Job:
        return self.finish(self.sbatch(comment, name))

    def run_cmd(self, *cmd: str) -> str:
        return subprocess.run(in_root(*cmd), capture_output=True, text=True, env=ROOT_ENV).stdout

    def squeue(self) -> str:
        return self.run_cmd("squeue", "-h")

    def node_state(self) -> str:
        return self.run_cmd("sinfo", "-h", "-n", NODE, "-o", "%T").strip()

    def record_path(self, job_id: str) -> Path:
        """The hooks run in the root: their job records are in its /run/ovlrun/jobs."""
        return ROOT / "run" / "ovlrun" / "jobs" / f"{job_id}.json"

    def record(self, job_id: str) -> dict[str, object] | None:
        path = self.record_path(job_id)
        return json.loads(path.read_text()) if path.exists() else None

    def wait_job_gone(self, job_id: str) -> None:
        """Wait until the Epilog is done with ``job_id`` (its record is removed last)."""
        poll(f"epilog of job {job_id}",
             lambda: not self.record_path(job_id).exists()
             and "JobState=COMPLETING" not in self.run_cmd("scontrol", "-o", "show", "job", job_id),
             timeout=30)

    def hook_log(self) -> str:
        path = Path(self.world.env()["OVLRUN_SLURM_LOG"])
        return path.read_text() if path.exists() else ""

    def slurmd_mountinfo(self) -> Path:
        """mountinfo of the root's namespace (slurmd's), where job_container/tmpfs mounts."""
        pid = (NSDIR / "pids" / "slurmd.pid").read_text().strip()
        return Path(f"/proc/{pid}/mountinfo")


def _setup(mode: str) -> float:
    env = dict(os.environ, OVLRUN_SLURM2411_MODE=mode)
    started = time.monotonic()
    subprocess.run(["bash", str(REPO / "ci" / "slurm2411-setup.sh")], env=env, check=True,
                   timeout=SETUP_TIMEOUT)
    took = time.monotonic() - started
    print(f"slurm 24.11 ({mode}) ready in {took:.1f}s", file=sys.stderr)
    return took


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("Slurm tests need root (they run slurmd and mount overlays)")
    world = make_world()
    # The root (and its namespace) come first: the world is bound into it.
    started = {MODES[0]: _setup(MODES[0])}
    ensure_user()
    state = ROOT / str(STATE_IN).lstrip("/")
    # The generated hooks source this: it points them at the test profiles and store.
    (state / "hook.env").write_text("".join(f"{k}={shlex.quote(v)}; export {k}\n"
                                            for k, v in world.env().items()))
    try:
        yield Cluster(world, started)
    finally:
        subprocess.run(["bash", str(REPO / "ci" / "slurm2411-stop.sh")], timeout=120)
        (state / "hook.env").unlink(missing_ok=True)


@pytest.fixture(scope="session", params=MODES)
def slurm(request: pytest.FixtureRequest, cluster: Cluster) -> Slurm:
    mode: str = request.param
    if mode not in cluster.started:
        cluster.started[mode] = _setup(mode)
    else:
        _setup(mode)  # idempotent: only waits for the node when nothing changed
    return Slurm(cluster.world, mode)
