"""ovlrun.linux.mountstats on real /proc/self/mountstats text.

tests/data/mountstats-6.1.txt and -6.12.txt were captured in the VM guests of
tests/test_vm_kernels.py (Debian 12's 6.1 and 13's 6.12 kernels, their own knfsd over
loopback): an NFSv4.2 mount (default options) at "/var/tmp/ovlrun-nfs/cap 4.2" and an
NFSv3 mount with lookupcache=positive at "/var/tmp/ovlrun-nfs/cap 3" (a space in each
mount point), each after 3 stats of absent names, one read of a file, one listing and
one statvfs; besides them 9p, tmpfs, proc and nfsd mounts that are not NFS.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ovlrun.linux import mountstats

DATA = Path(__file__).with_name("data")
KERNELS = ("6.1", "6.12")
V4, V3 = "/var/tmp/ovlrun-nfs/cap 4.2", "/var/tmp/ovlrun-nfs/cap 3"


def captured(kernel: str) -> str:
    return (DATA / f"mountstats-{kernel}.txt").read_text()


@pytest.mark.parametrize("kernel", KERNELS)
def test_only_nfs_mounts_keyed_by_unescaped_mount_point(kernel: str) -> None:
    stats = mountstats.parse(captured(kernel))
    assert sorted(stats) == sorted([V4, V3])
    v4, v3 = stats[V4], stats[V3]
    assert (v4.device, v4.fstype, v4.mount_point) == ("127.0.0.1:/", "nfs4", V4)
    assert (v3.device, v3.fstype) == ("127.0.0.1:/var/tmp/ovlrun-nfs/export", "nfs")
    assert "vers=4.2" in v4.options and "lookupcache=pos" in v3.options
    assert isinstance(v4.age, int) and v4.age >= 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_per_operation_calls_and_errors(kernel: str) -> None:
    stats = mountstats.parse(captured(kernel))
    v4, v3 = stats[V4], stats[V3]
    # Each protocol's own operation names, every one the kernel lists (zeros included).
    assert {"OPEN", "OPEN_NOATTR", "CLOSE", "STATFS", "READ_PLUS", "LOOKUP", "GETATTR", "ACCESS"} <= set(v4.ops)
    assert {"READDIRPLUS", "FSSTAT", "LOOKUP", "GETATTR", "ACCESS", "READ"} <= set(v3.ops)
    assert "READDIRPLUS" not in v4.ops and "OPEN" not in v3.ops
    for s in (v4, v3):
        # the 3 absent names: failed LOOKUPs (the 9th number of the line)
        assert s.errors["LOOKUP"] == 3 and s.ops["LOOKUP"] >= 4
        assert s.ops["READDIR"] + s.ops.get("READDIRPLUS", 0) == 1
        assert s.total("STATFS", "FSSTAT") == 1  # statvfs: STATFS on v4, FSSTAT on v3
        assert s.total("READ", "READ_PLUS") >= 1
        assert all(v > 0 for v in s.nonzero().values()) and "SETATTR" not in s.nonzero()
    assert mountstats.parse(captured(kernel))[V4].ops == v4.ops  # parsing is pure


def test_the_exact_numbers_of_one_line() -> None:
    text = ("device srv:/sw mounted on /sw with fstype nfs statvers=1.1\n"
            "\tage:\t42\n\tper-op statistics\n"
            "\t        NULL: 1 1 0 44 24 15 1 17 0\n"
            "\t      LOOKUP: 12 13 1 508 1140 0 10 29 7\n"
            "\t     GETATTR: 5 5 0 420 560 0 5 10\n")  # an older kernel: no errors column
    s = mountstats.parse(text)["/sw"]
    assert (s.age, s.ops, s.errors) == (42, {"NULL": 1, "LOOKUP": 12, "GETATTR": 5},
                                        {"NULL": 0, "LOOKUP": 7, "GETATTR": 0})
    assert s.total("LOOKUP", "GETATTR", "ACCESS") == 17


def test_delta_subtracts_per_mount_and_restarts_replaced_or_new_mounts() -> None:
    text = captured("6.12")
    before = mountstats.parse(text)
    after = mountstats.parse(text)
    after[V4].ops["LOOKUP"] += 40
    after[V4].errors["LOOKUP"] += 38
    after[V4].age += 5
    d = mountstats.delta(before, after)
    assert d[V4].nonzero() == {"LOOKUP": 40} and d[V4].errors["LOOKUP"] == 38
    assert d[V3].nonzero() == {}
    # A mount replaced in between (its counts restarted) counts from zero, as does a new one.
    remounted = mountstats.parse(text)
    remounted[V3].age = 0
    remounted[V3].ops = {k: 0 for k in remounted[V3].ops} | {"LOOKUP": 2}
    assert mountstats.delta(before, remounted)[V3].nonzero() == {"LOOKUP": 2}
    fresh = mountstats.delta({}, after)
    assert fresh[V4].ops == after[V4].ops
    # Gone by the second read: left out.
    assert list(mountstats.delta(before, {V3: after[V3]})) == [V3]


def test_read_this_machine(tmp_path: Path) -> None:
    # The host may have no NFS mount at all: read() still parses, keyed by mount point.
    assert all(s.fstype in mountstats.NFS_FSTYPES for s in mountstats.read().values())
    copy = tmp_path / "mountstats"
    copy.write_text(captured("6.1"))
    assert sorted(mountstats.read(str(copy))) == sorted([V4, V3])


def test_escaped_fields() -> None:
    assert mountstats._unescape("/a\\040b\\011c\\134d\\012") == "/a b\tc\\d\n"
    assert mountstats._unescape("/plain") == "/plain"
    assert mountstats._unescape("/trailing\\04") == "/trailing\\04"
