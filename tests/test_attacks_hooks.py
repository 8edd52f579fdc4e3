# ruff: noqa: F811  (pytest fixtures imported from tests.attacks_support are redefined as arguments)
"""Issue 18, items 0b, 2 and 7 (the rest): what a job, a killed Prolog, a signal or an
unreadable profile can leave behind or give away.

The Slurm hooks run directly with slurmd's environment, as tests/slurm/test_hooks.py
runs them (no Slurm daemons): a Prolog creates (and pins) the job's namespace, the job
is what runs in it, the Epilog removes it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ovlrun.jobs.history import ENDED
from ovlrun.linux import namespaces
from tests.attacks_support import (
    shipped_sudoers,  # noqa: F401 (fixture)
    slurm_env,
    su,
)
from tests.conftest import World, requires_overlay, requires_root

pytestmark = [requires_root, requires_overlay]

NODE = "attacknode"  # slurm_env's SLURMD_NODENAME


def _hook(world: World, name: str, env: dict[str, str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ovlrun", "slurm", name], env=env, capture_output=True, text=True,
                          timeout=120, cwd="/", **kw)  # type: ignore[call-overload,no-any-return]


def _job_container(world: World) -> Path:
    """A job_container.conf whose BasePath (Debian's per-node layout) is in the world."""
    base = world.base / "jcbase"
    (base / NODE).mkdir(parents=True)
    conf = world.base / "job_container.conf"
    conf.write_text(f"AutoBasePath=true\nBasePath={base}\n")
    return conf


def _mounts_under(path: Path) -> list[str]:
    """Mount points of the host (the test runner's namespace) at or below ``path``."""
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == str(path) or p.startswith(prefix)]


def _detach_leftovers(path: Path) -> list[str]:
    """Lazily unmount (in a child: umount(8)) whatever is left below ``path``; return it."""
    left = _mounts_under(path)
    for point in sorted(left, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
    return left


# ----------------------------------------------------------------------------- item 0b


def test_epilog_removes_a_job_directory_holding_a_deep_directory_chain(world: World, test_user: str) -> None:
    """The job fills its private /tmp (which lives in the job directory the Prolog made)
    with a 1,200-deep directory chain; the Epilog must still remove the job directory
    and exit 0 (a failing Epilog drains the node)."""
    world.simple_profile()
    world.build()
    job_id = str(974_000_000 + os.getpid() % 1_000_000)
    env = {**slurm_env(world, job_id), "OVLRUN_SLURM_JC_CONF": str(_job_container(world))}
    job_dir = world.base / "jcbase" / NODE / job_id
    r = _hook(world, "prolog", env)
    try:
        assert r.returncode == 0 and "(create): 1 localised path(s)" in r.stderr, r.stderr
        deep = ("import os\nos.chdir('/tmp')\nfor i in range(1200):\n    os.mkdir('d')\n    os.chdir('d')\n"
                "open('bottom', 'w').write('x')\n")
        job = subprocess.run(["nsenter", f"--mount={job_dir / '.ns'}", "runuser", "-u", test_user, "--",
                              "python3", "-c", deep], capture_output=True, text=True, timeout=60)
        assert job.returncode == 0, job.stderr
        started = time.monotonic()
        r = _hook(world, "epilog", env)
        took = time.monotonic() - started
    finally:
        left = _detach_leftovers(world.base / "jcbase")
        if job_dir.exists():
            subprocess.run(["rm", "-rf", str(job_dir)])  # shutil.rmtree recurses (3.11): RecursionError
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert left == [] and not job_dir.exists(), (left, r.stderr)
    assert took < 30, took


def test_epilog_logs_what_it_cannot_remove_and_exits_0(world: World, test_user: str) -> None:
    """An entry the Epilog cannot delete (here: root made it immutable inside the job's
    /tmp): the Epilog logs it, says to remove it by hand, and still exits 0."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    world.simple_profile()
    world.build()
    job_id = str(972_000_000 + os.getpid() % 1_000_000)
    env = {**slurm_env(world, job_id), "OVLRUN_SLURM_JC_CONF": str(_job_container(world))}
    job_dir = world.base / "jcbase" / NODE / job_id
    stuck = job_dir / f".{job_id}" / "stuck"
    r = _hook(world, "prolog", env)
    try:
        assert r.returncode == 0, r.stderr
        stuck.write_text("x")
        if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode != 0:
            pytest.skip("this file system has no immutable flag")
        r = _hook(world, "epilog", env)
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], capture_output=True)
        _detach_leftovers(world.base / "jcbase")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "could not remove 1 entries" in r.stderr and "remove it by hand" in r.stderr, r.stderr


def test_remove_tree_is_bounded_in_time_and_never_crosses_a_mount(world: World) -> None:
    """namespaces.remove_tree gives up with an OSError at its deadline (the Epilog logs
    it) rather than running for as long as a job's /tmp takes to delete."""
    big = world.base / "big"
    for i in range(200):
        d = big / f"d{i:03d}"
        d.mkdir(parents=True)
        for j in range(50):
            (d / f"f{j}").touch()
    with pytest.raises(OSError, match="gave up"):
        namespaces.remove_tree(big, timeout=0.001)
    assert big.exists()
    # A file system mounted below (in a child's own namespace): detached, never entered.
    # The child holds a descriptor of it, through which its file must still be there.
    (big / "d000" / "mnt").mkdir()
    child = ("import os, subprocess, sys\n"
             "from pathlib import Path\n"
             "from ovlrun.linux import namespaces\n"
             "big = sys.argv[1]\n"
             "subprocess.run(['mount', '--make-rprivate', '/'], check=True)\n"
             "subprocess.run(['mount', '-t', 'tmpfs', 'tmpfs', big + '/d000/mnt'], check=True)\n"
             "open(big + '/d000/mnt/kept', 'w').write('x')\n"
             "held = os.open(big + '/d000/mnt', os.O_RDONLY | os.O_DIRECTORY)\n"
             "namespaces.remove_tree(Path(big))\n"
             "print(os.path.exists(big), os.listdir(held))\n")
    r = subprocess.run(["unshare", "-m", sys.executable, "-c", child, str(big)], capture_output=True, text=True,
                       env={**world.env}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "['kept']"], r.stdout


# ------------------------------------------------------------------------------ item 2


ROUNDS = 40


def test_prologs_killed_at_random_moments_leave_nothing_after_their_epilogs(world: World, test_user: str) -> None:
    """slurmd SIGKILLs a Prolog's process group when PrologEpilogTimeout passes (or
    restarts).  40 Prologs killed at random moments, then their Epilogs: no mount, no
    pinned namespace and no record may be left, and gc can collect a replaced snapshot."""
    rel = world.sw / "app" / "1.0"
    world.simple_profile()
    world.build()
    rundir = world.base / "run" / "jobs"
    conf = _job_container(world)
    seed = int(os.environ.get("OVLRUN_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)

    def env_of(n: int) -> dict[str, str]:
        env = {**slurm_env(world, str(973_000_000 + n)), "OVLRUN_JOB_RUNDIR": str(rundir)}
        # Half the jobs with job_container/tmpfs (create mode), half without (pinned for `enter`).
        return {**env, "OVLRUN_SLURM_JC_CONF": str(conf) if n % 2 else "/nonexistent"}

    started = time.monotonic()  # how long an undisturbed Prolog takes, to spread the kills over it
    assert _hook(world, "prolog", env_of(ROUNDS)).returncode == 0
    whole = time.monotonic() - started
    assert _hook(world, "epilog", env_of(ROUNDS)).returncode == 0
    killed = 0
    try:
        for n in range(ROUNDS):
            p = subprocess.Popen([sys.executable, "-m", "ovlrun", "slurm", "prolog"], env=env_of(n), cwd="/",
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                p.wait(timeout=rng.uniform(0, whole))  # the random moment
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)  # as slurmd does: the Prolog's whole process group
                p.wait()
                killed += 1
            r = _hook(world, "epilog", env_of(n))
            assert r.returncode == 0, r.stderr
        # Live records only: the Epilog keeps an ended job's record in the bounded history
        # (jobs/history.py, RUNDIR/NODE/.ended), which is what it should leave.
        left_records = sorted(p.name for p in rundir.rglob("*.json") if ENDED not in p.parts) \
            if rundir.exists() else []
        left_mounts = _mounts_under(world.base)
        (rel / "README").write_text("app 1.0, patched\n")
        assert world.ovlrun("snapshot", "refresh", "--all").returncode == 0
        gc = world.ovlrun("snapshot", "gc", "--grace", "0", env={"OVLRUN_JOB_RUNDIR": str(rundir)})
    finally:
        _detach_leftovers(world.base)
    print(f"seed {seed}: {killed} of {ROUNDS} Prologs killed (an undisturbed one takes {whole:.2f}s)")
    assert left_mounts == [] and left_records == [], (seed, left_mounts, left_records)
    assert "kept: in use" not in gc.stdout, (seed, gc.stdout)


# ------------------------------------------------------------------------------ item 7


def test_sudo_launch_does_not_quote_an_unreadable_profile(world: World, test_user: str, shipped_sudoers: Path) -> None:
    """A profile only root may read (0600): a sudo caller's launch of it fails, and the
    error must not quote what is in it."""
    profile = world.write_profile("private", f'[[tree]]\nroot = "{world.sw}"\nlocalise = ["SECRET-TOKEN-4711/../x"]\n')
    profile.chmod(0o600)
    r = su(test_user, f"sudo -n {world.admin_entry()} -p private -- true")
    assert r.returncode == 125 and "private" in r.stderr, r
    assert "SECRET-TOKEN-4711" not in r.stderr, r.stderr


def test_plan_cache_leaves_no_temporary_file_after_a_signal(world: World) -> None:
    """A signal exactly at the rename that would publish the plan cache (strace delivers
    it there): SIGTERM must not leave the temporary file; SIGKILL, which nothing can
    hold back, leaves one, which gc removes."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    world.simple_profile()
    world.build()
    plans = world.store / "plans"

    def launch_killed_at_rename(sig: signal.Signals) -> list[str]:
        renames = "rename,renameat,renameat2"
        r = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={renames}", "-e",
                            f"inject={renames}:error=EINTR:signal={sig.name}", sys.executable, "-m", "ovlrun",
                            "--profile", "p", "--", "true"], env=world.env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode in (-sig, 128 + sig), r
        return [p.name for p in plans.iterdir() if p.name.endswith(".tmp")]

    assert launch_killed_at_rename(signal.SIGTERM) == []
    assert launch_killed_at_rename(signal.SIGKILL), "the attack did not leave a temporary file"
    assert world.job("true").returncode == 0
    assert world.ovlrun("snapshot", "gc").returncode == 0
    left = [p.name for p in plans.iterdir() if p.name.endswith(".tmp")]
    assert left == [], left
    assert json.loads((world.store / "index.json").read_text())["sources"]
