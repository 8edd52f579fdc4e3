#!/usr/bin/env python3
"""What a real NFS server sees: per-operation counts, direct vs inside ovlrun, on kernel NFS.

Boots Debian's 6.1 (bookworm: fallback mount, shared tree a regular lower layer) and 6.12
(trixie: data-only layer) kernels under qemu (tests/vm/harness.py, both at once), each
running its own knfsd over loopback, and runs bench/nfs_guest.py in them: three real
workloads (ld.so library search over 10 release dirs, a Python import storm over 10
releases, ``ls -lR`` of a release), direct and inside ``ovlrun --profile``, cold and warm,
per NFS version.  Counts come from the client's /proc/self/mountstats: exact under TCG.
Times under TCG mean nothing and are not shown.

    sudo .venv/bin/python bench/nfs_bench.py                    # v4.2 and v3, ~10 min on 2 cores
    sudo .venv/bin/python bench/nfs_bench.py --configs v4.2,v3,v4.2-positive,v3-positive

Prints markdown tables and writes bench/results/nfs-latest.{md,json} (``--out STEM``).
Needs what ``make vm-test`` needs (root, qemu, the kernels it caches).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import table
from tests.vm import harness, kernels

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# Column groups: the kernel's operation names per protocol (v3 / v4) folded into one.
GROUPS = (("LOOKUP", ("LOOKUP",)), ("GETATTR", ("GETATTR",)), ("ACCESS", ("ACCESS",)),
          ("OPEN", ("OPEN", "OPEN_NOATTR")), ("READ", ("READ", "READ_PLUS")),
          ("READDIR", ("READDIR", "READDIRPLUS")), ("READLINK", ("READLINK",)), ("STATFS", ("STATFS", "FSSTAT")))
GROUPED = {name for _, names in GROUPS for name in names}
KERNELS = {"bookworm": "6.1 (fallback)", "trixie": "6.12 (data-only)"}
OPENED_BY_IMPORTS = 210  # bench/nfs_guest.py: 200 modules and 10 packages, one .pyc each
WORKLOADS = {"libsearch": "library search (ld.so, 10 dirs)", "imports": "Python import storm (10 releases)",
             "lsR": "ls -lR of a release"}


def group(ops: dict[str, int]) -> list[int]:
    return [sum(ops.get(n, 0) for n in names) for _, names in GROUPS]


def other(ops: dict[str, int]) -> str:
    return " ".join(f"{k} {v}" for k, v in sorted(ops.items()) if k not in GROUPED and v) or "-"


def tables(results: list[dict[str, object]]) -> str:
    out = []
    for workload, title in WORKLOADS.items():
        rows = []
        for res in results:
            for r in res["rows"]:  # type: ignore[attr-defined]
                if r["workload"] != workload:
                    continue
                ops = r["ops"]
                rows.append([res["kernel_label"], res["config"], r["mode"], r["temp"], failed_names(r),
                             *group(ops), other(ops), sum(ops.values()),
                             "" if r.get("status") == 0 else f"status {r.get('status')}"])
        out.append(f"#### {title}\n\n" + table(
            ["kernel", "NFS", "mode", "cache", "failed names", *[g for g, _ in GROUPS], "other", "total", ""], rows))
    rows = []
    for res in results:
        for r in res["rows"]:  # type: ignore[attr-defined]
            if r["workload"] in ("launch (true)", "snapshot build"):
                ops = r["ops"]
                rows.append([res["kernel_label"], res["config"], r["workload"], r["temp"], failed_names(r),
                             *group(ops), other(ops), sum(ops.values())])
    out.append("#### launch and build (21 localised paths)\n\n" + table(
        ["kernel", "NFS", "what", "cache", "failed names", *[g for g, _ in GROUPS], "other", "total"], rows))
    out.append("#### goals\n\n" + table(
        ["kernel", "NFS", "cache", "imports: LOOKUP+GETATTR+ACCESS direct -> ovlrun", "fewer",
         "beyond 1 LOOKUP per opened file", "with .pyc inlined", "libsearch: failed names direct -> ovlrun", "fewer",
         "ls -lR: all ops direct -> ovlrun"], goal_rows(results)))
    return "\n\n".join(out)


def failed_names(row: dict[str, object]) -> int:
    """Name lookups the server answered with an error: failed LOOKUPs, and on NFSv4 failed
    OPENs (an open by name is the lookup there: ld.so's open() of a missing candidate)."""
    errors: dict[str, int] = row["errors"]  # type: ignore[assignment]
    return errors.get("LOOKUP", 0) + errors.get("OPEN", 0)


def _pct(direct: int, ovl: int) -> str:
    return f"{100 * (direct - ovl) / direct:.1f} %" if direct else "-"


def goal_rows(results: list[dict[str, object]]) -> list[list[object]]:
    rows = []
    for res in results:
        by = {(r["workload"], r["mode"], r["temp"]): r for r in res["rows"]}  # type: ignore[attr-defined]
        for temp in ("cold", "warm"):
            lga = {m: sum(by[("imports", m, temp)]["ops"].get(k, 0) for k in ("LOOKUP", "GETATTR", "ACCESS"))
                   for m in ("direct", "ovlrun", "ovlrun-inline") if ("imports", m, temp) in by}
            failed = {m: failed_names(by[("libsearch", m, temp)]) for m in ("direct", "ovlrun")}
            total = {m: sum(by[("lsR", m, temp)]["ops"].values()) for m in ("direct", "ovlrun")}
            # The floor of an open through a data-only layer: one LOOKUP (the redirect walk)
            # per file opened cold; the workload opens one .pyc per module.
            beyond = lga["ovlrun"] - (OPENED_BY_IMPORTS if temp == "cold" else 0)
            rows.append([res["kernel_label"], res["config"], temp, f"{lga['direct']} -> {lga['ovlrun']}",
                         _pct(lga["direct"], lga["ovlrun"]) + " (goal 95 %)",
                         f"{beyond}: {_pct(lga['direct'], max(beyond, 0))}",
                         (f"{lga['ovlrun-inline']}: {_pct(lga['direct'], lga['ovlrun-inline'])}"
                          if "ovlrun-inline" in lga else "-"),
                         f"{failed['direct']} -> {failed['ovlrun']}",
                         _pct(failed["direct"], failed["ovlrun"]) + " (goal 99 %)",
                         f"{total['direct']} -> {total['ovlrun']}"])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--configs", default="v4.2,v3", help="v4.2, v3, v4.2-positive, v3-positive")
    ap.add_argument("--suites", default="bookworm,trixie")
    ap.add_argument("--out", default=str(RESULTS / "nfs-latest"))
    ap.add_argument("--timeout", type=float, default=3000)
    args = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("must run as root (qemu guests with their own NFS server)")
    py = shlex.quote(sys.executable)
    script = ("export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8\n"
              "export PYTHONDONTWRITEBYTECODE=1\n"
              f"cd {shlex.quote(str(REPO))}\n"
              f"{py} bench/nfs_guest.py run --configs {shlex.quote(args.configs)}\n")
    suites = args.suites.split(",")
    fetched = {s: kernels.fetch(s) for s in suites}
    with ThreadPoolExecutor(len(suites)) as pool:
        futures = {s: pool.submit(harness.run, k, script, args.timeout, "2048M") for s, k in fetched.items()}
        runs = {s: f.result() for s, f in futures.items()}
    results = []
    for suite, run in runs.items():
        lines = [line for line in run.output.splitlines() if line.startswith("NFSBENCH ")]
        if run.status != 0 or not lines:
            print(f"{suite}: guest status {run.status}\n{run.output[-4000:]}\n{run.console[-2000:]}", file=sys.stderr)
            return 1
        for line in lines:
            res = json.loads(line[len("NFSBENCH "):])
            res["kernel_label"] = KERNELS.get(suite, suite)
            results.append(res)
    text = tables(results)
    print(text)
    Path(args.out + ".md").write_text(text + "\n")
    Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
