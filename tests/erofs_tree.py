"""Trees for the EROFS tests: a hand-made one with every odd case, one read from a real
directory (what the snapshot walker will feed the writer), and the records a mount of
their image must show."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

from ovlrun.store.image.tree import Node

D, R, L = stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK
DIRENT = 12


def _names_filling(total: int, prefix: bytes) -> list[bytes]:
    """Names whose dirents (12 bytes + name each) plus "." and ".." take exactly ``total`` bytes."""
    rest = total - (DIRENT + 1) - (DIRENT + 2)
    names = []
    i = 0
    while rest:
        length = min(255, rest - DIRENT)
        if 0 < rest - DIRENT - length < DIRENT + len(prefix) + 4:  # leave room for a last name
            length = rest - DIRENT - (DIRENT + len(prefix) + 8)
        stem = prefix + b"%04d" % i
        names.append(stem + b"n" * (length - len(stem)))
        rest -= DIRENT + length
        i += 1
    return names


def walk_dir(path: bytes, rel: bytes = b"") -> Node:
    """The Node tree of a real directory (lstat per entry, like the snapshot walker)."""
    st = os.lstat(path)
    root = Node(st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, children={})
    stack = [(path, rel, root)]
    while stack:
        dpath, drel, dnode = stack.pop()
        assert dnode.children is not None
        with os.scandir(dpath) as it:
            entries = list(it)
        for entry in entries:
            name = os.fsencode(entry.name)
            epath = dpath + b"/" + name
            erel = drel + b"/" + name
            st = os.lstat(epath)
            if stat.S_ISDIR(st.st_mode):
                child = Node(st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, children={})
                stack.append((epath, erel, child))
            elif stat.S_ISREG(st.st_mode):
                child = Node(st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_size, redirect=erel)
            elif stat.S_ISLNK(st.st_mode):
                child = Node(st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, target=os.readlink(epath))
            else:
                continue  # FIFOs, sockets, devices: skipped, as the walker does
            dnode.children[name] = child
    return root


def odd_tree() -> Node:
    """Every case the writer must get right, on a small scale."""
    ns = 1_700_000_000_123_456_789

    def f(name: bytes, size: int = 10, mode: int = 0o644, uid: int = 0, gid: int = 0, mtime: int = ns,
          redirect: bytes | None = None) -> tuple[bytes, Node]:
        return name, Node(R | mode, uid, gid, mtime, size, redirect=redirect or b"/" + name)

    def ln(name: bytes, target: bytes, uid: int = 0) -> tuple[bytes, Node]:
        return name, Node(L | 0o777, uid, uid, ns + 1, target=target)

    def d(children: dict[bytes, Node], mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: int = ns) -> Node:
        return Node(D | mode, uid, gid, mtime, children=children)

    odd_names = [b"new\nline", b"a:b", b"c,d", b"back\\slash", b"sp ace", b"\xff\xfe non-utf8", b"x" * 255,
                 b"-dash", b"!bang", b"\x01ctrl", b"~tilde", b".hidden", b"..dots", b"...", b"-", b"\xff",
                 b"\xc3\xa9t\xc3\xa9", b"*", b"?", b"[x]", b"$HOME", b"'q'", b'"dq"', b"a b c"]
    top: dict[bytes, Node] = {}
    top.update(f(n, size=len(n)) for n in odd_names)
    top.update([
        f(b"setuid", mode=0o4755), f(b"setgid", mode=0o2755), f(b"all-bits", mode=0o7777), f(b"no-bits", mode=0),
        f(b"nobody", uid=65534, gid=65534), f(b"big-ids", uid=70000, gid=2**31 + 5),
        f(b"max-id", uid=2**32 - 2, gid=2**32 - 2),
        f(b"zero", size=0), f(b"one", size=1), f(b"block", size=4096), f(b"block+1", size=4097),
        f(b"huge", size=100 << 30), f(b"past-8TiB", size=(8 << 40) + 1),
        f(b"epoch", mtime=0), f(b"ns-max", mtime=999_999_999), f(b"y2200", mtime=7_258_118_400_999_999_999),
        f(b"pre-1970", mtime=-1_500_000_000),
        f(b"long-redirect", redirect=b"/" + b"r" * 4095), f(b"redirect-255", redirect=b"/" + b"q" * 254),
        f(b"odd-redirect", redirect=b"/sub dir/new\nline:,\\\xff"),
        ln(b"link", b"setuid"), ln(b"dangling", b"/nowhere/at/all", uid=65534), ln(b"abs", b"/etc/passwd"),
        ln(b"link-4031", b"t" * 4031), ln(b"link-4032", b"t" * 4032), ln(b"link-4033", b"u" * 4033),
        ln(b"link-4095", b"v" * 4095), ln(b"odd-target", b"new\nline:,\\\xff"),
    ])
    top[b"empty"] = d({})
    top[b"sticky"] = d({}, mode=0o1777, uid=65534, gid=65534)
    top[b"setgid-dir"] = d({}, mode=0o2775, uid=1000, gid=70000)
    top[b"no-perm"] = d(dict([f(b"inside")]), mode=0o000)
    # Directories whose single block is exactly as large as an inline tail can be (80-byte
    # inode + xattrs, tail, NUL: 4015), one byte more, and exactly one full block.
    for total in (4015, 4016, 4095, 4096):
        top[b"dir-%d" % total] = d(dict(f(n) for n in _names_filling(total, b"e")))
    # Two blocks: the second (tail) of each size class.
    top[b"dir-2blocks"] = d(dict(f(n) for n in _names_filling(4096 + 4015 + 27, b"t")))
    # A big directory of every type spanning many blocks, names of varied lengths.
    big: dict[bytes, Node] = {}
    for i in range(5000):
        name = b"entry-%05d-" % i + b"z" * (i * 7 % 200)
        if i % 10 == 3:
            big[name] = d({b"leaf": Node(R | 0o644, 1, 1, ns, i, redirect=b"/big/" + name + b"/leaf")})
        elif i % 10 == 7:
            big[name] = Node(L | 0o777, 0, 0, ns, target=b"../" + name)
        else:
            big[name] = Node(R | 0o644, i, i, ns + i, i * 1000, redirect=b"/big/" + name)
    top[b"big"] = d(big)
    # Deep nesting.
    deep = d({b"bottom": Node(R | 0o600, 0, 0, ns, 3, redirect=b"/deep")})
    for i in range(150):
        deep = d({b"d%d" % i: deep, b"f": Node(R | 0o644, 0, 0, ns, i, redirect=b"/f%d" % i)})
    top[b"deep"] = deep
    return d(top, mode=0o755, uid=0, gid=0, mtime=ns - 5)


def iter_tree(root: Node, rel: bytes = b"") -> Iterator[tuple[bytes, Node]]:
    stack = [(rel, root)]
    while stack:
        rel, node = stack.pop()
        yield rel, node
        for name, child in (node.children or {}).items():
            stack.append((rel + b"/" + name if rel else name, child))


def expected_record(node: Node) -> tuple[int, int, int, int, int, int, bytes | None, dict[bytes, bytes]]:
    """What lstat/readlink/xattrs must show for ``node`` on the mounted image:
    (mode, uid, gid, size or -1 for directories, mtime_ns, nlink, target, xattrs)."""
    fmt = stat.S_IFMT(node.mode)
    if fmt == D:
        subdirs = sum(1 for c in (node.children or {}).values() if stat.S_ISDIR(c.mode))
        return (node.mode, node.uid, node.gid, -1, node.mtime_ns, 2 + subdirs, None,
                {b"trusted.overlay.opaque": b"y"})
    if fmt == R and node.stored:  # an ordinary file: no xattrs
        return (node.mode, node.uid, node.gid, node.size, node.mtime_ns, 1, None, {})
    if fmt == R:
        xattrs = {b"trusted.overlay.metacopy": b""}
        if node.redirect is not None:
            xattrs[b"trusted.overlay.redirect"] = node.redirect
        return (node.mode, node.uid, node.gid, node.size, node.mtime_ns, 1, None, xattrs)
    assert node.target is not None
    return (node.mode, node.uid, node.gid, len(node.target), node.mtime_ns, 1, node.target, {})


def random_tree(seed: int, count: int) -> Node:
    """``count`` random entries: random name bytes and lengths, many symlinks and
    directories (records with inline tails, which the writer must keep within a block)."""
    import random

    rng = random.Random(seed)
    alphabet = bytes(b for b in range(1, 256) if b != ord("/"))
    root = Node(D | 0o755, 0, 0, rng.randrange(2**62), children={})
    dirs = [root]
    for _ in range(count):
        parent = rng.choice(dirs)
        assert parent.children is not None
        length = rng.choice((1, 2, 3, rng.randrange(1, 40), rng.randrange(1, 256), 255))
        name = bytes(rng.choice(alphabet) for _ in range(length))
        if name in (b".", b"..") or name in parent.children:
            continue
        mode = rng.choice((0o755, 0o644, 0o4755, 0o1777, 0o2750, 0o000, 0o7777))
        uid, gid = rng.choice((0, 1, 65534, 70000, 2**32 - 2)), rng.randrange(2**32 - 1)
        mtime = rng.randrange(-(2**40), 2**63)
        kind = rng.random()
        if kind < 0.15:
            child = Node(D | mode, uid, gid, mtime, children={})
            dirs.append(child)
        elif kind < 0.45:
            tlen = rng.choice((1, rng.randrange(1, 100), rng.randrange(1, 4096), 4095, 4032, 4033))
            child = Node(L | 0o777, uid, gid, mtime, target=bytes(rng.choice(alphabet) for _ in range(tlen)))
        else:
            size = rng.choice((0, 1, rng.randrange(1 << 20), rng.randrange(1 << 45)))
            rlen = rng.choice((1, rng.randrange(1, 300), rng.randrange(1, 4097)))
            child = Node(R | mode, uid, gid, mtime, size, redirect=b"/" + bytes(rng.choice(alphabet)
                                                                                   for _ in range(rlen - 1)))
        parent.children[name] = child
    return root
