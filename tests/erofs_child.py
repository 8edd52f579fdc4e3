"""Child process for the EROFS tests: mounts an image in a private mount namespace and
reports what the kernel shows.  Run as ``python erofs_child.py`` with a pickled request
on stdin; writes a pickled reply on stdout.  Everything it mounts dies with it.

Request: {"image": path, "method": "file"|"loop"|"auto", "probes": {dir relpath: [names]},
          "overlay_source": path or None, "read": [file relpaths to read through the overlay]}
Reply: {"mountinfo": (fstype, source), "entries": {relpath: record}, "listings": {...},
        "probes": {dir: {name: errno}}, "overlay": {relpath: (sha256, stat tuple)}, "error": str}
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import stat
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ovlrun.linux import erofs as erofs_mount
from ovlrun.linux import syscalls

Record = tuple[int, int, int, int, int, int, int, bytes | None, dict[bytes, bytes]]


def _xattrs(path: bytes) -> dict[bytes, bytes]:
    out = {}
    for name in os.listxattr(path, follow_symlinks=False):
        out[os.fsencode(name)] = os.getxattr(path, name, follow_symlinks=False)
    return out


def _walk(top: bytes) -> tuple[dict[bytes, Record], dict[bytes, list[bytes]]]:
    entries: dict[bytes, Record] = {}
    listings: dict[bytes, list[bytes]] = {}
    stack = [b""]
    while stack:
        rel = stack.pop()
        path = top + b"/" + rel if rel else top
        st = os.lstat(path)
        target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
        entries[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_nlink, st.st_blocks,
                        target, _xattrs(path))
        if stat.S_ISDIR(st.st_mode):
            names = os.listdir(path)
            listings[rel] = names
            stack.extend(rel + b"/" + n if rel else n for n in names)
    return entries, listings


def _mount_overlay(lower: str | int, data: str, target: str) -> None:
    """lowerdir+ is a path, or the fd of a detached mount (FSCONFIG_SET_FD)."""
    fd = syscalls.fsopen("overlay")
    try:
        if isinstance(lower, int):
            syscalls.fsconfig_set_fd(fd, "lowerdir+", lower, "detached erofs mount")
        else:
            syscalls.fsconfig_set_string(fd, "lowerdir+", lower)
        syscalls.fsconfig_set_string(fd, "datadir+", data)
        syscalls.fsconfig_set_string(fd, "metacopy", "on")
        syscalls.fsconfig_set_string(fd, "redirect_dir", "follow")
        syscalls.fsconfig_set_flag(fd, "ro")
        try:
            syscalls.fsconfig_create(fd)
        except OSError as e:
            raise OSError(e.errno, f"overlay: {e}; {syscalls.read_fs_log(fd)}") from None
        mnt = syscalls.fsmount(fd, syscalls.FSMOUNT_CLOEXEC, syscalls.MOUNT_ATTR_RDONLY)
    finally:
        os.close(fd)
    syscalls.move_mount(mnt, target)
    os.close(mnt)


def main() -> int:
    req = pickle.load(sys.stdin.buffer)
    reply: dict[str, object] = {}
    try:
        syscalls.unshare(syscalls.CLONE_NEWNS)
        syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
        if req.get("no_loop_configure"):  # as on kernels before 5.8: an ioctl the loop driver does not know
            erofs_mount.LOOP_CONFIGURE = 0x4C7F
        how = {"file": erofs_mount.FILE_BACKED, "loop": erofs_mount.LOOP, "auto": erofs_mount.AUTO}[req["method"]]

        def mount(image: str) -> int:
            image_fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return erofs_mount.mount_image(image_fd, how)
            except erofs_mount.ImageMountError as e:  # the caller names the image, as a launch does
                raise erofs_mount.ImageMountError(e.errno, e.call, image, f"cannot mount {image}: {e}") from None
            finally:
                os.close(image_fd)

        fd = mount(req["image"])
        if req.get("overlay_detached"):  # the overlay's lower layer is the detached mount itself
            merged = tempfile.mkdtemp(prefix="erofs-ovl-")
            _mount_overlay(fd, req["overlay_source"], merged)
            os.close(fd)
            with open("/proc/self/mountinfo") as f:
                reply["erofs_attached"] = any(" - erofs " in line for line in f)
            fd = mount(req["image"])  # attached too, for the comparison of the image itself
        top = tempfile.mkdtemp(prefix="erofs-child-")
        syscalls.move_mount(fd, top)
        os.close(fd)
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if left.split()[4] == top:
                    fstype, source = right.split()[:2]
                    reply["mountinfo"] = (fstype, source)
                    if source.startswith("/dev/loop"):
                        sysfs = f"/sys/block/{os.path.basename(source)}"
                        with open(f"{sysfs}/ro") as ro, open(f"{sysfs}/loop/autoclear") as autoclear:
                            reply["loop"] = (ro.read().strip(), autoclear.read().strip())
        if req.get("walk", True):
            reply["entries"], reply["listings"] = _walk(os.fsencode(top))
        raw = {}
        for rel, offset, length in req.get("raw", []):
            with open(os.fsencode(top) + b"/" + rel, "rb") as f:
                f.seek(offset)
                raw[(rel, offset)] = f.read(length)
        reply["raw"] = raw
        probes: dict[bytes, dict[bytes, int]] = {}
        for rel, names in req.get("probes", {}).items():
            got = probes[rel] = {}
            for name in names:
                try:
                    os.lstat(os.fsencode(top) + b"/" + (rel + b"/" if rel else b"") + name)
                    got[name] = 0
                except OSError as e:
                    got[name] = e.errno or -1
        reply["probes"] = probes
        if req.get("overlay_source"):
            if not req.get("overlay_detached"):
                merged = tempfile.mkdtemp(prefix="erofs-ovl-")
                _mount_overlay(top, req["overlay_source"], merged)
            seen = {}
            for rel in req["read"]:
                path = os.fsencode(merged) + b"/" + rel
                st = os.lstat(path)
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        digest.update(chunk)
                seen[rel] = (digest.hexdigest(), (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                                                  st.st_blocks))
            reply["overlay"] = seen
            reply["overlay_root_opaque"] = os.listxattr(merged)
    except Exception as e:  # reported to the test, which shows it
        reply["error"] = f"{type(e).__name__}: {e}"
        reply["errno"] = getattr(e, "errno", None) or errno.EIO
    sys.stdout.buffer.write(pickle.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
