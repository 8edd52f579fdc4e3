"""Snapshot images (EROFS) against directory snapshots, side by side (issue 12).

"image" is this checkout (ovlrun writes one EROFS image per snapshot); "directory" is
the commit before images (a per-node tree of sparse metacopy files on ext4), run from
its own checkout (bench.ovlrun_cli.BASE_REPO) with its own store.  Every part runs
both sides in the same run, on the same release (numpy, scipy,
pandas, matplotlib and sympy, plus every pystack release and the stdlib: bench/tree.py
BUNDLE_RELEASE, ~68k entries), served by the stand-in:

  storage   store bytes per entry: the image, the directory snapshot (du on ext4),
            and Debian's mkfs.erofs 1.5 on the directory snapshot's tree
  build     entries/s and remote requests: image build, directory build, the kernel's
            metacopy copy-up (chown -R through a metacopy=on overlay); stand-in and local
  stat      cold/warm lstat of every entry (Python walk, ls -lR) through each overlay
  fetch     remote requests per node to localise: walk-and-build vs fetching the image
  launch    launch overhead, 20 localised paths, image vs directory (paired, interleaved)
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import ovlrun_cli
from bench.configs import SHARED_ROOT
from bench.mounts import bind_ro, drop_caches, is_mountpoint, umount
from bench.ovlrun_cli import DIR_SIDE, IMAGE_SIDE, Side
from bench.snapshot_bench import kernel_copyup
from bench.standin.counters import diff, metadata_requests, round_trips
from bench.standin.server import RUN_DIR, StandIn
from bench.tree import BENCH_CACHE, BUNDLE_RELEASE, TREE_DIR, TreeInfo
from bench.tree import REFERENCE_RELEASE as REFERENCE_RELEASE_PIP

# The release every part localises: tens of thousands of entries (see bench/tree.py).
REFERENCE_RELEASE = BUNDLE_RELEASE

REF_PROFILE = "bench-ref"
REFERENCE_SET = REFERENCE_RELEASE_PIP  # the package set, pip-installed (~15k entries)
REFSET_PROFILE = "bench-refset"
SMALL_RELEASE = "sw/pystack/2023.2"
SMALL_PROFILE = "bench-ref-small"
SIDES = (IMAGE_SIDE, DIR_SIDE)
# Where the fetch part publishes the image on the shared tree (outside every release).
PUBLISHED = Path("images")
NODES_DIR = BENCH_CACHE / "nodes"
LAUNCH_PROFILE = "bench-launch-20"

Log = type(print)


def count_release(rel: str) -> tuple[int, int]:
    """(entries including the release directory itself, directories including it)."""
    entries = dirs = 1
    for _dp, dn, fn in os.walk(TREE_DIR / rel):
        entries += len(dn) + len(fn)
        dirs += len(dn)
    return entries, dirs


def allocated(path: Path) -> int:
    """Bytes allocated to a file or a tree (st_blocks, like du, hard links once)."""
    st = os.lstat(path)
    if not os.path.isdir(path):
        return st.st_blocks * 512
    seen: set[tuple[int, int]] = set()
    total = st.st_blocks * 512
    for dp, dn, fn in os.walk(path):
        for n in dn + fn:
            s = os.lstat(os.path.join(dp, n))
            if (s.st_dev, s.st_ino) in seen:
                continue
            seen.add((s.st_dev, s.st_ino))
            total += s.st_blocks * 512
    return total


def snapshot_dirs(side: Side) -> list[Path]:
    return sorted(side.store.glob("snapshots/*/*"))


def write_profiles(tree: TreeInfo) -> None:
    ovlrun_cli.write_profile(REF_PROFILE, SHARED_ROOT, [REFERENCE_RELEASE],
                             "bench: the reference release of issue 12")
    ovlrun_cli.write_profile(SMALL_PROFILE, SHARED_ROOT, [SMALL_RELEASE],
                             "bench: a smaller release (for the slow kernel copy-up at 1 ms)")
    ovlrun_cli.write_profile(LAUNCH_PROFILE, SHARED_ROOT, tree.lib_dirs[:20],
                             "bench: 20 localised library directories")


class Shared:
    """What is mounted at SHARED_ROOT: the stand-in (latency > = 0) or the local tree."""

    def __init__(self, where: str, latency_us: int) -> None:
        self.where = where
        self.standin: StandIn | None = None
        if where == "standin":
            self.standin = StandIn(TREE_DIR, SHARED_ROOT, latency_us=latency_us)
            self.standin.mount()
        else:
            bind_ro(TREE_DIR, SHARED_ROOT)

    def cold(self, read_ahead_kb: int | None = None) -> None:
        if self.standin:
            self.standin.unmount()
        drop_caches()
        if self.standin:
            self.standin.mount()
            if read_ahead_kb:
                set_read_ahead_kb(SHARED_ROOT, read_ahead_kb)

    def counters(self) -> dict[str, int]:
        return self.standin.counters() if self.standin else {}

    def close(self) -> None:
        if self.standin:
            self.standin.unmount()
        elif is_mountpoint(SHARED_ROOT):
            umount(SHARED_ROOT)


def set_read_ahead_kb(mountpoint: Path, kb: int) -> None:
    """The client's readahead window on a mount (its backing device's read_ahead_kb).

    FUSE's default is 128 KiB, so the kernel asks the stand-in for 128 KiB per READ even
    when the application reads 1 MiB; an NFS client mounted with rsize=1M sends 1 MiB
    READs.  Setting 1024 here makes the stand-in see what such an NFS server would."""
    dev = os.stat(mountpoint).st_dev
    Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").write_text(f"{kb}\n")


def build(side: Side, profile: str, shared: Shared) -> dict[str, object]:
    """A cold `ovlrun snapshot build` of one profile into an empty store."""
    shutil.rmtree(side.store, ignore_errors=True)
    shared.cold()
    before = shared.counters()
    t0 = time.perf_counter()
    proc = side.snapshot_build(profile)
    elapsed = time.perf_counter() - t0
    counts = diff(shared.counters(), before) if shared.standin else {}
    snaps = snapshot_dirs(side)
    out: dict[str, object] = {"elapsed": elapsed, "counters": counts, "output": proc.stderr[-500:]}
    if snaps:
        out["snapshot_bytes"] = allocated(snaps[0])
        image = snaps[0] / "image.erofs"
        if image.exists():
            out["image_size"] = image.stat().st_size
            out["image_bytes"] = allocated(image)
        if (snaps[0] / "tree").is_dir():
            out["tree_bytes"] = allocated(snaps[0] / "tree")
    return out


# ---------------------------------------------------------------- storage + build


MKFS_VARIANTS = {
    "plain": [],
    "-zlz4hc": ["-zlz4hc"],
    "-zlz4hc -Eztailpacking": ["-zlz4hc", "-Eztailpacking"],
    "-zlz4hc,12 -Eztailpacking -C65536": ["-zlz4hc,12", "-Eztailpacking", "-C65536"],
    "--chunksize=4096": ["--chunksize=4096"],
    "--chunksize=4096 -Eforce-inode-blockmap": ["--chunksize=4096", "-Eforce-inode-blockmap"],
    "--chunksize=1GiB -Eforce-inode-blockmap": ["--chunksize=1073741824", "-Eforce-inode-blockmap"],
}


def mkfs_erofs(tree: Path, log: Log) -> dict[str, dict[str, object]]:
    """Debian 12's mkfs.erofs (1.5) on the directory snapshot's tree, several ways."""
    out: dict[str, dict[str, object]] = {}
    if not shutil.which("mkfs.erofs"):
        return out
    img = BENCH_CACHE / "mkfs-test.erofs"
    version = subprocess.run(["mkfs.erofs", "--version"], capture_output=True, text=True).stdout.strip()
    for name, opts in MKFS_VARIANTS.items():
        img.unlink(missing_ok=True)
        t0 = time.perf_counter()
        proc = subprocess.run(["mkfs.erofs", *opts, str(img), str(tree)], capture_output=True, text=True)
        took = time.perf_counter() - t0
        if proc.returncode != 0:
            out[name] = {"error": (proc.stderr or proc.stdout).strip()[-300:]}
            log(f"  mkfs.erofs {name}: failed: {out[name]['error'][-120:]}")
            continue
        fsck = subprocess.run(["fsck.erofs", str(img)], capture_output=True, text=True)
        out[name] = {"bytes": img.stat().st_size, "seconds": took, "fsck_ok": fsck.returncode == 0,
                     "version": version}
        log(f"  mkfs.erofs {name}: {img.stat().st_size} bytes in {took:.1f} s, fsck {fsck.returncode}")
    img.unlink(missing_ok=True)
    return out


def measure_build(tree: TreeInfo, latency_us: int, log: Log = print,
                  copyup_standin: str = SMALL_RELEASE, reps: int = 1,
                  where_list: tuple[str, ...] = ("standin", "local"), copyup: bool = True) -> dict[str, object]:
    """Parts 1 and 2: storage and build speed, side by side, stand-in then local.

    With ``reps`` > 1 the image and directory builds alternate (image, directory,
    directory, image, ...), and the table shows every run and the median."""
    write_profiles(tree)
    entries, dirs = count_release(REFERENCE_RELEASE)
    small_entries, small_dirs = count_release(SMALL_RELEASE)
    log(f"  {REFERENCE_RELEASE}: {entries} entries, {dirs} dirs; {SMALL_RELEASE}: {small_entries} entries")
    res: dict[str, object] = {"release": REFERENCE_RELEASE, "entries": entries, "dirs": dirs,
                              "small_release": SMALL_RELEASE, "small_entries": small_entries,
                              "small_dirs": small_dirs, "latency_us": latency_us, "rows": []}
    rows: list[dict[str, object]] = res["rows"]  # type: ignore[assignment]
    for where in where_list:
        shared = Shared(where, latency_us)
        try:
            plan: list[tuple[str, str]] = []
            for i in range(reps):
                pair = [("image", REFERENCE_RELEASE), ("directory", REFERENCE_RELEASE)]
                plan += pair if i % 2 == 0 else pair[::-1]
            if where == "local":
                plan += [("copy-up", REFERENCE_RELEASE)] if copyup else []
            else:  # the copy-up costs ~5 requests per entry: 68k entries at 1 ms is ~10 min
                for i in range(reps):
                    pair = [("image", copyup_standin), ("directory", copyup_standin)]
                    plan += pair if i % 2 == 0 else pair[::-1]
                plan += [("copy-up", copyup_standin)] if copyup else []
            for method, rel in plan:
                n, nd = (entries, dirs) if rel == REFERENCE_RELEASE else (small_entries, small_dirs)
                if method == "copy-up":
                    r = kernel_copyup(shared.standin, rel) if shared.standin else _local_copyup(rel)
                else:
                    side = IMAGE_SIDE if method == "image" else DIR_SIDE
                    r = build(side, REF_PROFILE if rel == REFERENCE_RELEASE else SMALL_PROFILE, shared)
                    if (method == "directory" and rel == REFERENCE_RELEASE and where == "local"
                            and "mkfs_erofs" not in res):
                        snaps = snapshot_dirs(DIR_SIDE)
                        res["mkfs_erofs"] = mkfs_erofs(snaps[0] / "tree", log)
                row = {"where": where, "method": method, "release": rel, "entries": n, "dirs": nd, **r}
                row["entries_per_s"] = n / r["elapsed"]
                rows.append(row)
                log(f"  {where:7s} {method:9s} {rel:22s} {r['elapsed']:7.2f} s {n / r['elapsed']:8.0f} entries/s"
                    f"  remote={round_trips(r.get('counters') or {})}")
            if where == "local":
                # Storage of the issue's own package set (a smaller release: ~15k entries).
                res["refset"] = refset_storage(shared, log)
        finally:
            shared.close()
    return res


def refset_storage(shared: Shared, log: Log) -> dict[str, object]:
    ovlrun_cli.write_profile(REFSET_PROFILE, SHARED_ROOT, [REFERENCE_SET],
                             "bench: the issue's package set alone")
    n, nd = count_release(REFERENCE_SET)
    out: dict[str, object] = {"release": REFERENCE_SET, "entries": n, "dirs": nd}
    for side in SIDES:
        r = build(side, REFSET_PROFILE, shared)
        out[side.name] = r.get("image_size") or r.get("tree_bytes")
    log(f"  {REFERENCE_SET}: {n} entries; image {out['image']} B, directory tree {out['directory']} B")
    return out


def _local_copyup(rel: str) -> dict[str, object]:
    drop_caches()
    return kernel_copyup(None, rel)


# ---------------------------------------------------------------- stat of every entry

STAT_CODE = r"""
import json, os, subprocess, sys, time
sys.path.insert(0, sys.argv[3])
from bench.standin.counters import diff, read_counters
root, how, ctl = sys.argv[1], sys.argv[2], sys.argv[4]
before = read_counters(ctl)
t0 = time.perf_counter()
n = 0
if how == "lstat":
    stack = [root]
    while stack:
        d = stack.pop()
        os.lstat(d)
        n += 1
        with os.scandir(d) as it:
            for e in it:
                st = os.lstat(e.path)
                n += 1
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                    n -= 1
else:
    subprocess.run(["ls", "-lR", root], stdout=subprocess.DEVNULL, check=True)
elapsed = time.perf_counter() - t0
print(json.dumps({"elapsed": elapsed, "entries": n, "counters": diff(read_counters(ctl), before)}))
"""


def measure_stat(tree: TreeInfo, latency_us: int, reps: int, log: Log = print) -> dict[str, object]:
    """Part 3: stat every entry of the localised release, image vs directory overlay.

    Cold: stand-in remounted (fresh client caches) and `echo 3 > drop_caches` (so the
    snapshot store, image or tree, is read from disk again) before the launch; warm:
    the same again right after.  Timed inside the job: the launch is not included.
    """
    write_profiles(tree)
    root = SHARED_ROOT / REFERENCE_RELEASE
    shared = Shared("standin", 0)
    samples: dict[tuple[str, str, str], list[dict[str, object]]] = {}
    try:
        for side in SIDES:  # builds at 0 latency: not what is measured here
            shutil.rmtree(side.store, ignore_errors=True)
            side.snapshot_build(REF_PROFILE)
        assert shared.standin
        shared.standin.set_latency(latency_us)
        for _ in range(reps):
            for how in ("lstat", "ls -lR"):
                for side in SIDES:  # interleaved: image, directory, image, ...
                    for mode in ("cold", "warm"):
                        if mode == "cold":
                            shared.cold()
                        cmd = [*side.prefix(REF_PROFILE), sys.executable, "-I", "-c", STAT_CODE,
                               str(root), how.split()[0], str(ovlrun_cli.REPO), str(shared.standin.counters_path)]
                        proc = subprocess.run(cmd, env=side.env(), capture_output=True, text=True, cwd="/")
                        if proc.returncode != 0:
                            raise RuntimeError(f"stat {side.name} {how}: {proc.stderr[-1500:]}")
                        r = json.loads(proc.stdout.strip().splitlines()[-1])
                        samples.setdefault((how, side.name, mode), []).append(r)
                        log(f"  {how:7s} {side.name:9s} {mode}  {r['elapsed'] * 1e3:8.0f} ms  "
                            f"remote={round_trips(r['counters'])}")
    finally:
        shared.close()
    rows = []
    for (how, side, mode), rs in samples.items():
        ops = sorted({k for r in rs for k in r["counters"]})
        med = {k: int(statistics.median(r["counters"].get(k, 0) for r in rs)) for k in ops}
        rows.append({"walk": how, "side": side, "mode": mode, "n": len(rs),
                     "elapsed": statistics.median(r["elapsed"] for r in rs),
                     "all": [r["elapsed"] for r in rs], "counters": med,
                     "entries": rs[0]["entries"]})
    return {"release": REFERENCE_RELEASE, "latency_us": latency_us, "rows": rows}


# ---------------------------------------------------------------- requests per node


def fetch_image(src: Path, dest: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    """What `ovlrun snapshot fetch` does (pending on main): copy the published image
    with large sequential reads, hashing it on the way, into the node's store."""
    digest = hashlib.sha256()
    size = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb", buffering=0) as f, open(dest, "wb") as out:
        while True:
            b = f.read(chunk)
            if not b:
                break
            digest.update(b)
            out.write(b)
            size += len(b)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), size


def measure_fetch(tree: TreeInfo, latency_us: int, nodes: int, walk_nodes: int,
                  log: Log = print, fleet: int = 2000) -> dict[str, object]:
    """Part 4: remote requests per node to localise the reference release.

    Each simulated node has its own store and a cold client: the stand-in is remounted
    and caches dropped before each node.  Walk-and-build = `ovlrun snapshot build`;
    fetch = copy the image published on the shared tree (1 MiB reads) + sha256.
    """
    write_profiles(tree)
    entries, _dirs = count_release(REFERENCE_RELEASE)
    published = TREE_DIR / PUBLISHED / (REFERENCE_RELEASE.replace("/", "_") + ".erofs")
    shared = Shared("standin", 0)
    res: dict[str, object] = {"release": REFERENCE_RELEASE, "entries": entries, "latency_us": latency_us,
                              "fleet": fleet, "walk": [], "fetch": []}
    try:
        # The publisher: one build, its image put on the shared tree.
        shutil.rmtree(IMAGE_SIDE.store, ignore_errors=True)
        IMAGE_SIDE.snapshot_build(REF_PROFILE)
        snap = snapshot_dirs(IMAGE_SIDE)[0]
        manifest = json.loads((snap / "manifest.json").read_text())
        published.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(snap / "image.erofs", published)
        res["image_size"] = published.stat().st_size
        assert shared.standin
        shared.standin.set_latency(latency_us)
        shutil.rmtree(NODES_DIR, ignore_errors=True)
        for i in range(max(nodes, walk_nodes)):
            for ra, key in ((1024, "fetch"), (128, "fetch_ra128")) if i < nodes else ():
                shared.cold(read_ahead_kb=ra)
                before = shared.counters()
                t0 = time.perf_counter()
                sha, size = fetch_image(SHARED_ROOT / PUBLISHED / published.name,
                                        NODES_DIR / f"node{i:02d}" / "image.erofs")
                took = time.perf_counter() - t0
                c = diff(shared.counters(), before)
                ok = sha == manifest.get("image_sha256")
                res.setdefault(key, []).append({"node": i, "elapsed": took, "counters": c,  # type: ignore[union-attr]
                                                "sha_ok": ok, "bytes": size})
                log(f"  node {i:2d} fetch (read_ahead_kb {ra}) {took * 1e3:7.0f} ms  remote={round_trips(c)}"
                    f"  sha256 ok={ok}")
            if i < walk_nodes:
                node = Side(f"node{i}", IMAGE_SIDE.repo, NODES_DIR / f"node{i:02d}" / "store")
                shared.cold()
                before = shared.counters()
                t0 = time.perf_counter()
                node.snapshot_build(REF_PROFILE)
                took = time.perf_counter() - t0
                c = diff(shared.counters(), before)
                res["walk"].append({"node": i, "elapsed": took, "counters": c})  # type: ignore[union-attr]
                log(f"  node {i:2d} walk+build {took:7.1f} s  remote={round_trips(c)}")
    finally:
        shared.close()
        published.unlink(missing_ok=True)
        if published.parent.exists() and not any(published.parent.iterdir()):
            published.parent.rmdir()
        shutil.rmtree(NODES_DIR, ignore_errors=True)
    return res


# ---------------------------------------------------------------- launch


def _run_timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(wall, user+sys, sys) seconds of one whole command, children included."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    sys_s = after.ru_stime - before.ru_stime
    return wall, after.ru_utime - before.ru_utime + sys_s, sys_s


def paired(cmd_a: list[str], cmd_b: list[str], runs: int, env: dict[str, str],
           warmup: int = 3) -> dict[str, object]:
    """Time A and B in turn (A B, B A, A B, ...: the order alternates so neither always
    runs first), ``runs`` pairs after ``warmup`` uncounted pairs.  Whole-process wall
    time (perf_counter around fork to reap) and CPU from getrusage(RUSAGE_CHILDREN);
    the A/B ratio is taken pair by pair, so drift in machine speed cancels."""
    for _ in range(warmup):
        _run_timed(cmd_a, env)
        _run_timed(cmd_b, env)
    a: list[tuple[float, float, float]] = []
    b: list[tuple[float, float, float]] = []
    for i in range(runs):
        if i % 2 == 0:
            a.append(_run_timed(cmd_a, env))
            b.append(_run_timed(cmd_b, env))
        else:
            b.append(_run_timed(cmd_b, env))
            a.append(_run_timed(cmd_a, env))

    def summary(xs: list[float]) -> dict[str, float]:
        return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}

    out: dict[str, object] = {"cmd_a": cmd_a, "cmd_b": cmd_b, "runs": runs}
    for name, rs in (("a", a), ("b", b)):
        out[name] = {k: summary([r[j] for r in rs]) for j, k in enumerate(("wall", "cpu", "sys"))}
    out["ratio_wall"] = summary([x[0] / y[0] for x, y in zip(a, b, strict=True)])
    out["ratio_cpu"] = summary([x[1] / y[1] for x, y in zip(a, b, strict=True) if y[1] > 0])
    out["diff_wall"] = summary([x[0] - y[0] for x, y in zip(a, b, strict=True)])
    return out


def measure_launch(tree: TreeInfo, latency_us: int, runs: int, log: Log = print) -> dict[str, object]:
    """Part 5: launch overhead with 20 localised paths, image vs directory snapshots.

    Both launchers are the same kind of isolated script (python -I -S) around each
    checkout; plans are cached (warm-up runs).  The stand-in runs at ``latency_us``.
    Pairs are timed in turn (:func:`paired`).
    """
    write_profiles(tree)
    shared = Shared("standin", 0)
    out: dict[str, object] = {"latency_us": latency_us, "runs": runs}
    try:
        launchers = {}
        for side in SIDES:
            shutil.rmtree(side.store, ignore_errors=True)
            side.snapshot_build(LAUNCH_PROFILE)
            launchers[side.name] = side.write_launcher(RUN_DIR / f"ovlrun-{side.name}")
        assert shared.standin
        shared.standin.set_latency(latency_us)
        env = dict(os.environ, OVLRUN_PROFILE_PATH=str(ovlrun_cli.PROFILE_DIR))
        # The store differs per side: give it through a tiny sh wrapper per side.
        cmd = {s.name: ["env", f"OVLRUN_STORE={s.store}", str(launchers[s.name]), "--profile", LAUNCH_PROFILE,
                        "--", "/bin/true"] for s in SIDES}
        for s in SIDES:  # plan cache warm + requests per launch
            subprocess.run(cmd[s.name], env=env, check=True)
            before = shared.counters()
            subprocess.run(cmd[s.name], env=env, check=True)
            out[f"requests_{s.name}"] = round_trips(diff(shared.counters(), before))
        bare = [sys.executable, "-I", "-S", "-c", "pass"]
        for key, (a, b) in (("image_vs_directory", (cmd["image"], cmd["directory"])),
                            ("image_vs_python", (cmd["image"], bare)),
                            ("directory_vs_python", (cmd["directory"], bare))):
            r = paired(a, b, runs, env)
            out[key] = r
            log(f"  {key}: A {r['a']['wall']['median'] * 1e3:.1f} ms, B {r['b']['wall']['median'] * 1e3:.1f} ms, "  # type: ignore[index]
                f"A/B {r['ratio_wall']['median']:.3f}")  # type: ignore[index]
    finally:
        shared.close()
    return out


# ---------------------------------------------------------------- markdown


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"


def storage_table(res: dict) -> str:
    from bench.report import table
    n = res["entries"]
    rows = []
    by = {(r["where"], r["method"], r["release"]): r for r in res["rows"]}
    img = by.get(("local", "image", res["release"])) or by.get(("standin", "image", res["release"]))
    d = by.get(("local", "directory", res["release"])) or by.get(("standin", "directory", res["release"]))
    cu = by.get(("local", "copy-up", res["release"]))
    if img:
        rows.append(["ovlrun image (image.erofs, file size)", img["image_size"], img["image_size"] / n])
        rows.append(["ovlrun image (allocated on ext4)", img["image_bytes"], img["image_bytes"] / n])
        rows.append(["ovlrun image snapshot dir incl. manifest (du)", img["snapshot_bytes"], img["snapshot_bytes"] / n])
    if d:
        rows.append(["directory snapshot, tree only (du, ext4)", d.get("tree_bytes", 0), d.get("tree_bytes", 0) / n])
        rows.append(["directory snapshot dir incl. manifest (du, ext4)", d["snapshot_bytes"], d["snapshot_bytes"] / n])
    if cu:
        rows.append(["kernel copy-up upper (du, ext4)", cu["store_bytes"], cu["store_bytes"] / n])
    rs = res.get("refset")
    if rs:
        for side in ("image", "directory"):
            label = "ovlrun image" if side == "image" else "directory snapshot tree (du, ext4)"
            rows.append([f"{label}, of {rs['release']} ({rs['entries']:,} entries: the issue's package set)",
                         rs[side], rs[side] / rs["entries"]])
    for name, m in (res.get("mkfs_erofs") or {}).items():
        if "bytes" in m:
            rows.append([f"mkfs.erofs 1.5 {name} of the directory snapshot tree"
                         + ("" if m.get("fsck_ok") else " (fsck.erofs FAILED)"), m["bytes"], m["bytes"] / n])
        else:
            rows.append([f"mkfs.erofs 1.5 {name}: failed ({m['error'][-80:]})", "", ""])
    return table(["store", "bytes", "bytes/entry"], [[a, f"{b:,}" if isinstance(b, int) else b,
                                                        _fmt(c) if c != "" else ""] for a, b, c in rows])


def build_table(res: dict) -> str:
    from bench.report import table
    rows = []
    for r in res["rows"]:
        k = r.get("counters") or {}
        n, nd = r["entries"], r["dirs"]
        rd = k.get("readdir", 0) + k.get("readdirplus", 0)
        rows.append([r["where"] + (f" ({res['latency_us'] / 1000:g} ms)" if r["where"] == "standin" else ""),
                     r["release"], n, r["method"], f"{r['elapsed']:.2f}", _fmt(r["entries_per_s"]),
                     f"{k.get('getattr', 0) / n:.3f}" if k else "-", f"{k.get('lookup', 0) / n:.3f}" if k else "-",
                     f"{rd / nd:.2f}" if k else "-",
                     f"{(k.get('getxattr', 0) + k.get('listxattr', 0)) / n:.2f}" if k else "-",
                     f"{round_trips(k):,}" if k else "-"])
    return table(["source", "release", "entries", "method", "wall s", "entries/s", "getattr/entry",
                  "lookup/entry", "readdir/dir", "xattr/entry", "remote requests"], rows)


def stat_table(res: dict) -> str:
    from bench.report import table
    rows = []
    by = {(r["walk"], r["side"], r["mode"]): r for r in res["rows"]}
    for how in ("lstat", "ls -lR"):
        for mode in ("cold", "warm"):
            base = by.get((how, "directory", mode))
            for side in ("image", "directory"):
                r = by.get((how, side, mode))
                if not r:
                    continue
                k = r["counters"]
                rows.append([how, mode, side, f"{r['elapsed'] * 1e3:,.0f}",
                             " / ".join(f"{x * 1e3:,.0f}" for x in r["all"]),
                             f"{base['elapsed'] / r['elapsed']:.2f}x" if base else "",
                             r["entries"] if how == "lstat" else "", metadata_requests(k), round_trips(k)])
    return table(["walk", "mode", "snapshot", "median ms", "runs ms", "speed vs directory", "entries",
                  "remote metadata", "remote requests"], rows)


def fetch_table(res: dict) -> str:
    from bench.report import table
    rows = []
    for kind, label in (("walk", "walk and build (`ovlrun snapshot build`)"),
                        ("fetch", "fetch the image: 1 MiB reads + sha256, client readahead 1 MiB (NFS rsize=1M)"),
                        ("fetch_ra128", "fetch the image: 1 MiB reads + sha256, FUSE default readahead 128 KiB")):
        rs = res.get(kind)
        if not rs:
            continue
        per = [round_trips(r["counters"]) for r in rs]
        meta = [metadata_requests(r["counters"]) for r in rs]
        reads = [r["counters"].get("read", 0) for r in rs]
        med = statistics.median(per)
        rows.append([label, len(rs), f"{min(per):,}-{max(per):,}", f"{med:,.0f}", f"{statistics.median(meta):,.0f}",
                     f"{statistics.median(reads):,.0f}", f"{statistics.median(r['elapsed'] for r in rs):.2f}",
                     f"{med * res['fleet']:,.0f}"])
    return table(["localise by", "nodes measured", "requests/node (min-max)", "median requests/node",
                  "of which metadata", "reads", "median s/node", f"total for {res['fleet']:,} nodes"], rows)


def launch_text(res: dict) -> str:
    from bench.report import table
    rows = []
    for key, a_name, b_name in (("image_vs_directory", "image launcher", "directory launcher"),
                                ("image_vs_python", "image launcher", "python -I -S -c pass"),
                                ("directory_vs_python", "directory launcher", "python -I -S -c pass")):
        r = res.get(key)
        if not r or "a" not in r:
            continue
        ms = lambda d: f"{d['median'] * 1e3:.1f} ({d['min'] * 1e3:.1f}-{d['max'] * 1e3:.1f})"  # noqa: E731
        rows.append([f"{a_name} vs {b_name}", r["runs"], ms(r["a"]["wall"]), ms(r["b"]["wall"]),
                     f"{r['diff_wall']['median'] * 1e3:+.1f}", f"{r['ratio_wall']['median']:.3f}",
                     f"{r['a']['cpu']['median'] * 1e3:.1f} / {r['b']['cpu']['median'] * 1e3:.1f}",
                     f"{r['a']['sys']['median'] * 1e3:.1f} / {r['b']['sys']['median'] * 1e3:.1f}"])
    return (f"remote requests per launch (stand-in, {res['latency_us']} us): image "
            f"{res.get('requests_image')}, directory {res.get('requests_directory')}\n\n"
            + table(["A vs B", "pairs", "A wall ms median (min-max)", "B wall ms median (min-max)",
                     "A-B per pair, median ms", "A/B per pair, median", "cpu ms A / B", "sys ms A / B"], rows))
