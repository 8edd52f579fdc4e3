"""Kernel NFS inside a VM guest: knfsd exporting a guest tmpfs, mounted over loopback.

Run in a guest booted by :mod:`tests.vm.harness` (as root, stdlib only).  The userland is
the host's (nfs-kernel-server, nfs-common, rpcbind; the Makefile's VM package list), the
kernel side the guest's own nfsd/nfs modules, so what the client sends and the server
answers is the real thing.  The guest's root is the host's ``/`` read-only over 9p, so
what the daemons write goes to tmpfs: ``/var/lib/nfs`` (etab, rmtab, statd's state) and
an empty ``/etc/exports`` bound over the host's (exports are made with ``exportfs -o``).

The export is a tmpfs directory with ``fsid=0``: tmpfs has no UUID for knfsd to build
file handles from, and an NFSv4 client walks the pseudo root, which would otherwise have
to be built from the 9p root (not exportable).  So v4 clients mount ``127.0.0.1:/`` and
v3 clients ``127.0.0.1:EXPORT``; both see :data:`EXPORT` as the mount's root.  Exported
with the defaults a site has (``root_squash``, ``sync``): root on the client is nobody
on the server.

Every step has a timeout; a failing step raises with the command's output.
"""

from __future__ import annotations

import os
import subprocess

BASE = "/var/tmp/ovlrun-nfs"
EXPORT = f"{BASE}/export"  # the server's own view of the exported tree (guest tmpfs)
MODPROBE = "/run/ovlrun-vm/modprobe"  # the harness's wrapper (modprobe -d on the kernel's modules)
# Short grace and lease: a v4 client must not wait 90 s to open files after the server
# starts (tests only; the minimum knfsd accepts is 10 s).
GRACE_SECONDS = 10


def run(*argv: str, timeout: float = 60) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {(r.stderr or r.stdout).strip()}")
    return r.stdout


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def start_server() -> None:
    """Start knfsd with :data:`EXPORT` exported to 127.0.0.1 (idempotent per boot)."""
    if os.path.exists(f"{BASE}/.server-started"):
        return
    os.makedirs(EXPORT, exist_ok=True)
    os.chmod(EXPORT, 0o755)
    run("busybox", "ip", "link", "set", "lo", "up")  # busybox-static: no iproute2 needed
    run("mount", "-t", "tmpfs", "-o", "mode=0755", "nfs-state", "/var/lib/nfs")
    for d in ("sm", "sm.bak", "v4recovery", "rpc_pipefs"):
        os.makedirs(f"/var/lib/nfs/{d}", exist_ok=True)
    for f in ("etab", "rmtab", "state"):
        _write(f"/var/lib/nfs/{f}", "")
    _write("/run/ovlrun-nfs-exports", "")
    run("mount", "--bind", "/run/ovlrun-nfs-exports", "/etc/exports")
    os.makedirs("/run/rpcbind", exist_ok=True)
    run(MODPROBE, "nfsd")
    run("mount", "-t", "nfsd", "nfsd", "/proc/fs/nfsd")
    for knob in ("nfsv4gracetime", "nfsv4leasetime"):
        _write(f"/proc/fs/nfsd/{knob}", f"{GRACE_SECONDS}\n")
    run("rpcbind", "-w")
    run("exportfs", "-o", "rw,sync,no_subtree_check,root_squash,fsid=0", f"127.0.0.1:{EXPORT}")
    run("rpc.mountd")
    run("rpc.statd")  # NFSv3 mounts lock through statd by default
    run("rpc.nfsd", "4", timeout=120)
    _write(f"{BASE}/.server-started", "")


def mount(version: str, point: str, options: str = "") -> str:
    """Mount the export at ``point`` with ``vers=VERSION`` plus ``options``; return the
    options the kernel shows (mountinfo's super options)."""
    os.makedirs(point, exist_ok=True)
    source = "127.0.0.1:/" if version.startswith("4") else f"127.0.0.1:{EXPORT}"
    run("mount", "-t", "nfs", "-o", ",".join(o for o in (f"vers={version}", options) if o), source, point,
        timeout=120)
    shown = point.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011").replace("\n", "\\012")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == shown:
                return right.split()[2]
    raise RuntimeError(f"{point}: mounted, but not in mountinfo")


def umount(point: str) -> None:
    run("umount", point, timeout=120)


def server_path(client_path: str, point: str) -> str:
    """The server's own path of ``client_path`` under the mount at ``point``."""
    rel = os.path.relpath(client_path, point)
    return EXPORT if rel == "." else os.path.join(EXPORT, rel)
