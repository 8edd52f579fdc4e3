"""Unit tests of pure parsers: the mountinfo reader, the launch command line, file trust."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ovlrun.cli.launch import LaunchArgs, parse_launch
from ovlrun.errors import OvlrunError
from ovlrun.linux import mountinfo
from ovlrun.linux.files import NOT_WRITABLE, PRIVATE, is_temporary_of, temporary_name, trust_problem
from ovlrun.store.layout import snapshot_of_layer

# Real lines (6.18), one per kind: a plain ext4 root, an overlay made by ovlrun with
# escaped layer paths, a mount point with a space and a tab.
MOUNTINFO = (
    "23 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "402 23 0:60 / /sw/app/1.0 ro,nosuid,nodev,relatime master:1 - overlay ovlrun "
    "ro,lowerdir+=/var/lib/ovlrun/snapshots/K/I/tree,datadir+=/sw/a\\054b,redirect_dir=follow,metacopy=on\n"
    "403 23 0:61 / /mnt/with\\040space\\011tab rw shared:5 - tmpfs tmp\\134fs rw\n"
)


def test_mountinfo_parses_points_types_sources_and_unescapes(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "mountinfo")
    with open(path, "w") as f:
        f.write(MOUNTINFO)
    mounts = mountinfo.read(path)
    assert [(m.point, m.fstype, m.source) for m in mounts] == [
        ("/", "ext4", "/dev/vda"), ("/sw/app/1.0", "overlay", "ovlrun"), ("/mnt/with space\ttab", "tmpfs", "tmp\\fs")]
    assert mountinfo.overlay_layers(mounts[1].super_options) == ["/var/lib/ovlrun/snapshots/K/I/tree", "/sw/a,b"]


def test_mountinfo_reads_this_process_table() -> None:
    assert any(m.point == "/" for m in mountinfo.read())


@pytest.mark.parametrize(("options", "layers"), [
    ("ro,lowerdir+=/s/snapshots/K/I/tree,datadir+=/sw/a\\054b,metacopy=on", ["/s/snapshots/K/I/tree", "/sw/a,b"]),
    ("lowerdir=/s\\:x/snapshots/K/I/tree::/sw/app,redirect_dir=follow", ["/s:x/snapshots/K/I/tree", "/sw/app"]),
    ("lowerdir=/a:/b,upperdir=/u,workdir=/w", ["/a", "/b"]),
    ("rw,relatime", []),
])
def test_overlay_layers(options: str, layers: list[str]) -> None:
    assert mountinfo.overlay_layers(options) == layers


def test_unescape_is_byte_exact() -> None:
    assert mountinfo.unescape("a\\040b\\134c\\012") == "a b\\c\n"
    assert mountinfo.unescape("\\377x") == os.fsdecode(b"\xffx")
    assert mountinfo.unescape("no\\escape\\9") == "no\\escape\\9"


def test_snapshot_of_layer() -> None:
    assert snapshot_of_layer("/x/snapshots/K/I/tree/") == ("K", "I")
    assert snapshot_of_layer("/sw/app/tree") is None


@pytest.mark.parametrize(("argv", "parsed"), [
    (["--profile", "p", "--", "ls", "-l"], LaunchArgs("p", None, False, False, ["ls", "-l"])),
    (["-p", "p", "ls", "--profile", "x"], LaunchArgs("p", None, False, False, ["ls", "--profile", "x"])),
    (["--profile=p", "--strict", "-u", "bob"], LaunchArgs("p", "bob", True, False, [])),
    (["--user=bob", "-p", "p", "--login", "-", "x"], LaunchArgs("p", "bob", False, True, ["-", "x"])),
])
def test_parse_launch(argv: list[str], parsed: LaunchArgs) -> None:
    assert parse_launch(argv) == parsed


@pytest.mark.parametrize(("argv", "message"), [
    ([], "missing --profile"),
    (["--profile"], "option --profile needs a value"),
    (["--bogus", "p"], "unknown option '--bogus'"),
    (["ls"], "missing --profile"),
])
def test_parse_launch_errors(argv: list[str], message: str) -> None:
    with pytest.raises(OvlrunError, match=message) as info:
        parse_launch(argv)
    assert info.value.status == 125  # env(1)'s status for its own usage errors


def test_trust_problem_masks(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "f")
    open(path, "w").close()
    for mode, writable, private in ((0o644, None, "open"), (0o664, "writable", "open"), (0o600, None, None)):
        os.chmod(path, mode)
        st = os.stat(path)
        if os.geteuid() != 0:
            assert trust_problem(st) == f"owned by uid {os.geteuid()}, not root"
            continue
        for mask, expect in ((NOT_WRITABLE, writable), (PRIVATE, private)):
            problem = trust_problem(st, mask)
            assert (problem is None) if expect is None else (expect in str(problem))


def test_temporary_names() -> None:
    tmp = temporary_name("/s/index.json")
    assert os.path.dirname(tmp) == "/s" and is_temporary_of(os.path.basename(tmp), "index.json")
    assert not is_temporary_of("index.json", "index.json")


def test_bounded_worker_keeps_error_class_and_status() -> None:
    from ovlrun.store.bounded import run_bounded
    from ovlrun.store.build import BuildError

    def fail() -> None:
        raise BuildError("the walk failed", status=3)

    with pytest.raises(BuildError, match="the walk failed") as info:
        run_bounded(fail, timeout=60, what="a test walk")
    assert info.value.status == 3


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    # any character, and the lone surrogates undecodable bytes become in paths
                    | st.text(st.characters() | st.sampled_from([chr(c) for c in range(0xDC80, 0xDD00)])),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12))
def test_job_record_json_is_what_json_writes(value: object) -> None:
    """Records are written without the json module (the launch path does not import it):
    the text must be json.dumps's, and read back to the same value."""
    from ovlrun.jobs.records import encode

    assert encode(value) == json.dumps(value)
    assert json.loads(encode(value)) == value


def test_job_record_round_trips_and_refuses_what_is_not_one() -> None:
    from ovlrun.jobs.records import JobRecord, encode, valid_record_id

    record = JobRecord("launch-12-34", 1000, 1000, "alice", kind="launch", profile="p", state="localised",
                       localised=["/sw/a\udcff", "/sw/b\n"], messages=['say "hi"'], pid=12, pid_start=34,
                       ns_ino=4026531840, started=1.5, stats={"lookups": 3, "paths": {"/sw/a": [1, 2.5, None]}})
    assert JobRecord.from_dict(json.loads(encode(record.to_dict()))) == record
    assert valid_record_id("123") and valid_record_id("launch-12-34")
    for bad_id in ("", "../x", "launch-12", "launch-1-2-3", "12a", "\u00b2", "launch-1-\u00b2"):
        assert not valid_record_id(bad_id), bad_id
    data = record.to_dict()
    for key, value in (("uid", "1000"), ("uid", True), ("ns_owned", 1), ("localised", [1]), ("stats", [])):
        with pytest.raises(ValueError):
            JobRecord.from_dict({**data, key: value})
    with pytest.raises(ValueError):
        JobRecord.from_dict({k: v for k, v in data.items() if k != "user"})
    assert JobRecord.from_dict({**data, "from_a_newer_ovlrun": 1}) == record


def test_namespace_helper_keeps_the_childs_error_class_and_status() -> None:
    """A failure in a namespace helper arrives as the child raised it (issue 15): the
    caller adds its context once, from the error's fields, never from its text."""
    import errno

    from ovlrun.linux import namespaces
    from ovlrun.linux.children import ChildFailed
    from ovlrun.linux.syscalls import SyscallError
    from ovlrun.store.build import BuildError

    def raising(e: BaseException) -> object:
        def rest() -> dict[str, list[str]]:
            raise e
        return rest

    with pytest.raises(SyscallError) as syscall:
        namespaces.run_in_child(lambda: None, raising(SyscallError(errno.EPERM, "mount", "/sw/a", "detail")))
    e = syscall.value
    assert (e.errno, e.call, e.filename, e.detail, str(e)) == (
        errno.EPERM, "mount", "/sw/a", "detail", "mount(/sw/a): Operation not permitted (detail)")
    with pytest.raises(BuildError) as build:
        namespaces.run_in_child(lambda: None, raising(BuildError("no walk", status=3)))
    assert build.value.status == 3 and build.value.message == "no walk"
    with pytest.raises(FileNotFoundError):
        namespaces.run_in_child(lambda: None, raising(FileNotFoundError(errno.ENOENT, "gone", "/x")))
    with pytest.raises(ChildFailed, match="ZeroDivisionError"):
        namespaces.run_in_child(lambda: None, raising(ZeroDivisionError()))
    assert namespaces.run_in_child(lambda: None, lambda: {"a": ["b"]}) == {"a": ["b"]}


def test_open_trusted_opens_only_what_root_may_trust(tmp_path: os.PathLike[str]) -> None:
    """One opener for every file root acts on: no symlink followed, no FIFO waited for,
    type, owner and mode checked on the fd."""
    import errno
    import stat

    from ovlrun.linux.files import UntrustedError, open_trusted

    base = str(tmp_path)
    good, fifo, link, loose = (os.path.join(base, n) for n in ("good", "fifo", "link", "loose"))
    for path in (good, loose):
        with open(path, "w") as f:
            f.write("x")
    os.chmod(good, 0o644)
    os.chmod(loose, 0o666)
    os.mkfifo(fifo)
    os.symlink(good, link)
    fd = open_trusted(good, uid=os.getuid(), owner="me")
    assert os.get_blocking(fd) and stat.S_ISREG(os.fstat(fd).st_mode)
    os.close(fd)
    with pytest.raises(UntrustedError) as refused:
        open_trusted(fifo, uid=os.getuid())  # returns at once: O_NONBLOCK
    assert refused.value.wrong_type and refused.value.problem == "not a regular file"
    with pytest.raises(OSError) as loop:
        open_trusted(link, uid=os.getuid())
    assert loop.value.errno == errno.ELOOP
    os.close(open_trusted(link, uid=os.getuid(), follow_symlinks=True))
    with pytest.raises(UntrustedError, match="writable by group or others") as writable:
        open_trusted(loose, uid=os.getuid())
    assert not writable.value.wrong_type
    with pytest.raises(UntrustedError, match="owned by uid"):
        open_trusted(good, uid=os.getuid() + 1, owner="someone else")
    os.close(open_trusted(loose, uid=None))  # the owner rule left to the caller
    with pytest.raises(NotADirectoryError):  # O_DIRECTORY: the open itself refuses
        open_trusted(good, directory=True, uid=os.getuid())
    dir_fd = open_trusted(base, directory=True, uid=os.getuid())
    try:
        os.close(open_trusted("good", dir_fd=dir_fd, uid=os.getuid()))
    finally:
        os.close(dir_fd)


def test_site_configuration_that_is_a_fifo_is_refused_at_once(tmp_path: os.PathLike[str]) -> None:
    """The openers root used before open_trusted waited forever on a FIFO planted under a
    trusted name (only fleet's did not)."""
    import subprocess
    import sys

    conf = os.path.join(str(tmp_path), "ovlrun.toml")
    os.mkfifo(conf, 0o644)
    code = ("import sys; from ovlrun.errors import OvlrunError; from ovlrun.store.siteconfig import load_site_config\n"
            "try:\n    load_site_config(sys.argv[1])\nexcept OvlrunError as e:\n    print(e)")
    r = subprocess.run([sys.executable, "-c", code, conf], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    assert r.stdout.strip() == f"site configuration {conf} is not a regular file", r


LOCALITY = (
    "23 1 254:0 / / rw - ext4 /dev/vda rw\n"
    "30 23 0:40 / /sw rw - nfs4 server:/sw rw\n"
    "31 30 254:1 / /sw/local rw - xfs /dev/vdb rw\n"
    "32 23 0:41 / /tmp rw - tmpfs tmpfs rw\n"
    "33 23 7:0 / /images rw - ext4 /dev/loop0 rw\n"
    "34 32 0:42 / /tmp/fuse rw - fuse.sshfs host:/x rw\n"
)


def test_mounts_local_follows_each_mount_up_to_the_root(tmp_path: os.PathLike[str]) -> None:
    """Local: a disk or memory file system, and every mount it hangs on; a mount on NFS
    (even a local disk mounted below it: walking to it asks the server), FUSE, a loop
    device (its file may be remote) or one the table does not list is not."""
    path = os.path.join(tmp_path, "mountinfo")
    with open(path, "w") as f:
        f.write(LOCALITY)
    assert mountinfo.mounts_local({23, 32}, path)
    assert mountinfo.mounts_local(set(), path)
    for remote in (30, 31, 33, 34, 99):
        assert not mountinfo.mounts_local({23, remote}, path), remote
    assert not mountinfo.mounts_local({23}, os.path.join(tmp_path, "absent"))
