"""Files stored whole in snapshot images (the per-tree ``inline`` option, issue 17): what
the image holds, fsck, what a running job reads after the source changed in place,
verify/refresh, determinism, and the profile's errors.  (Reading them through every
mount method: tests/test_mount.py, which the VM tests run on 6.1 and 6.12 too.)"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ovlrun.store.image.reader import read_image
from tests.conftest import World, requires_overlay, requires_root
from tests.erofs_tree import iter_tree
from tests.test_lifecycle import current_dir, read_until_ready, start_holding_job, verify_json
from tests.test_mount import STAYS_METACOPY, inline_release


def image_nodes(world: World, rel: Path) -> dict[str, object]:
    with open(current_dir(world, rel) / "image.erofs", "rb") as f, mmap.mmap(f.fileno(), 0,
                                                                                prot=mmap.PROT_READ) as data:
        root = read_image(data)
    return {os.fsdecode(path): node for path, node in iter_tree(root)}


@requires_root
def test_image_stores_what_the_rule_selects_and_passes_fsck(world: World) -> None:
    rel, files = inline_release(world)
    nodes = image_nodes(world, rel)
    for name, data in files.items():
        node = nodes[name]
        assert node.stored == (name not in STAYS_METACOPY), name  # type: ignore[attr-defined]
        assert node.size == len(data)  # type: ignore[attr-defined]
        if name in STAYS_METACOPY:
            assert node.redirect == b"/" + name.encode()  # type: ignore[attr-defined]
    manifest = json.loads((current_dir(world, rel) / "manifest.json").read_text())
    assert (manifest["inline"], manifest["inline_max"]) == (["**/*.pyc", "**/*.so*"], 256 << 10)
    assert manifest["counts"]["inlined"] == len(files) - len(STAYS_METACOPY) - 1  # the empty file is not read
    if shutil.which("fsck.erofs"):
        r = subprocess.run(["fsck.erofs", str(current_dir(world, rel) / "image.erofs")], capture_output=True,
                           text=True)
        assert r.returncode == 0 and "<E>" not in r.stdout + r.stderr, r.stdout + r.stderr
    # Without the option nothing but empty files is stored (the default).
    world.simple_profile(patterns=("app/1.0",))
    world.build()
    plain = image_nodes(world, world.sw / "app" / "1.0")
    assert [p for p, n in plain.items() if n.stored] == []  # type: ignore[attr-defined]


@requires_root
@requires_overlay
def test_inlined_file_changed_in_place_reads_the_snapshot_until_refresh(world: World) -> None:
    """An inlined file is served from the snapshot: rewriting its source in place changes
    nothing for a running job (nor for new jobs) until refresh; verify reports it."""
    rel, files = inline_release(world)
    world.write_profile("p", (world.profiles / "inl.toml").read_text())
    pyc = rel / "lib/python/pkg/__pycache__/m2.cpython-311.pyc"
    mod = rel / "lib/python/pkg/mod.py"
    old = files["lib/python/pkg/__pycache__/m2.cpython-311.pyc"]
    holder = start_holding_job(world, f"sha256sum {pyc} | cut -c1-64", f"sha256sum {pyc} | cut -c1-64; cat {mod}")
    try:
        assert read_until_ready(holder) == [hashlib.sha256(old).hexdigest()]
        with open(pyc, "r+b") as f:  # in place: same inode, same size, new bytes
            f.write(bytes(len(old)))
        mod.write_bytes(b"y = 2\n")  # a metacopy file: its new data shows (as before)
        assert holder.stdin is not None
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert read_until_ready(holder) == [hashlib.sha256(old).hexdigest(), "y = 2"]
        assert world.job(f"cmp -s {pyc} /dev/zero -n {len(old)} && echo new || echo snapshot",
                         profile="inl").stdout == "snapshot\n"
        code, rows = verify_json(world, "--profile", "inl")
        assert code == 1 and "/lib/python/pkg/__pycache__/m2.cpython-311.pyc" in rows[0]["changed"]  # type: ignore[operator]
        r = world.ovlrun("snapshot", "refresh", "--profile", "inl")
        assert r.returncode == 0 and "rebuilt:" in r.stderr, r.stderr
        assert world.job(f"cmp -s {pyc} /dev/zero -n {len(old)} && echo new || echo snapshot",
                         profile="inl").stdout == "new\n"
        # refresh kept the inline settings
        assert image_nodes(world, rel)["lib/python/pkg/__pycache__/m2.cpython-311.pyc"].stored  # type: ignore[attr-defined]
    finally:
        holder.kill()
        holder.wait(timeout=30)


@requires_root
def test_images_are_deterministic_and_rebuilt_when_the_rule_changes(world: World) -> None:
    rel, _ = inline_release(world)
    built = world.ovlrun("snapshot", "build", "--profile", "inl", "--rebuild")
    assert "up-to-date" in built.stderr, built.stderr
    first = (current_dir(world, rel) / "image.erofs").read_bytes()
    shutil.rmtree(world.store)
    world.build("inl")
    assert (current_dir(world, rel) / "image.erofs").read_bytes() == first
    again = world.ovlrun("snapshot", "build", "--profile", "inl")
    assert "exists:" in again.stderr
    # Other inline settings: the snapshot is rebuilt with them (here: none).
    world.write_profile("inl", f'[[tree]]\nroot = "{world.sw}"\nlocalise = ["app/2.0"]\n')
    r = world.ovlrun("snapshot", "build", "--profile", "inl")
    assert r.returncode == 0 and "built:" in r.stderr and "inline settings changed" in r.stderr, r.stderr
    nodes = image_nodes(world, rel)
    assert [p for p, n in nodes.items() if n.stored] == ["lib/python/pkg/__init__.py"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("lines,key,why", [
    ('inline = ["/abs/*.pyc"]', "tree[0].inline[0]", "is absolute"),
    ('inline = ["a**/x"]', "tree[0].inline[0]", "'**' must be a whole component"),
    ('inline = ["a/../x"]', "tree[0].inline[0]", "'..' component"),
    ('inline = "**/*.pyc"', "tree[0].inline", "must be an array"),
    ("inline = []", "tree[0].inline", "empty"),
    ("inline = [3]", "tree[0].inline[0]", "must be a string"),
    ('inline = ["*.pyc"]\ninline_max = "12 parsecs"', "tree[0].inline_max", "is not a size"),
    ('inline = ["*.pyc"]\ninline_max = "2GiB"', "tree[0].inline_max", "out of range"),
    ('inline = ["*.pyc"]\ninline_max = -1', "tree[0].inline_max", "out of range"),
    ('inline = ["*.pyc"]\ninline_max = true', "tree[0].inline_max", "must be a size"),
    ('inline_max = "1MiB"', "tree[0].inline_max", "without inline"),
    ('inlne = ["*.pyc"]', "tree[0].inlne", "unknown key"),
])
def test_bad_inline_options_are_clear_errors(world: World, lines: str, key: str, why: str) -> None:
    path = world.write_profile("bad", f'[[tree]]\nroot = "{world.sw}"\nlocalise = ["app/1.0"]\n{lines}\n')
    r = world.ovlrun("profile", "check", str(path))
    assert r.returncode != 0
    message = r.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert str(path) in message and key in message and why in message, message


def test_inline_rule_matching() -> None:
    from ovlrun.profile.parse import Inline, parse_size
    from ovlrun.profile.patterns import FilePattern
    rule = Inline((FilePattern.parse("**/*.pyc"), FilePattern.parse("lib/**/*.so*")), 100)
    assert rule.selects("a.pyc", 100) and rule.selects("x/__pycache__/a.cpython-311.pyc", 1)
    assert not rule.selects("a.pyc", 101) and not rule.selects("a.py", 1)
    assert rule.selects("lib/libx.so.1", 5) and rule.selects("lib/a/b/_m.so", 5) and not rule.selects("libx.so", 5)
    assert rule.selects("new\nline/x.pyc", 1)  # names are anything but '/'
    assert not FilePattern.parse("*.pyc").matches("a/b.pyc")  # '*' stays in one component
    assert [parse_size(v) for v in (1, "1", "10 B", "256KiB", "1 MiB", "1GiB")] == \
        [1, 1, 10, 256 << 10, 1 << 20, 1 << 30]


def _spool(tmp_dir: Path, name: str, st: os.stat_result) -> tuple[int, list[str], bytes]:
    import io

    from ovlrun.store.walk import WalkState, _spool_file
    state = WalkState()
    spool = io.BytesIO()
    fd = os.open(tmp_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        at = _spool_file(name, fd, name.encode(), st, state, spool)
    finally:
        os.close(fd)
    return at, state.warnings, spool.getvalue()


def test_a_fifo_swapped_in_after_the_lstat_is_never_opened(tmp_path: Path) -> None:
    """Between the walk's lstat and the read, a writable release could swap the file for
    a FIFO (or a device node): the builder, root, must not open it.  A writer blocked on
    the FIFO would be released by any open for reading."""
    (tmp_path / "m.pyc").write_bytes(b"pyc data")
    st = os.lstat(tmp_path / "m.pyc")
    os.unlink(tmp_path / "m.pyc")
    os.mkfifo(tmp_path / "m.pyc")
    import select
    import sys
    import time
    writer = subprocess.Popen([sys.executable, "-c", "import os, sys; os.open(sys.argv[1], os.O_WRONLY); print('opened')",
                               str(tmp_path / "m.pyc")], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:  # wait until the writer is blocked in openat(2) (syscall 257 on x86-64)
            with open(f"/proc/{writer.pid}/syscall") as f:
                if f.read().split()[0] in ("257", "2"):
                    break
            assert time.monotonic() < deadline
            time.sleep(0.01)
        at, warnings, data = _spool(tmp_path, "m.pyc", st)
        assert at == -1 and data == b"" and any("changed while being inlined" in w for w in warnings), warnings
        assert writer.stdout is not None
        assert select.select([writer.stdout], [], [], 0.5)[0] == [], "the builder opened the FIFO"
    finally:
        os.close(os.open(tmp_path / "m.pyc", os.O_RDONLY | os.O_NONBLOCK))  # release the writer
        writer.wait(timeout=10)


def test_a_file_replaced_or_grown_after_the_lstat_stays_a_redirect(tmp_path: Path) -> None:
    (tmp_path / "a.pyc").write_bytes(b"12345")
    st = os.lstat(tmp_path / "a.pyc")
    at, warnings, data = _spool(tmp_path, "a.pyc", st)
    assert (at, warnings, data) == (0, [], b"12345")
    (tmp_path / "a.pyc").write_bytes(b"123456")  # grew (and its mtime moved)
    at, warnings, data = _spool(tmp_path, "a.pyc", st)
    assert at == -1 and data == b"" and warnings
    (tmp_path / "b.pyc").write_bytes(b"12345")
    os.utime(tmp_path / "b.pyc", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(tmp_path / "b.pyc", tmp_path / "a.pyc")  # same size and mtime, another inode
    at, warnings, data = _spool(tmp_path, "a.pyc", st)
    assert at == -1 and data == b"" and warnings
