"""Running ``ovlrun learn`` in tests: as a child (``python -I -m ovlrun.learn``: the
job's environment, PYTHONPATH included, is the workload's, never learn's own), and
checking that nothing of it stays behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IS_ROOT, World

LEARN = [sys.executable, "-I", "-m", "ovlrun", "learn"]


def learn(world: World, *args: str, env: dict[str, str] | None = None, timeout: float = 300,
          **kw: Any) -> subprocess.CompletedProcess[str]:
    full = {"OVLRUN_STORE": str(world.store), "OVLRUN_PROFILE_PATH": str(world.profiles),
            "OVLRUN_JOB_RUNDIR": str(world.rundir), "LC_ALL": "C.UTF-8",
            "PATH": "/usr/bin:/bin", **(env or {})}
    return subprocess.run([*LEARN, *args], env=full, text=True, capture_output=True, timeout=timeout, **kw)


def report(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def rows(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """release -> its row (release directories only)."""
    return {r["release"]: r for r in data["rows"] if r["release"]}


def events(path: Path) -> list[tuple[str, str, str]]:
    """Every lookup of an ``--events`` file, one entry per time it was made, sorted."""
    return sorted((e["syscall"], e["path"], e["result"]) for e in map(json.loads, path.read_text().splitlines())
                  for _ in range(e["count"]))


def children(pid: int) -> dict[int, str]:
    """pid -> comm of the processes whose parent is ``pid``."""
    out = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            out[int(entry)] = comm
    return out


def all_exit(pidfds: list[int], timeout: float) -> bool:
    """Have all the processes behind these pidfds exited (zombies included) within ``timeout``?"""
    import select

    deadline = time.monotonic() + timeout
    pending = list(pidfds)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select(pending, [], [], left)
        pending = [fd for fd in pending if fd not in ready]
    return True


def tracefs_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if " - tracefs " in line or " - debugfs " in line]


_BPFTRACE_REASON: list[str] = []


def require_bpftrace(world: World) -> None:
    """Skip (with the kernel's reason) where bpftrace cannot attach to syscall tracepoints."""
    if not IS_ROOT:
        pytest.skip("bpftrace needs root")
    if not _BPFTRACE_REASON:
        r = learn(world, "--tracer", "bpftrace", "--tree", str(world.sw), "--", "/bin/true")
        refused = ("could not attach", "cannot mount tracefs", "no syscall tracepoints", "not installed")
        _BPFTRACE_REASON.append(next((line for line in r.stderr.splitlines() if any(x in line for x in refused)), ""))
    if _BPFTRACE_REASON[0]:
        pytest.skip(f"the kernel refuses bpftrace here: {_BPFTRACE_REASON[0]}")
