"""The Slurm instances the tests run jobs on, and one instance in one mode as the tests see it.

Two instances, each a single node started by a ci/ script that shares ci/slurm-lib.sh:

* ``host``: the machine's own apt Slurm (Debian 12: 22.05, Debian 13: 24.11),
  ci/slurm-setup.sh, state in OVLRUN_SLURM_STATE, ports from OVLRUN_SLURM_PORT_BASE.
* ``trixie``: Debian 13's 24.11 in a debootstrapped root that is the root of a private
  mount+UTS namespace, ci/slurm2411-setup.sh.  Commands run there through nsenter.

Modes (OVLRUN_SLURM_MODE of the ci scripts: how job_container/tmpfs hands ovlrun the
job's namespace; docs/slurm.md): ``contain`` (PrologFlags=Contain: before 23.02.5 the
Prolog creates the job's namespace; later slurmds refuse that and the job runs
unlocalised), ``runinjob`` (24.05+), ``clonens`` (24.11+).  A mode a slurmd does not have
is skipped with the setup script's reason; which modes localise is decided by the
version found, never assumed from the instance.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..conftest import REPO, TEST_USER
from .world import WORLDS, World, overlays, parse, poll

SETUP_TIMEOUT = 900  # a cold debootstrap + apt-get install on a fresh machine
JOB_TIMEOUT = 90
EXIT_UNSUPPORTED = 77  # ci/slurm-lib.sh: this slurmd does not have the requested mode
MODES = ("contain", "runinjob", "clonens")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Since 23.02.5 job_container/tmpfs fails a job whose directory exists (SchedMD bug 16164),
# so PrologFlags=Contain alone no longer lets the Prolog prepare the job's namespace.
CREATE_REFUSED_FROM = (23, 2, 5)
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def parse_version(text: str) -> tuple[int, int, int]:
    """``slurmd -V`` output ("slurm-wlm 22.05.8", "slurm 24.11.5") as (22, 5, 8)."""
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    assert m, f"not a Slurm version: {text!r}"
    return (int(m[1]), int(m[2]), int(m[3]))


def localises(version: tuple[int, int, int], mode: str) -> bool:
    """Whether jobs asking for a profile get it with this slurmd in this mode."""
    return version < CREATE_REFUSED_FROM if mode == "contain" else True


@dataclass(frozen=True)
class Instance:
    name: str
    setup: str  # scripts in ci/
    stop: str
    state: Path  # the state directory as the instance sees it (slurm.conf in etc/)
    node: str
    python: str  # the instance's interpreter that runs ovlrun (hooks, enter, status)
    root: Path | None = None  # host path of the instance's root (None: the host itself)
    nsdir: Path | None = None  # where the instance's namespaces are pinned

    def host_path(self, path: Path | str) -> Path:
        """``path`` of the instance as seen from the host."""
        return self.root / str(path).lstrip("/") if self.root else Path(path)

    def pids(self) -> Path:
        return self.nsdir / "pids" if self.nsdir else self.host_path(self.state / "run")

    def cmd(self, *args: str) -> list[str]:
        """A command line running ``args`` in the instance's namespaces."""
        if self.nsdir is None:
            return list(args)
        return ["nsenter", f"--mount={self.nsdir / 'mnt'}", f"--uts={self.nsdir / 'uts'}", "--", *args]

    def env(self) -> dict[str, str]:
        return {"PATH": PATH, "LANG": "C.UTF-8", "SLURM_CONF": str(self.state / "etc" / "slurm.conf")}

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.cmd(*args), env=self.env(), capture_output=True, text=True, timeout=timeout)

    def start(self, mode: str) -> float:
        """Run the setup script in ``mode`` (idempotent); skip if this Slurm has no such
        mode.  Returns the seconds it took."""
        env = dict(os.environ, OVLRUN_SLURM_MODE=mode, OVLRUN_SLURM_PYTHON=sys.executable,
                   OVLRUN_SLURM_TEST_DIR=str(WORLDS))
        started = time.monotonic()
        r = subprocess.run(["bash", str(REPO / "ci" / self.setup)], env=env, capture_output=True,
                           text=True, timeout=SETUP_TIMEOUT)
        took = time.monotonic() - started
        print(r.stderr, file=sys.stderr, end="")
        if r.returncode == EXIT_UNSUPPORTED:
            pytest.skip(f"{self.name} Slurm: {r.stderr.strip().splitlines()[-1]}")
        assert r.returncode == 0, f"ci/{self.setup} failed ({r.returncode}): {r.stderr[-3000:]}"
        print(f"slurm {self.name} ({mode}) ready in {took:.1f}s", file=sys.stderr)
        return took

    def stop_all(self) -> None:
        subprocess.run(["bash", str(REPO / "ci" / self.stop)], timeout=120)

    def version(self) -> tuple[int, int, int]:
        r = self.run("slurmd", "-V")
        assert r.returncode == 0, r.stderr
        return parse_version(r.stdout)

    def slurmd_mountinfo(self) -> str:
        """The mount table of slurmd's namespace, where job_container/tmpfs mounts."""
        return f"/proc/{(self.pids() / 'slurmd.pid').read_text().strip()}/mountinfo"

    def record_path(self, job_id: str) -> Path:
        """The hooks' job record (/run/ovlrun/jobs of the instance: the hooks run there)."""
        return self.host_path("/run/ovlrun/jobs") / f"{job_id}.json"

    def enter(self, world: World, job_id: str, sudo_uid: int, *cmd: str) -> subprocess.CompletedProcess[str]:
        """``ovlrun enter`` as sudo would run it for a user: no PYTHON*/LD_*/OVLRUN_*
        settings (ovlrun refuses those under sudo), this checkout from the working directory."""
        env = [f"SUDO_UID={sudo_uid}", f"SUDO_GID={sudo_uid}", f"SUDO_USER={TEST_USER}",
               *(f"{k}={v}" for k, v in world.job_env(self.python).items())]
        return self.run("sh", "-c", 'cd "$0" && exec "$@"', str(REPO), "env", *env,
                        self.python, "-m", "ovlrun", "enter", job_id, "--", *cmd)


HOST = Instance("host", "slurm-setup.sh", "slurm-stop.sh",
                state=Path(os.environ.get("OVLRUN_SLURM_STATE", "/var/spool/ovlrun-slurm")),
                node=os.uname().nodename.split(".")[0], python=sys.executable)
TRIXIE = Instance("trixie", "slurm2411-setup.sh", "slurm2411-stop.sh",
                  state=Path("/var/spool/ovlrun-slurm2411"), node="ovl2411", python="/usr/bin/python3",
                  root=Path(os.environ.get("OVLRUN_TRIXIE_ROOT", "/var/lib/ovlrun-ci/trixie")),
                  nsdir=Path(os.environ.get("OVLRUN_TRIXIE_NS", "/var/lib/ovlrun-ci/ns2411")))
INSTANCES = {i.name: i for i in (HOST, TRIXIE)}


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
class Slurm:
    """One instance, running in one mode, with the session's world."""

    instance: Instance
    mode: str
    version: tuple[int, int, int]
    world: World
    log: Path  # the hooks' log of this instance
    overlays_at_start: list[str]  # overlays in slurmd's namespace before any job

    @property
    def label(self) -> str:
        return f"{self.instance.name}-{self.mode}"

    @property
    def version_text(self) -> str:
        major, minor, micro = self.version
        return f"{major}.{minor:02d}.{micro}"  # as Slurm writes it: 22.05.8

    def localises(self) -> bool:
        return localises(self.version, self.mode)

    def shared_dir(self, name: str) -> Path:
        """A new empty directory of this instance and mode, that jobs and the test share."""
        path = self.world.out / f"{name}-{self.label}"
        path.mkdir()
        path.chmod(0o777)
        return path

    def sbatch(self, comment: str | None, name: str, *, script: str = "job.sh", args: tuple[str, ...] | None = None,
               rendezvous: Path | None = None, tag: str = "") -> Submitted:
        """Submit a script of the world as the test user; returns at once (see :meth:`finish`).
        ``job.sh`` gets its output file, ``rendezvous`` and ``tag``; others ``args``."""
        name = f"{self.label}-{name}"
        (self.world.out / f"{name}.kv").unlink(missing_ok=True)
        env = {"PYTHONPATH": str(REPO), **self.world.job_env(self.instance.python)}
        cmd = ["sbatch", "--parsable", "-n1", "-c1", "-J", name, "-D", str(self.world.out),
               "-o", str(self.world.out / f"{name}.slurm-out"),
               f"--export=ALL,{','.join(f'{k}={v}' for k, v in env.items())}"]
        if comment is not None:
            cmd.append(f"--comment={comment}")
        if args is None:
            args = (str(self.world.out / f"{name}.kv"), str(rendezvous or ""), tag)
        r = self.instance.run("runuser", "-u", TEST_USER, "--", *cmd, str(self.world.base / script), *args)
        assert r.returncode == 0, f"sbatch {name}: {r.stderr}"
        return Submitted(name, r.stdout.strip().split(";")[0])

    def finish(self, sub: Submitted) -> Job:
        """Wait for the job to end by polling its state (``sbatch --wait`` polls at 2, 4, 8 s...)."""
        fields: dict[str, str] = {}

        def ended() -> bool:
            text = self.instance.run("scontrol", "-o", "show", "job", sub.job_id).stdout
            fields.update(tok.partition("=")[::2] for tok in text.split() if "=" in tok)
            state = fields.get("JobState", "")
            assert not (state == "PENDING" and "held" in fields.get("Reason", "")), \
                f"job {sub.name} cannot start: {text}"
            return state in ENDED

        poll(f"job {sub.name} ({sub.job_id}) to end", ended, timeout=JOB_TIMEOUT, interval=0.2)
        code = int(fields.get("ExitCode", "1:0").split(":")[0])
        out_file = self.world.out / f"{sub.name}.kv"
        slurm_out = self.world.out / f"{sub.name}.slurm-out"
        return Job(sub.job_id, code if fields["JobState"] == "COMPLETED" else code or 1,
                   parse(out_file.read_text()) if out_file.exists() else {},
                   slurm_out.read_text() if slurm_out.exists() else "", fields["JobState"])

    def run(self, comment: str | None, name: str) -> Job:
        return self.finish(self.sbatch(comment, name))

    def node_state(self) -> str:
        return self.instance.run("sinfo", "-h", "-n", self.instance.node, "-o", "%T").stdout.strip()

    def wait_job_gone(self, job_id: str) -> None:
        """Wait until the Epilog is done with ``job_id`` (its record is removed last)."""
        poll(f"epilog of job {job_id}",
             lambda: not self.instance.record_path(job_id).exists()
             and "JobState=COMPLETING" not in self.instance.run("scontrol", "-o", "show", "job", job_id).stdout,
             timeout=30)

    def hook_log(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def overlays_in_slurmd_ns(self) -> list[str]:
        return overlays(self.instance.slurmd_mountinfo())
