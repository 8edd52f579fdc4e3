"""Shared fixtures: a real shared tree, a private store, profiles, and ovlrun as a child.

Tests never change the test runner's own namespaces or credentials: every mount happens
in an ``ovlrun`` child process (or a ``python -c`` child) that dies with its namespace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0


def _has_overlay() -> bool:
    try:
        with open("/proc/filesystems") as f:
            if any(line.split()[-1] == "overlay" for line in f if line.strip()):
                return True
    except OSError:
        return False
    return subprocess.run(["modprobe", "overlay"], capture_output=True).returncode == 0


requires_root = pytest.mark.skipif(not IS_ROOT, reason="needs root: overlayfs metacopy/redirect xattrs "
                                   "(trusted.*) and mount namespaces require CAP_SYS_ADMIN")
requires_overlay = pytest.mark.skipif(IS_ROOT and not _has_overlay(), reason="kernel has no overlayfs")
NOBODY = 65534
TEST_USER = "ovltest"
TEST_UID = 4242


def ensure_user(name: str, uid: int) -> None:
    """An unprivileged user with a home and a login shell (useradd if missing)."""
    if not IS_ROOT:
        pytest.skip(f"needs root to create the user {name}")
    if subprocess.run(["id", name], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-m", "-u", str(uid), "-s", "/bin/bash", name], check=True)


@pytest.fixture(scope="session")
def test_user() -> str:
    """The suite's unprivileged user (see :func:`ensure_user`)."""
    ensure_user(TEST_USER, TEST_UID)
    return TEST_USER


def host_mounts() -> list[tuple[str, str]]:
    """(mount point, fstype) of the test runner's namespace, i.e. the host's, limited to what
    ovlrun or these tests could have mounted: overlays and anything under /var/tmp/ovlrun-test-*
    (other activity on a developer's machine must not make tests flaky)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point, (fstype, source) = left.split()[4], right.split()[:2]
            if (fstype == "overlay" and source != "overlay") or point.startswith("/var/tmp/ovlrun-test-"):
                out.append((point, fstype))
    return sorted(out)


@dataclass
class World:
    """A shared software tree, a snapshot store and a profile directory, all private."""

    base: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def sw(self) -> Path:
        return self.base / "sw"

    @property
    def store(self) -> Path:
        return self.base / "store"

    @property
    def profiles(self) -> Path:
        return self.base / "profiles"

    @property
    def rundir(self) -> Path:
        """Where this world's launches and hooks keep their job records."""
        return self.base / "run" / "jobs"

    def write_profile(self, name: str, text: str) -> Path:
        path = self.profiles / f"{name}.toml"
        path.write_text(text)
        return path

    def simple_profile(self, name: str = "p", patterns: tuple[str, ...] = ("app/1.0",)) -> Path:
        items = ", ".join(f'"{p}"' for p in patterns)
        return self.write_profile(name, f'description = "test"\n[[tree]]\nroot = "{self.sw}"\nlocalise = [{items}]\n')

    def ovlrun(self, *args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None,
               timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
        full_env = {**self.env, **(env or {})}
        return subprocess.run([sys.executable, "-m", "ovlrun", *args], env=full_env, cwd=cwd, text=True,
                              capture_output=True, timeout=timeout, **kw)  # type: ignore[call-overload,no-any-return]

    def admin_entry(self) -> Path:
        """An admin-installed ``ovlrun`` (what sudoers points at) whose defaults are this world's
        store and profiles: sudo callers may not choose them through the environment."""
        entry = self.base / "ovlrun-entry"
        if not entry.exists():
            entry.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
                             "import ovlrun.profile.locate, ovlrun.store.layout, ovlrun.jobs.records\n"
                             f"ovlrun.store.layout.DEFAULT_STORE = {str(self.store)!r}\n"
                             f"ovlrun.profile.locate.DEFAULT_PROFILE_DIRS = ({str(self.profiles)!r},)\n"
                             f"ovlrun.jobs.records.DEFAULT_RUNDIR = {str(self.rundir)!r}\n"
                             "from ovlrun.cli.main import main\nsys.exit(main())\n")
            entry.chmod(0o755)
        return entry

    def as_sudo(self, *args: str, uid: int, gid: int | None = None, extra_env: dict[str, str] | None = None,
                **kw: object) -> subprocess.CompletedProcess[str]:
        """Run the admin entry as sudo would leave it: reset env plus SUDO_* (no sudo parent)."""
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
               "SUDO_UID": str(uid), "SUDO_GID": str(uid if gid is None else gid), "SUDO_USER": "x",
               **(extra_env or {})}
        return subprocess.run([str(self.admin_entry()), *args], env=env, text=True, capture_output=True,
                              timeout=60, **kw)  # type: ignore[call-overload,no-any-return]

    def build(self, profile: str = "p") -> subprocess.CompletedProcess[str]:
        result = self.ovlrun("snapshot", "build", "--profile", profile)
        assert result.returncode == 0, result.stderr
        return result

    def job(self, script: str, profile: str = "p", env: dict[str, str] | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
        return self.ovlrun("--profile", profile, "--", "/bin/sh", "-c", script, env=env, cwd=cwd)


def make_release_tree(sw: Path) -> None:
    """app/1.0 (to localise), app/1.1 (not), lib dirs, a symlink, data files."""
    for rel in ("1.0", "1.1"):
        d = sw / "app" / rel
        (d / "lib" / "python").mkdir(parents=True)
        (d / "bin").mkdir()
        (d / "lib" / "python" / "mod.py").write_text(f"VERSION = '{rel}'\n")
        (d / "lib" / "libfoo.so.1").write_bytes(b"\x7fELF" + bytes(range(256)) * 40)
        (d / "bin" / "tool").write_text("#!/bin/sh\necho tool " + rel + "\n")
        (d / "bin" / "tool").chmod(0o755)
        (d / "lib" / "libfoo.so").symlink_to("libfoo.so.1")
        (d / "README").write_text(f"app {rel}\n")


@pytest.fixture
def world() -> Iterator[World]:
    # Under /var/tmp with 0755 so an unprivileged job user can traverse it (pytest's
    # tmp_path lives under a 0700 directory).
    base = Path(tempfile.mkdtemp(prefix="ovlrun-test-", dir="/var/tmp"))
    base.chmod(0o755)
    w = World(base)
    w.sw.mkdir()
    w.profiles.mkdir()
    make_release_tree(w.sw)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OVLRUN_", "SUDO_"))}
    env.update({"OVLRUN_STORE": str(w.store), "OVLRUN_PROFILE_PATH": str(w.profiles),
                "OVLRUN_JOB_RUNDIR": str(w.rundir), "PYTHONPATH": str(REPO), "LC_ALL": "C.UTF-8"})
    w.env = env
    before = host_mounts() if IS_ROOT else []
    yield w
    if IS_ROOT:
        assert host_mounts() == before, "a test left mounts in the host namespace"
    shutil.rmtree(base, ignore_errors=True)


@dataclass
class Entry:
    """One entry of a snapshot image as the kernel shows it (mounted in a child)."""

    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    nlink: int
    blocks: int
    target: bytes | None
    xattrs: dict[bytes, bytes]


def snapshot_dir(world: World, path: str | Path) -> Path:
    """The current snapshot directory of a localised path, per the store's index."""
    import json

    index = json.loads((world.store / "index.json").read_text())["sources"]
    return world.store / index[str(path)]


def snapshot_entries(world: World, path: str | Path) -> dict[bytes, Entry]:
    """Every entry of the current snapshot image of ``path``, relpath bytes -> Entry, read by
    mounting the image in a child's private namespace (tests/erofs_child.py)."""
    import pickle

    image = snapshot_dir(world, path) / "image.erofs"
    child = Path(__file__).with_name("erofs_child.py")
    r = subprocess.run([sys.executable, str(child)], input=pickle.dumps({"image": str(image), "method": "auto"}),
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    reply = pickle.loads(r.stdout)
    assert "error" not in reply, reply["error"]
    return {rel: Entry(*record) for rel, record in reply["entries"].items()}


# Tests that build whole environments of their own: Debian kernels booted under qemu, the
# Slurm 24.11 debootstrapped root, the fresh Debian roots of the quick start.  Inside a
# fresh root (tests/freshroot.py sets OVLRUN_NESTED=1) they skip: the host runs them in
# the same CI run.  `make test-fast` deselects them (-m "not environment").
ENVIRONMENT_TESTS = ("tests/test_vm_kernels.py",
                     "tests/test_quickstart.py::test_quick_start_on_fresh_debian",
                     "tests/test_quickstart.py::test_fresh_root_dies_with_its_runner")
ENVIRONMENT_SLURM = "trixie"  # tests/slurm's instance in a debootstrapped root


def _builds_environment(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    slurm = callspec.params.get("slurm") if callspec is not None else None
    return item.nodeid.startswith(ENVIRONMENT_TESTS) or (isinstance(slurm, tuple) and slurm[0] == ENVIRONMENT_SLURM)
NESTED = os.environ.get("OVLRUN_NESTED") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "environment: builds its own VM, root or Slurm (slow; skipped when nested)")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    nested = pytest.mark.skipif(True, reason="OVLRUN_NESTED=1 (inside a fresh Debian root): "
                              "runs on the host in the same CI run")
    for item in items:
        if _builds_environment(item):
            item.add_marker(pytest.mark.environment)
            if NESTED:
                item.add_marker(nested)
