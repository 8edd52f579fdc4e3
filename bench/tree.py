"""Build (once) and cache the realistic software tree that the stand-in serves.

The tree is made of real software so that file counts, directory fan-out, name
lengths and the import graph are what a site's shared NFS tree looks like:

  sw/python/3.11/lib/python3.11/...            copy of this interpreter's stdlib
  sw/pystack/<release>/lib/python3.11/site-packages/
                                               pinned numpy/scipy/pandas/requests
  sw/tools/<name>/<version>/lib/python/        small pure-Python tools (PYTHONPATH filler)
  sw/libs/<name>/<version>/lib/*.so*           real shared objects (LD_LIBRARY_PATH dirs)

Everything is pinned, so a rebuild from scratch yields the same tree.  The
result is cached under BENCH_CACHE (outside /tmp and outside the repo) and
reused while the spec hash recorded in tree.json matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

BENCH_CACHE = Path(os.environ.get("OVLRUN_BENCH_CACHE", "/var/cache/ovlrun-bench"))
TREE_DIR = BENCH_CACHE / "tree"
WHEEL_DIR = BENCH_CACHE / "wheels"
STAMP = BENCH_CACHE / "tree.json"

PY_TAG = "python3.11"

# Release name -> exact pins (installed with --no-deps so the set is complete
# and repeatable; the dependencies are listed explicitly).
PYSTACK_RELEASES: dict[str, list[str]] = {
    "2022.2": ["numpy==1.23.5", "scipy==1.9.3", "pandas==1.5.3", "requests==2.28.2"],
    "2023.1": ["numpy==1.24.4", "scipy==1.10.1", "pandas==2.0.3", "requests==2.31.0"],
    "2023.2": ["numpy==1.26.4", "scipy==1.11.1", "pandas==2.1.4", "requests==2.31.0"],
    "2024.1": ["numpy==1.26.4", "scipy==1.13.1", "pandas==2.2.2", "requests==2.32.3"],
    "2024.2": ["numpy==2.0.2", "scipy==1.13.1", "pandas==2.2.3", "requests==2.32.3"],
    "2025.1": ["numpy==2.2.6", "scipy==1.16.3", "pandas==2.3.3", "requests==2.32.4"],
}
PYSTACK_COMMON = [
    "python-dateutil==2.9.0.post0",
    "pytz==2024.2",
    "tzdata==2024.2",
    "six==1.16.0",
    "urllib3==2.2.3",
    "idna==3.10",
    "certifi==2024.8.30",
    "charset-normalizer==3.4.0",
]

# The reference release of issue 12 (snapshot images): numpy + scipy + pandas +
# matplotlib + sympy pip-installed into one directory, ~95k entries.  Every
# dependency is pinned explicitly (installed with --no-deps, like the others).
REFERENCE_RELEASE = "sw/refstack/2025.1"
REFERENCE_PINS = [
    "numpy==2.2.6", "scipy==1.16.3", "pandas==2.3.3", "matplotlib==3.11.2", "sympy==1.14.0",
    "contourpy==1.3.3", "cycler==0.12.1", "fonttools==4.68.0", "kiwisolver==1.5.1",
    "mpmath==1.3.0", "packaging==26.4", "pillow==13.0.0", "pyparsing==3.3.3",
    "python-dateutil==4.0.0", "pytz==2026.6", "tzdata==2026.6",
]

# The Python stack of issue 17 (data inlining): the reference set plus scikit-learn and
# requests, pip-installed into one release (~15k files): what the import workload of
# bench/inline_bench.py imports, with and without inlined .pyc/.so data.
ML_RELEASE = "sw/mlstack/2025.1"
ML_PINS = [*REFERENCE_PINS, "scikit-learn==1.9.1", "joblib==1.6.0", "threadpoolctl==3.8.0",
           "requests==2.34.2", "urllib3==2.8.0", "idna==3.20", "certifi==2026.10.19.post1",
           "charset-normalizer==3.5.3"]

# pip installs the reference set into ~15k entries here, not the 95k; a release
# of tens of thousands of entries is what the image benchmarks need, so they use a
# bundle release, as a site's software-stack release (a Spack/conda environment) is:
# copies of every pystack release, the reference release and the stdlib (~68k entries).
BUNDLE_RELEASE = "sw/bundle/2025.1"

# Small tools whose directories end up on PYTHONPATH ahead of the stack, as a
# site's module system does; none of them provides the modules we import.
TOOLS: dict[str, list[str]] = {
    "click": ["8.1.7", "8.1.3"],
    "jinja2": ["3.1.4", "3.1.2"],
    "markupsafe": ["2.1.5"],
    "pyyaml": ["6.0.2", "6.0.1"],
    "attrs": ["24.2.0", "23.2.0"],
    "packaging": ["24.1", "23.2"],
    "pluggy": ["1.5.0"],
    "toml": ["0.10.2"],
    "tabulate": ["0.9.0"],
    "wrapt": ["1.16.0"],
}

# Shared-object directories for the library-search workload.
N_LIB_DIRS = 120
SYSTEM_LIB_DIR = Path("/usr/lib/x86_64-linux-gnu")

SPEC_VERSION = 6


@dataclass(frozen=True)
class TreeInfo:
    root: Path
    files: int
    dirs: int
    symlinks: int
    bytes: int
    pystack_releases: list[str]
    tool_dirs: list[str]
    lib_dirs: list[str]
    lib_names: dict[str, str]  # library file name -> the lib dir (relative) holding it


def spec_hash() -> str:
    spec = {
        "v": SPEC_VERSION,
        "pystack": PYSTACK_RELEASES,
        "common": PYSTACK_COMMON,
        "tools": TOOLS,
        "nlib": N_LIB_DIRS,
        "reference": REFERENCE_PINS,
        "ml": ML_PINS,
        "bundle": BUNDLE_RELEASE,
        "py": sys.version,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _pip_install(target: Path, reqs: list[str]) -> None:
    # A private constraint-free environment: the machine-wide pip constraints
    # are about torch and must not interfere with our pins.
    env = dict(os.environ, PIP_CONSTRAINT="", PIP_DISABLE_PIP_VERSION_CHECK="1")
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:",
         "--target", str(tmp), "--find-links", str(WHEEL_DIR), *reqs],
        check=True, env=env,
    )
    tmp.rename(target)


def _download_wheels(reqs: list[str]) -> None:
    env = dict(os.environ, PIP_CONSTRAINT="", PIP_DISABLE_PIP_VERSION_CHECK="1")
    WHEEL_DIR.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--dest", str(WHEEL_DIR), *reqs],
        check=True, env=env,
    )


def _copy_stdlib(dest: Path) -> None:
    src = Path(sysconfig.get_paths()["stdlib"])
    # site-packages is the machine's own environment, not part of a release.
    shutil.copytree(src, dest, symlinks=True,
                    ignore=shutil.ignore_patterns("site-packages"))


def _build_lib_dirs(sw: Path) -> None:
    sos = sorted(p for p in SYSTEM_LIB_DIR.iterdir()
                 if ".so" in p.name and p.is_file() and not p.is_symlink())
    # Spread the real shared objects round-robin over N_LIB_DIRS release
    # directories named like a module tree: libs/<name>/<version>/lib.
    for i in range(N_LIB_DIRS):
        d = sw / "libs" / f"pkg{i:03d}" / f"{1 + i % 3}.{i % 7}" / "lib"
        d.mkdir(parents=True, exist_ok=True)
    for j, so in enumerate(sos):
        i = j % N_LIB_DIRS
        d = sw / "libs" / f"pkg{i:03d}" / f"{1 + i % 3}.{i % 7}" / "lib"
        shutil.copy2(so, d / so.name)
        # Real library dirs hold the soname symlink next to the versioned
        # file (libfoo.so.1 -> libfoo.so.1.2.3); ld.so opens the soname.
        stem, sep, ver = so.name.partition(".so.")
        if sep and "." in ver:
            soname = f"{stem}.so.{ver.split('.')[0]}"
            if not (d / soname).exists():
                (d / soname).symlink_to(so.name)


def build_bundle(sw: Path) -> None:
    """Copies (not hard links: every entry its own inode, as on a real tree)."""
    dest = sw / BUNDLE_RELEASE.removeprefix("sw/")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel in sorted(PYSTACK_RELEASES):
        shutil.copytree(sw / "pystack" / rel, tmp / "pystack" / rel, symlinks=True)
    shutil.copytree(sw / REFERENCE_RELEASE.removeprefix("sw/"), tmp / "refstack", symlinks=True)
    shutil.copytree(sw / "python" / "3.11", tmp / "python", symlinks=True)
    tmp.rename(dest)


def _walk_info(root: Path) -> tuple[int, int, int, int]:
    files = dirs = links = size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirs += len(dirnames)
        for n in filenames:
            st = os.lstat(os.path.join(dirpath, n))
            if os.path.islink(os.path.join(dirpath, n)):
                links += 1
            else:
                files += 1
                size += st.st_size
    return files, dirs, links, size


def _describe(root: Path, counts: dict[str, int]) -> TreeInfo:
    sw = root / "sw"
    libs: dict[str, str] = {}
    lib_dirs = sorted(str(p.relative_to(root)) for p in (sw / "libs").glob("*/*/lib"))
    for d in lib_dirs:
        for n in sorted(os.listdir(root / d)):
            libs[n] = d
    tool_dirs = sorted(str(p.relative_to(root)) for p in (sw / "tools").glob("*/*/lib/python"))
    return TreeInfo(
        root=root, files=counts["files"], dirs=counts["dirs"], symlinks=counts["symlinks"],
        bytes=counts["bytes"], pystack_releases=sorted(PYSTACK_RELEASES),
        tool_dirs=tool_dirs, lib_dirs=lib_dirs, lib_names=libs,
    )


def ensure_tree(log=print) -> TreeInfo:
    """Return the cached tree, building it first if missing or stale."""
    want = spec_hash()
    if STAMP.exists():
        stamp = json.loads(STAMP.read_text())
        if stamp.get("spec") == want and TREE_DIR.is_dir():
            return _describe(TREE_DIR, stamp["counts"])
    log(f"building software tree in {TREE_DIR} (one-off, needs PyPI)")
    shutil.rmtree(TREE_DIR, ignore_errors=True)
    sw = TREE_DIR / "sw"
    sw.mkdir(parents=True)

    all_reqs = sorted({r for rs in PYSTACK_RELEASES.values() for r in rs} | set(PYSTACK_COMMON)
                      | {f"{n}=={v}" for n, vs in TOOLS.items() for v in vs}
                      | set(REFERENCE_PINS) | set(ML_PINS))
    # pip resolves one version per name per call, so download in batches in
    # which every project name appears once.
    batches: list[dict[str, str]] = []
    for req in all_reqs:
        name = req.split("==")[0].lower()
        for batch in batches:
            if name not in batch:
                batch[name] = req
                break
        else:
            batches.append({name: req})
    for batch in batches:
        _download_wheels(sorted(batch.values()))

    log("  stdlib copy")
    _copy_stdlib(sw / "python" / "3.11" / "lib" / PY_TAG)
    for rel, pins in PYSTACK_RELEASES.items():
        log(f"  pystack {rel}")
        _pip_install(sw / "pystack" / rel / "lib" / PY_TAG / "site-packages", pins + PYSTACK_COMMON)
    log(f"  reference release {REFERENCE_RELEASE}")
    _pip_install(sw / REFERENCE_RELEASE.removeprefix("sw/") / "lib" / PY_TAG / "site-packages",
                 REFERENCE_PINS)
    log(f"  issue 17 stack {ML_RELEASE}")
    _pip_install(sw / ML_RELEASE.removeprefix("sw/") / "lib" / PY_TAG / "site-packages", ML_PINS)
    for name, versions in TOOLS.items():
        for v in versions:
            _pip_install(sw / "tools" / name / v / "lib" / "python", [f"{name}=={v}"])
    log("  shared-object dirs")
    _build_lib_dirs(sw)
    log(f"  bundle release {BUNDLE_RELEASE}")
    build_bundle(sw)

    files, dirs, links, size = _walk_info(TREE_DIR)
    counts = {"files": files, "dirs": dirs, "symlinks": links, "bytes": size}
    STAMP.write_text(json.dumps({"spec": want, "counts": counts}, indent=1))
    log(f"  tree: {files} files, {dirs} dirs, {links} symlinks, {size / 2**20:.0f} MiB")
    return _describe(TREE_DIR, counts)


if __name__ == "__main__":
    info = ensure_tree()
    print(f"{info.root}: {info.files} files, {info.dirs} dirs")
