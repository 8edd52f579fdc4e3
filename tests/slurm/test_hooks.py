"""The hooks' modes without slurmd: the namespace is made the way Slurm makes it.

* Slurm 24.05+ ``PrologFlags=RunInJob``: the plugin's namespace is pinned at
  ``<BasePath>/<node>/<jobid>/.ns`` before the Prolog runs; the Prolog joins it.
* Slurm 24.11+ ``CloneNSScript``: the Prolog only records the request; the script gets
  the namespace in ``$SLURM_NS``.
* No job_container plugin: the Prolog pins a namespace that ``ovlrun enter`` joins.

Namespaces are created like job_container/tmpfs does (a private bind of the job
directory, a forked helper's new namespace bound on ``.ns`` inside it: unshare(1)
--mount=FILE does exactly that) and inspected with nsenter(1) as the test user.  The
hooks run as the CLI (``python -m ovlrun slurm HOOK``); their job records are read as
the JSON files they are (docs/slurm.md, "Job records").
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import REPO, TEST_UID, TEST_USER
from .cluster import HOST
from .world import World, mounts_under, parse

NODE = HOST.node  # the host's own node: records in the run directory itself
RUNDIR = Path("/run/ovlrun/jobs")  # the hooks' default; `ovlrun enter` under sudo uses no other
NS_GET_NSTYPE = 0xB703  # <linux/nsfs.h>
CLONE_NEWNS = 0x00020000


def hook(name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ovlrun", "slurm", name], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def record(job_id: str, node: str | None = None, rundir: Path = RUNDIR) -> dict[str, Any] | None:
    """The hooks' record of ``job_id`` (of another slurmd node of this host: ``node``)."""
    path = (rundir / node if node else rundir) / f"{job_id}.json"
    return json.loads(path.read_text()) if path.exists() else None


def remove_record(job_id: str, node: str | None = None) -> None:
    for ext in ("json", "messages", "env"):
        ((RUNDIR / node if node else RUNDIR) / f"{job_id}.{ext}").unlink(missing_ok=True)


def is_mount_ns_holder(path: Path) -> bool:
    """True if ``path`` pins a mount namespace (a bind mount of a mount namespace file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNS
    except OSError:  # not an nsfs file (ENOTTY)
        return False
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Detach everything mounted at or below ``path`` (deepest first), then delete it."""
    for m in sorted(mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], check=True)
    assert mounts_under(path) == []
    shutil.rmtree(path)


def probe_in(ns: Path, world: World) -> dict[str, str]:
    """What the test user sees inside the namespace pinned at ``ns``."""
    r = subprocess.run(["nsenter", f"--mount={ns}", "runuser", "-u", TEST_USER, "--",
                        "bash", str(world.base / "probe.sh"), "x"],
                       env={**os.environ, **world.job_env(sys.executable)}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return parse(r.stdout)


def assert_localised(view: dict[str, str], localised: str) -> None:
    assert view["x.uid"] == str(TEST_UID)
    for v in ("1.0", "2.0"):
        assert view[f"x.{v}.added"] == ("hidden" if v == localised else "visible"), view


@pytest.fixture
def job_id() -> Iterator[str]:
    # Far above what the test slurmctlds hand out, distinct per test process.
    jid = str(990_000_000 + os.getpid() % 1_000_000)
    yield jid
    remove_record(jid)


@pytest.fixture
def jc(slurm_world: World, tmp_path: Path) -> tuple[Path, Path]:
    """A job_container.conf (BasePath in the world, Debian's per-node layout)."""
    base = slurm_world.base / "hooks-jc"
    (base / NODE).mkdir(parents=True, exist_ok=True)
    conf = tmp_path / "job_container.conf"
    conf.write_text(f"AutoBasePath=true\nBasePath={base}\n")
    return conf, base


def slurm_env(world: World, job_id: str, comment: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env.update(world.hook_env(world.base / "slurm-hooks.log"), SLURM_JOB_ID=job_id, SLURM_JOB_UID=str(TEST_UID),
               SLURM_JOB_GID=str(TEST_UID), SLURM_JOB_USER=TEST_USER, SLURM_JOB_COMMENT=comment,
               SLURMD_NODENAME=NODE, **extra)
    return env


def pin_like_slurm(job_dir: Path) -> Path:
    """What job_container/tmpfs does before the Prolog (RunInJob) or CloneNSScript."""
    job_dir.mkdir(mode=0o700)
    # The kernel binds a namespace file only on a mount that does not propagate.
    subprocess.run(["mount", "--bind", str(job_dir), str(job_dir)], check=True)
    subprocess.run(["mount", "--make-rprivate", str(job_dir)], check=True)
    holder = job_dir / ".ns"
    holder.touch(mode=0o600)
    subprocess.run(["unshare", f"--mount={holder}", "--propagation", "slave", "true"], check=True)
    assert is_mount_ns_holder(holder)
    return holder


def release(job_dir: Path) -> None:
    """The plugin's own cleanup of its namespace."""
    remove_tree(job_dir)


def test_comment_parsing(slurm_world: World, job_id: str) -> None:
    """The request is the first word of the comment that starts with ``ovl:``; a name, never
    a path.  Seen in the record: the profile asked for (None: no usable name), the messages."""
    def request(comment: str) -> tuple[str | None, list[str]] | None:
        remove_record(job_id)
        r = hook("prolog", slurm_env(slurm_world, job_id, comment, OVLRUN_SLURM_JC_CONF="/nonexistent"))
        assert r.returncode == 0, r.stderr
        rec = record(job_id)
        return None if rec is None else (rec["profile"], rec["messages"])

    assert request("") is None  # asks for nothing: no record at all
    assert request("just a note") is None
    for comment, name in (("ovl:prod", "prod"), ("run 7, ovl:prod-2.1 more", "prod-2.1")):
        got = request(comment)  # a valid name: looked up (and not found here)
        assert got and got[0] == name and len(got[1]) == 1, got
        assert got[1][0].startswith(f"job runs unlocalised: no profile named {name!r}"), got
    for bad in ("ovl:/etc/x.toml", "ovl:../x", "ovl:x.toml"):
        got = request(bad)
        assert got and got[0] is None and len(got[1]) == 1 and "not a path" in got[1][0], (bad, got)
    assert request("ovl:") == (None, ["job runs unlocalised: empty profile name in job comment 'ovl:'"])


def test_run_in_job_prolog_joins_the_plugins_namespace(slurm_world: World, jc: tuple[Path, Path],
                                                        job_id: str) -> None:
    conf, base = jc
    job_dir = base / NODE / job_id
    holder = pin_like_slurm(job_dir)
    try:
        r = hook("prolog", slurm_env(slurm_world, job_id, "ovl:slurmtest-a", OVLRUN_SLURM_JC_CONF=str(conf)))
        assert r.returncode == 0, r.stderr
        assert "(join): 1 localised path(s)" in r.stderr
        rec = record(job_id)
        assert rec and rec["ns_path"] == str(holder) and not rec["ns_owned"]
        assert_localised(probe_in(holder, slurm_world), "1.0")
        # The epilog leaves the plugin's namespace to the plugin.
        assert hook("epilog", slurm_env(slurm_world, job_id, "")).returncode == 0
        assert is_mount_ns_holder(holder)
        assert record(job_id) is None
    finally:
        release(job_dir)
    assert mounts_under(base) == [] and mounts_under(slurm_world.sw) == []


def test_clone_ns_script_mounts_into_slurm_ns(slurm_world: World, jc: tuple[Path, Path], job_id: str) -> None:
    conf, base = jc
    # On the BasePath line: Slurm 24.11 ignores CloneNSScript on a line of its own.
    conf.write_text(conf.read_text().replace(f"BasePath={base}",
                                             f"BasePath={base} CloneNSScript=/usr/sbin/ovlrun-clone-ns"))
    env = slurm_env(slurm_world, job_id, "ovl:slurmtest-b", OVLRUN_SLURM_JC_CONF=str(conf))
    r = hook("prolog", env)
    assert r.returncode == 0, r.stderr
    rec = record(job_id)
    assert rec and rec["profile"] == "slurmtest-b" and rec["ns_path"] is None
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
    assert record(job_id) is None


def test_enter_without_job_container(slurm_world: World, job_id: str) -> None:
    env = slurm_env(slurm_world, job_id, "ovl:slurmtest-a", OVLRUN_SLURM_JC_CONF="/nonexistent")
    r = hook("prolog", env)
    assert r.returncode == 0, r.stderr
    rec = record(job_id)
    assert rec and rec["ns_owned"] and rec["ns_path"]
    holder = Path(rec["ns_path"])
    assert is_mount_ns_holder(holder)
    probe = ("bash", str(slurm_world.base / "probe.sh"), "x")
    try:
        r = HOST.enter(slurm_world, job_id, TEST_UID, *probe)
        assert r.returncode == 0, r.stderr
        view = parse(r.stdout)
        assert_localised(view, "1.0")
        assert view["x.overlays"] == "1"
        # Someone else's job: refused, nothing run.
        r = HOST.enter(slurm_world, job_id, TEST_UID + 1, *probe)
        assert r.returncode == 125 and f"belongs to {TEST_USER}" in r.stderr, r
        assert r.stdout == ""
    finally:
        assert hook("epilog", env).returncode == 0
    assert not holder.exists() and not holder.parent.exists()
    assert record(job_id) is None
    assert mounts_under(RUNDIR / job_id) == []  # this job's: other suites may run jobs meanwhile
    r = HOST.enter(slurm_world, job_id, TEST_UID, *probe)
    assert r.returncode == 125 and "no ovlrun namespace" in r.stderr


def test_prolog_failure_modes_exit_zero(slurm_world: World, jc: tuple[Path, Path], job_id: str) -> None:
    conf, base = jc
    for comment, reason in (("ovl:nope", "no profile named 'nope'"),
                            ("ovl:../../etc/x", "not a path")):
        env = slurm_env(slurm_world, job_id, comment, OVLRUN_SLURM_JC_CONF=str(conf))
        r = hook("prolog", env)
        assert r.returncode == 0, r.stderr
        assert reason in r.stderr
        assert not (base / NODE / job_id).exists()
        rec = record(job_id)
        assert rec and rec["messages"] and reason in rec["messages"][0]
        assert reason in (RUNDIR / f"{job_id}.messages").read_text()
        assert hook("epilog", env).returncode == 0
    # Not run by slurmd at all: still exit 0, and say so.
    r = hook("prolog", {"PATH": os.environ["PATH"], **slurm_world.hook_env(slurm_world.base / "slurm-hooks.log")})
    assert r.returncode == 0 and "SLURM_JOB_ID" in r.stderr


def test_prolog_with_the_tree_not_mounted_says_the_job_runs_unlocalised(slurm_world: World, jc: tuple[Path, Path],
                                                                         job_id: str) -> None:
    conf, _ = jc
    hidden = slurm_world.sw.with_name("sw.hidden")
    slurm_world.sw.rename(hidden)
    slurm_world.sw.mkdir()  # an empty mount point: the NFS tree is not mounted
    try:
        env = slurm_env(slurm_world, job_id, "ovl:slurmtest-a", OVLRUN_SLURM_JC_CONF=str(conf))
        r = hook("prolog", env)
        assert r.returncode == 0, r.stderr
        rec = record(job_id)
        assert rec is not None and rec["state"] == "unlocalised"
        (message,) = rec["messages"]
        assert message.startswith("job runs unlocalised") and f"shared tree root {slurm_world.sw} is empty" in message
        assert "refusing" not in message  # it is not refused: a Prolog cannot stop it without draining the node
        assert hook("epilog", env).returncode == 0
    finally:
        slurm_world.sw.rmdir()
        hidden.rename(slurm_world.sw)


def test_first_job_on_a_fresh_node_creates_the_run_directory(slurm_world: World, job_id: str) -> None:
    rundir = slurm_world.base / "fresh-run" / "jobs"
    assert not rundir.parent.exists()
    env = slurm_env(slurm_world, job_id, "ovl:slurmtest-a", OVLRUN_SLURM_JC_CONF="/nonexistent",
                    OVLRUN_JOB_RUNDIR=str(rundir))
    r = hook("prolog", env)
    assert r.returncode == 0, r.stderr
    assert "(create): 1 localised path(s)" in r.stderr
    assert is_mount_ns_holder(rundir / job_id / ".ns")
    assert hook("epilog", env).returncode == 0
    assert not (rundir / job_id).exists() and mounts_under(rundir) == []
    assert record(job_id, rundir=rundir) is None
    shutil.rmtree(rundir.parent)


def test_one_job_on_two_slurmd_nodes_of_one_host_keeps_two_records(slurm_world: World, job_id: str) -> None:
    """Slurm's multiple-slurmd: two nodes on one host, one job spanning both.  Each node's
    hooks keep their own record and namespace; enter refuses to guess between them."""
    envs = {node: {**slurm_env(slurm_world, job_id, "ovl:slurmtest-a", OVLRUN_SLURM_JC_CONF="/nonexistent"),
                   "SLURMD_NODENAME": node} for node in ("vnode-a", "vnode-b")}
    probe = ("bash", str(slurm_world.base / "probe.sh"), "x")
    try:
        for env in envs.values():
            r = hook("prolog", env)
            assert r.returncode == 0 and "(create): 1 localised path(s)" in r.stderr, r.stderr
        records = {node: record(job_id, node) for node in envs}
        assert all(r is not None and r["node"] == node and r["ns_path"] for node, r in records.items())
        assert len({r["ns_path"] for r in records.values() if r}) == 2
        r = HOST.enter(slurm_world, job_id, TEST_UID, *probe)
        assert r.returncode == 125 and "runs on several nodes of this host (vnode-a, vnode-b)" in r.stderr, r
        assert hook("epilog", envs["vnode-a"]).returncode == 0
        assert record(job_id, "vnode-a") is None and record(job_id, "vnode-b") is not None
        r = HOST.enter(slurm_world, job_id, TEST_UID, *probe)  # one node left: no ambiguity
        assert r.returncode == 0, r.stderr
        assert_localised(parse(r.stdout), "1.0")
    finally:
        for env in envs.values():
            assert hook("epilog", env).returncode == 0
    for node in envs:  # this job's: other suites may run jobs meanwhile
        assert mounts_under(RUNDIR / node / job_id) == []
        assert not (RUNDIR / node / job_id).exists()
