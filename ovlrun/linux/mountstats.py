"""What the NFS client sent to the server: per-operation counts from ``/proc/self/mountstats``.

The kernel keeps, per NFS mount (per superblock: every mount of the same one shows the
same numbers), how many times each operation went to the server.  These counts are
exact whatever the machine's speed (a VM under TCG counts like bare metal), so they are
what "ovlrun takes load off the server" is measured in.  Requests answered from the
client's own caches (dentries, attributes, negative entries) never appear here.

    before = mountstats.read()
    ...                                          # the workload
    for point, d in mountstats.delta(before, mountstats.read()).items():
        print(point, d.ops.get("LOOKUP", 0), d.errors.get("LOOKUP", 0))

Operation names are the kernel's, per protocol: NFSv3 has ``READDIRPLUS`` and ``FSSTAT``
(what statfs sends), NFSv4 has ``OPEN``, ``OPEN_NOATTR``, ``CLOSE``, ``STATFS``, and
``READ_PLUS`` for most reads on 4.2.  ``errors`` counts replies with an error status
(a failed LOOKUP is one), on kernels that report them (4.x and later; 0 before).

Imports nothing: cheap enough to call from a launch or a Slurm hook.  It only reads,
and never needs root.
"""

from __future__ import annotations

PROC_MOUNTSTATS = "/proc/self/mountstats"
NFS_FSTYPES = ("nfs", "nfs4")


class MountStats:
    """One NFS mount's counters: ``ops[NAME]`` calls sent, ``errors[NAME]`` of them failed.

    ``age`` is the seconds since the superblock was created: a mount whose age went
    down between two reads was replaced (a remount), and its counts restarted.
    """

    __slots__ = ("age", "device", "errors", "fstype", "mount_point", "ops", "options")

    def __init__(self, mount_point: str, device: str, fstype: str, options: str = "", age: int = 0,
                 ops: dict[str, int] | None = None, errors: dict[str, int] | None = None) -> None:
        self.mount_point = mount_point
        self.device = device
        self.fstype = fstype
        self.options = options  # the "opts:" line, as the kernel shows it
        self.age = age
        self.ops: dict[str, int] = ops if ops is not None else {}
        self.errors: dict[str, int] = errors if errors is not None else {}

    def total(self, *names: str) -> int:
        """Calls of all ``names`` together (absent names count 0)."""
        return sum(self.ops.get(n, 0) for n in names)

    def nonzero(self) -> dict[str, int]:
        """The operations sent at least once, in the kernel's order."""
        return {k: v for k, v in self.ops.items() if v}

    def __repr__(self) -> str:
        return f"MountStats({self.mount_point!r}, {self.fstype}, {self.nonzero()})"


def _unescape(field: str) -> str:
    """Undo the kernel's octal escapes (space is ``\\040``, as in mountinfo)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    raw = field.encode("utf-8", "surrogateescape")
    while i < len(raw):
        if raw[i] == 0x5C and i + 3 < len(raw) and all(0x30 <= c <= 0x37 for c in raw[i + 1:i + 4]):
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return bytes(out).decode("utf-8", "surrogateescape")


def parse(text: str) -> dict[str, MountStats]:
    """The NFS mounts of a mountstats text, keyed by mount point (later lines win)."""
    result: dict[str, MountStats] = {}
    current: MountStats | None = None
    in_ops = False
    for line in text.splitlines():
        if line.startswith("device "):
            current, in_ops = None, False
            # device DEV mounted on POINT with fstype TYPE [statvers=X]
            words = line.split(" ")
            if len(words) < 7 or words[2:4] != ["mounted", "on"] or words[5] != "with" or words[6] != "fstype":
                continue
            fstype = words[7] if len(words) > 7 else ""
            if fstype in NFS_FSTYPES:
                current = MountStats(_unescape(words[4]), _unescape(words[1]), fstype)
                result[current.mount_point] = current
            continue
        if current is None:
            continue
        stripped = line.strip()
        if stripped.startswith("opts:"):
            current.options = stripped[5:].strip()
        elif stripped.startswith("age:"):
            current.age = int(stripped[4:].strip() or 0)
        elif stripped == "per-op statistics":
            in_ops = True
        elif in_ops and ":" in stripped:
            # NAME: calls transmissions timeouts bytes_sent bytes_received queue rtt execute [errors]
            name, _, numbers = stripped.partition(":")
            fields = numbers.split()
            if not fields or not fields[0].isdigit():
                continue
            current.ops[name] = int(fields[0])
            current.errors[name] = int(fields[8]) if len(fields) > 8 else 0
    return result


def read(path: str = PROC_MOUNTSTATS) -> dict[str, MountStats]:
    """The NFS mounts visible in this process's mount namespace, keyed by mount point."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse(f.read())


def delta(before: dict[str, MountStats], after: dict[str, MountStats]) -> dict[str, MountStats]:
    """Per mount point of ``after``: what was sent between the two reads.

    A mount absent from ``before``, or one that was replaced in between (other device or
    type, lower age, or any counter lower than before), counts from zero: its ``after``
    numbers are all new.  Mounts gone by ``after`` are left out.
    """
    out: dict[str, MountStats] = {}
    for point, a in after.items():
        b = before.get(point)
        replaced = (b is None or b.device != a.device or b.fstype != a.fstype or a.age < b.age
                    or any(a.ops.get(k, 0) < v for k, v in b.ops.items()))
        base_ops = {} if replaced or b is None else b.ops
        base_errors = {} if replaced or b is None else b.errors
        out[point] = MountStats(point, a.device, a.fstype, a.options, a.age,
                                {k: v - base_ops.get(k, 0) for k, v in a.ops.items()},
                                {k: v - base_errors.get(k, 0) for k, v in a.errors.items()})
    return out
