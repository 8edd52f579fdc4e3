"""Files stored whole in snapshot images (issue 17), side by side in one run.

The release is the issue's Python stack (bench/tree.py ML_RELEASE: numpy, scipy, pandas,
matplotlib, scikit-learn, sympy, requests pip-installed into one directory), served by
the stand-in at ``--latency-us`` (1 ms).  Parts:

  build    `ovlrun snapshot build` of the release without and with inlining (each rule of
           RULES): wall time, remote requests, image size, B/entry, files/bytes inlined
  imports  `python -c "import scipy.stats, pandas, matplotlib"` with the release on
           PYTHONPATH, cold (stand-in remounted, caches dropped) and warm (right after):
           time and remote requests for direct (the stand-in), ovlrun without inlining,
           ovlrun with each rule, and the local copy (bind mount, no server)
  fetch    `ovlrun snapshot publish` on the build host, then `ovlrun snapshot fetch` into
           fresh stores (nodes) through the stand-in: requests per node, per rule, at the
           client readahead an NFS rsize=1M mount has (1 MiB) and FUSE's default (128 KiB)
  bpe      bytes per entry of the bundle release of issue 12 (no inlining): this writer
           against the one before compact inodes (git show 41a2536:ovlrun/store/image.py),
           with the per-part breakdown
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import ovlrun_cli
from bench.configs import SHARED_ROOT
from bench.image_bench import Shared, count_release, set_read_ahead_kb
from bench.ovlrun_cli import PROFILE_DIR, Side
from bench.standin.counters import diff, metadata_requests, round_trips
from bench.tree import BENCH_CACHE, BUNDLE_RELEASE, ML_RELEASE, PY_TAG, TREE_DIR

SITE = f"{ML_RELEASE}/lib/{PY_TAG}/site-packages"
IMPORT = "import scipy.stats, pandas, matplotlib"
# name -> (inline patterns, inline_max); None: no inlining (today's metacopy images).
RULES: dict[str, tuple[list[str], str] | None] = {
    "metacopy": None,
    "inline-256KiB": (["**/*.pyc", "**/*.so*"], "256KiB"),
    "inline-64KiB": (["**/*.pyc", "**/*.so*"], "64KiB"),
    # Every .pyc and shared object the import opens (the biggest .so is 25 MB): what it
    # takes to get near the local copy cold, at the price of the image size.
    "inline-32MiB": (["**/*.pyc", "**/*.so*"], "32MiB"),
}
PUBLISHED = "ovlrun-published"  # below TREE_DIR (served as SHARED_ROOT/ovlrun-published)
MPLCONFIG = BENCH_CACHE / "mplconfig"
Log = type(print)

IMPORT_CODE = r"""
import json, os, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from bench.standin.counters import diff, read_counters
ctl = sys.argv[2]
env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": sys.argv[3], "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/root",
       "MPLCONFIGDIR": sys.argv[4], "MPLBACKEND": "Agg", "OPENBLAS_NUM_THREADS": "1"}
before = read_counters(ctl) if ctl else {}
t0 = time.perf_counter()
subprocess.run([sys.executable, "-s", "-c", sys.argv[5]], env=env, check=True)
elapsed = time.perf_counter() - t0
print(json.dumps({"elapsed": elapsed, "counters": diff(read_counters(ctl), before) if ctl else {}}))
"""


def side(rule: str) -> Side:
    return Side(rule, ovlrun_cli.REPO, BENCH_CACHE / f"store-{rule}")


def profile_name(rule: str) -> str:
    return f"bench-ml-{rule}"


def write_profiles() -> None:
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    for rule, spec in RULES.items():
        lines = [f'description = "bench: issue 17 stack, {rule}"', "[[tree]]", f"root = {json.dumps(str(SHARED_ROOT))}",
                 f"localise = [{json.dumps(ML_RELEASE)}]"]
        if spec:
            lines += [f"inline = {json.dumps(spec[0])}", f"inline_max = {json.dumps(spec[1])}"]
        (PROFILE_DIR / f"{profile_name(rule)}.toml").write_text("\n".join(lines) + "\n")


def manifest_of(store: Path) -> dict[str, object]:
    (path,) = store.glob("snapshots/*/*/manifest.json")
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def measure_build(latency_us: int, log: Log = print) -> dict[str, object]:
    write_profiles()
    entries, dirs = count_release(ML_RELEASE)
    shared = Shared("standin", latency_us)
    rows = []
    try:
        for rule in RULES:
            s = side(rule)
            shutil.rmtree(s.store, ignore_errors=True)
            shared.cold()
            before = shared.counters()
            t0 = time.perf_counter()
            s.snapshot_build(profile_name(rule))
            took = time.perf_counter() - t0
            c = diff(shared.counters(), before)
            m = manifest_of(s.store)
            counts = m["counts"]
            assert isinstance(counts, dict)
            rows.append({"rule": rule, "elapsed": took, "requests": round_trips(c), "reads": c.get("read", 0),
                         "image_bytes": m["image_bytes"], "inlined": counts.get("inlined", 0),
                         "inlined_bytes": counts.get("inlined_bytes", 0)})
            log(f"  build {rule:14s} {took:7.2f} s  image {m['image_bytes']:>12,} B  remote={round_trips(c)}")
    finally:
        shared.close()
    return {"release": ML_RELEASE, "entries": entries, "dirs": dirs, "latency_us": latency_us, "rows": rows}


def _import_once(prefix: list[str], env: dict[str, str], ctl: str) -> dict[str, object]:
    pythonpath = str(SHARED_ROOT / SITE)
    cmd = [*prefix, sys.executable, "-I", "-c", IMPORT_CODE, str(ovlrun_cli.REPO), ctl, pythonpath, str(MPLCONFIG),
           IMPORT]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/")
    if proc.returncode != 0:
        raise RuntimeError(f"import failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def measure_imports(latency_us: int, reps: int, log: Log = print) -> dict[str, object]:
    """Cold then warm imports per configuration; configurations interleaved per rep."""
    write_profiles()
    MPLCONFIG.mkdir(parents=True, exist_ok=True)
    configs = ["direct", *[f"ovlrun-{r}" for r in RULES], "local"]
    samples: dict[tuple[str, str], list[dict[str, object]]] = {}
    shared = Shared("standin", 0)
    try:
        for rule in RULES:  # builds at 0 latency: measured by the build part
            s = side(rule)
            shutil.rmtree(s.store, ignore_errors=True)
            s.snapshot_build(profile_name(rule))
        # One import on the local copy first: matplotlib's font cache, built once.
        assert shared.standin
        _import_once([], ovlrun_cli.env(), "")
        shared.standin.set_latency(latency_us)
        for rep in range(reps):
            for name in configs if rep % 2 == 0 else configs[::-1]:
                for mode in ("cold", "warm"):
                    if name == "local":
                        shared.close()
                        shared = Shared("local", 0)
                        if mode == "cold":
                            shared.cold()
                        r = _import_once([], ovlrun_cli.env(), "")
                        shared.close()
                        shared = Shared("standin", latency_us)
                    else:
                        if mode == "cold":
                            shared.cold()
                        prefix, env = [], ovlrun_cli.env()
                        if name != "direct":
                            s = side(name.removeprefix("ovlrun-"))
                            prefix, env = s.prefix(profile_name(name.removeprefix("ovlrun-"))), s.env()
                        assert shared.standin
                        r = _import_once(prefix, env, str(shared.standin.counters_path))
                    samples.setdefault((name, mode), []).append(r)
                    log(f"  {name:22s} {mode}  {float(r['elapsed']) * 1e3:8.0f} ms"  # type: ignore[arg-type]
                        f"  remote={round_trips(r['counters'])}")  # type: ignore[arg-type]
    finally:
        shared.close()
    rows = []
    for (name, mode), rs in samples.items():
        ops = sorted({k for r in rs for k in r["counters"]})  # type: ignore[attr-defined]
        med = {k: int(statistics.median(r["counters"].get(k, 0) for r in rs)) for k in ops}  # type: ignore[attr-defined]
        rows.append({"config": name, "mode": mode, "n": len(rs), "elapsed": statistics.median(
            float(r["elapsed"]) for r in rs), "all": [r["elapsed"] for r in rs], "counters": med})  # type: ignore[arg-type]
    return {"import": IMPORT, "latency_us": latency_us, "rows": rows}


def measure_fetch(nodes: int, log: Log = print) -> dict[str, object]:
    """Publish each rule's image on the shared tree; fetch it into ``nodes`` fresh stores."""
    write_profiles()
    published = TREE_DIR / PUBLISHED
    shared = Shared("standin", 0)
    rows = []
    try:
        for rule in RULES:
            s = side(rule)
            shutil.rmtree(s.store, ignore_errors=True)
            s.snapshot_build(profile_name(rule))
            shutil.rmtree(published, ignore_errors=True)
            published.mkdir(mode=0o755)
            proc = subprocess.run([*s.command(), "snapshot", "publish", "--to", str(published), "--profile",
                                   profile_name(rule)], env=s.env(), capture_output=True, text=True, cwd="/")
            if proc.returncode != 0:
                raise RuntimeError(f"publish failed: {proc.stderr[-2000:]}")
            for i in range(nodes):
                for ra in (1024, 128):
                    node = Side(f"node{i}", ovlrun_cli.REPO, BENCH_CACHE / "fetch-nodes" / f"node{i:02d}")
                    shutil.rmtree(node.store, ignore_errors=True)
                    node.store.parent.mkdir(parents=True, exist_ok=True)
                    shared.cold(read_ahead_kb=ra)
                    set_read_ahead_kb(SHARED_ROOT, ra)
                    before = shared.counters()
                    t0 = time.perf_counter()
                    proc = subprocess.run([*node.command(), "snapshot", "fetch", "--from",
                                           str(SHARED_ROOT / PUBLISHED), "--profile", profile_name(rule)],
                                          env=node.env(), capture_output=True, text=True, cwd="/")
                    if proc.returncode != 0:
                        raise RuntimeError(f"fetch failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
                    took = time.perf_counter() - t0
                    c = diff(shared.counters(), before)
                    rows.append({"rule": rule, "node": i, "read_ahead_kb": ra, "elapsed": took,
                                 "requests": round_trips(c), "reads": c.get("read", 0),
                                 "image_bytes": manifest_of(s.store)["image_bytes"]})
                    log(f"  fetch {rule:14s} node {i} readahead {ra:4d} KiB: {round_trips(c)} requests")
    finally:
        shared.close()
        shutil.rmtree(published, ignore_errors=True)
        shutil.rmtree(BENCH_CACHE / "fetch-nodes", ignore_errors=True)
    return {"nodes": nodes, "rows": rows}


BPE_CODE = r"""
import io, json, subprocess, sys
sys.path.insert(0, sys.argv[1])
from tests.erofs_tree import iter_tree, walk_dir
from ovlrun.store.image.writer import write_image
old_src = subprocess.run(["git", "-C", sys.argv[1], "show", "41a2536:ovlrun/store/image.py"], check=True,
                         capture_output=True, text=True).stdout
old = {}
exec(compile(old_src, "old_image.py", "exec"), old)
root = walk_dir(sys.argv[2].encode())
nodes = [n for _, n in iter_tree(root)]
def conv(x):
    return old["Node"](x.mode, x.uid, x.gid, x.mtime_ns, x.size, x.target, x.redirect,
                       {k: conv(v) for k, v in x.children.items()} if x.children is not None else None)
before = old["write_image"](conv(root), io.BytesIO(), build_time=0)
after = write_image(root, io.BytesIO())
regs = [n for n in nodes if n.mode & 0o170000 == 0o100000]
meta = [n for n in regs if n.size]
print(json.dumps({"entries": len(nodes), "dirs": sum(1 for n in nodes if n.children is not None),
                  "files": len(regs), "empty_files": len(regs) - len(meta),
                  "mean_redirect": sum(len(n.redirect) for n in meta) / max(1, len(meta)),
                  "mean_name": sum(len(k) for n in nodes if n.children for k in n.children) / max(1, len(nodes) - 1),
                  "distinct_mtimes": len({n.mtime_ns for n in nodes}),
                  "before": before.__dict__, "after": after.__dict__}))
"""


def measure_bpe(log: Log = print) -> dict[str, object]:
    """B/entry of the bundle release (issue 12's benchmark) before and after, no inlining."""
    out = subprocess.run([sys.executable, "-c", BPE_CODE, str(ovlrun_cli.REPO), str(TREE_DIR / BUNDLE_RELEASE)],
                         check=True, capture_output=True, text=True).stdout
    res: dict[str, object] = json.loads(out)
    n = res["entries"]
    log(f"  {BUNDLE_RELEASE}: {n} entries; before {res['before']['bytes'] / n:.1f} B/entry, "  # type: ignore[index,operator]
        f"after {res['after']['bytes'] / n:.1f} B/entry")  # type: ignore[index,operator]
    return {"release": BUNDLE_RELEASE, **res}


# ---------------------------------------------------------------- markdown


def tables(res: dict[str, object]) -> str:
    from bench.report import table
    parts = []
    b = res.get("build")
    if isinstance(b, dict):
        n = b["entries"]
        head = f"Build of {b['release']} ({n:,} entries) through the stand-in at {b['latency_us']} us:\n\n"
        parts.append(head + table(
            ["rule", "wall s", "remote requests", "of which reads", "image bytes", "B/entry", "files inlined",
             "bytes inlined"],
            [[r["rule"], f"{r['elapsed']:.2f}", f"{r['requests']:,}", f"{r['reads']:,}", f"{r['image_bytes']:,}",
              f"{r['image_bytes'] / n:.0f}", f"{r['inlined']:,}", f"{r['inlined_bytes']:,}"] for r in b["rows"]]))
    i = res.get("imports")
    if isinstance(i, dict):
        by = {(r["config"], r["mode"]): r for r in i["rows"]}
        rows = []
        for (name, mode), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            local, direct = by.get(("local", mode)), by.get(("direct", mode))
            k = r["counters"]
            rows.append([mode, name, f"{r['elapsed'] * 1e3:,.0f}", " / ".join(f"{x * 1e3:,.0f}" for x in r["all"]),
                         f"{r['elapsed'] / local['elapsed']:.2f}x" if local else "",
                         f"{round_trips(k):,}", f"{metadata_requests(k):,}",
                         f"{100 * round_trips(k) / round_trips(direct['counters']):.1f} %"
                         if direct and round_trips(direct["counters"]) else ""])
        parts.append(f"`{i['import']}` at {i['latency_us']} us (median; goals: <= 1.5x local cold, <= 1.2x warm, "
                     "requests <= 10 % of direct):\n\n" + table(
                         ["mode", "config", "median ms", "runs ms", "vs local", "remote requests", "of which metadata",
                          "requests vs direct"], rows))
    f = res.get("fetch")
    if isinstance(f, dict):
        groups: dict[tuple[str, int], list[dict[str, object]]] = {}
        for r in f["rows"]:
            groups.setdefault((r["rule"], r["read_ahead_kb"]), []).append(r)
        parts.append("`ovlrun snapshot fetch` per node (goal <= 100 requests per release):\n\n" + table(
            ["rule", "client readahead", "image bytes", "nodes", "requests/node (min-max)", "reads", "median s"],
            [[rule, f"{ra} KiB", f"{rs[0]['image_bytes']:,}", len(rs),
              f"{min(int(r['requests']) for r in rs)}-{max(int(r['requests']) for r in rs)}",  # type: ignore[call-overload]
              f"{statistics.median(int(r['reads']) for r in rs):.0f}",  # type: ignore[call-overload]
              f"{statistics.median(float(r['elapsed']) for r in rs):.2f}"] for (rule, ra), rs in groups.items()]))  # type: ignore[arg-type]
    p = res.get("bpe")
    if isinstance(p, dict):
        n = p["entries"]
        rows = [[k, f"{p['before'][k]:,}", f"{p['after'][k]:,}"] for k in p["after"] if k in p["before"]]
        rows.append(["bytes/entry", f"{p['before']['bytes'] / n:.1f}", f"{p['after']['bytes'] / n:.1f}"])
        rows.append(["compact inodes", "0", f"{p['after']['compact']:,}"])
        rows.append(["files stored whole (empty)", "0", f"{p['after']['stored']:,}"])
        parts.append(f"Bytes per entry of {p['release']} ({n:,} entries, {p['distinct_mtimes']:,} distinct mtimes, "
                     f"mean redirect {p['mean_redirect']:.1f} B), no inlining:\n\n"
                     + table(["", "before (41a2536)", "after"], rows))
    return "\n\n".join(parts)
