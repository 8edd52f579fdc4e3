#!/usr/bin/env python3
"""``ovlrun learn``'s costs, side by side in one run (as root):

1. overhead: the wall time of each workload of tests/learn_workloads.py (ld.so library
   search over 10 dirs, Python import storm over 10 releases, PATH search of 50
   entries), repeated in one shell loop, untraced, under ``learn --tracer bpftrace`` and
   under ``learn --tracer strace``; the job times itself (the loop), so learn's own
   start (bpftrace compiles its program) is reported apart;
2. rate: lookups per second bpftrace sustains without losing events: 1, 2, 4 parallel
   stat(2) loops of a small C program over ENOENT paths of the tree;
3. watcher: the CPU of ``learn watch`` (bpftrace + Python) on an idle node and while
   the workloads run in a loop, and the workloads' time with and without it.

    python3 bench/learn_bench.py                  # everything (~10 min on 2 quiet cores)
    python3 bench/learn_bench.py --quick          # a short check of the script (~2 min)
    python3 bench/learn_bench.py --only rate

Prints markdown and (not with --quick) writes bench/results/learn.md.  Needs bpftrace,
strace, gcc.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.learn_workloads import WORKLOADS, Workload, build  # noqa: E402

LEARN = [sys.executable, "-I", "-m", "ovlrun", "learn"]
RESULTS = Path(__file__).resolve().parent / "results"
STORM_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
int main(int argc, char **argv) {
    long n = atol(argv[2]); char path[4096]; struct stat st;
    for (long i = 0; i < n; i++) { snprintf(path, sizeof path, "%s/nothing%ld", argv[1], i % 64); stat(path, &st); }
    return 0;
}
"""


def timed_loop(command: list[str], reps: int, out: Path) -> list[str]:
    """A shell that runs ``command`` ``reps`` times and writes its own elapsed ns to ``out``."""
    body = (f"t0=$(/bin/date +%s%N); i=0; while [ $i -lt {reps} ]; do {shlex.join(command)} >/dev/null 2>&1; "
            f"i=$((i+1)); done; t1=$(/bin/date +%s%N); echo $((t1-t0)) > {shlex.quote(str(out))}")
    return ["/bin/sh", "-c", body]


def run_job(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, dict[str, object] | None]:
    """(total wall seconds, learn's JSON report or None)."""
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=3600)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {shlex.join(argv[:8])}...\n{r.stderr[-2000:]}")
    report = cwd / "report.json"
    data = json.loads(report.read_text()) if report.exists() else None
    if report.exists():
        report.unlink()
    return elapsed, data


def relocate(w: Workload, old: Path, new: Path) -> Workload:
    """The workload as seen through ``new`` (a stand-in mount of ``old``)."""
    def fix(text: str) -> str:
        return text.replace(str(old), str(new))
    return w._replace(command=[fix(a) for a in w.command], env={k: fix(v) for k, v in w.env.items()})


def overhead(base: Path, reps: int, rounds: int, latency_us: int | None) -> list[str]:
    """The workloads on a local tree, or (``latency_us``) served by the benchnfs stand-in
    for NFS with that latency per request (bench/standin: 1 s entry/attribute/negative
    timeouts, as an NFS client caches)."""
    backing = base / "sw"
    lines = ["| workload | loop of | untraced | bpftrace | overhead | strace | overhead | lookups/run | "
             "learn start (bpftrace) |", "|---|---|---|---|---|---|---|---|---|"]
    standin = None
    if latency_us is not None:
        from bench.standin.server import StandIn

        standin = StandIn(backing, base / "nfs", latency_us=latency_us, counters_path=base / "benchnfs.ctl")
    try:
        built = [build(name, backing) for name in WORKLOADS]
        sw = backing
        if standin is not None:
            standin.mount()
            sw = standin.mountpoint
            built = [relocate(w, backing, sw) for w in built]
        for w in built:
            lines.append(_overhead_row(w, sw, base, reps, rounds))
    finally:
        if standin is not None:
            standin.unmount()
    return lines


def _overhead_row(w: Workload, sw: Path, base: Path, reps: int, rounds: int) -> str:
    times: dict[str, list[float]] = {"none": [], "bpftrace": [], "strace": []}
    starts: list[float] = []
    lookups = 0
    for _ in range(rounds):
        for config in times:  # interleaved, so drift on a shared machine hits all three alike
            stamp = base / "elapsed"
            job = timed_loop(w.command, reps, stamp)
            if config == "none":
                total, data = run_job(job, w.env, base)
            else:
                total, data = run_job([*LEARN, "--tracer", config, "--tree", str(sw), "--json", "--report",
                                       str(base / "report.json"), "--", *job], w.env, base)
                assert data is not None and data["complete"], data and data["notes"]
                lookups = int(data["lookups"]) // reps  # type: ignore[call-overload]
            job_s = int(stamp.read_text()) / 1e9
            times[config].append(job_s)
            if config == "bpftrace":
                starts.append(total - job_s)
    med = {k: statistics.median(v) for k, v in times.items()}
    return (f"| {w.name} | {reps} | {med['none']:.3f} s | {med['bpftrace']:.3f} s | "
            f"{100 * (med['bpftrace'] / med['none'] - 1):+.1f} % | {med['strace']:.3f} s | "
            f"{100 * (med['strace'] / med['none'] - 1):+.1f} % | {lookups:,} | "
            f"{statistics.median(starts):.1f} s |")


def rate(base: Path, count: int) -> list[str]:
    sw = base / "sw"
    (sw / "storm" / "1.0").mkdir(parents=True, exist_ok=True)
    exe = base / "storm"
    (base / "storm.c").write_text(STORM_C)
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(base / "storm.c")], check=True)
    lines = ["| parallel loops | lookups | job time | lookups/s | lost events | untraced job time |",
             "|---|---|---|---|---|---|"]
    target = str(sw / "storm" / "1.0")
    for parallel in (1, 2, 4):
        script = " ".join(f"{exe} {target} {count} &" for _ in range(parallel)) + " wait"
        stamp = base / "elapsed"
        job = ["/bin/sh", "-c", f"t0=$(/bin/date +%s%N); {script}; t1=$(/bin/date +%s%N); "
                                f"echo $((t1-t0)) > {stamp}"]
        run_job(job, {"PATH": "/usr/bin:/bin"}, base)
        untraced = int(stamp.read_text()) / 1e9
        _, data = run_job([*LEARN, "--tracer", "bpftrace", "--tree", str(sw), "--json", "--report",
                           str(base / "report.json"), "--", *job], {"PATH": "/usr/bin:/bin"}, base)
        assert data is not None
        job_s = int(stamp.read_text()) / 1e9
        notes = [n for n in data["notes"] if "lost" in n]  # type: ignore[union-attr]
        lost = notes[0].split()[0] if notes else "0"
        n = int(data["lookups"])  # type: ignore[call-overload]
        lines.append(f"| {parallel} | {n:,} | {job_s:.2f} s | {n / job_s:,.0f} | {lost} | {untraced:.2f} s |")
    return lines


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def _watcher_pids(pid: int) -> list[int]:
    out = [pid]
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return out


def watcher(base: Path, window: float, reps: int) -> list[str]:
    sw = base / "sw"
    workloads = [build(name, sw) for name in WORKLOADS]

    def busy_round() -> float:
        t0 = time.perf_counter()
        for w in workloads:
            for _ in range(reps):
                subprocess.run(w.command, env=w.env, cwd=base, capture_output=True, check=True)
        return time.perf_counter() - t0

    without = statistics.median(busy_round() for _ in range(3))
    state = base / "state"
    proc = subprocess.Popen([*LEARN, "watch", "--interval", "5", "--tree", str(sw)], stderr=subprocess.PIPE,
                            text=True, env={"PATH": "/usr/bin:/bin", "OVLRUN_LEARN_DIR": str(state)})
    assert proc.stderr is not None
    line = proc.stderr.readline()
    if "watching" not in line:
        raise SystemExit(f"learn watch did not start: {line}{proc.stderr.read()}")
    try:
        pids = _watcher_pids(proc.pid)
        c0, t0 = _cpu_seconds(pids), time.perf_counter()
        time.sleep(window)  # the idle window itself is what is measured
        idle = (_cpu_seconds(pids) - c0) / (time.perf_counter() - t0)
        c0, t0 = _cpu_seconds(pids), time.perf_counter()
        rounds = []
        while time.perf_counter() - t0 < window:
            rounds.append(busy_round())
        busy = (_cpu_seconds(pids) - c0) / (time.perf_counter() - t0)
        with_watch = statistics.median(rounds)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    return ["| node | watcher CPU (bpftrace + Python) | workloads' round | vs no watcher |",
            "|---|---|---|---|",
            f"| idle ({window:.0f} s) | {100 * idle:.2f} % of one core | - | - |",
            f"| busy (the three workloads in a loop, {window:.0f} s) | {100 * busy:.2f} % of one core | "
            f"{with_watch:.3f} s | {100 * (with_watch / without - 1):+.1f} % ({without:.3f} s without) |"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", action="append", choices=("overhead", "rate", "watch"))
    ap.add_argument("--quick", action="store_true", help="short runs: checks the script, not for the record")
    ap.add_argument("--reps", type=int, help="runs of each workload in the job's loop (default 20; --quick 3)")
    ap.add_argument("--rounds", type=int, help="measurements per cell (default 5; --quick 1)")
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("bpftrace") or not shutil.which("strace"):
        raise SystemExit("run as root, with bpftrace and strace installed")
    parts = args.only or ["overhead", "rate", "watch"]
    reps, rounds, count, window = (3, 1, 200_000, 10.0) if args.quick else (20, 5, 2_000_000, 60.0)
    reps, rounds = args.reps or reps, args.rounds or rounds
    base = Path(tempfile.mkdtemp(prefix="ovlrun-learn-bench-", dir="/var/tmp"))
    base.chmod(0o755)
    out = [f"# ovlrun learn ({time.strftime('%Y-%m-%d')}, {os.uname().release}, {os.cpu_count()} cores"
           + (", --quick: not for the record" if args.quick else "") + ")", ""]
    try:
        if "overhead" in parts:
            head = f"(median of {rounds}; the job's own loop of {reps} runs)"
            out += [f"## Job wall time under each tracer, local tree {head}", "",
                    *overhead(base, reps, rounds, None), ""]
            out += [f"## Job wall time under each tracer, tree served with 1 ms per request {head}", "",
                    *overhead(base, reps, rounds, 1000), ""]
        if "rate" in parts:
            out += ["## Lookups per second bpftrace sustains", "", *rate(base, count), ""]
        if "watch" in parts:
            out += ["## learn watch", "", *watcher(base, window, max(1, reps // 4)), ""]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    text = "\n".join(out) + "\n"
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "learn.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
