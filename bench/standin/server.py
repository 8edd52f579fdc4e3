"""Build, mount and unmount the benchnfs stand-in."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.mounts import is_mountpoint, umount
from bench.standin.counters import read_counters, set_latency_us
from bench.tree import BENCH_CACHE

SOURCE = Path(__file__).with_name("benchnfs.c")
RUN_DIR = Path("/run/ovlrun-bench")


def ensure_packages() -> None:
    """Install the C toolchain bits the server needs (Debian packages)."""
    have_hdr = Path("/usr/include/fuse3/fuse_lowlevel.h").exists()
    if have_hdr and shutil.which("gcc") and shutil.which("fusermount3"):
        return
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "gcc", "pkg-config", "fuse3",
                    "libfuse3-dev"], check=True)


def build_server() -> Path:
    """Compile benchnfs.c once per source version into the bench cache."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    binary = BENCH_CACHE / "bin" / f"benchnfs-{digest}"
    if binary.exists():
        return binary
    ensure_packages()
    binary.parent.mkdir(parents=True, exist_ok=True)
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], check=True,
                           capture_output=True, text=True).stdout.split()
    tmp = binary.with_suffix(".tmp")
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(tmp), str(SOURCE), *flags],
                   check=True)
    tmp.rename(binary)
    return binary


@dataclass
class StandIn:
    """One benchnfs server serving `backing` at `mountpoint`."""

    backing: Path
    mountpoint: Path
    latency_us: int = 1000
    entry_timeout: float = 1.0
    attr_timeout: float = 1.0
    negative_timeout: float = 1.0
    xattr: str = "passthrough"
    counters_path: Path = RUN_DIR / "benchnfs.ctl"
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def mount(self) -> None:
        if is_mountpoint(self.mountpoint):
            raise RuntimeError(f"{self.mountpoint} is already a mount point")
        binary = build_server()
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.counters_path.parent.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen([
            str(binary), "--latency-us", str(self.latency_us),
            "--entry-timeout", str(self.entry_timeout),
            "--attr-timeout", str(self.attr_timeout),
            "--negative-timeout", str(self.negative_timeout),
            "--xattr", self.xattr, "--counters", str(self.counters_path),
            str(self.backing), str(self.mountpoint),
        ])
        deadline = time.monotonic() + 10
        while not is_mountpoint(self.mountpoint):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("benchnfs failed to mount")
            time.sleep(0.01)

    def unmount(self) -> None:
        if self._proc is None:
            return
        # SIGTERM: libfuse leaves its loop and unmounts the filesystem itself.
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)
        if is_mountpoint(self.mountpoint):
            # Still referenced (a leaked namespace): detach it.
            umount(self.mountpoint, lazy=True)
        self._proc = None

    def remount(self) -> None:
        """A fresh client: no cached dentries, attributes or pages."""
        self.unmount()
        self.mount()

    def counters(self) -> dict[str, int]:
        return read_counters(self.counters_path)

    def set_latency(self, latency_us: int) -> None:
        self.latency_us = latency_us
        set_latency_us(self.counters_path, latency_us)

    def __enter__(self) -> "StandIn":
        self.mount()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()
