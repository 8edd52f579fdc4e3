"""EROFS snapshot images: written by ovlrun.store.image, checked by fsck.erofs, mounted by
ovlrun.linux.erofs (file-backed and loop) in a child's private mount namespace, and used
as the lower layer of a real metacopy overlay."""

from __future__ import annotations

import errno
import glob
import hashlib
import io
import os
import pickle
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ovlrun.store.image.reader import read_image
from ovlrun.store.image.tree import ImageError, Node
from ovlrun.store.image.writer import write_image
from tests.conftest import IS_ROOT
from tests.erofs_tree import D, L, R, expected_record, iter_tree, odd_tree, random_tree, walk_dir

CHILD = Path(__file__).with_name("erofs_child.py")
requires_root = pytest.mark.skipif(not IS_ROOT, reason="mounting needs root")
requires_fsck = pytest.mark.skipif(shutil.which("fsck.erofs") is None, reason="erofs-utils not installed")


@pytest.fixture
def tmp() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="ovlrun-erofs-test-", dir="/var/tmp"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def write(root: Node, path: Path) -> None:
    with open(path, "wb") as f:
        write_image(root, f)


def fsck(path: Path) -> None:
    result = subprocess.run(["fsck.erofs", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<E>" not in result.stdout + result.stderr


def erofs_mounts() -> list[str]:
    """Lines of the runner's (host) mount table a test could leave behind."""
    with open("/proc/self/mountinfo") as f:
        return sorted(line for line in f if " - erofs " in line or "erofs-child-" in line or "erofs-ovl-" in line)


def loops_backing(image: Path) -> list[str]:
    found = []
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(backing) as f:
                if f.read().strip().startswith(str(image)):
                    found.append(backing)
        except OSError:
            pass
    return found


def kernel_state() -> tuple[str, int]:
    with open("/proc/sys/kernel/tainted") as f:
        tainted = f.read().strip()
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    return tainted, dmesg.count("WARNING")


def in_child(request: dict[str, Any], image: Path) -> dict[str, Any]:
    """Run erofs_child.py; check it left no mount and (once it is gone) no loop device."""
    before = erofs_mounts()
    state = kernel_state()
    result = subprocess.run([sys.executable, str(CHILD)], input=pickle.dumps({"image": str(image), **request}),
                            capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    reply: dict[str, Any] = pickle.loads(result.stdout)
    assert "error" not in reply, reply["error"]
    assert erofs_mounts() == before, "the child's mounts leaked into the test runner's namespace"
    deadline = time.monotonic() + 10
    while loops_backing(image) and time.monotonic() < deadline:  # autoclear follows the namespace's teardown
        time.sleep(0.05)
    assert loops_backing(image) == [], "the loop device outlived the mount (LO_FLAGS_AUTOCLEAR)"
    after = kernel_state()
    if after != state:
        # Seen once on 6.18: a one-time WARNING (ext4_check_map_extents_env from
        # erofs_fc_fill_super) on the first file-backed mount of an image on ext4.
        warnings.warn(f"kernel taint/WARNING count changed during an erofs mount: {state} -> {after}", stacklevel=2)
    return reply


def check_mount(root: Node, reply: dict[str, Any], *, blocks: bool = True) -> int:
    """Compare everything the mount showed with the tree; returns the number of entries."""
    entries: dict[bytes, Any] = reply["entries"]
    listings: dict[bytes, list[bytes]] = reply["listings"]
    expected = dict(iter_tree(root))
    assert sorted(entries) == sorted(expected)
    for rel, node in expected.items():
        mode, uid, gid, size, mtime_ns, nlink, st_blocks, target, xattrs = entries[rel]
        want = expected_record(node)
        got = (mode, uid, gid, -1 if stat.S_ISDIR(mode) else size, mtime_ns, nlink, target, xattrs)
        assert got == want, (rel, got, want)
        if node.children is not None:
            assert sorted(listings[rel]) == sorted(node.children), rel
        elif stat.S_ISREG(node.mode) and blocks:
            # erofs reports i_blocks "as generic filesystems" from i_size (fs/erofs/inode.c,
            # erofs_read_inode), although the image holds no data block for the file.
            assert st_blocks == (node.size + 4095) // 4096 * 8, rel
    return len(expected)


def absent_names(node: Node) -> list[bytes]:
    """Names a lookup must not find: neighbours of every present name in sort order, and
    names before and after all of them (the kernel binary-searches blocks, then dirents)."""
    names = set(node.children or {})
    probes = {b"!", b"\x01", b"\xff\xff", b"0", b"zzzzzz", b"..." + b"." * 5}
    for name in names:
        probes.update((name + b"~", name + b"\x01", name[:-1] or b"\x02", name + b"\xff"))
        if len(name) < 255:
            probes.add(name + b"0")
    return sorted(p for p in probes - names - {b".", b".."} if len(p) <= 255)


def probes_for(root: Node, limit: int = 0) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    for rel, node in iter_tree(root):
        if node.children is not None and (not limit or len(out) < limit):
            out[rel] = absent_names(node)
    return out


def check_probes(reply: dict[str, Any]) -> None:
    for rel, got in reply["probes"].items():
        wrong = {name: err for name, err in got.items() if err != errno.ENOENT}
        assert not wrong, (rel, wrong)


# --- the writer alone -----------------------------------------------------------------------


def test_deterministic(tmp: Path) -> None:
    """The image is a function of the tree alone: no clock (the superblock's time is the
    tree's most common mtime, which compact inodes take as theirs)."""
    a, b = io.BytesIO(), io.BytesIO()
    stats = write_image(odd_tree(), a)
    time.sleep(0.01)
    write_image(odd_tree(), b)
    assert a.getvalue() == b.getvalue()
    assert len(a.getvalue()) == stats.bytes == stats.blocks * 4096
    assert stats.inodes == sum(1 for _ in iter_tree(odd_tree()))
    changed = odd_tree()
    assert changed.children is not None
    changed.children[b"one"].mtime_ns += 1
    c = io.BytesIO()
    write_image(changed, c)
    assert c.getvalue() != a.getvalue()


@pytest.mark.parametrize("bad", [
    {b"fifo": Node(stat.S_IFIFO | 0o644)},
    {b"sock": Node(stat.S_IFSOCK | 0o644)},
    {b"dev": Node(stat.S_IFCHR | 0o644)},
    {b"a/b": Node(R | 0o644)},
    {b"": Node(R | 0o644)},
    {b".": Node(R | 0o644)},
    {b"..": Node(D | 0o755, children={})},
    {b"nul\0": Node(R | 0o644)},
    {b"n" * 256: Node(R | 0o644)},
    {b"link": Node(L | 0o777, target=b"")},
    {b"link": Node(L | 0o777, target=b"t" * 4096)},
    {b"uid": Node(R | 0o644, uid=2**32)},
    {b"redirect": Node(R | 0o644, size=1, redirect=b"r" * 65536)},
    {b"redirect": Node(R | 0o644, size=1, redirect=b"")},
    {b"mode": Node(R | 0o644 | 0x10000)},
    {b"mtime": Node(R | 0o644, mtime_ns=2**100)},
])
def test_refuses_what_it_cannot_store(bad: dict[bytes, Node]) -> None:
    with pytest.raises(ImageError):
        write_image(Node(D | 0o755, children=bad), io.BytesIO())


def test_root_must_be_a_directory() -> None:
    with pytest.raises(ImageError):
        write_image(Node(R | 0o644), io.BytesIO())


def test_small_and_empty_trees_are_compact() -> None:
    out = io.BytesIO()
    stats = write_image(Node(D | 0o755, children={}), out)
    assert stats.bytes == 4096 and stats.inodes == 1
    out = io.BytesIO()
    files = {b"f%03d" % i: Node(R | 0o644, size=i, redirect=b"/f%03d" % i) for i in range(100)}
    stats = write_image(Node(D | 0o755, children=files), out)
    assert stats.blocks <= 5, stats


def records(root: Node) -> dict[bytes, tuple[object, ...]]:
    return {rel: (node.mode, node.uid, node.gid, node.size if stat.S_ISREG(node.mode) else 0, node.mtime_ns,
                  node.target, None if node.stored else node.redirect, node.stored,
                  sorted(node.children or {}) if stat.S_ISDIR(node.mode) else None)
            for rel, node in iter_tree(root)}


@pytest.mark.parametrize("make", [odd_tree, lambda: random_tree(7, 3000), lambda: Node(D | 0o700, children={})],
                         ids=["odd", "random", "empty"])
def test_read_image_returns_the_tree(make: Any) -> None:
    out = io.BytesIO()
    write_image(make(), out)
    assert records(read_image(out.getvalue())) == records(make())


def test_read_image_refuses_what_write_image_does_not_write() -> None:
    out = io.BytesIO()
    write_image(odd_tree(), out)
    image = bytearray(out.getvalue())
    with pytest.raises(ImageError):
        read_image(bytes(4096))
    # Turn the first "overlay.opaque" shared xattr into "overlay.opaquf".
    at = image.index(b"overlay.opaque")
    image[at + 13:at + 14] = b"f"
    with pytest.raises(ImageError, match="unexpected xattrs"):
        read_image(bytes(image))


@requires_fsck
def test_fsck_odd_tree(tmp: Path) -> None:
    write(odd_tree(), tmp / "odd.img")
    fsck(tmp / "odd.img")


# --- mounted --------------------------------------------------------------------------------


@requires_root
@requires_fsck
@pytest.mark.parametrize("method", ["file", "loop", "auto"])
def test_mount_shows_the_tree(tmp: Path, method: str) -> None:
    root = odd_tree()
    image = tmp / "odd.img"
    write(root, image)
    # Files read directly from the image are holes: zeros up to st_size, nothing after.
    raw = [(b"one", 0, 10), (b"block+1", 4000, 200), (b"huge", 50 << 30, 4096), (b"huge", (100 << 30) - 1, 10),
           (b"past-8TiB", 8 << 40, 10), (b"zero", 0, 10)]
    reply = in_child({"method": method, "probes": probes_for(root), "raw": raw}, image)
    assert reply["raw"] == {(b"one", 0): bytes(1), (b"block+1", 4000): bytes(97), (b"huge", 50 << 30): bytes(4096),
                            (b"huge", (100 << 30) - 1): bytes(1), (b"past-8TiB", 8 << 40): bytes(1),
                            (b"zero", 0): b""}
    fstype, source = reply["mountinfo"]
    assert fstype == "erofs"
    if method == "loop":
        assert source.startswith("/dev/loop")
        assert reply["loop"] == ("1", "1")  # read-only, autoclear
    elif method == "file":  # the image as the fd the caller opened and checked
        assert source.startswith("/proc/self/fd/")
    check_mount(root, reply)
    check_probes(reply)


@requires_root
@requires_fsck
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_trees(tmp: Path, seed: int) -> None:
    """Random names, owners, modes, times and a mix of records with inline tails (symlinks
    and directories up to a block) and without: exercises the placement of inodes."""
    root = random_tree(seed, 3000)
    image = tmp / "random.img"
    write(root, image)
    fsck(image)
    reply = in_child({"method": ("file", "loop", "auto")[seed % 3], "probes": probes_for(root, limit=50)}, image)
    check_mount(root, reply)
    check_probes(reply)


@requires_root
def test_file_backed_mount_of_a_long_path(tmp: Path) -> None:
    """fsconfig strings stop at 256 bytes: longer image paths go through /proc/self/fd."""
    deep = tmp / ("d" * 200) / ("e" * 200)
    deep.mkdir(parents=True)
    root = Node(D | 0o755, children={b"f": Node(R | 0o644, size=3, redirect=b"/f")})
    write(root, deep / "x.img")
    for method in ("file", "loop"):
        check_mount(root, in_child({"method": method}, deep / "x.img"))


@requires_root
def test_loop_without_loop_configure(tmp: Path) -> None:
    """LOOP_SET_FD + LOOP_SET_STATUS64 where LOOP_CONFIGURE is unknown: read-only, autoclear."""
    root = odd_tree()
    write(root, tmp / "odd.img")
    reply = in_child({"method": "loop", "no_loop_configure": True}, tmp / "odd.img")
    assert reply["mountinfo"][1].startswith("/dev/loop")
    assert reply["loop"] == ("1", "1")  # read-only, autoclear
    check_mount(root, reply)


@requires_root
def test_bad_image_is_a_clear_error(tmp: Path) -> None:
    image = tmp / "bad.img"
    image.write_bytes(bytes(8192))
    for method in ("file", "loop", "auto"):
        result = subprocess.run([sys.executable, str(CHILD)],
                                input=pickle.dumps({"image": str(image), "method": method}), capture_output=True,
                                timeout=60)
        reply = pickle.loads(result.stdout)
        assert "ImageMountError" in reply["error"] and str(image) in reply["error"], reply
    assert loops_backing(image) == []


def make_source(base: Path) -> Path:
    """A real release directory with odd names, modes, owners, links and contents."""
    src = base / "src"
    (src / "lib" / "sub dir").mkdir(parents=True)
    (src / "bin").mkdir()
    (src / "empty").mkdir()
    names = [b"new\nline", b"a:b,c", b"back\\slash", b"\xff\xfe", b"x" * 255, b"-dash", b"sp ace"]
    for i, name in enumerate(names):
        (src / "lib" / os.fsdecode(name)).write_bytes(bytes([i]) * (i * 1000 + 1))
    (src / "lib" / "sub dir" / "data.bin").write_bytes(os.urandom(300_000))
    (src / "lib" / "libfoo.so.1").write_bytes(b"\x7fELF" + bytes(range(256)) * 40)
    (src / "lib" / "libfoo.so").symlink_to("libfoo.so.1")
    (src / "lib" / "empty-file").write_bytes(b"")
    (src / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    (src / "bin" / "tool").chmod(0o4755)
    os.chown(src / "bin" / "tool", 65534, 70000)
    os.utime(src / "bin" / "tool", ns=(1, 1_600_000_000_123_456_789))
    sparse = src / "lib" / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(50 << 20)
        f.seek(20 << 20)
        f.write(b"middle")
    deep = src
    for i in range(40):
        deep = deep / f"level{i}"
    deep.mkdir(parents=True)
    (deep / "bottom").write_text("deep\n")
    (src / "empty").chmod(0o1777)
    return src


@requires_root
@pytest.mark.parametrize("method,detached", [("file", False), ("loop", False), ("auto", True)])
def test_overlay_serves_the_source(tmp: Path, method: str, detached: bool) -> None:
    """detached: the overlay's lower layer is the erofs mount's fd (FSCONFIG_SET_FD), which
    is attached nowhere: works on 6.18."""
    src = make_source(tmp)
    root = walk_dir(os.fsencode(src))
    image = tmp / "snap.img"
    write(root, image)
    files = [rel for rel, node in iter_tree(root) if stat.S_ISREG(node.mode)]
    reply = in_child({"method": method, "overlay_source": str(src), "read": files, "overlay_detached": detached},
                     image)
    if detached:
        assert reply["erofs_attached"] is False
    check_mount(root, reply)
    assert sorted(reply["overlay"]) == sorted(files)
    for rel, (digest, (mode, uid, gid, size, mtime_ns, blocks)) in reply["overlay"].items():
        path = os.fsencode(src) + b"/" + rel
        with open(path, "rb") as f:
            assert digest == hashlib.sha256(f.read()).hexdigest(), rel
        st = os.lstat(path)
        # stat through the overlay is the snapshot's, st_blocks included: erofs derives it
        # from i_size (so a sparse source file shows its apparent size, where the old
        # directory snapshots showed 0 blocks), the data layer is not asked.
        assert (mode, uid, gid, size, mtime_ns) == (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                                    st.st_mtime_ns), rel
        assert blocks == (st.st_size + 4095) // 4096 * 8, rel


def stored_tree() -> tuple[Node, io.BytesIO, dict[bytes, bytes]]:
    """Files stored whole at every layout boundary, beside compact and extended inodes
    (the common mtime, other mtimes, 32-bit ids), with metacopy files between them."""
    import random

    rng = random.Random(5)
    spool = io.BytesIO()
    contents: dict[bytes, bytes] = {}
    ns = 1_700_000_000_123_456_789
    children: dict[bytes, Node] = {}
    sizes = (0, 1, 2, 100, 4031, 4032, 4033, 4063, 4064, 4065, 4095, 4096, 4097, 8191, 8192, 8193, 12_000, 300_000)
    for i, size in enumerate(sizes):
        for kind, (uid, mtime) in enumerate(((0, ns), (70000, ns), (0, ns + i + 1))):
            data = bytes(rng.getrandbits(8) for _ in range(size))
            name = b"s%02d-%d-%d" % (i, kind, size)
            children[name] = Node(R | 0o644, uid, uid, mtime, size, data_at=spool.tell())
            spool.write(data)
            contents[name] = data
            children[name + b".meta"] = Node(R | 0o755, 0, 0, ns, size + 1, redirect=b"/" + name)
    children[b"sub"] = Node(D | 0o755, 0, 0, ns, children={b"x": Node(R | 0o600, 5, 5, ns, 3, data_at=spool.tell())})
    spool.write(b"abc")
    contents[b"sub/x"] = b"abc"
    return Node(D | 0o755, 0, 0, ns, children=children), spool, contents


@requires_root
@requires_fsck
@pytest.mark.parametrize("method", ["file", "loop"])
def test_stored_files_round_trip(tmp: Path, method: str) -> None:
    """Files stored whole read back byte for byte through the kernel's erofs, with their
    mode, owner, size and ns mtime, whether their inode is compact or extended."""
    root, spool, contents = stored_tree()
    image = tmp / "stored.img"
    with open(image, "wb") as f:
        stats = write_image(root, f, spool)
    assert stats.stored == len(contents) and stats.compact > len(contents) // 3, stats
    assert stats.stored_bytes == sum(map(len, contents.values()))
    fsck(image)
    read_back = read_image(image.read_bytes())
    assert records(read_back) == records(root)
    reply = in_child({"method": method, "raw": [(name, 0, len(data) + 10) for name, data in contents.items()]},
                     image)
    assert {name: reply["raw"][(name, 0)] for name in contents} == contents
    check_mount(root, reply)
    assert write_image(root, io.BytesIO(), spool).bytes == stats.bytes  # deterministic


def test_stored_file_needs_its_data() -> None:
    root = Node(D | 0o755, children={b"f": Node(R | 0o644, size=10, data_at=0)})
    with pytest.raises(ImageError, match="data source"):
        write_image(root, io.BytesIO())
    with pytest.raises(ImageError, match="holds 5 bytes"):
        write_image(root, io.BytesIO(), io.BytesIO(b"12345"))


# --- a real tree ----------------------------------------------------------------------------

REAL_TREE = "/usr/share"


@requires_root
@requires_fsck
def test_real_tree_round_trips(tmp: Path) -> None:
    if not os.path.isdir(REAL_TREE):
        pytest.skip(f"no {REAL_TREE}")
    root = walk_dir(os.fsencode(REAL_TREE))
    count = sum(1 for _ in iter_tree(root))
    if count < 50_000:
        pytest.skip(f"{REAL_TREE} has only {count} entries (50,000 wanted)")
    image = tmp / "real.img"
    started = time.perf_counter()
    with open(image, "wb") as f:
        stats = write_image(root, f)
    took = time.perf_counter() - started
    print(f"\n{REAL_TREE}: {count} entries, {stats.bytes} bytes ({stats.bytes / count:.1f} B/entry), "
          f"written in {took:.2f} s ({count / took:,.0f} entries/s); {stats}")
    assert stats.inodes == count
    assert stats.bytes / count < 400
    fsck(image)
    started = time.perf_counter()
    assert records(read_image(image.read_bytes())) == records(root)
    print(f"read back with read_image in {time.perf_counter() - started:.2f} s")
    # Every entry through the mount; every 20th regular file read through the overlay.
    files = [rel for rel, node in iter_tree(root) if stat.S_ISREG(node.mode)]
    sample = [rel for rel in files[::20] if os.access(os.fsencode(REAL_TREE) + b"/" + rel, os.R_OK)]
    reply = in_child({"method": "auto", "probes": probes_for(root, limit=200), "overlay_source": REAL_TREE,
                      "read": sample}, image)
    assert check_mount(root, reply) == count
    check_probes(reply)
    for rel, (digest, _) in reply["overlay"].items():
        with open(os.fsencode(REAL_TREE) + b"/" + rel, "rb") as f:
            assert digest == hashlib.sha256(f.read()).hexdigest(), rel
