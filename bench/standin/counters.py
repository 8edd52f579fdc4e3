"""Read the stand-in's request counters from its shared control file.

The file is mapped MAP_SHARED by the server (see benchnfs.c for the layout),
so a plain read() sees the live values without touching the FUSE mount.  This
module is deliberately dependency-free: the in-namespace workload driver
imports it too.
"""

from __future__ import annotations

import struct
from pathlib import Path

HEADER = struct.Struct("<8sII Q 5Q")
NAME_LEN = 24

# Requests that cost the server a metadata operation (the target).
METADATA_OPS = ("lookup", "getattr", "opendir", "readdir", "readdirplus")
# Everything the client sent that NFS would also have to send over the wire.
ROUND_TRIP_OPS = ("lookup", "getattr", "readlink", "open", "read", "opendir", "readdir",
                  "readdirplus", "statfs", "getxattr", "listxattr", "access")


def read_counters(path: Path | str) -> dict[str, int]:
    data = Path(path).read_bytes()
    magic, version, nops, _latency, *_ = HEADER.unpack_from(data, 0)
    if magic != b"BENCHNFS" or version != 1:
        raise ValueError(f"{path}: not a benchnfs control file")
    names_off = HEADER.size
    names = [data[names_off + i * NAME_LEN: names_off + (i + 1) * NAME_LEN].rstrip(b"\0").decode()
             for i in range(nops)]
    counts = struct.unpack_from(f"<{nops}Q", data, names_off + nops * NAME_LEN)
    return dict(zip(names, counts))


def set_latency_us(path: Path | str, latency_us: int) -> None:
    """Change the injected latency of a running server."""
    with open(path, "r+b") as f:
        f.seek(16)
        f.write(struct.pack("<Q", latency_us * 1000))


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def metadata_requests(c: dict[str, int]) -> int:
    return sum(c.get(k, 0) for k in METADATA_OPS)


def round_trips(c: dict[str, int]) -> int:
    return sum(c.get(k, 0) for k in ROUND_TRIP_OPS)
