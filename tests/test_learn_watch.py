"""``learn watch`` counting every job of the node, and ``learn propose`` merging node
summaries (local, or published to a shared directory under the image owner's trust)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

from tests.conftest import TEST_UID, TEST_USER, World, requires_root
from tests.learn_support import LEARN, learn, require_bpftrace
from tests.learn_workloads import build


def _summary_releases(path: Path) -> dict[str, list[int]]:
    data = json.loads(path.read_text())
    assert data["format"] == 1
    return {rel: cell for tree in data["trees"].values() for rel, cell in tree["releases"].items()}


@requires_root
def test_watch_counts_every_job_and_propose_merges_node_summaries(world: World, test_user: str) -> None:
    require_bpftrace(world)
    jobs = [build("libsearch", world.sw), build("pathsearch", world.sw)]
    state, pub = world.base / "state", world.base / "pub"
    pub.mkdir(mode=0o755)
    os.chown(pub, TEST_UID, TEST_UID)
    config = world.base / "ovlrun.toml"
    config.write_text(f'image_owner = "{TEST_USER}"\n')
    env = {"OVLRUN_LEARN_DIR": str(state), "OVLRUN_CONFIG": str(config)}
    watcher = subprocess.Popen([*LEARN, "watch", "--interval", "1", "--tree", str(world.sw), "--publish", str(pub)],
                               stderr=subprocess.PIPE, text=True,
                               env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", **env})
    try:
        assert watcher.stderr is not None
        line = watcher.stderr.readline()
        assert "watching" in line, line + watcher.stderr.read()
        for job in jobs:  # the node's jobs, not run under learn, as a user
            subprocess.run(job.command, env=job.env, check=True, user=TEST_UID, group=TEST_UID, extra_groups=[],
                           cwd="/", capture_output=True)
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=120) == 0
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    node = os.uname().nodename.split(".")[0]
    local = state / f"{node}.json"
    st = local.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o644)
    seen = _summary_releases(local)
    failing = {rel for rel, cell in seen.items() if cell[1]}
    assert {f"lib{i}/1.0" for i in range(10)} | {f"tool{i}/1.0" for i in range(50)} == failing
    published = pub / f"{node}.json"
    assert published.stat().st_uid == TEST_UID
    assert _summary_releases(published) == seen

    r = learn(world, "propose", "--output", str(world.base / "local.toml"), "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert {p["pattern"] for p in json.loads(r.stdout)["patterns"]} == failing
    assert world.ovlrun("profile", "check", str(world.base / "local.toml")).returncode == 0

    other = pub / "node2.json"
    shutil.copy(published, other)
    os.chown(other, TEST_UID, TEST_UID)
    r = learn(world, "propose", "--from", str(pub), "--json", env=env)
    assert r.returncode == 0, r.stderr
    merged = {p["pattern"]: p for p in json.loads(r.stdout)["patterns"]}
    assert set(merged) == failing
    assert merged["lib0/1.0"]["enoent"] == 2 * seen["lib0/1.0"][1]
    ranked = list(merged.values())
    assert ranked == sorted(ranked, key=lambda p: -(p["lookups"] - p["opens"]))

    os.chown(other, 0, 0)  # not the image owner's: a node would refuse it, so does propose
    r = learn(world, "propose", "--from", str(pub), env=env)
    assert r.returncode == 125 and "refusing node2.json" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    other.unlink()
    other.symlink_to(published)
    r = learn(world, "propose", "--from", str(pub), env=env)
    assert r.returncode == 125 and "symlink" in r.stderr


@requires_root
def test_watch_needs_root_and_bpftrace(world: World, test_user: str) -> None:
    r = learn(world, "watch", "--tree", str(world.sw), user=TEST_UID, group=TEST_UID, extra_groups=[], cwd="/")
    assert r.returncode == 125 and "must run as root" in r.stderr
    r = learn(world, "watch", "--tree", str(world.sw), env={"OVLRUN_LEARN_BPFTRACE": "/nonexistent/bpftrace"})
    assert r.returncode == 125 and "bpftrace is not installed" in r.stderr
