"""Turn benchmark results into markdown tables and target verdicts."""

from __future__ import annotations

from bench.standin.counters import metadata_requests, round_trips

CONFIG_ORDER = ("direct", "ovlrun-noloc", "ovlrun-loc", "ovlrun-loc-dir", "local")


def table(headers: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(r) for r in cells)])


def workload_tables(rows: list[dict]) -> str:
    out = []
    by = {(r["workload"], r["config"], r["mode"]): r for r in rows}
    for w in ("imports", "libsearch", "statwalk"):
        trs = []
        for mode in ("cold", "warm"):
            direct = by.get((w, "direct", mode))
            for c in CONFIG_ORDER:
                r = by.get((w, c, mode))
                if not r:
                    continue
                k = r["counters"]
                meta = metadata_requests(k)
                # Floor: what opening files costs even with everything
                # localised (one lookup per opened file, plus open and reads).
                floor = 2 * k.get("open", 0) + k.get("read", 0)
                dmeta = metadata_requests(direct["counters"]) if direct else 0
                trs.append([
                    mode, c, r["elapsed"] * 1e3,
                    (direct["elapsed"] / r["elapsed"]) if direct else "",
                    k.get("lookup", 0), k.get("lookup_enoent", 0), k.get("getattr", 0),
                    k.get("opendir", 0) + k.get("readdir", 0) + k.get("readdirplus", 0),
                    k.get("open", 0), k.get("read", 0), k.get("readlink", 0),
                    k.get("getxattr", 0) + k.get("listxattr", 0),
                    meta, round_trips(k), floor,
                    f"{100 * meta / dmeta:.2f}%" if dmeta else "",
                ])
        if trs:
            out.append(f"#### {w}\n\n" + table(
                ["mode", "config", "wall ms", "speed-up vs direct", "lookup", "of which ENOENT",
                 "getattr", "readdir+opendir", "open", "read", "readlink", "xattr", "metadata",
                 "all remote", "floor", "metadata % of direct"], trs))
    return "\n\n".join(out)


def workload_targets(rows: list[dict]) -> list[list[object]]:
    """Check the issue's targets per workload and mode."""
    by = {(r["workload"], r["config"], r["mode"]): r for r in rows}
    verdicts = []
    for w in ("imports", "libsearch", "statwalk"):
        for mode in ("cold", "warm"):
            d, loc, local = (by.get((w, c, mode)) for c in ("direct", "ovlrun-loc", "local"))
            if not (d and loc):
                continue
            dmeta = metadata_requests(d["counters"])
            lmeta = metadata_requests(loc["counters"])
            opens = loc["counters"].get("open", 0)
            # Metadata beyond the floor of one lookup per opened file.
            excess = max(0, lmeta - opens)
            pct = 100 * excess / dmeta if dmeta else 0.0
            speedup = d["elapsed"] / loc["elapsed"]
            vs_local = loc["elapsed"] / local["elapsed"] if local else float("nan")
            enoent = loc["counters"].get("lookup_enoent", 0)
            verdicts.append([
                w, mode, f"{pct:.2f}% {'met' if pct <= 1 else 'MISSED'}",
                f"{enoent} {'met' if enoent == 0 else 'MISSED'}",
                f"{speedup:.1f}x {'met' if speedup >= 10 else 'MISSED'}",
                f"{vs_local:.2f}x {'met' if vs_local <= 1.2 else 'MISSED'}",
            ])
    return verdicts


def launch_table(res: dict) -> str:
    rows = [[r["command"], r["latency_us"], r["median_ms"], f"{r['q1_ms']:.2f}-{r['q3_ms']:.2f}",
             r["overhead_ms"], r["remote_requests"], r["n"]] for r in res["rows"]]
    return table(["command", "stand-in latency us", "median ms", "IQR ms", "minus bare true ms",
                  "remote requests (at launch)", "n"], rows)


def breakdown_table(res: dict) -> str:
    return table(["phase (strace -f -ttt, inflated by tracing)", "median ms"],
                 [[b["phase"], b["ms"]] for b in res["breakdown"]])


def importtime_table(res: dict) -> str:
    it = res["importtime"]
    rows = [[t["module"], t["self_ms"], t["cumulative_ms"]] for t in it["top"]]
    return (f"Total import time (sum of top-level cumulative): {it['total_ms']:.1f} ms\n\n"
            + table(["module", "self ms", "cumulative ms"], rows))


def snapshot_table(res: dict) -> str:
    rows = []
    for name in ("kernel copy-up", "ovlrun snapshot build"):
        r = res.get(name)
        if not r:
            continue
        k = r["counters"]
        n = res["entries"]
        rows.append([name, r["elapsed"], r["entries_per_s"], k.get("getattr", 0) / n,
                     k.get("lookup", 0) / n,
                     (k.get("readdir", 0) + k.get("readdirplus", 0)) / res["dirs"],
                     (k.get("readdir", 0) + k.get("readdirplus", 0) - k.get("readdir_eof", 0))
                     / res["dirs"],
                     (k.get("getxattr", 0) + k.get("listxattr", 0)) / n,
                     round_trips(k) / n, r["store_bytes"] / n, r["store_inodes"]])
    return table(["method", "wall s", "entries/s", "getattr/entry", "lookup/entry",
                  "readdir/dir", "readdir/dir w/o EOF probe", "xattr/entry", "remote/entry", "store bytes/entry",
                  "store inodes"], rows)


def storage_table(res: dict) -> str:
    r = res.get("ovlrun snapshot build")
    if not r:
        return ""
    n = res["entries"]
    sp = r["spill"]
    rows = [["ovlrun store on ext4 (du)", r["store_bytes"] / n, r["store_inodes"]],
            ["kernel copy-up upper on ext4 (du)", res["kernel copy-up"]["store_bytes"] / n,
             res["kernel copy-up"]["store_inodes"]]]
    if res.get("erofs_bytes"):
        rows.append(["EROFS image of the snapshot (mkfs.erofs 1.5, 4 KiB chunks)",
                     res["erofs_bytes"] / n, ""])
    return (table(["storage", "bytes/entry", "inodes"], rows)
            + f"\n\nmetacopy files: {sp['metacopy_files']}, with xattrs spilled to an external "
              f"block: {sp['spilled']}, mean redirect length {sp['mean_redirect_len']:.0f} B")
