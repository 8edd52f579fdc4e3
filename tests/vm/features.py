"""Measure, by really mounting, which overlay mount methods work on the running kernel.

Run as root (in a VM guest or on the host): ``python -m tests.vm.features`` prints one
JSON object, ``{check: result}``, where a result is "ok", "ok (...)" or the errno name /
what went wrong.  Every method that mounts is checked by reading data through a metacopy
redirect (and a failing lookup) in its own private mount namespace, so "ok" means the
method works, not merely that a syscall returned 0.  This is the measurement behind the
README's "Supported kernels" table and the probe in :mod:`ovlrun.linux.kernel`.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable

from ovlrun.linux import syscalls

DATA = b"payload through the redirect\n"


def _name(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def _tree(base: str, long_component: int = 0) -> tuple[str, str, str]:
    """(snapshot tree, data dir, mount point); the snapshot is metacopy + absolute redirect."""
    deep = base
    if long_component:  # a store path longer than fsconfig's 255-byte string limit
        for part in ("s" * 200, "t" * 200):
            deep = os.path.join(deep, part)
    snap, data, point = os.path.join(deep, "snapshots/k/i/tree"), os.path.join(base, "data"), os.path.join(base, "mnt")
    for d in (os.path.join(snap, "lib"), os.path.join(data, "lib"), point):
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(data, "lib", "f"), "wb") as f:
        f.write(DATA)
    meta = os.path.join(snap, "lib", "f")
    with open(meta, "wb") as f:
        f.truncate(len(DATA))
    os.setxattr(meta, "trusted.overlay.metacopy", b"")
    os.setxattr(meta, "trusted.overlay.redirect", b"/lib/f")
    for d in (snap, os.path.join(snap, "lib")):
        os.setxattr(d, "trusted.overlay.opaque", b"y")
    return snap, data, point


def _check_mount(point: str) -> str:
    with open(os.path.join(point, "lib", "f"), "rb") as f:
        got = f.read()
    if got != DATA:
        return f"mounted, but data read {got[:40]!r}"
    try:
        os.stat(os.path.join(point, "lib", "absent"))
        return "mounted, but an absent name exists"
    except FileNotFoundError:
        pass
    shown = [line.split(" - ", 1)[1].split(" ")[2] for line in open("/proc/self/mountinfo")
             if f" {point} " in line and " - overlay " in line]
    return "ok" if shown else "mounted, but not in mountinfo"


def _in_child(fn: Callable[[], str]) -> str:
    """Run ``fn`` in a forked child in its own mount namespace; return its result string."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            syscalls.unshare(syscalls.CLONE_NEWNS)
            syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
            out = fn()
        except OSError as e:
            out = f"{_name(e)} ({e})"
        except BaseException as e:
            out = f"error: {e!r}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


def _fs_mount(point: str, config: Callable[[int], None]) -> str:
    fs = syscalls.fsopen("overlay")
    try:
        try:
            config(fs)
            syscalls.fsconfig_set_string(fs, "metacopy", "on")
            syscalls.fsconfig_set_string(fs, "redirect_dir", "follow")
            syscalls.fsconfig_create(fs)
        except OSError as e:
            log = "; ".join(syscalls.read_fs_log(fs))
            return f"{_name(e)} ({e}{'; ' + log if log else ''})"
        mnt = syscalls.fsmount(fs, syscalls.FSMOUNT_CLOEXEC, syscalls.MOUNT_ATTR_RDONLY)
    finally:
        os.close(fs)
    syscalls.move_mount(mnt, point)
    os.close(mnt)
    return _check_mount(point)


def _legacy_mount(point: str, options: str) -> str:
    syscalls.mount("overlay", point, "overlay", syscalls.MS_RDONLY, options + ",metacopy=on,redirect_dir=follow")
    return _check_mount(point)


def measure(base: str) -> dict[str, str]:
    res: dict[str, str] = {}
    registered_before = _registered()
    try:
        os.close(syscalls.fsopen("overlay"))
        res["overlay autoload by fsopen"] = "ok" if not registered_before else "n/a (already loaded)"
    except OSError as e:
        res["overlay autoload by fsopen"] = _name(e)
        return res
    res["overlay registered after fsopen"] = "yes" if _registered() else "no"

    def probe(fn: Callable[[int], None]) -> str:
        fs = syscalls.fsopen("overlay")
        try:
            fn(fs)
            return "accepted"
        except OSError as e:
            return _name(e)
        finally:
            os.close(fs)

    res["unknown key rejected"] = {"accepted": "no (accepted: no own parser)"}.get(
        probe(lambda fs: syscalls.fsconfig_set_string(fs, "ovlrun_no_such_key", "/")), "yes")

    def fd_probe(flags: int) -> Callable[[int], None]:
        def fn(fs: int) -> None:
            fd = os.open("/", flags | os.O_DIRECTORY)
            try:
                syscalls.fsconfig_set_fd(fs, "lowerdir+", fd)
            finally:
                os.close(fd)
        return fn

    res["probe: O_PATH fd of / as lowerdir+"] = probe(fd_probe(os.O_PATH))
    res["probe: O_RDONLY fd of / as lowerdir+"] = probe(fd_probe(os.O_RDONLY))
    snap, data, point = _tree(base)

    def with_fds(flags: int) -> Callable[[], str]:
        def fn() -> str:
            def config(fs: int) -> None:
                a, b = os.open(snap, flags | os.O_DIRECTORY), os.open(data, flags | os.O_DIRECTORY)
                try:
                    syscalls.fsconfig_set_fd(fs, "lowerdir+", a)
                    syscalls.fsconfig_set_fd(fs, "datadir+", b)
                finally:
                    os.close(a)
                    os.close(b)
            return _fs_mount(point, config)
        return fn

    res["fd layers (O_RDONLY)"] = _in_child(with_fds(os.O_RDONLY))
    res["O_PATH fd layers"] = _in_child(with_fds(os.O_PATH))

    def strings(key: str, value: str) -> Callable[[], str]:
        def config(fs: int) -> None:
            syscalls.fsconfig_set_string(fs, "lowerdir+", snap)
            syscalls.fsconfig_set_string(fs, key, value)
        return lambda: _fs_mount(point, config)

    res["datadir+ string"] = _in_child(strings("datadir+", data))
    res["lowerdir+ string (fallback layout)"] = _in_child(strings("lowerdir+", data))
    res["fsconfig lowerdir=SNAP::DATA"] = _in_child(
        lambda: _fs_mount(point, lambda fs: syscalls.fsconfig_set_string(fs, "lowerdir", f"{snap}::{data}")))
    res["mount(2) lowerdir=SNAP::DATA"] = _in_child(lambda: _legacy_mount(point, f"lowerdir={snap}::{data}"))
    res["fallback mount(2) lowerdir=SNAP:DATA"] = _in_child(lambda: _legacy_mount(point, f"lowerdir={snap}:{data}"))

    # Long layer paths (> 255 bytes) where fds are refused.
    lsnap, _, _ = _tree(base, long_component=1)
    store = lsnap[: -len("/snapshots/k/i/tree")]
    res["long: store path bytes"] = str(len(store))
    res["long: fsconfig string > 255"] = _in_child(strings_at(point, lsnap, data))

    def relative_fs() -> str:
        os.chdir(store)
        return _fs_mount(point, string_layers("snapshots/k/i/tree", data))

    def relative_legacy(sep: str) -> Callable[[], str]:
        def fn() -> str:
            os.chdir(store)
            return _legacy_mount(point, f"lowerdir=snapshots/k/i/tree{sep}{data}") + f" [{_shown(point)}]"
        return fn

    def magic_fs() -> str:
        fd = os.open(lsnap, os.O_PATH | os.O_DIRECTORY)
        return _fs_mount(point, string_layers(f"/proc/self/fd/{fd}", data))

    def magic_legacy(sep: str) -> Callable[[], str]:
        def fn() -> str:
            fd = os.open(lsnap, os.O_PATH | os.O_DIRECTORY)
            return _legacy_mount(point, f"lowerdir=/proc/self/fd/{fd}{sep}{data}") + f" [{_shown(point)}]"
        return fn

    res["long: relative after chdir, fsconfig lowerdir+/datadir+"] = _in_child(
        lambda: relative_fs() + f" [{_shown(point)}]")
    res["long: relative after chdir, mount(2) ::"] = _in_child(relative_legacy("::"))
    res["long: relative after chdir, mount(2) :"] = _in_child(relative_legacy(":"))
    res["long: /proc/self/fd/N, fsconfig lowerdir+/datadir+"] = _in_child(lambda: magic_fs() + f" [{_shown(point)}]")
    res["long: /proc/self/fd/N, mount(2) ::"] = _in_child(magic_legacy("::"))
    res["long: /proc/self/fd/N, mount(2) :"] = _in_child(magic_legacy(":"))
    res.update(timings(snap, lsnap, data, point))
    return res


def timings(snap: str, lsnap: str, data: str, point: str, rounds: int = 20) -> dict[str, str]:
    """ms per mount+umount through ovlrun's own mount_overlay, short vs > 255-byte store
    path, for every method this kernel has (in a child namespace)."""
    from ovlrun.linux.kernel import METHODS, forced, probe
    from ovlrun.linux.overlay import OverlaySpec, mount_overlay

    usable = METHODS[METHODS.index(probe().method):]
    out: dict[str, str] = {}
    for method in usable:
        for label, tree in (("short", snap), ("long", lsnap)):
            def fn(tree: str = tree, method: str = method) -> str:
                spec, features = OverlaySpec(point, tree, data), forced(method)
                start = time.perf_counter()
                for _ in range(rounds):
                    mount_overlay(spec, features)
                    syscalls.umount2(point, syscalls.MNT_DETACH)
                return f"{(time.perf_counter() - start) * 1000 / rounds:.2f} ms"
            out[f"time: {method}, {label} store path ({len(tree)} B)"] = _in_child(fn)
    return out


def string_layers(snap: str, data: str) -> Callable[[int], None]:
    def config(fs: int) -> None:
        syscalls.fsconfig_set_string(fs, "lowerdir+", snap)
        syscalls.fsconfig_set_string(fs, "datadir+", data)
    return config


def strings_at(point: str, snap: str, data: str) -> Callable[[], str]:
    return lambda: _fs_mount(point, string_layers(snap, data))


def _shown(point: str) -> str:
    for line in open("/proc/self/mountinfo"):
        if f" {point} " in line and " - overlay " in line:
            return line.split(" - ", 1)[1].split(" ")[2]
    return "?"


def _registered() -> bool:
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == "overlay" for line in f if line.strip())


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="ovlrun-features-", dir=sys.argv[1] if len(sys.argv) > 1 else "/var/tmp") as b:
        print(json.dumps({"kernel": os.uname().release, **measure(b)}, indent=1))
