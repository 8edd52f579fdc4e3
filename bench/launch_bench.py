"""Launch overhead: `ovlrun --profile P -- /bin/true` against its floors.

Commands are measured in the same run and interleaved (each round runs every
command once, in a shuffled order), so drift in machine state hits all of
them alike; we report the median and the interquartile range.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import ovlrun_cli
from bench.configs import SHARED_ROOT
from bench.standin.counters import diff, round_trips
from bench.standin.server import RUN_DIR, StandIn
from bench.tree import TREE_DIR, TreeInfo

SUBTREE_COUNTS = (1, 20, 100)
BASELINE_SNAP = RUN_DIR / "launch-snap"


def launch_profile(n: int) -> str:
    return f"bench-launch-{n}"


def write_launch_profiles(tree: TreeInfo) -> None:
    for n in SUBTREE_COUNTS:
        ovlrun_cli.write_profile(launch_profile(n), SHARED_ROOT, tree.lib_dirs[:n],
                                 f"bench: {n} localised library directories")


def make_baseline_snapshot(tree: TreeInfo) -> tuple[Path, str]:
    """A hand-made snapshot of one lib dir for the `unshare + mount` floor.

    Same shape as ovlrun's: an opaque directory of sparse metacopy files with
    absolute redirects into the data-only layer.
    """
    rel = tree.lib_dirs[0]
    shutil.rmtree(BASELINE_SNAP, ignore_errors=True)
    BASELINE_SNAP.mkdir(parents=True)
    os.setxattr(BASELINE_SNAP, "trusted.overlay.opaque", b"y")
    for name in os.listdir(TREE_DIR / rel):
        src = TREE_DIR / rel / name
        dst = BASELINE_SNAP / name
        st = os.lstat(src)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
            continue
        with open(dst, "wb") as f:
            f.truncate(st.st_size)
        os.setxattr(dst, "trusted.overlay.metacopy", b"")
        os.setxattr(dst, "trusted.overlay.redirect", f"/{name}".encode())
    return BASELINE_SNAP, rel


@dataclass
class Stat:
    name: str
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def iqr(self) -> tuple[float, float]:
        q = statistics.quantiles(self.samples, n=4)
        return q[0], q[2]


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0


def measure(tree: TreeInfo, rounds: int, latency_us: int, log=print) -> dict[str, object]:
    write_launch_profiles(tree)
    snap, rel = make_baseline_snapshot(tree)
    target = SHARED_ROOT / rel
    mount_sh = (f"mount -t overlay overlay -o ro,metacopy=on,redirect_dir=follow,"
                f"lowerdir={snap}::{target} {target} && exec /bin/true")
    env = ovlrun_cli.env()
    cmds: dict[str, list[str]] = {
        "bare /bin/true": ["/bin/true"],
        "unshare -m + 1 mount": ["unshare", "-m", "sh", "-c", mount_sh],
        # The interpreter floor of any Python launcher: same python, same site.
        "python3 -c pass": [sys.executable, "-c", "pass"],
        # ... and of the isolated launcher `make install` writes (no site, no .pth hooks).
        "python3 -I -S -c pass": [sys.executable, "-I", "-S", "-c", "pass"],
    }
    isolated = RUN_DIR / "ovlrun-isolated"
    subprocess.run([sys.executable, "-m", "ovlrun.cli.install_launcher", "--from-checkout", str(isolated)], check=True, capture_output=True,
                   cwd=ovlrun_cli.REPO)
    for n in SUBTREE_COUNTS:
        cmds[f"ovlrun {n} subtrees"] = [*ovlrun_cli.prefix(launch_profile(n)), "/bin/true"]
        cmds[f"ovlrun -I -S launcher, {n} subtrees"] = [str(isolated), "--profile", launch_profile(n), "--",
                                                         "/bin/true"]

    standin = StandIn(TREE_DIR, SHARED_ROOT, latency_us=latency_us)
    standin.mount()
    try:
        standin.set_latency(0)
        for n in SUBTREE_COUNTS:
            ovlrun_cli.snapshot_build(launch_profile(n))
        standin.set_latency(latency_us)
        requests: dict[str, int] = {}
        for name, cmd in cmds.items():  # warm-up + remote requests per launch
            _timed(cmd, env)
            before = standin.counters()
            _timed(cmd, env)
            requests[name] = round_trips(diff(standin.counters(), before))
        # Twice: at the configured latency, and at 0 to separate ovlrun's own
        # CPU cost from the round trips its path walks and mounts make.
        samples: dict[str, list[float]] = {}
        rng = random.Random(1)
        for lat in (latency_us, 0):
            standin.set_latency(lat)
            for _ in range(rounds):
                order = list(cmds)
                rng.shuffle(order)
                for name in order:
                    samples.setdefault(f"{name} @{lat}us", []).append(_timed(cmds[name], env))
        standin.set_latency(latency_us)
        breakdown = phase_breakdown(cmds[f"ovlrun 20 subtrees"], env)
        importtime = import_profile(launch_profile(20), env)
    finally:
        standin.unmount()
        shutil.rmtree(BASELINE_SNAP, ignore_errors=True)
    stats = {k: Stat(k, v) for k, v in samples.items()}
    rows = []
    for k, s in stats.items():
        name, _, lat = k.rpartition(" @")
        bare = stats[f"bare /bin/true @{lat}"].median
        lo, hi = s.iqr
        rows.append({"command": name, "latency_us": int(lat.rstrip("us")),
                     "median_ms": s.median * 1e3, "q1_ms": lo * 1e3,
                     "q3_ms": hi * 1e3, "overhead_ms": (s.median - bare) * 1e3,
                     "remote_requests": requests[name], "n": len(s.samples)})
        log(f"  {k:32s} median {s.median * 1e3:7.2f} ms  (+{(s.median - bare) * 1e3:6.2f})")
    return {"rows": rows, "breakdown": breakdown, "importtime": importtime}


_STRACE_LINE = re.compile(r"^(?:\[pid\s+(\d+)\]\s+|(\d+)\s+)?(\d+\.\d+)\s+(\w+)\((.*)$")


def phase_breakdown(cmd: list[str], env: dict[str, str], runs: int = 5) -> list[dict[str, object]]:
    """Split one launch into phases from syscall timestamps (strace -f -ttt).

    strace slows every syscall, so absolute numbers are inflated; the phases'
    relative sizes are what matters.  Medians over a few runs.
    """
    log_path = RUN_DIR / "launch.strace"
    phases: dict[str, list[float]] = {}
    for _ in range(runs):
        subprocess.run(["strace", "-f", "-ttt", "-qq", "-o", str(log_path),
                        "-e", "trace=execve,openat,unshare,mount,mount_setattr,fsopen,fsconfig,"
                              "fsmount,move_mount,setresuid,setresgid,setgroups,setuid,setgid,"
                              "clone,clone3,vfork,exit_group,wait4",
                        *cmd], env=env, check=True, stdin=subprocess.DEVNULL)
        events = []
        for line in log_path.read_text().splitlines():
            m = _STRACE_LINE.match(line)
            if m:
                events.append((float(m.group(3)), m.group(4), m.group(5)))
        log_path.unlink()
        t_start = events[0][0]
        first = lambda pred: next((t for t, s, a in events if pred(s, a)), None)  # noqa: E731
        last = lambda pred: next((t for t, s, a in reversed(events) if pred(s, a)), None)  # noqa: E731
        t_ovl = first(lambda s, a: s == "openat" and "/ovlrun/" in a)
        t_ns = first(lambda s, a: s in ("unshare", "clone", "clone3") and "NEWNS" in a)
        t_mount_end = last(lambda s, a: s in ("mount", "move_mount", "fsmount", "mount_setattr"))
        t_priv = first(lambda s, a: s in ("setgroups", "setresgid", "setresuid", "setgid", "setuid"))
        t_exec = last(lambda s, a: s == "execve" and "/bin/true" in a)
        t_end = events[-1][0]
        marks = [("interpreter start", t_start, t_ovl), ("imports + profile load", t_ovl, t_ns),
                 ("namespace + mounts", t_ns, t_mount_end),
                 ("privilege drop + exec", t_priv or t_mount_end, t_exec),
                 ("/bin/true + exit", t_exec, t_end)]
        for name, a, b in marks:
            if a is not None and b is not None:
                phases.setdefault(name, []).append((b - a) * 1e3)
        phases.setdefault("total (under strace)", []).append((t_end - t_start) * 1e3)
    return [{"phase": k, "ms": statistics.median(v)} for k, v in phases.items()]


def import_profile(profile: str, env: dict[str, str], top: int = 15) -> dict[str, object]:
    """`python -X importtime` of the launch path: top modules by cumulative time."""
    cmd = [*ovlrun_cli.prefix(profile), "/bin/true"]
    # -X importtime via the environment works for the console script too.
    e = dict(env, PYTHONPROFILEIMPORTTIME="1")
    proc = subprocess.run(cmd, env=e, check=True, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    entries = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            entries.append((int(m.group(1)), int(m.group(2)), len(m.group(3)), m.group(4)))
    top_level = [e for e in entries if e[2] == 1]
    total_us = sum(e[1] for e in top_level)
    heavy = sorted(entries, key=lambda e: -e[1])[:top]
    return {"total_ms": total_us / 1e3,
            "top": [{"module": m, "self_ms": s / 1e3, "cumulative_ms": c / 1e3, "depth": d}
                    for s, c, d, m in heavy],
            "ovlrun_modules": [{"module": m, "self_ms": s / 1e3, "cumulative_ms": c / 1e3}
                               for s, c, d, m in entries if m.startswith("ovlrun")]}
