"""Snapshot build speed and storage, against the kernel's metacopy copy-up.

Baseline ("kernel copy-up"): a writable overlay with metacopy=on over the
shared subtree and `chown -R -h` through it, which makes the kernel copy up
every entry as a metadata-only upper file (the approach of the original
seed).  Both methods start with dropped caches and a freshly mounted
stand-in, and are timed on the same release.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from bench import ovlrun_cli
from bench.configs import SHARED_ROOT
from bench.mounts import drop_caches, is_mountpoint, umount
from bench.standin.counters import diff
from bench.standin.server import RUN_DIR, StandIn
from bench.tree import BENCH_CACHE, TREE_DIR

SNAP_RELEASE = "sw/pystack/2023.2"
SNAP_PROFILE = "bench-snapshot"
SNAP_STORE = BENCH_CACHE / "store-snapbench"
COPYUP_DIR = BENCH_CACHE / "copyup"
COPYUP_MNT = RUN_DIR / "copyup-mnt"


def count_entries(root: Path) -> tuple[int, int]:
    """(entries below root, directories below root incl. root)."""
    entries, dirs = 0, 1
    for _dp, dn, fn in os.walk(root):
        entries += len(dn) + len(fn)
        dirs += len(dn)
    return entries, dirs


def _du_bytes(path: Path) -> tuple[int, int]:
    """(allocated bytes, inodes) of a directory tree, like `du -s`."""
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], check=True,
                         capture_output=True, text=True).stdout.split()[0]
    inodes = subprocess.run(["du", "-s", "--inodes", str(path)], check=True,
                            capture_output=True, text=True).stdout.split()[0]
    return int(out), int(inodes)


def _cold(standin: StandIn | None) -> None:
    if standin:
        standin.unmount()
    drop_caches()
    if standin:
        standin.mount()


def ovlrun_build(standin: StandIn | None) -> dict[str, object]:
    shutil.rmtree(SNAP_STORE, ignore_errors=True)
    ovlrun_cli.write_profile(SNAP_PROFILE, SHARED_ROOT, [SNAP_RELEASE],
                             "bench: snapshot build of one release")
    _cold(standin)
    before = standin.counters() if standin else {}
    t0 = time.perf_counter()
    ovlrun_cli.snapshot_build(SNAP_PROFILE, store=SNAP_STORE)
    elapsed = time.perf_counter() - t0
    counts = diff(standin.counters(), before) if standin else {}
    alloc, inodes = _du_bytes(SNAP_STORE)
    return {"elapsed": elapsed, "counters": counts, "store_bytes": alloc, "store_inodes": inodes,
            "spill": xattr_spill(SNAP_STORE)}


def kernel_copyup(standin: StandIn | None, release: str = SNAP_RELEASE) -> dict[str, object]:
    shutil.rmtree(COPYUP_DIR, ignore_errors=True)
    upper, work = COPYUP_DIR / "upper", COPYUP_DIR / "work"
    upper.mkdir(parents=True)
    work.mkdir()
    COPYUP_MNT.mkdir(parents=True, exist_ok=True)
    _cold(standin)
    before = standin.counters() if standin else {}
    t0 = time.perf_counter()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"metacopy=on,redirect_dir=on,lowerdir={SHARED_ROOT / release},"
                    f"upperdir={upper},workdir={work}", str(COPYUP_MNT)], check=True)
    try:
        subprocess.run(["chown", "-R", "-h", "0:0", str(COPYUP_MNT)], check=True)
    finally:
        umount(COPYUP_MNT)
    os.sync()  # ovlrun's build syncs its store too; count the writeback alike
    elapsed = time.perf_counter() - t0
    counts = diff(standin.counters(), before) if standin else {}
    alloc, inodes = _du_bytes(upper)
    shutil.rmtree(COPYUP_DIR, ignore_errors=True)
    return {"elapsed": elapsed, "counters": counts, "store_bytes": alloc, "store_inodes": inodes}


def xattr_spill(store: Path) -> dict[str, object]:
    """How many metadata-only files needed an external xattr block.

    A sparse metacopy file has no data blocks, so any allocated block is the
    ext4 xattr block that the redirect spilled into (256-byte inodes leave
    ~100 bytes of in-inode xattr space).
    """
    files = spilled = redirect_bytes = 0
    for dp, _dn, fn in os.walk(store):
        for n in fn:
            p = os.path.join(dp, n)
            st = os.lstat(p)
            if not os.path.isfile(p) or os.path.islink(p):
                continue
            try:
                redirect = os.getxattr(p, "trusted.overlay.redirect", follow_symlinks=False)
            except OSError:
                continue
            files += 1
            redirect_bytes += len(redirect)
            if st.st_blocks > 0:
                spilled += 1
    return {"metacopy_files": files, "spilled": spilled,
            "mean_redirect_len": redirect_bytes / files if files else 0.0}


def erofs_image_bytes(src: Path) -> int | None:
    """Size of an EROFS image of the store (the storage proposal), if mkfs.erofs exists."""
    if not shutil.which("mkfs.erofs"):
        return None
    img = BENCH_CACHE / "store.erofs"
    img.unlink(missing_ok=True)
    # erofs-utils 1.5 (Debian 12) only keeps holes with chunked files; 4 KiB
    # chunks are the smallest, and cost one chunk index per 4 KiB of size.
    proc = subprocess.run(["mkfs.erofs", "--chunksize=4096", "-x1", str(img), str(src)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    size = img.stat().st_size
    img.unlink()
    return size


def measure(latency_us: int, log=print) -> dict[str, object]:
    entries, dirs = count_entries(TREE_DIR / SNAP_RELEASE)
    log(f"  release {SNAP_RELEASE}: {entries} entries, {dirs} dirs")
    results: dict[str, object] = {"release": SNAP_RELEASE, "entries": entries, "dirs": dirs}
    standin = StandIn(TREE_DIR, SHARED_ROOT, latency_us=latency_us)
    standin.mount()
    try:
        for name, fn in (("kernel copy-up", kernel_copyup), ("ovlrun snapshot build", ovlrun_build)):
            r = fn(standin)
            r["entries_per_s"] = entries / r["elapsed"]
            results[name] = r
            log(f"  {name:22s} {r['elapsed']:7.2f} s  {r['entries_per_s']:8.0f} entries/s")
        # Storage of what ovlrun built, and what an EROFS image of it costs.
        trees = sorted(SNAP_STORE.glob("snapshots/*/*/tree"))
        results["erofs_bytes"] = erofs_image_bytes(trees[0]) if trees else None
    finally:
        standin.unmount()
        if is_mountpoint(COPYUP_MNT):
            umount(COPYUP_MNT, lazy=True)
    return results
