"""The hooks' other modes, without slurmd: the namespace is made the way Slurm makes it.

* Slurm 24.05+ ``PrologFlags=RunInJob``: the plugin's namespace is pinned at
  ``<BasePath>/<node>/<jobid>/.ns`` before the Prolog runs; the Prolog joins it.
* Slurm 24.11+ ``CloneNSScript``: the Prolog only records the request; the script gets
  the namespace in ``$SLURM_NS``.
* No job_container plugin: the Prolog pins a namespace that ``ovlrun enter`` joins.

Namespaces are created like job_container/tmpfs does (a forked helper unshares, its
``/proc/PID/ns/mnt`` is bound on ``.ns`` inside a private bind of the job directory)
and inspected with nsenter(1) as the test user.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ovlrun.hooks.records import JobRecord, rundir
from ovlrun.hooks.slurm import requested_profile
from ovlrun.linux import namespaces

from .harness import BASE, REPO, UID, USER, SlurmWorld, mounts_under, parse

NODE = os.uname().nodename.split(".")[0]  # the host's own node: records in the run directory itself


def hook(name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ovlrun", "slurm", name], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def probe_in(ns: Path, world: SlurmWorld) -> dict[str, str]:
    """What the test user sees inside the namespace pinned at ``ns``."""
    r = subprocess.run(["nsenter", f"--mount={ns}", "runuser", "-u", USER, "--",
                        "bash", str(world.base / "probe.sh"), "x"],
                       env={**os.environ, **world.job_env()}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return parse(r.stdout)


def assert_localised(view: dict[str, str], localised: str) -> None:
    assert view["x.uid"] == str(UID)
    for v in ("1.0", "2.0"):
        assert view[f"x.{v}.added"] == ("hidden" if v == localised else "visible"), view


@pytest.fixture
def job_id() -> Iterator[str]:
    # Far above what the test slurmctld hands out, distinct per test process.
    jid = str(990_000_000 + os.getpid() % 1_000_000)
    yield jid
    JobRecord.remove(jid)


@pytest.fixture
def jc(slurm_world: SlurmWorld, tmp_path: Path) -> tuple[Path, Path]:
    """A job_container.conf (BasePath under BASE, Debian's per-node layout)."""
    base = BASE / "hooks-jc"
    (base / NODE).mkdir(parents=True, exist_ok=True)
    conf = tmp_path / "job_container.conf"
    conf.write_text(f"AutoBasePath=true\nBasePath={base}\n")
    return conf, base


def slurm_env(world: SlurmWorld, job_id: str, comment: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env.update(world.env(), SLURM_JOB_ID=job_id, SLURM_JOB_UID=str(UID), SLURM_JOB_GID=str(UID),
               SLURM_JOB_USER=USER, SLURM_JOB_COMMENT=comment, SLURMD_NODENAME=NODE, **extra)
    return env


def pin_like_slurm(job_dir: Path) -> Path:
    """What job_container/tmpfs does before the Prolog (RunInJob) or CloneNSScript."""
    job_dir.mkdir(mode=0o700)
    namespaces.make_private_bind(job_dir)
    holder = job_dir / ".ns"
    holder.touch(mode=0o600)
    namespaces.create_pinned_namespace(holder, lambda: [])
    return holder


def release(job_dir: Path) -> None:
    """The plugin's own cleanup of its namespace."""
    namespaces.unpin(job_dir / ".ns")
    namespaces.remove_tree(job_dir)


def test_comment_parsing() -> None:
    assert requested_profile("") == (None, None)
    assert requested_profile("just a note") == (None, None)
    assert requested_profile("ovl:prod") == ("prod", None)
    assert requested_profile("run 7, ovl:prod-2.1 more") == ("prod-2.1", None)
    for bad in ("ovl:/etc/x.toml", "ovl:../x", "ovl:x.toml"):
        name, problem = requested_profile(bad)
        assert name is None and problem and "not a path" in problem
    assert requested_profile("ovl:")[1] == "empty profile name in job comment 'ovl:'"


def test_run_in_job_prolog_joins_the_plugins_namespace(slurm_world: SlurmWorld, jc: tuple[Path, Path],
                                                        job_id: str) -> None:
    conf, base = jc
    job_dir = base / NODE / job_id
    holder = pin_like_slurm(job_dir)
    try:
        r = hook("prolog", slurm_env(slurm_world, job_id, "ovl:slurmtest-a", OVLRUN_SLURM_JC_CONF=str(conf)))
        assert r.returncode == 0, r.stderr
        assert "(join): 1 localised path(s)" in r.stderr
        record = JobRecord.load(job_id)
        assert record and record.ns_path == str(holder) and not record.ns_owned
        assert_localised(probe_in(holder, slurm_world), "1.0")
        # The epilog leaves the plugin's namespace to the plugin.
        assert hook("epilog", slurm_env(slurm_world, job_id, "")).returncode == 0
        assert namespaces.is_ns_holder(holder)
        assert JobRecord.load(job_id) is None
    finally:
        release(job_dir)
    assert mounts_under(base) == [] and mounts_under(slurm_world.sw) == []


def test_clone_ns_script_mounts_into_slurm_ns(slurm_world: SlurmWorld, jc: tuple[Path, Path], job_id: str,
                                              tmp_path: Path) -> None:
    conf, base = jc
    # On the BasePath line: Slurm 24.11 ignores CloneNSScript on a line of its own.
    conf.write_text(conf.read_text().replace(f"BasePath={base}", f"BasePath={base} CloneNSScript=/usr/sbin/ovlrun-clone-ns"))
    env = slurm_env(slurm_world, job_id, "ovl:slurmtest-b", OVLRUN_SLURM_JC_CONF=str(conf))
    r = hook("prolog", env)
    assert r.returncode == 0, r.stderr
    record = JobRecord.load(job_id)
    assert record and record.profile == "slurmtest-b" and record.ns_path is None
    job_dir = base / NODE / job_id
    assert not job_dir.exists(), "with CloneNSScript the Prolog must leave the namespace to Slurm"
    holder = pin_like_slurm(job_dir)
    try:
        # CloneNSScript's documented environment: SLURM_JOB_ID and SLURM_NS (no comment).
        clone_env = {k: v for k, v in env.items() if k != "SLURM_JOB_COMMENT"}
        r = hook("clone-ns", {**clone_env, "SLURM_NS": str(holder)})
        assert r.returncode == 0, r.stderr
        assert "1 localised path(s)" in r.stderr
        assert_localised(probe_in(holder, slurm_world), "2.0")
    finally:
        release(job_dir)
    assert hook("epilog", env).returncode == 0
    assert JobRecord.load(job_id) is None


def _enter(job_id: str, sudo_uid: int, world: SlurmWorld) -> subprocess.CompletedProcess[str]:
    # As sudo would run it: no PYTHON*/LD_* variables (ovlrun refuses those under sudo).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LD_", "OVLRUN_", "SLURM"))}
    env.update(world.job_env(), SUDO_UID=str(sudo_uid), SUDO_GID=str(sudo_uid), SUDO_USER=USER)
    return subprocess.run([sys.executable, "-m", "ovlrun", "enter", job_id, "--",
                           "bash", str(world.base / "probe.sh"), "x"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_enter_without_job_container(slurm_world: SlurmWorld, job_id: str) -> None:
    env = slurm_env(slurm_world, job_id, "ovl:slurmtest-a", OVLRUN_SLURM_JC_CONF="/nonexistent")
    r = hook("prolog", env)
    assert r.returncode == 0, r.stderr
    record = JobRecord.load(job_id)
    assert record and record.ns_owned and record.ns_path
    holder = Path(record.ns_path)
    assert namespaces.is_ns_holder(holder)
    try:
        r = _enter(job_id, UID, slurm_world)
        assert r.returncode == 0, r.stderr
        view = parse(r.stdout)
        assert_localised(view, "1.0")
        assert view["x.overlays"] == "1"
        # Someone else's job: refused, nothing run.
        r = _enter(job_id, UID + 1, slurm_world)
        assert r.returncode == 125 and f"belongs to {USER}" in r.stderr, r
        assert r.stdout == ""
    finally:
        assert hook("epilog", env).returncode == 0
    assert not holder.exists() and not holder.parent.exists()
    assert JobRecord.load(job_id) is None
    assert mounts_under(rundir()) == []
    r = _enter(job_id, UID, slurm_world)
    assert r.returncode == 125 and "no ovlrun namespace" in r.stderr


def test_prolog_failure_modes_exit_zero(slurm_world: SlurmWorld, jc: tuple[Path, Path], job_id: str) -> None:
    conf, base = jc
    for comment, reason in (("ovl:nope", "no profile named 'nope'"),
                            ("ovl:../../etc/x", "not a path")):
        env = slurm_env(slurm_world, job_id, comment, OVLRUN_SLURM_JC_CONF=str(conf))
        r = hook("prolog", env)
        assert r.returncode == 0, r.stderr
        assert reason in r.stderr
        assert not (base / NODE / job_id).exists()
        record = JobRecord.load(job_id)
        assert record and record.messages and reason in record.messages[0]
        assert reason in JobRecord.messages_path(job_id).read_text()
        assert hook("epilog", env).returncode == 0
    # Not run by slurmd at all: still exit 0, and say so.
    r = hook("prolog", {"PATH": os.environ["PATH"], **slurm_world.env()})
    assert r.returncode == 0 and "SLURM_JOB_ID" in r.stderr


def test_prolog_with_the_tree_not_mounted_says_the_job_runs_unlocalised(slurm_world: SlurmWorld, jc: tuple[Path, Path],
                                                                         job_id: str) -> None:
    conf, _ = jc
    hidden = slurm_world.sw.with_name("sw.hidden")
    slurm_world.sw.rename(hidden)
    slurm_world.sw.mkdir()  # an empty mount point: the NFS tree is not mounted
    try:
        env = slurm_env(slurm_world, job_id, "ovl:slurmtest-a", OVLRUN_SLURM_JC_CONF=str(conf))
        r = hook("prolog", env)
        assert r.returncode == 0, r.stderr
        record = JobRecord.load(job_id)
        assert record is not None and record.state == "unlocalised"
        (message,) = record.messages
        assert message.startswith("job runs unlocalised") and f"shared tree root {slurm_world.sw} is empty" in message
        assert "refusing" not in message  # it is not refused: a Prolog cannot stop it without draining the node
        assert hook("epilog", env).returncode == 0
    finally:
        slurm_world.sw.rmdir()
        hidden.rename(slurm_world.sw)


def test_first_job_on_a_fresh_node_creates_the_run_directory(slurm_world: SlurmWorld, job_id: str) -> None:
    rundir = BASE / "fresh-run" / "jobs"
    if rundir.exists():
        namespaces.remove_tree(rundir.parent)
    env = slurm_env(slurm_world, job_id, "ovl:slurmtest-a", OVLRUN_SLURM_JC_CONF="/nonexistent",
                    OVLRUN_JOB_RUNDIR=str(rundir))
    r = hook("prolog", env)
    assert r.returncode == 0, r.stderr
    assert "(create): 1 localised path(s)" in r.stderr
    assert namespaces.is_ns_holder(rundir / job_id / ".ns")
    assert hook("epilog", env).returncode == 0
    assert not (rundir / job_id).exists() and mounts_under(rundir) == []
    assert not (rundir / f"{job_id}.json").exists()


def test_one_job_on_two_slurmd_nodes_of_one_host_keeps_two_records(slurm_world: SlurmWorld, job_id: str) -> None:
    """Slurm's multiple-slurmd: two nodes on one host, one job spanning both.  Each node's
    hooks keep their own record and namespace; enter refuses to guess between them."""
    envs = {node: {**slurm_env(slurm_world, job_id, "ovl:slurmtest-a", OVLRUN_SLURM_JC_CONF="/nonexistent"),
                   "SLURMD_NODENAME": node} for node in ("vnode-a", "vnode-b")}
    try:
        for env in envs.values():
            r = hook("prolog", env)
            assert r.returncode == 0 and "(create): 1 localised path(s)" in r.stderr, r.stderr
        records = {node: JobRecord.load(job_id, node) for node in envs}
        assert all(r is not None and r.node == node and r.ns_path for node, r in records.items())
        assert len({r.ns_path for r in records.values() if r}) == 2
        r = _enter(job_id, UID, slurm_world)
        assert r.returncode == 125 and "runs on several nodes of this host (vnode-a, vnode-b)" in r.stderr, r
        assert hook("epilog", envs["vnode-a"]).returncode == 0
        assert JobRecord.load(job_id, "vnode-a") is None and JobRecord.load(job_id, "vnode-b") is not None
        r = _enter(job_id, UID, slurm_world)  # one node left: no ambiguity
        assert r.returncode == 0, r.stderr
        assert_localised(parse(r.stdout), "1.0")
    finally:
        for env in envs.values():
            assert hook("epilog", env).returncode == 0
    assert mounts_under(rundir()) == []
