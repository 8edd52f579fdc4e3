"""Run one workload and print its wall time and remote-request deltas as JSON.

Executed as a separate process inside the configuration under test (e.g. as
`ovlrun --profile P -- python3 -I bench/workloads/driver.py ...`), so the time
and request counts cover the workload only, not ovlrun's own start-up.  The
interpreter running this driver is the local one; only the workload touches
the software tree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# -I drops the script directory from sys.path: add the repo root explicitly
# so that the dependency-free counters module can be imported.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.standin.counters import diff, read_counters  # noqa: E402

IMPORTS = ("numpy", "pandas", "requests", "scipy.linalg", "json", "email.mime.multipart",
           "http.client", "xml.etree.ElementTree", "logging.handlers", "argparse",
           "decimal", "csv", "sqlite3", "urllib.request")


def import_storm(pythonpath: list[str]) -> dict[str, object]:
    """Start an interpreter with a long PYTHONPATH and import a real stack."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(pythonpath),
           "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/root"}
    code = "import " + ", ".join(IMPORTS) + "; import numpy, json; print(numpy.__file__, json.__file__)"
    out = subprocess.run([sys.executable, "-s", "-c", code], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return {"numpy": out[0], "json": out[1], "modules": len(IMPORTS)}


def lib_search(dirs: list[str], names: list[str]) -> dict[str, object]:
    """Probe library names through a search path the way ld.so does.

    ld.so tries open() on each directory/name candidate in order and, on
    success, reads the ELF header; a missing candidate is an ENOENT lookup.
    """
    found = probes = 0
    for name in names:
        for d in dirs:
            probes += 1
            try:
                fd = os.open(os.path.join(d, name), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                os.read(fd, 832)  # sizeof(Elf64_Ehdr) + program headers
            finally:
                os.close(fd)
            found += 1
            break
    return {"names": len(names), "dirs": len(dirs), "found": found, "probes": probes}


def stat_walk(root: str) -> dict[str, object]:
    """find -type f equivalent: walk the release and lstat every entry."""
    files = dirs = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirs += len(dirnames)
        for n in filenames:
            os.lstat(os.path.join(dirpath, n))
            files += 1
    return {"files": files, "dirs": dirs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workload", choices=("imports", "libsearch", "statwalk"))
    ap.add_argument("--counters", help="benchnfs control file (absent for the local copy)")
    ap.add_argument("--spec", required=True, help="JSON with the workload's parameters")
    args = ap.parse_args()
    spec = json.loads(args.spec)

    before = read_counters(args.counters) if args.counters else {}
    t0 = time.perf_counter()
    if args.workload == "imports":
        detail = import_storm(spec["pythonpath"])
    elif args.workload == "libsearch":
        detail = lib_search(spec["dirs"], spec["names"])
    else:
        detail = stat_walk(spec["root"])
    elapsed = time.perf_counter() - t0
    counts = diff(read_counters(args.counters), before) if args.counters else {}
    print(json.dumps({"elapsed": elapsed, "counters": counts, "detail": detail}))


if __name__ == "__main__":
    main()
