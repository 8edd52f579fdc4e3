"""Workloads 1-3 x configurations x cold/warm.

Each run starts a fresh process (the driver) inside the configuration; the
driver measures the workload's wall time and the stand-in's request deltas
itself, so ovlrun's launch is excluded here (it has its own benchmark).
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import ovlrun_cli
from bench.configs import CONFIGS, LOC_PROFILE, SHARED_ROOT, Config, SharedTree, write_profiles
from bench.standin.counters import metadata_requests
from bench.tree import TreeInfo

DRIVER = Path(__file__).resolve().parent / "workloads" / "driver.py"
WORKLOADS = ("imports", "libsearch", "statwalk")
IMPORT_RELEASE = "sw/pystack/2024.2/lib/python3.11/site-packages"
STAT_RELEASE = "sw/pystack/2024.1"
N_SEARCH_DIRS = 30
N_LIB_NAMES = 100


def workload_specs(tree: TreeInfo) -> dict[str, dict[str, object]]:
    root = SHARED_ROOT
    # A module environment's PYTHONPATH: 16 tool dirs first (none has what we
    # import), then the stack, the stdlib, and a further unused release.
    pythonpath = [str(root / d) for d in tree.tool_dirs]
    pythonpath += [str(root / IMPORT_RELEASE),
                   str(root / "sw/python/3.11/lib/python3.11"),
                   str(root / "sw/python/3.11/lib/python3.11/lib-dynload"),
                   str(root / "sw/pystack/2025.1/lib/python3.11/site-packages")]
    search_dirs = tree.lib_dirs[:N_SEARCH_DIRS]
    inside = sorted(n for n, d in tree.lib_names.items() if d in search_dirs)
    outside = sorted(n for n, d in tree.lib_names.items() if d not in search_dirs)
    rng = random.Random(42)
    # 80 libraries that resolve somewhere on the path, 20 that do not (the
    # common "optional dependency" probe); each miss tries every directory.
    names = rng.sample(inside, min(80, len(inside)))
    names += rng.sample(outside, N_LIB_NAMES - len(names))
    rng.shuffle(names)
    return {
        "imports": {"pythonpath": pythonpath},
        "libsearch": {"dirs": [str(root / d) for d in search_dirs], "names": names},
        "statwalk": {"root": str(root / STAT_RELEASE)},
    }


@dataclass
class Run:
    workload: str
    config: str
    mode: str  # "cold" | "warm"
    elapsed: float
    counters: dict[str, int]
    detail: dict[str, object]


def run_once(cfg: Config, workload: str, spec: dict[str, object], ctl: Path | None) -> dict:
    cmd = [*cfg.prefix(), sys.executable, "-I", str(DRIVER), workload, "--spec", json.dumps(spec)]
    if ctl:
        cmd += ["--counters", str(ctl)]
    proc = subprocess.run(cmd, env=cfg.env(), cwd=ovlrun_cli.REPO, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cfg.name}/{workload} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_workloads(tree: TreeInfo, config_names: list[str], workloads: list[str], reps: int,
                  latency_us: int, log=print) -> list[Run]:
    specs = workload_specs(tree)
    write_profiles()
    shared = SharedTree(latency_us=latency_us)
    runs: list[Run] = []
    try:
        for cname in config_names:
            cfg = CONFIGS[cname]
            shared.setup(cfg)
            if cfg.profile == LOC_PROFILE:  # (either side: image or directory snapshots)
                # Build the snapshots up front (without latency: the build
                # itself is measured by the snapshot benchmark).
                assert shared.standin
                shared.standin.set_latency(0)
                cfg.snapshot_build()
                shared.standin.set_latency(latency_us)
            for w in workloads:
                for rep in range(reps):
                    # cold, then warm right after: the warm run sees the
                    # caches the cold one filled (subject to the 1 s timeouts).
                    for mode in ("cold", "warm", "warm"):
                        if mode == "cold":
                            shared.make_cold()
                        ctl = shared.standin.counters_path if shared.standin else None
                        r = run_once(cfg, w, specs[w], ctl)
                        runs.append(Run(w, cname, mode, r["elapsed"], r["counters"], r["detail"]))
                        log(f"  {w:9s} {cname:12s} {mode}  {r['elapsed'] * 1000:8.1f} ms"
                            f"  meta={metadata_requests(r['counters'])}")
    finally:
        shared.teardown()
    return runs


def summarise(runs: list[Run]) -> list[dict[str, object]]:
    """Median time and per-op median counters per (workload, config, mode)."""
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.workload, r.config, r.mode), []).append(r)
    rows = []
    for (w, c, m), rs in groups.items():
        ops = sorted({k for r in rs for k in r.counters})
        med = {k: int(statistics.median(r.counters.get(k, 0) for r in rs)) for k in ops}
        rows.append({"workload": w, "config": c, "mode": m, "n": len(rs),
                     "elapsed": statistics.median(r.elapsed for r in rs),
                     "counters": med, "detail": rs[0].detail})
    return rows
