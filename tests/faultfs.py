"""The fault-injecting FUSE stand-in for the shared tree (``faultfs.c``), for tests.

The daemon runs in its own private mount namespace (``unshare -m``), so the FUSE mount
never appears in the test runner's (the host's) mount table; ovlrun commands that must
see it run in that namespace through ``nsenter``.  When the daemon dies its connection
is aborted, so anything blocked on a stalled request gets ENOTCONN and can exit.
"""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).with_name("faultfs.c")
COUNTERS = ("getattr", "opendir", "readdir", "readlink", "open", "read")


def faultfs_binary() -> Path:
    """Compile faultfs.c once per source version (cached under /var/tmp), or skip."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse: the FUSE fault stand-in cannot run here")
    if shutil.which("gcc") is None or not Path("/usr/include/fuse3/fuse.h").exists():
        pytest.skip("gcc or libfuse3-dev missing (make setup installs libfuse3-dev)")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    binary = Path("/var/tmp/ovlrun-test-bin") / f"faultfs-{digest}"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], check=True, capture_output=True,
                               text=True).stdout.split()
        tmp = binary.with_name(binary.name + f".{os.getpid()}")
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(tmp), str(SOURCE), *flags], check=True)
        tmp.rename(binary)
    return binary


class FaultFS:
    """``backing`` served read-only at ``mountpoint`` inside a private mount namespace."""

    def __init__(self, base: Path, backing: Path, mountpoint: Path) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.ctl = base / f"ctl-{mountpoint.name}"
        self.ctl.mkdir(exist_ok=True)
        mountpoint.mkdir(exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10) -> FaultFS:
        (self.ctl / "release").unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            self.stop()
            raise AssertionError("faultfs did not come up")
        assert self.proc.stdout.readline() == b"ready\n"
        return self

    def command(self) -> list[str]:
        """The daemon's command line (in a private mount namespace of its own)."""
        return ["unshare", "-m", "--propagation", "private", str(faultfs_binary()), str(self.backing),
                str(self.mountpoint), str(self.ctl)]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            (self.ctl / "release").touch()
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None

    def __enter__(self) -> FaultFS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def faults(self, *rules: str) -> None:
        """Replace the fault rules ("OP MODE /path/inside/the/fs")."""
        tmp = self.ctl / "faults.tmp"
        tmp.write_text("".join(r + "\n" for r in rules))
        os.replace(tmp, self.ctl / "faults")

    def release(self) -> None:
        (self.ctl / "release").touch()

    def counters(self) -> dict[str, int]:
        data = (self.ctl / "counters").read_bytes()
        return dict(zip(COUNTERS, struct.unpack(f"{len(COUNTERS)}Q", data[:8 * len(COUNTERS)]), strict=True))

    def run(self, argv: list[str], env: dict[str, str], timeout: float = 60,
            **kw: object) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the daemon's mount namespace (where the mount is)."""
        assert self.proc is not None
        return subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m", "--", *argv], env=env, cwd="/",
                              text=True, capture_output=True, timeout=timeout, **kw)  # type: ignore[call-overload,no-any-return]

    def ovlrun(self, *args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run([sys.executable, "-m", "ovlrun", *args], env=env, timeout=timeout)
