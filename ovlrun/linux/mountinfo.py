"""Reading a mount table (``/proc/PID/mountinfo``): the one parser ovlrun has.

Light on purpose (os only): hooks and ``status`` read it, gc reads one per live mount
namespace.  The kernel octal-escapes space, tab, newline and backslash in the mount
point and source (``\\040``), and in overlay's super options also ',' and '=' in layer
paths (fs/seq_file.c: seq_escape; fs/overlayfs/params.c: ovl_show_options).
"""

from __future__ import annotations

import os


class Mount:
    """One line of mountinfo (proc(5)), with the mount point unescaped."""

    __slots__ = ("fstype", "point", "source", "super_options")

    def __init__(self, point: str, fstype: str, source: str, super_options: str) -> None:
        self.point = point
        self.fstype = fstype
        self.source = source
        self.super_options = super_options  # still escaped: split on ',' before unescaping

    def __repr__(self) -> str:
        return f"Mount({self.point!r}, {self.fstype!r}, {self.source!r})"


def unescape(field: str) -> str:
    """Undo the kernel's ``\\ooo`` octal escapes (bytes-exact, via surrogateescape)."""
    if "\\" not in field:
        return field
    raw = os.fsencode(field)
    out = bytearray()
    i = 0
    while i < len(raw):
        chunk = raw[i + 1:i + 4]
        if raw[i] == 0x5C and len(chunk) == 3 and all(0x30 <= c <= 0x37 for c in chunk):
            out.append(int(chunk, 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def parse_line(line: str) -> Mount | None:
    """A mountinfo line, or None if it is not one (the optional fields end at '-')."""
    left, sep, right = line.rstrip("\n").partition(" - ")
    fields = left.split(" ")
    tail = right.split(" ", 2)
    if not sep or len(fields) < 5 or len(tail) < 2:
        return None
    return Mount(unescape(fields[4]), tail[0], unescape(tail[1]), tail[2] if len(tail) > 2 else "")


def read(path: str = "/proc/self/mountinfo") -> list[Mount]:
    """Every mount in the table at ``path``, in its order (parents before children)."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        text = f.read()
    return [m for m in map(parse_line, text.splitlines()) if m is not None]


def _split_legacy_lowerdir(value: str) -> list[str]:
    """``lowerdir=A:B::C``: layers split on unescaped ':' (one or two), '\\:' and '\\\\'
    are a literal ':' and '\\' (fs/overlayfs/params.c: ovl_parse_param_split_lowerdirs)."""
    layers: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            current.append(value[i + 1])
            i += 2
            continue
        if ch == ":":
            if current:
                layers.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    if current:
        layers.append("".join(current))
    return layers


def overlay_layers(super_options: str) -> list[str]:
    """The lower and data layer paths of an overlay mount, from its super options."""
    layers: list[str] = []
    for option in super_options.split(","):  # a ',' inside a value is escaped as \054
        key, _, value = option.partition("=")
        if key in ("lowerdir+", "datadir+"):
            layers.append(unescape(value))
        elif key == "lowerdir":
            layers.extend(_split_legacy_lowerdir(unescape(value)))
    return layers
