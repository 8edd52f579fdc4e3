"""Shared pieces of the attack tests (issues 9 and 18): a second, victim user, real sudoers
drop-ins, running commands as a user, a RENAME_EXCHANGE racer, pinned job namespaces and
a FUSE mount a user made.

Everything that changes credentials, namespaces or mounts runs in a child process.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, TEST_UID, World, ensure_user
from tests.faultfs import FaultFS, faultfs_binary

VICTIM_USER = "ovlvictim"
VICTIM_UID = 4243
SHIPPED_SUDOERS = REPO / "contrib" / "sudoers.d" / "ovlrun"
SECRET_NAME = "victim-secret-name.txt"


@pytest.fixture(scope="session")
def victim() -> Path:
    """Another unprivileged user whose 0700 home holds a private directory."""
    ensure_user(VICTIM_USER, VICTIM_UID)
    home = Path(f"/home/{VICTIM_USER}")
    private = home / "private"
    private.mkdir(parents=True, exist_ok=True)
    (private / SECRET_NAME).write_text("victim's data\n")
    for p in (home, private, private / SECRET_NAME):
        os.chown(p, VICTIM_UID, VICTIM_UID)
    home.chmod(0o700)
    private.chmod(0o700)
    return private


def install_sudoers(text: str, tag: str) -> Iterator[Path]:
    if shutil.which("sudo") is None:
        pytest.skip("sudo is not installed (make setup installs it)")
    rule = Path(f"/etc/sudoers.d/ovlrun-{tag}-{os.getpid()}")
    rule.write_text(text)
    rule.chmod(0o440)
    try:
        check = subprocess.run(["visudo", "-cf", str(rule)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        yield rule
    finally:
        rule.unlink()


@pytest.fixture
def shipped_sudoers(world: World, test_user: str) -> Iterator[Path]:
    """contrib/sudoers.d/ovlrun as shipped, pointing at this world's admin entry."""
    entry = world.admin_entry()
    text = SHIPPED_SUDOERS.read_text().replace("/usr/local/sbin/ovlrun", str(entry))
    # A unique alias name: an installed /etc/sudoers.d/ovlrun defines OVLRUN too, and a
    # second definition would make sudo refuse both files.
    text = re.sub(r"\bOVLRUN\b", f"OVLRUN_TEST_{os.getpid()}", text)
    yield from install_sudoers(text, "shipped")


@pytest.fixture
def broad_sudoers(world: World, test_user: str) -> Iterator[Path]:
    """A drop-in granting any arguments (the shipped one before issue 9): tests the tool's own refusal."""
    entry = world.admin_entry()
    yield from install_sudoers(f"{test_user} ALL=(root) NOPASSWD: {entry}\n", "broad")


def su(user: str, script: str, *, timeout: float = 120, cwd: str = "/") -> subprocess.CompletedProcess[str]:
    """``script`` run by ``sh`` as ``user`` (a real login: su), environment reset by su."""
    return subprocess.run(["su", user, "-s", "/bin/sh", "-c", script], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def sudo_env(uid: int = TEST_UID) -> dict[str, str]:
    """The environment sudo leaves its command (env_reset), for runs without a sudo parent."""
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
            "SUDO_UID": str(uid), "SUDO_GID": str(uid), "SUDO_USER": "x", "HOME": "/root"}


def user_dir(path: Path, uid: int = TEST_UID, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    path.chmod(mode)
    return path


RACER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE = 2
a, b = (os.fsencode(p) for p in sys.argv[1:3])
print("racing", flush=True)
while True:
    if libc.renameat2(-100, a, -100, b, RENAME_EXCHANGE) != 0:
        sys.exit(f"renameat2: {os.strerror(ctypes.get_errno())}")
"""


class Racer:
    """A child process swapping two names with renameat2(RENAME_EXCHANGE) as fast as it can."""

    def __init__(self, a: Path, b: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", RACER, str(a), str(b)], stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "racing\n"  # started: no sleep needed

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def race_dirs(base: Path, victim_dir: Path) -> tuple[Path, Path, int]:
    """``base/dir`` (a real directory the attacker owns) and ``base/link`` (a symlink to the
    victim's directory), and an O_PATH fd of the real directory for children to start in."""
    user_dir(base)
    real = user_dir(base / "dir")
    link = base / "link"
    link.symlink_to(victim_dir)
    os.lchown(link, TEST_UID, TEST_UID)
    fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return real, link, fd


def slurm_env(world: World, job_id: str, uid: int = TEST_UID, user: str = "ovltest") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "OVLRUN_", "SUDO_"))}
    env.update(world.env, SLURM_JOB_ID=job_id, SLURM_JOB_UID=str(uid), SLURM_JOB_GID=str(uid),
               SLURM_JOB_USER=user, SLURM_JOB_COMMENT="ovl:p", SLURMD_NODENAME="attacknode",
               OVLRUN_SLURM_JC_CONF=str(world.base / "no-job_container.conf"),
               OVLRUN_SLURM_LOG=str(world.base / "slurm.log"))
    return env


# The mount fusermount3 makes for a user (issue 18, item 1): root opens /dev/fuse and
# mounts it with the user's user_id/group_id and without allow_other, then the daemon runs
# as the user and is handed the connection as /dev/fd/N (libfuse's pre-mounted fd).  Done
# in a private mount namespace of its own, so the host's mount table never sees it (this
# machine's /dev/fuse is root-only, so the user could not open it directly).
USER_FUSE = r"""
import ctypes, os, sys
uid, gid = int(sys.argv[1]), int(sys.argv[2])
binary, backing, mnt, ctl = sys.argv[3:7]
libc = ctypes.CDLL(None, use_errno=True)
def check(result, what):
    if result != 0:
        sys.exit(f"{what}: {os.strerror(ctypes.get_errno())}")
check(libc.unshare(0x00020000), "unshare")
check(libc.mount(None, b"/", None, 0x4000 | 0x40000, None), "make / private")
fd = os.open("/dev/fuse", os.O_RDWR)
os.set_inheritable(fd, True)
rootmode = os.stat(mnt).st_mode & 0o170000
options = f"fd={fd},rootmode={rootmode:o},user_id={uid},group_id={gid}".encode()
check(libc.mount(b"faultfs", os.fsencode(mnt), b"fuse.faultfs", 1 | 2 | 4, options), "mount")  # ro,nosuid,nodev
os.setgroups([])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)
os.execv(binary, [binary, backing, f"/dev/fd/{fd}", ctl])
"""


class UserFuse(FaultFS):
    """A FUSE file system a user mounted on a directory they own, as fusermount3 mounts
    it: the daemon runs as that user and the kernel refuses every other user, root
    included (EACCES), since the mount has no allow_other.  Commands that must see it run
    in its namespace (:meth:`FaultFS.run`)."""

    def __init__(self, base: Path, backing: Path, mountpoint: Path, uid: int) -> None:
        super().__init__(base, backing, mountpoint)
        self.uid = uid
        os.chown(self.ctl, uid, uid)  # the daemon (the user) writes its counters there

    def command(self) -> list[str]:
        return [sys.executable, "-c", USER_FUSE, str(self.uid), str(self.uid), str(faultfs_binary()),
                str(self.backing), str(self.mountpoint), str(self.ctl)]
