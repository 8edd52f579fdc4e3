"""``ovlrun learn`` when things go wrong: exit statuses, one-line errors, missing or dying
tracers, tracefs that cannot be mounted, lost events, thousands of processes, and learn
killed at random moments (nothing may stay behind)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import IS_ROOT, TEST_UID, World, requires_root
from tests.learn_support import LEARN, all_exit, children, learn, report, require_bpftrace, tracefs_mounts

TRACERS = ("strace", "bpftrace")


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def _require(world: World, tracer: str) -> None:
    if tracer == "bpftrace":
        require_bpftrace(world)


@requires_root
@pytest.mark.parametrize("tracer", TRACERS)
def test_learn_exits_with_cmds_own_status(world: World, tracer: str) -> None:
    _require(world, tracer)
    script = world.base / "not-executable"
    script.write_text("echo no\n")
    for command, status in ((["/bin/sh", "-c", "exit 3"], 3), (["/bin/sh", "-c", "kill -TERM $$"], 143),
                            (["no-such-command-here"], 127), ([str(script)], 126)):
        r = learn(world, "--tracer", tracer, "--tree", str(world.sw), "--report", "/dev/null", "--", *command)
        assert r.returncode == status, (command, r.stderr)
    assert "no-such-command-here: command not found" in learn(world, "--tracer", tracer, "--tree", str(world.sw),
                                                              "--report", "/dev/null", "--",
                                                              "no-such-command-here").stderr


def test_usage_and_setup_errors_are_one_line_with_status_125(world: World, test_user: str) -> None:
    tree = ("--tree", str(world.sw))
    cases = [((*tree,), "Missing argument"),
             (("--tree", str(world.base / "nope"), "--", "true"), "does not exist"),
             (("--tree", "relative/sw", "--", "true"), "not an absolute path"),
             ((*tree, "--tracer", "dtrace", "--", "true"), "use auto, bpftrace or strace"),
             ((*tree, "--no-such-option", "--", "true"), "No such option")]
    for args, message in cases:
        r = learn(world, *args)
        assert r.returncode == 125, (args, r.stderr)
        assert message in _one_line(r.stderr)
    as_user = {"user": TEST_UID, "group": TEST_UID, "extra_groups": [], "cwd": "/"}
    for args, message in (((*tree, "--tracer", "bpftrace", "--", "true"), "needs root"),
                          ((*tree, "--user", "root", "--", "true"), "only for root"),
                          ((*tree, "--profile", "p", "--", "true"), "sudo ovlrun --profile p -- ovlrun learn")):
        r = learn(world, *args, **as_user)
        assert r.returncode == 125, (args, r.stderr)
        assert message in _one_line(r.stderr)
    r = learn(world, *tree, "--tracer", "strace", "--", "true", env={"OVLRUN_LEARN_STRACE": "/nonexistent/strace"},
              **as_user)
    assert r.returncode == 125
    assert "strace is not installed" in _one_line(r.stderr)
    if IS_ROOT:
        r = learn(world, *tree, "--", "true", env={"SUDO_UID": str(TEST_UID)})
        assert r.returncode == 125
        assert "not available through sudo" in _one_line(r.stderr)


@requires_root
def test_auto_falls_back_to_strace_and_says_why(world: World) -> None:
    r = learn(world, "--tree", str(world.sw), "--json", "--report", str(world.base / "r.json"), "--", "/bin/true",
              env={"OVLRUN_LEARN_BPFTRACE": "/nonexistent/bpftrace"})
    assert r.returncode == 0, r.stderr
    assert "using strace: bpftrace is not installed" in r.stderr
    assert report(world.base / "r.json")["tracer"] == "strace"


@requires_root
def test_tracefs_that_cannot_be_mounted(world: World) -> None:
    """In a mount namespace where /sys/kernel/tracing cannot be a mount point: bpftrace is
    refused with the reason; auto falls back to strace and still runs the job."""
    require_bpftrace(world)
    before = tracefs_mounts()
    hide = ("mount --make-rprivate / && mount -t tmpfs -o size=64k none /sys/kernel && : > /sys/kernel/tracing "
            "&& exec \"$@\"")
    for tracer, status in (("bpftrace", 125), ("auto", 0)):
        r = subprocess.run(["unshare", "-m", "/bin/sh", "-c", hide, "sh", *LEARN, "--tracer", tracer, "--tree",
                            str(world.sw), "--report", "/dev/null", "--", "/bin/true"], capture_output=True,
                           text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"})
        assert r.returncode == status, r.stderr
        assert "cannot mount tracefs on /sys/kernel/tracing" in (_one_line(r.stderr) if status else r.stderr)
    assert tracefs_mounts() == before


@requires_root
@pytest.mark.parametrize("tracer", TRACERS)
def test_a_tracer_that_dies_while_the_job_runs(world: World, tracer: str) -> None:
    """The job keeps running and its status is learn's; the report says the trace stopped."""
    _require(world, tracer)
    started, go = world.base / "started", world.base / "go"
    os.mkfifo(started)
    os.mkfifo(go)
    job = f"echo up > {started}; read x < {go}; ls {world.sw}/app/1.0/nosuch 2>/dev/null; exit 5"
    proc = subprocess.Popen([*LEARN, "--tracer", tracer, "--tree", str(world.sw), "--json", "--report",
                             str(world.base / "r.json"), "--", "/bin/sh", "-c", job], stderr=subprocess.PIPE,
                            text=True, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"})
    with open(started) as f:
        assert f.read().strip() == "up"  # the job is running, traced
    tracers = [pid for pid, comm in children(proc.pid).items() if comm == tracer]
    assert len(tracers) == 1
    pidfd = os.pidfd_open(tracers[0])
    os.kill(tracers[0], signal.SIGKILL)
    assert all_exit([pidfd], 10)
    os.close(pidfd)
    with open(go, "w") as f:
        f.write("go\n")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 5, stderr
    data = report(world.base / "r.json")
    assert not data["complete"]
    assert any(f"{tracer}" in n and "while the job ran" in n for n in data["notes"]), data["notes"]


@requires_root
def test_lost_events_are_counted_and_said(world: World) -> None:
    """A one-page perf buffer cannot keep up with a stat storm: bpftrace drops events and
    learn says how many (the counts are lower bounds)."""
    require_bpftrace(world)
    r = learn(world, "--tracer", "bpftrace", "--tree", str(world.sw), "--json", "--report",
              str(world.base / "r.json"), "--", "/usr/bin/find", "/usr/lib", "/usr/share", "-name", "nothing-x",
              env={"OVLRUN_LEARN_PERF_PAGES": "1"})
    assert r.returncode == 0, r.stderr
    data = report(world.base / "r.json")
    assert not data["complete"]
    assert any("events lost" in n for n in data["notes"]), data["notes"]


@requires_root
def test_thousands_of_processes_and_a_full_process_map(world: World) -> None:
    """2,000 short processes are all followed; with room for 32 threads, 200 concurrent
    sleepers cannot all be, and learn says so instead of undercounting silently."""
    require_bpftrace(world)
    many = "i=0; while [ $i -lt 2000 ]; do /bin/true; i=$((i+1)); done"
    r = learn(world, "--tracer", "bpftrace", "--tree", str(world.sw), "--json", "--report",
              str(world.base / "r.json"), "--", "/bin/sh", "-c", many, timeout=600)
    assert r.returncode == 0, r.stderr
    data = report(world.base / "r.json")
    assert data["processes"] >= 2001 and data["complete"], data["notes"]
    wide = "i=0; while [ $i -lt 200 ]; do sleep 2 & i=$((i+1)); done; wait"
    r = learn(world, "--tracer", "bpftrace", "--tree", str(world.sw), "--json", "--report",
              str(world.base / "r2.json"), "--", "/bin/sh", "-c", wide, env={"OVLRUN_LEARN_MAP_KEYS": "32"})
    assert r.returncode == 0, r.stderr
    data = report(world.base / "r2.json")
    assert not data["complete"]
    assert any("could not follow" in n or "could not remember" in n for n in data["notes"]), data["notes"]


def _tracers_of(learn_pid: int) -> list[int]:
    mark = f"OVLRUN_LEARN_OF={learn_pid}\0".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() in TRACERS and mark in Path(
                    f"/proc/{pid}/environ").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


def _pidfds(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            out.append(os.pidfd_open(pid))
        except ProcessLookupError:
            pass  # already gone
    return out


def _kill_marked(marker: str) -> None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            continue


@requires_root
@pytest.mark.parametrize("tracer", TRACERS)
def test_killing_learn_at_random_moments_leaves_nothing_behind(world: World, tracer: str) -> None:
    """SIGKILL and SIGTERM at random moments (tracer starting, attached, job running): no
    tracer survives learn, tracefs is never mounted on the host, and SIGTERM reaches the
    job (learn exits 143 whether the job had started or not)."""
    _require(world, tracer)
    before = tracefs_mounts()
    rng = random.Random(16)
    # Mostly quiet: a tracer with nothing to write would not notice learn's end by itself.
    job = f"i=0; while [ $i -lt 5 ]; do ls {world.sw}/app/1.0/nosuch 2>/dev/null; i=$((i+1)); done; sleep 60"
    for attempt in range(6):
        marker = f"LEARN_TEST_{uuid.uuid4().hex}"
        sig = signal.SIGKILL if attempt % 2 == 0 else signal.SIGTERM
        # stderr to a file: the job (which a SIGKILL leaves running) holds it open
        errors = world.base / f"stderr.{attempt}"
        with open(errors, "w") as err:
            proc = subprocess.Popen([*LEARN, "--tracer", tracer, "--tree", str(world.sw), "--report", "/dev/null",
                                     "--", "/bin/sh", "-c", job], stderr=err, text=True,
                                    env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", marker: "1"})
        try:
            proc.wait(timeout=rng.uniform(0.05, 3.0))
            pytest.fail(f"learn ended before it was killed: {errors.read_text()}")
        except subprocess.TimeoutExpired:
            pass
        seen = _tracers_of(proc.pid)
        pidfds = _pidfds(seen)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        stderr = errors.read_text()
        pidfds += _pidfds([pid for pid in _tracers_of(proc.pid) if pid not in seen])
        try:
            assert all_exit(pidfds, 10), f"a {tracer} outlived learn ({sig.name})"
            if sig == signal.SIGTERM:
                # 143: learn passed it on to the job, or gave up before starting it; -15:
                # it came before learn had set anything up (still importing)
                assert proc.returncode in (143, -signal.SIGTERM), stderr
                assert "Traceback" not in stderr
            assert tracefs_mounts() == before
        finally:
            for fd in pidfds:
                os.close(fd)
            _kill_marked(marker)  # after SIGKILL the job runs on, untraced: end it
