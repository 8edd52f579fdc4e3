"""Crash safety and concurrency of the store, and mount hygiene under many jobs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import World, host_mounts, requires_overlay, requires_root

pytestmark = [requires_root, requires_overlay]


def grow(release: Path, dirs: int, files: int) -> None:
    for i in range(dirs):
        d = release / "bulk" / f"d{i:03}"
        d.mkdir(parents=True)
        for j in range(files):
            (d / f"f{j:03}.py").write_text("x = 1\n")


def check_store(world: World, *, settled: bool = False) -> dict[str, str]:
    """The store invariants that must hold whenever no builder is running.

    Every snapshot in snapshots/ is complete (manifest + image); the index parses and
    names only such snapshots.  (tmp/ and a temporary index file of a writer killed
    mid-write may remain: the next build or gc removes them, so with ``settled``, after
    one, there are none.)
    """
    index: dict[str, str] = {}
    if (world.store / "index.json").exists():
        index = json.loads((world.store / "index.json").read_text())["sources"]
    for rel in index.values():
        assert (world.store / rel / "manifest.json").is_file(), rel
        assert (world.store / rel / "image.erofs").is_file(), rel
    snapshots = world.store / "snapshots"
    if snapshots.is_dir():
        for key in snapshots.iterdir():
            for snap in key.iterdir():
                manifest = json.loads((snap / "manifest.json").read_text())
                assert manifest["id"] == snap.name and (snap / "image.erofs").is_file(), snap
    if settled:
        leftovers = [p.name for p in world.store.glob(".index.json.*")]
        assert leftovers == [], leftovers
    return index


def run_bg(world: World, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "ovlrun", *args], env=world.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigkill_builds_at_random_points(world: World) -> None:
    release = world.sw / "app" / "1.0"
    grow(release, 20, 40)
    world.simple_profile()
    world.build()
    started = time.monotonic()
    world.build()  # up-to-date: measures interpreter start + planning, the floor of a build
    floor = time.monotonic() - started
    fulls = []
    for i in range(3):  # the fastest of a few publishing rebuilds: the first one runs cold
        os.utime(release / "README", ns=(10**9 + i, 10**9 + i))
        t0 = time.monotonic()
        r = world.ovlrun("snapshot", "build", "--profile", "p", "--rebuild")
        fulls.append(time.monotonic() - t0)
        assert r.returncode == 0
    full = min(fulls)
    rng = random.Random(0x5EED)
    published = killed_before = 0
    loop_started = time.monotonic()
    # At least 50 kills, and on until 10 of them interrupted a build in progress (how the
    # kill points fall depends on this machine's speed), within the time bound.
    i = 0
    while i < 50 or killed_before < 10:
        i += 1
        os.utime(release / "README", ns=(i, i))  # the source changed: a rebuild publishes
        before = check_store(world)
        proc = run_bg(world, "snapshot", "build", "--profile", "p", "--rebuild")
        # Kill anywhere from interpreter start-up to just after a complete build.
        time.sleep(rng.uniform(floor * 0.5, full * 1.2))  # the kill point itself is what is random
        proc.kill()
        proc.communicate(timeout=30)
        after = check_store(world)
        if after != before:
            published += 1
        elif proc.returncode == -signal.SIGKILL:
            killed_before += 1
        if i % 15 == 0 and after:
            job = world.ovlrun("--profile", "p", "--strict", "--", "cat", f"{release}/README")
            assert job.returncode == 0 and job.stdout == "app 1.0\n", job.stderr
        assert time.monotonic() - loop_started < 240, "crash loop over its time bound"
    took = time.monotonic() - loop_started
    iterations = i
    print(f"crash loop: {iterations} SIGKILLed builds in {took:.1f}s, {published} got to publish, "
          f"{killed_before} killed before publishing")
    assert killed_before >= 10, "kill points never hit a build in progress"
    # The next build cleans leftovers and completes; gc removes replaced snapshots.
    r = world.ovlrun("snapshot", "build", "--profile", "p", "--rebuild")
    assert r.returncode == 0, r.stderr
    assert list((world.store / "tmp").iterdir()) == []
    r = world.ovlrun("snapshot", "gc", "--grace", "0")
    assert r.returncode == 0, r.stderr
    index = check_store(world, settled=True)
    assert len(list((world.store / "snapshots").glob("*/*"))) == len(index) == 1
    assert world.ovlrun("--profile", "p", "--strict", "--", "cat", f"{release}/README").stdout == "app 1.0\n"


def test_concurrent_launches_during_concurrent_builds(world: World) -> None:
    world.simple_profile(patterns=("app/1.0", "app/1.1"))
    builds = [run_bg(world, "snapshot", "build", "--profile", "p") for _ in range(5)]
    jobs = [run_bg(world, "--profile", "p", "--", "cat", f"{world.sw}/app/1.{i % 2}/README") for i in range(50)]
    for i, job in enumerate(jobs):
        out, err = job.communicate(timeout=120)
        assert job.returncode == 0 and out == f"app 1.{i % 2}\n", err
    outputs = [b.communicate(timeout=120) for b in builds]
    assert all(b.returncode == 0 for b in builds), outputs
    assert sum(err.count("built:") for _, err in outputs) == 2  # one build per source, the rest up-to-date
    index = check_store(world)
    assert sorted(index) == [str(world.sw / "app" / "1.0"), str(world.sw / "app" / "1.1")]
    assert len(list((world.store / "snapshots").glob("*/*"))) == 2
    assert list((world.store / "tmp").iterdir()) == []


def test_thousand_short_jobs_some_sigkilled_leave_no_mounts(world: World) -> None:
    world.simple_profile(patterns=("app/1.0", "app/1.1"))
    world.build()
    before = host_mounts()
    rng = random.Random(1000)
    batch, total, killed = 25, 1000, 0
    started = time.monotonic()
    for first in range(0, total, batch):
        procs = []
        for n in range(first, first + batch):
            if n % 10 == 9:  # killed mid-run, after its overlays are up
                script = f"cat {world.sw}/app/1.0/README >/dev/null; echo ready; exec sleep 600"
            elif n % 10 == 4:  # killed at a random point, possibly during namespace/mount setup
                script = "exec sleep 600"
            else:
                script = f"exec cat {world.sw}/app/1.{n % 2}/README"
            procs.append((n, run_bg(world, "--profile", "p", "--", "/bin/sh", "-c", script)))
        for n, proc in procs:
            if n % 10 == 9:
                assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
                proc.kill()
                killed += 1
            elif n % 10 == 4:
                time.sleep(rng.uniform(0, 0.05))
                proc.kill()
                killed += 1
        for n, proc in procs:
            out, err = proc.communicate(timeout=120)
            if n % 10 in (4, 9):
                assert proc.returncode == -signal.SIGKILL, (n, err)
            else:
                assert proc.returncode == 0 and out == f"app 1.{n % 2}\n", (n, err)
        assert time.monotonic() - started < 300, "1,000 jobs over their time bound"
    took = time.monotonic() - started
    print(f"{total} jobs ({killed} SIGKILLed) in {took:.1f}s")
    assert host_mounts() == before
    # No job namespace is left with our overlays either (once the mount workers of jobs
    # killed while mounting are gone: they die of PR_SET_PDEATHSIG a moment later).  Only
    # this store's snapshots: other ovlrun jobs on the machine (another suite's, a user's)
    # may use their own.
    from ovlrun.jobs.inuse import snapshot_ids_in_use

    wait_for_mount_workers(world)
    ours = {(d.parent.name, d.name) for d in (world.store / "snapshots").glob("*/*")}
    assert len(ours) == 2, ours
    assert snapshot_ids_in_use() & ours == set()


def wait_for_mount_workers(world: World, timeout: float = 30) -> None:
    """Wait (pidfd, no polling) for the processes left of this world's launches: a launch
    SIGKILLed while mounting leaves its mount worker (ovlrun/launch/mountworker.py) to
    die of its pending SIGKILL, a few milliseconds later, its mounts with it."""
    import select

    marker = f"OVLRUN_STORE={world.store}".encode()
    deadline = time.monotonic() + timeout
    for pid in os.listdir("/proc"):
        try:
            if not pid.isdigit() or marker not in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                continue
            fd = os.pidfd_open(int(pid))
        except OSError:
            continue
        try:
            select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(fd)


FULL_DISK_SCRIPT = r"""
set -u
mount -t tmpfs -o size=256k,mode=0755 tmpfs "$STORE"
run() { "$PY" -m ovlrun "$@"; }
run snapshot build --profile small 2>&1; echo "small=$?"
run snapshot build --profile big 2>&1; echo "big=$?"
echo "tmp=$(ls -A "$STORE/tmp" | wc -l)"
echo "stray=$(ls -A "$STORE" | grep -c '^\.index')"
echo "snapshots=$(find "$STORE/snapshots" -name manifest.json | wc -l)"
for d in "$STORE"/snapshots/*/*/; do test -f "$d/manifest.json" || echo "partial=$d"; done
echo "index=$(tr -d '\n' < "$STORE/index.json")"
run --profile small --strict -- cat "$SW/app/1.0/README"; echo "job=$?"
"""


def test_full_store_fails_cleanly_and_jobs_still_run(world: World) -> None:
    grow(world.sw / "app" / "1.1", 40, 50)  # an image of ~400 KiB: more than the 256 KiB store holds
    world.write_profile("small", f'[[tree]]\nroot = "{world.sw}"\nlocalise = ["app/1.0"]\n')
    world.write_profile("big", f'[[tree]]\nroot = "{world.sw}"\nlocalise = ["app/1.1"]\n')
    world.store.mkdir()
    # The tmpfs is mounted in a private mount namespace of a child, never on the host.
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", FULL_DISK_SCRIPT],
                       env={**world.env, "STORE": str(world.store), "PY": sys.executable, "SW": str(world.sw)},
                       capture_output=True, text=True, timeout=120)
    out = r.stdout
    assert "small=0" in out, out + r.stderr
    assert "big=1" in out and "is full (no space left on device); nothing was published" in out, out
    assert "Traceback" not in out
    assert "tmp=0" in out and "stray=0" in out and "partial=" not in out, out
    index = json.loads(next(line for line in out.splitlines() if line.startswith("index="))[6:])
    assert list(index["sources"]) == [str(world.sw / "app" / "1.0")]
    assert "snapshots=1\n" in out, out
    assert "app 1.0\njob=0" in out, out
