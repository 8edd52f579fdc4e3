#!/usr/bin/env python3
"""ovlrun benchmarks: one command, as root, prints the tables.

    python3 bench/run.py                      # everything (~45-60 min on 2 cores)
    python3 bench/run.py --only launch        # one part: tree, workloads, launch, snapshot,
                                              # build, stat, fetch, launch20 (images = the last four)
    python3 bench/run.py --only workloads --configs direct,local --workloads imports
    python3 bench/run.py --only images        # images against directory snapshots (issue 12)
    python3 bench/run.py --only inline        # files stored whole in images (issue 17): the four
                                              # parts inline-build, inline-imports, inline-fetch, inline-bpe

Results are printed as markdown and written to bench/results/latest.{json,md}.
Nothing stays mounted afterwards (checked against /proc/self/mountinfo).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import image_bench, inline_bench, launch_bench, ovlrun_cli, report, snapshot_bench, workload_bench  # noqa: E402
from bench.configs import CONFIGS, SHARED_ROOT  # noqa: E402
from bench.mounts import mounted_at, umount_all_under  # noqa: E402
from bench.standin.server import RUN_DIR, build_server  # noqa: E402
from bench.tree import BENCH_CACHE, ensure_tree  # noqa: E402

IMAGE_PARTS = ("build", "stat", "fetch", "launch20")
INLINE_PARTS = ("inline-build", "inline-imports", "inline-fetch", "inline-bpe")
PARTS = ("workloads", "launch", *IMAGE_PARTS)  # "snapshot" (pre-image build bench) on request
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, str]:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), "?")
    mem = next((l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal")), "0")
    return {"kernel": platform.release(), "cpu": cpu, "cores": str(os.cpu_count()),
            "memory_gib": f"{int(mem) / 2**20:.1f}", "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def leaked_mounts() -> list[str]:
    return mounted_at(SHARED_ROOT) + mounted_at(RUN_DIR) + mounted_at(BENCH_CACHE)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", action="append", choices=(*PARTS, *INLINE_PARTS, "snapshot", "images", "inline", "tree"),
                    help="run only this part (repeatable)")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--workloads", default=",".join(workload_bench.WORKLOADS))
    ap.add_argument("--reps", type=int, default=2, help="cold+warm+warm cycles per cell")
    ap.add_argument("--rounds", type=int, default=25, help="launch measurements per command")
    ap.add_argument("--latency-us", type=int, default=1000, help="stand-in latency per request")
    ap.add_argument("--out", default=str(RESULTS / "latest"), help="results path stem")
    ap.add_argument("--build-reps", type=int, default=1,
                    help="image/directory build pairs per source, alternating (build part)")
    ap.add_argument("--build-where", default="standin,local", help="build part: standin, local or both")
    ap.add_argument("--no-copyup", action="store_true", help="build part: skip the kernel copy-up")
    ap.add_argument("--stat-reps", type=int, default=3, help="cold+warm pairs per side (stat part)")
    ap.add_argument("--nodes", type=int, default=10, help="simulated nodes that fetch (fetch part)")
    ap.add_argument("--walk-nodes", type=int, default=10, help="simulated nodes that walk and build")
    ap.add_argument("--fetch-latency-us", type=int, default=0,
                    help="stand-in latency in the fetch part (request counts do not depend on it)")
    ap.add_argument("--launch-pairs", type=int, default=100, help="timed A/B pairs per comparison (launch20)")
    ap.add_argument("--inline-reps", type=int, default=3, help="cold+warm import pairs per config (inline-imports)")
    ap.add_argument("--inline-nodes", type=int, default=3, help="fresh stores that fetch, per rule (inline-fetch)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("must run as root (mounts, drop_caches)")
    groups = {"images": IMAGE_PARTS, "inline": INLINE_PARTS}
    parts = [p for o in (args.only or PARTS) for p in groups.get(o, (o,))]

    tree = ensure_tree()
    build_server()
    print(f"tree: {tree.root} - {tree.files} files, {tree.dirs} dirs, {tree.symlinks} symlinks, "
          f"{tree.bytes / 2**20:.0f} MiB")
    have_ovlrun = ovlrun_cli.available()
    configs = [c for c in args.configs.split(",") if c]
    if not have_ovlrun:
        print("ovlrun not available yet: skipping ovlrun configurations and benchmarks")
        configs = [c for c in configs if not CONFIGS[c].profile]

    results: dict[str, object] = {"machine": machine(), "latency_us": args.latency_us,
                                  "tree": {k: v for k, v in dataclasses.asdict(tree).items()
                                           if k in ("files", "dirs", "symlinks", "bytes")},
                                  "command": " ".join(["python3", "bench/run.py", *sys.argv[1:]])}
    md: list[str] = []
    try:
        if "workloads" in parts:
            print("== workloads")
            runs = workload_bench.run_workloads(tree, configs, args.workloads.split(","),
                                                args.reps, args.latency_us)
            rows = workload_bench.summarise(runs)
            results["workloads"] = rows
            md += ["### Workloads", report.workload_tables(rows),
                   "### Workload targets (ovlrun-loc)",
                   report.table(["workload", "mode", "metadata beyond floor, % of direct (<=1%)",
                                 "ENOENT reaching server (0)", "speed-up vs direct (>=10x)",
                                 "vs local copy (<=1.2x)"], report.workload_targets(rows))]
        if "launch" in parts and have_ovlrun:
            print("== launch overhead")
            res = launch_bench.measure(tree, args.rounds, args.latency_us)
            results["launch"] = res
            md += ["### Launch overhead", report.launch_table(res),
                   "### Launch breakdown", report.breakdown_table(res),
                   "### Import time of the launch path (-X importtime)",
                   report.importtime_table(res)]
        if "snapshot" in parts and have_ovlrun:
            print("== snapshot build")
            res = snapshot_bench.measure(args.latency_us)
            results["snapshot"] = res
            md += ["### Snapshot build", report.snapshot_table(res),
                   "### Storage", report.storage_table(res)]
        if "build" in parts:
            print("== storage and build: image vs directory snapshots vs kernel copy-up")
            res = image_bench.measure_build(tree, args.latency_us, reps=args.build_reps,
                                            where_list=tuple(args.build_where.split(",")),
                                            copyup=not args.no_copyup)
            results["build"] = res
            md += ["### Storage per entry (images, issue 12)", image_bench.storage_table(res),
                   "### Build speed (images, issue 12)", image_bench.build_table(res)]
        if "stat" in parts:
            print("== stat of every entry: image vs directory overlay")
            res = image_bench.measure_stat(tree, args.latency_us, args.stat_reps)
            results["stat"] = res
            md += ["### Stat of every entry of the localised release", image_bench.stat_table(res)]
        if "fetch" in parts:
            print("== remote requests per node: walk-and-build vs fetch")
            res = image_bench.measure_fetch(tree, args.fetch_latency_us, args.nodes, args.walk_nodes)
            results["fetch"] = res
            md += ["### Remote requests per node to localise", image_bench.fetch_table(res)]
        if "launch20" in parts:
            print("== launch, 20 localised paths: image vs directory")
            res = image_bench.measure_launch(tree, args.latency_us, args.launch_pairs)
            results["launch20"] = res
            md += ["### Launch, 20 localised paths: image vs directory", image_bench.launch_text(res)]
        inline: dict[str, object] = {}
        for part, run in (("inline-build", lambda: inline_bench.measure_build(args.latency_us)),
                          ("inline-imports", lambda: inline_bench.measure_imports(args.latency_us, args.inline_reps)),
                          ("inline-fetch", lambda: inline_bench.measure_fetch(args.inline_nodes)),
                          ("inline-bpe", inline_bench.measure_bpe)):
            if part in parts:
                print(f"== {part}")
                inline[part.removeprefix("inline-")] = run()
        if inline:
            results["inline"] = inline
            md += ["### Files stored whole in images (issue 17)", inline_bench.tables(inline)]
    finally:
        if leaked_mounts():
            umount_all_under(SHARED_ROOT)
            umount_all_under(RUN_DIR)
            umount_all_under(BENCH_CACHE)
        left = leaked_mounts()
        if left:
            print("WARNING: mounts left behind:\n" + "\n".join(left), file=sys.stderr)

    text = "\n\n".join(md)
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    out.with_suffix(".md").write_text(text + "\n")
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
