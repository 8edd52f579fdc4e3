"""Launch overhead of this checkout against another commit's, side by side (issue 17 item 4).

    sudo .venv/bin/python bench/launch_ab.py                  # vs main: 1/20/100 paths, local tree and 1 ms stand-in
    sudo .venv/bin/python bench/launch_ab.py --base c54512c --pairs 60 --rounds 3

Each side launches `--profile P -- /bin/true` through the launcher its own
`ovlrun.cli.install_launcher` writes (what `make install` ships), on the same store and
profiles, with a cached plan.  A and B run in turn (A B B A ...), so drift hits both;
wall time is a monotonic clock around posix_spawn/wait4, CPU time (user + system) is
wait4's rusage of the launch and everything it waited for (the mount worker included).
Printed per comparison: medians, and the median of the per-pair ratios A/B.  `--rounds`
repeats the whole table, to show how noisy the machine was.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.standin.server import StandIn  # noqa: E402
from bench.tree import BENCH_CACHE, TREE_DIR, ensure_tree  # noqa: E402

SCRATCH = BENCH_CACHE / "launch-ab"
COUNTS = (1, 20, 100)
FLOOR = "python -I -S -c pass"


def launcher(checkout: Path, target: Path) -> Path:
    subprocess.run([sys.executable, "-m", "ovlrun.cli.install_launcher", "--from-checkout", str(target)],
                   cwd=checkout, check=True, capture_output=True)
    return target


def write_profiles(lib_dirs: list[str], nfs: Path) -> None:
    d = SCRATCH / "profiles"
    d.mkdir(parents=True, exist_ok=True)
    for where, root in (("local", TREE_DIR), ("fuse", nfs)):
        for n in COUNTS:
            patterns = ", ".join(json.dumps(p) for p in lib_dirs[:n])
            (d / f"{where}{n}.toml").write_text(f'[[tree]]\nroot = "{root}"\nlocalise = [{patterns}]\n')


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall ms, cpu ms) of one run, which must succeed."""
    t0 = time.perf_counter()
    pid = os.posix_spawn(cmd[0], cmd, env, file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)])
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd}: exit {os.waitstatus_to_exitcode(status)}")
    return wall * 1e3, (usage.ru_utime + usage.ru_stime) * 1e3


def compare(a: list[str], b: list[str], env: dict[str, str], pairs: int) -> dict[str, float]:
    for cmd in (a, b):  # warm-up (caches, the plan cache), which must not warn: all localised
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0 or r.stderr:
            raise SystemExit(f"{cmd}: exit {r.returncode}: {r.stderr}")
        run(cmd, env)
    ra, rb = [], []
    for i in range(pairs):
        first, second = (a, b) if i % 2 == 0 else (b, a)
        x, y = run(first, env), run(second, env)
        ra.append(x if first is a else y)
        rb.append(y if first is a else x)
    out: dict[str, float] = {}
    for k, name in ((0, "wall"), (1, "cpu")):
        out[f"A {name}"] = statistics.median(r[k] for r in ra)
        out[f"B {name}"] = statistics.median(r[k] for r in rb)
        out[f"A/B {name}"] = statistics.median(x[k] / y[k] for x, y in zip(ra, rb, strict=True) if y[k] > 0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="main", help="the git commit to compare with (B)")
    ap.add_argument("--pairs", type=int, default=40, help="A/B pairs per comparison")
    ap.add_argument("--rounds", type=int, default=2, help="times the whole table is measured")
    ap.add_argument("--latency-us", type=int, default=1000, help="the stand-in's latency per request")
    ap.add_argument("--no-standin", action="store_true", help="local tree only")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (the launches mount)")
    tree = ensure_tree()
    base = SCRATCH / "base"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", args.base], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
    a = launcher(REPO, SCRATCH / "ovlrun-A")
    b = launcher(base, SCRATCH / "ovlrun-B")
    nfs = SCRATCH / "nfs"
    nfs.mkdir(exist_ok=True)
    write_profiles(tree.lib_dirs, nfs)
    env = dict(os.environ, OVLRUN_PROFILE_PATH=str(SCRATCH / "profiles"), OVLRUN_STORE=str(SCRATCH / "store"),
               OVLRUN_JOB_RUNDIR=str(SCRATCH / "run"))
    wheres = ["local"] if args.no_standin else ["local", "fuse"]
    standin = StandIn(TREE_DIR, nfs, latency_us=0, counters_path=SCRATCH / "benchnfs.ctl")
    if not args.no_standin:
        standin.mount()
    try:
        for where in wheres:
            subprocess.run([str(a), "snapshot", "build", "--profile", f"{where}{max(COUNTS)}"], env=env,
                           check=True, capture_output=True)
        if not args.no_standin:
            standin.set_latency(args.latency_us)
        print(f"A = this checkout ({REPO}), B = {args.base}; {args.pairs} pairs; launcher first lines: "
              f"A {a.read_text().splitlines()[0]!r}, B {b.read_text().splitlines()[0]!r}")
        print("| round | tree | paths | A cpu ms | B cpu ms | A/B cpu | A wall ms | B wall ms | A/B wall |")
        print("|---|---|---|---|---|---|---|---|---|")
        for rnd in range(1, args.rounds + 1):
            floor = compare([sys.executable, "-I", "-S", "-c", "pass"], ["/bin/true"], env, args.pairs)
            print(f"| {rnd} | {FLOOR} | - | {floor['A cpu']:.1f} | - | - | {floor['A wall']:.1f} | - | - |")
            for where in wheres:
                for n in COUNTS:
                    r = compare([str(a), "--profile", f"{where}{n}", "--", "/bin/true"],
                                [str(b), "--profile", f"{where}{n}", "--", "/bin/true"], env, args.pairs)
                    tree_name = "local" if where == "local" else f"stand-in {args.latency_us} us"
                    print(f"| {rnd} | {tree_name} | {n} | {r['A cpu']:.1f} | {r['B cpu']:.1f} | {r['A/B cpu']:.2f} "
                          f"| {r['A wall']:.1f} | {r['B wall']:.1f} | {r['A/B wall']:.2f} |", flush=True)
        print(f"load average: {os.getloadavg()}")
    finally:
        if not args.no_standin:
            standin.unmount()
        shutil.rmtree(SCRATCH / "run", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
