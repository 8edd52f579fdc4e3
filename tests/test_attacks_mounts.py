# ruff: noqa: F811  (pytest fixtures imported from tests.attacks_support are redefined as arguments)
"""Issue 18, items 1, 6 and 7 (the launch's side): what a release maintainer, a caller's
resource limits or a stalled tree can do to the mount phase.

- item 1: one path that cannot be opened (a maintainer's FUSE mount on their own release,
  root squashed to EACCES, an NFS file handle gone stale) stays unlocalised with a
  warning and the rest of the profile is mounted; ``--strict`` refuses;
- item 6: under any resource limit the caller sets, a launch is a one-line error and 125,
  or a correct run with every path localised; ``--strict`` never runs with a path
  unlocalised; the job gets the caller's limits back;
- item 7: root imports nothing after the first mount; a stalled tree makes the launch
  give up within its bound (exit 125) instead of hanging; loop devices are bounded.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.attacks_support import (
    VICTIM_USER,
    UserFuse,
    shipped_sudoers,  # noqa: F401 (fixture)
    su,
    user_dir,
    victim,  # noqa: F401 (fixture)
)
from tests.conftest import REPO, TEST_UID, World, requires_overlay, requires_root
from tests.faultfs import FaultFS

pytestmark = [requires_root, requires_overlay]

MOUNTS = "grep ' overlay ovlrun ' /proc/self/mountinfo | cut -d' ' -f5"
SU_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ovlrun: warning:")]


def _one_line_error(r: subprocess.CompletedProcess[str]) -> bool:
    """125 and a single 'ovlrun: ...' line on stderr (warnings before it allowed), no traceback."""
    lines = r.stderr.splitlines()
    return (r.returncode == 125 and "Traceback" not in r.stderr and bool(lines)
            and all(line.startswith("ovlrun: ") for line in lines)
            and not lines[-1].startswith("ovlrun: warning:"))


# ------------------------------------------------------------------------------ item 1


def test_maintainers_fuse_mount_on_their_release_leaves_only_that_path_unlocalised(
        world: World, test_user: str, victim: Path, shipped_sudoers: Path) -> None:
    """The maintainer of app/1.0 mounts a FUSE file system of their own on it (as
    fusermount3 would: no allow_other, so root gets EACCES there).  Another user's launch
    of a profile naming app/1.0 and app/1.1, through real sudo: app/1.1 is localised,
    app/1.0 stays unlocalised with one warning; --strict refuses."""
    mine, other = world.sw / "app" / "1.0", world.sw / "app" / "1.1"
    world.simple_profile(patterns=("app/1.0", "app/1.1"))
    world.build()
    os.chown(mine, TEST_UID, TEST_UID)  # the maintainer's own release
    backing = user_dir(world.base / "maintainer-fuse")
    (backing / "README").write_text("served by the maintainer's daemon\n")
    entry = world.admin_entry()
    job = f"sudo -n {entry} -p p {{}} -- sh -c \"{MOUNTS}; cat {other}/README\""
    with UserFuse(world.base, backing, mine, TEST_UID) as fs:
        denied = fs.run(["stat", str(mine)], env=SU_ENV)
        assert "Permission denied" in denied.stderr, denied  # the attack is real: root is refused
        r = fs.run(["su", VICTIM_USER, "-s", "/bin/sh", "-c", job.format("")], env=SU_ENV)
        strict = fs.run(["su", VICTIM_USER, "-s", "/bin/sh", "-c", job.format("--strict")], env=SU_ENV)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r
    assert r.stdout.split() == [str(other), "app", "1.1"], r
    (warning,) = _warnings(r.stderr)
    assert str(mine) in warning and "another file system is mounted" in warning, warning
    assert "stays unlocalised" in warning
    assert _one_line_error(strict) and str(mine) in strict.stderr and strict.stdout == "", strict


def _fuse_tree(world: World, patterns: str) -> tuple[Path, Path]:
    """The world's tree (plus app/2.0) served through faultfs at ``mnt``; profile p."""
    backing = world.base / "backing"
    shutil.copytree(world.sw, backing, symlinks=True)
    shutil.copytree(backing / "app" / "1.1", backing / "app" / "2.0", symlinks=True)
    mnt = world.base / "mnt"
    world.write_profile("p", f'[[tree]]\nroot = "{mnt}"\nlocalise = [{patterns}]\n')
    return backing, mnt


def test_permission_denied_or_stale_release_leaves_only_that_path_unlocalised(world: World) -> None:
    """Root squashed on one release (EACCES), another release deleted on the server while
    the client still knew it (ESTALE, what NFS returns; treated as missing, re-opened
    once): those two stay unlocalised with a warning each, app/2.0 is mounted."""
    backing, mnt = _fuse_tree(world, '"app/*"')
    env = {**world.env, "PATH": "/usr/bin:/bin"}
    with FaultFS(world.base, backing, mnt) as fs:
        assert fs.ovlrun("snapshot", "build", "--profile", "p", env=env).returncode == 0
    with FaultFS(world.base, backing, mnt) as fs:  # a fresh mount: nothing cached
        fs.faults("getattr eacces /app/1.0", "getattr estale /app/1.1")
        r = fs.ovlrun("--profile", "p", "--", "sh", "-c", MOUNTS, env=env)
        strict = fs.ovlrun("--profile", "p", "--strict", "--", "sh", "-c", MOUNTS, env=env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r
    assert r.stdout.split() == [str(mnt / "app" / "2.0")], r
    denied, stale = sorted(_warnings(r.stderr))
    assert str(mnt / "app" / "1.0") in denied and "Permission denied" in denied and "stays unlocalised" in denied
    assert f"{mnt / 'app' / '1.1'} (localised path" in stale and "is missing on the shared tree" in stale, stale
    assert _one_line_error(strict) and str(mnt / "app" / "1.0") in strict.stderr, strict


def test_snapshot_image_that_cannot_be_mounted_leaves_only_its_path_unlocalised(world: World) -> None:
    """Item 3's launch side: an image the kernel refuses (here: not EROFS at all, but
    trusted and current in the store) fails its own path, not the whole launch."""
    import json

    world.simple_profile(patterns=("app/1.0", "app/1.1"))
    world.build()
    index = json.loads((world.store / "index.json").read_text())["sources"]
    image = world.store / index[str(world.sw / "app" / "1.0")] / "image.erofs"
    image.write_bytes(b"not an erofs image\n" * 512)
    r = world.ovlrun("--profile", "p", "--", "sh", "-c", MOUNTS)
    assert r.returncode == 0 and r.stdout.split() == [str(world.sw / "app" / "1.1")], r
    (warning,) = _warnings(r.stderr)
    assert str(world.sw / "app" / "1.0") in warning and "stays unlocalised" in warning, warning
    strict = world.ovlrun("--profile", "p", "--strict", "--", "true")
    assert _one_line_error(strict) and str(image) in strict.stderr, strict


# ------------------------------------------------------------------------------ item 6


N_PATHS = 24


def _many_paths(world: World) -> None:
    for i in range(N_PATHS):
        lib = world.sw / "many" / f"r{i:02d}" / "lib"
        lib.mkdir(parents=True)
        (lib / "libx.so").write_text("x")
    world.simple_profile(patterns=("many/*",))
    world.build()


# The limits a caller can set before `sudo ovlrun`: the red team saw tracebacks and, once,
# a --strict launch that ran with a path unlocalised at RLIMIT_NOFILE 37-38.
LIMITS = ([("NOFILE", n) for n in range(20, 41)]
          + [("AS", mb << 20) for mb in (20, 30, 40, 50, 60, 80)]
          + [("DATA", mb << 20) for mb in (5, 10, 20, 40)]
          + [("NPROC", n) for n in (0, 1, 4)]
          + [("FSIZE", n) for n in (0, 1, 4096)])


def _limited(name: str, value: int) -> object:
    def preexec() -> None:  # in the child only: the test runner keeps its own limits
        resource.setrlimit(getattr(resource, f"RLIMIT_{name}"), (value, value))
    return preexec


def test_resource_limits_give_a_correct_run_or_one_line_and_125(world: World) -> None:
    _many_paths(world)
    floor = "import ovlrun.cli.main, ovlrun.cli.launch, ovlrun.launch.execute, ovlrun.launch.mount"
    problems, skipped = [], []
    for name, value in LIMITS:
        start = subprocess.run([sys.executable, "-c", floor], env=world.env, capture_output=True,
                               preexec_fn=_limited(name, value), timeout=60)
        if start.returncode != 0:
            skipped.append(f"{name}={value}")  # the interpreter itself cannot start: not ours
            continue
        for cached, strict in ((False, True), (True, True), (True, False)):
            if not cached:
                shutil.rmtree(world.store / "plans", ignore_errors=True)
            args = ["--profile", "p", *(["--strict"] if strict else []), "--", "sh", "-c", MOUNTS]
            r = world.ovlrun(*args, preexec_fn=_limited(name, value))
            what = f"{name}={value} {'strict' if strict else 'plain'} {'cached' if cached else 'planned'}"
            if "Traceback" in r.stderr:
                problems.append(f"{what}: traceback: {r.stderr.strip().splitlines()[-1]}")
            elif r.returncode == 0 and len(r.stdout.split()) != N_PATHS:
                problems.append(f"{what}: ran with {len(r.stdout.split())}/{N_PATHS} paths localised"
                                f" ({r.stderr.strip()[-200:]})")
            elif r.returncode != 0 and not _one_line_error(r):
                problems.append(f"{what}: exit {r.returncode}: {r.stderr.strip()[-200:]}")
    print(f"interpreter cannot start under: {skipped}")
    assert problems == [], "\n".join(problems)


def test_job_gets_the_callers_limits_back_through_sudo(world: World, test_user: str,
                                                       shipped_sudoers: Path) -> None:
    """Through real sudo, at the soft limits the red team used: the root phase lifts them
    (to the hard limit at least: no capability needed), so the run is correct, and the
    job runs with exactly the limits its caller set, soft and hard.  (sudo here passes
    RLIMIT_NOFILE through; it resets RLIMIT_AS for its command, so the address-space
    limits are covered by the direct sweep above.)  What the job must get is what sudo
    gives its command at that limit: sudo's PAM session (pam_limits) may set limits of its
    own (measured: a fresh Debian 12 root, libpam-modules 1.5.2-6+deb12u2, gets a soft
    RLIMIT_NOFILE of 1024 from plain sudo; this host, deb12u1, keeps the caller's 37), so
    sudo without ovlrun, in the same shell, is the reference."""
    _many_paths(world)
    entry = world.admin_entry()
    for flag, soft in (("-n", "37"), ("-n", "38"), ("-n", "20")):
        plain = subprocess.run(["sh", "-c", f"ulimit -S {flag} {soft} && sudo -n sh -c 'ulimit -H {flag}; "
                                            f"ulimit -S {flag}'"], capture_output=True, text=True, timeout=60)
        assert plain.returncode == 0, plain.stderr
        r = su(test_user, f"ulimit -H {flag}; ulimit -S {flag} {soft} && sudo -n {entry} -p p --strict -- sh -c "
                          f"\"{MOUNTS} | wc -l; ulimit -H {flag}; ulimit -S {flag}\"")
        assert r.returncode == 0 and "Traceback" not in r.stderr, (flag, soft, r)
        _hard, count, job_hard, job_soft = r.stdout.split()
        assert count == str(N_PATHS), (flag, soft, r.stdout)
        assert [job_hard, job_soft] == plain.stdout.split(), (flag, soft, r.stdout, plain.stdout)


# ------------------------------------------------------------------------------ item 7


def test_root_imports_nothing_after_the_first_mount(world: World, test_user: str) -> None:
    """README: after the first mount root imports nothing.  strace -f of a launch of two
    paths: no Python module file is opened by any launcher process between the first
    mount and the privilege drop, whether the launch mounts in-process (a local tree) or
    from its worker's threads (a tree on FUSE)."""
    for lines in _trace_local_and_fuse_launches(world, test_user):
        _assert_no_import_after_the_first_mount(lines)


def _trace_local_and_fuse_launches(world: World, user: str = "") -> tuple[list[str], list[str]]:
    """strace -f of a launch of two paths on the world's local tree, then on the same
    tree served through faultfs."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    world.simple_profile(patterns=("app/1.0", "app/1.1"))
    world.build()

    def local(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env=world.env, capture_output=True, text=True, timeout=120)

    on_disk = _trace_launch(local, world.base / "local.strace", user)
    backing, mnt = _fuse_tree(world, '"app/1.0", "app/1.1"')
    env = {**world.env, "PATH": "/usr/bin:/bin"}
    with FaultFS(world.base, backing, mnt) as fs:
        assert fs.ovlrun("snapshot", "build", "--profile", "p", env=env).returncode == 0
        on_fuse = _trace_launch(lambda argv: fs.run(argv, env=env, timeout=120), world.base / "fuse.strace", user)
    return on_disk, on_fuse


def _trace_launch(run: Callable[[list[str]], subprocess.CompletedProcess[str]], log: Path,
                  user: str = "") -> list[str]:
    """strace -f of a launch of profile p: opens, mounts, the privilege drop, forks."""
    r = run(["strace", "-f", "-qq", "-o", str(log), "-e",
             "trace=open,openat,openat2,mount,fsmount,move_mount,setgroups,setresuid,execve,clone,clone3,fork,vfork",
             sys.executable, "-m", "ovlrun", "--profile", "p", *(["--user", user] if user else []), "--", "true"])
    assert r.returncode == 0, r.stderr
    return log.read_text().splitlines()


def _assert_no_import_after_the_first_mount(lines: list[str]) -> None:
    first_mount = next(i for i, line in enumerate(lines) if re.search(r"\b(mount|fsmount|move_mount)\(", line)
                       and not re.search(r"= -1 ", line))
    drop = next(i for i, line in enumerate(lines) if i > first_mount and re.search(r"\b(setgroups|setresuid)\(", line))
    late = [line for line in lines[first_mount:drop]
            if re.search(r"\bopen(at2?)?\(", line) and re.search(r"\.(py|pyc|so)\"|python3", line)]
    assert late == [], "\n".join(late)


def test_stalled_tree_makes_the_launch_give_up_within_its_bound(world: World) -> None:
    """The tree stops answering while a launch resolves a release (a FUSE request the
    daemon holds: the thread waiting for it is in D state, not even SIGKILL ends that).
    The launch gives up within its mount-phase bound, says so in one line and exits 125;
    nothing is mounted on the host."""
    backing, mnt = _fuse_tree(world, '"app/1.0", "app/1.1"')
    env = {**world.env, "PATH": "/usr/bin:/bin"}
    with FaultFS(world.base, backing, mnt) as fs:
        assert fs.ovlrun("snapshot", "build", "--profile", "p", env=env).returncode == 0
    with FaultFS(world.base, backing, mnt) as fs:
        fs.faults("getattr stall /app/1.1")
        started = time.monotonic()
        try:
            r = fs.ovlrun("--profile", "p", "--", "true", env={**env, "OVLRUN_MOUNT_TIMEOUT": "2"}, timeout=30)
        finally:
            took = time.monotonic() - started
            fs.release()
    assert took < 15, took
    assert _one_line_error(r), r
    assert "did not answer within 2s" in r.stderr and str(mnt / "app" / "1.1") in r.stderr, r.stderr


LOOP_JOB = r"""
import sys
sys.path.insert(0, sys.argv[1])
import ovlrun.linux.erofs
ovlrun.linux.erofs._file_backed_refused = True  # mount images the way kernels before 6.12 must
from ovlrun.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def _loop_devices_of(store: Path) -> list[str]:
    """Bound loop devices whose backing file is an image of ``store``."""
    out = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if backing.read_text().strip().startswith(f"{store}/"):
                out.append(backing.parent.parent.name)
        except OSError:
            continue
    return sorted(out)


def test_loop_devices_are_bounded_by_images_not_by_jobs(world: World, test_user: str) -> None:
    """One user's jobs on a kernel that mounts images through loop devices: 6 jobs of a
    3-path profile must not hold 18 loop devices; one per image, shared, is the bound (and
    the devices left unbound in /sys/block after the jobs are then at most that many)."""
    if not Path("/dev/loop-control").exists():
        pytest.skip("no /dev/loop-control")
    world.simple_profile(patterns=("app/1.0", "app/1.1", "app/2.0"))
    shutil.copytree(world.sw / "app" / "1.1", world.sw / "app" / "2.0", symlinks=True)
    world.build()
    jobs = []
    try:
        for _ in range(6):
            p = subprocess.Popen([sys.executable, "-c", LOOP_JOB, str(REPO), "--profile", "p", "--user", test_user,
                                  "--", "sh", "-c", "echo up; read x"], env=world.env, cwd="/", text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            jobs.append(p)
            assert p.stdout is not None and p.stdout.readline() == "up\n"
        held = _loop_devices_of(world.store)
    finally:
        for p in jobs:
            p.communicate("")
    assert len(held) <= 3, held


def test_mount_phase_forks_its_bounded_worker_unless_every_tree_is_local(world: World) -> None:
    """The worker that bounds the mount phase (a stalled tree) costs every launch a fork
    and threads: a tree on a local disk cannot stall, so its launch mounts in-process and
    starts nothing; a tree on FUSE (NFS's stand-in) still goes through the worker.  The
    decision is made on the opened tree root's mount, not on its path."""
    on_disk, on_fuse = _trace_local_and_fuse_launches(world)
    assert _forks(on_disk) == 0
    assert _forks(on_fuse) >= 1


def _forks(lines: list[str]) -> int:
    """Processes and threads a traced launch started."""
    return sum(1 for line in lines if re.search(r"\b(clone3?|v?fork)\(", line))
