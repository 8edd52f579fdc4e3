"""Boot one of Debian's stock kernels under qemu on this machine's root and run a script.

The guest's root is the host's ``/`` over 9p (read-only, ``multidevs=remap`` because the
host's ``/`` spans several filesystems), so the guest runs this very checkout with the
host's Python.  The initramfs (busybox-static, the virtio/9p modules and ``/init``) loads
only what mounting that root needs: *not* overlay, so the first ``fsopen("overlay")`` in
the guest must autoload it, as on a freshly booted Debian machine.

What the guest needs writable is tmpfs: ``/tmp``, ``/run``, ``/var/tmp`` (the tests'
trees and stores: overlayfs' ``trusted.*`` xattrs need a real local filesystem, 9p is
not one).  Modules for autoload: the host may have no ``/lib/modules`` directory to mount
over (a container's root), so ``/proc/sys/kernel/modprobe`` points at a wrapper running
``modprobe -d`` on a tmpfs tree with the unpacked kernel's modules bound in; the kernel's
own request_module() path is exercised unchanged.

Results come back through a second, writable virtfs (``out``): the script's output and
its exit status as files, written before the guest powers off; the serial console is
kept for diagnosis only.  Every step has a timeout and qemu is killed on failure.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.vm.kernels import CACHE, Kernel

BUSYBOX = "/bin/busybox"
BOOTED = "OVLRUN-VM-BOOTED"  # /init's last word before switch_root
# The modules /init needs for a 9p root, dependencies first (resolved from modules.dep).
ROOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p")

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "OVLRUN-VM-INIT-FAILED: $*"; echo b > /proc/sysrq-trigger; }
for m in $(cat /modules.order); do insmod "/modules/$m" || fail "insmod $m"; done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro root /newroot || fail "9p root"
# The checkout may itself lie under one of the directories that get a tmpfs (a clone in
# /var/tmp): keep its 9p view aside and put it back on top of the tmpfs.
mkdir -p /keep; mount --bind "/newroot@CHECKOUT@" /keep || fail "checkout"
for d in tmp run var/tmp; do mount -t tmpfs -o mode=1777 tmpfs "/newroot/$d" || fail "tmpfs $d"; done
mkdir -p "/newroot@CHECKOUT@" 2>/dev/null; mount --move /keep "/newroot@CHECKOUT@" || fail "checkout back"
mkdir -p /newroot/run/ovlrun-vm/out /newroot/run/ovlrun-vm/modroot/lib/modules/@RELEASE@
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out /newroot/run/ovlrun-vm/out || fail "9p out"
mount --bind "/newroot@MODULES@" /newroot/run/ovlrun-vm/modroot/lib/modules/@RELEASE@ || fail "modules"
printf '#!/bin/sh\nexec /sbin/modprobe -d /run/ovlrun-vm/modroot "$@"\n' > /newroot/run/ovlrun-vm/modprobe
chmod 755 /newroot/run/ovlrun-vm/modprobe
echo /run/ovlrun-vm/modprobe > /proc/sys/kernel/modprobe
# What a real boot does (systemd-tmpfiles-setup-dev runs `kmod static-nodes`): device
# nodes for modules that load on first open, /dev/loop-control (loop.ko) among them.
grep -v '^#' "/newroot@MODULES@/modules.devname" | while read -r mod name node; do
    kind=${node%%[0-9]*}; nums=${node#?}
    mkdir -p "/dev/$(dirname "$name")"; mknod -m 0600 "/dev/$name" "$kind" "${nums%%:*}" "${nums##*:}" 2>/dev/null
done
grep -qw '^loop' /proc/modules && fail "loop is already loaded"
grep -qw overlay /proc/filesystems && fail "overlay is already registered"
mount --move /proc /newroot/proc; mount --move /sys /newroot/sys; mount --move /dev /newroot/dev
echo @BOOTED@
exec switch_root /newroot /bin/sh -c '
  cd /run/ovlrun-vm/out
  /bin/sh ./job.sh > ./output 2>&1; echo $? > ./status.tmp; mv ./status.tmp ./status
  cd /; umount /run/ovlrun-vm/out; sync; echo b > /proc/sysrq-trigger'
"""


@dataclass
class Result:
    status: int | None  # None: the guest never reported one (crash, timeout)
    output: str
    console: str
    seconds: float


def _module_closure(kernel: Kernel) -> list[str]:
    """Module paths (relative to the modules dir) for ROOT_MODULES, dependencies first."""
    deps: dict[str, list[str]] = {}
    for line in (kernel.modules / "modules.dep").read_text().splitlines():
        name, _, rest = line.partition(":")
        deps[name] = rest.split()
    by_name = {Path(p).name.split(".ko")[0].replace("-", "_"): p for p in deps}
    order: list[str] = []

    def add(path: str) -> None:
        for d in reversed(deps[path]):  # modules.dep lists the closest dependency first
            add(d)
        if path not in order:
            order.append(path)

    for m in ROOT_MODULES:
        if m in by_name:  # built in on some kernels (trixie's virtio_pci)
            add(by_name[m])
    return order


def build_initramfs(kernel: Kernel) -> Path:
    out = CACHE / "initramfs" / f"{kernel.release}.cpio.gz"
    if out.exists() and out.stat().st_mtime > Path(__file__).stat().st_mtime:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        root = Path(tmp)
        (root / "bin").mkdir()
        (root / "modules").mkdir()
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        names = []
        for rel in _module_closure(kernel):
            name = Path(rel).name
            target = root / "modules" / name.removesuffix(".xz").removesuffix(".zst")
            if name.endswith(".xz"):  # busybox insmod takes plain .ko files
                target.write_bytes(subprocess.run(["xz", "-dc", str(kernel.modules / rel)], check=True,
                                                  capture_output=True, timeout=60).stdout)
            elif name.endswith(".zst"):
                target.write_bytes(subprocess.run(["zstd", "-dc", str(kernel.modules / rel)], check=True,
                                                  capture_output=True, timeout=60).stdout)
            else:
                shutil.copy2(kernel.modules / rel, target)
            names.append(target.name)
        (root / "modules.order").write_text("\n".join(names) + "\n")
        modules_on_host = str(kernel.modules)
        init = root / "init"
        init.write_text(INIT.replace("@RELEASE@", kernel.release).replace("@MODULES@", modules_on_host)
                        .replace("@CHECKOUT@", str(Path(__file__).resolve().parents[2]))
                        .replace("@BOOTED@", BOOTED))
        init.chmod(0o755)
        files = subprocess.run("find . -print0 | cpio --null -o -H newc --quiet | gzip -1", shell=True, cwd=root,
                               check=True, capture_output=True, timeout=120).stdout
        partial = out.with_suffix(".partial")
        partial.write_bytes(files)
        partial.rename(out)
    return out


def run(kernel: Kernel, script: str, timeout: float = 300, memory: str = "1536M") -> Result:
    """Boot ``kernel``, run ``script`` (sh) as root in the guest; return its status and output.

    A boot that dies before /init ran is retried once: nothing of the script ran, and
    multi-threaded TCG now and then crashes a kernel while it patches its own code early
    in boot (seen once in ~50 boots: "Oops: int3" in sched_clock_cpu, then a panic).
    """
    result = _run_once(kernel, script, timeout, memory)
    if result.status is None and BOOTED not in result.console:
        retry = _run_once(kernel, script, timeout, memory)
        return Result(retry.status, retry.output, result.console + "\nOVLRUN-VM: boot retried\n" + retry.console,
                      result.seconds + retry.seconds)
    return result


def _run_once(kernel: Kernel, script: str, timeout: float, memory: str) -> Result:
    initrd = build_initramfs(kernel)
    outdir = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE))
    try:
        (outdir / "job.sh").write_text(script)
        cmd = ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", memory,
               "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
               "-append", "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init",
               "-virtfs", "local,path=/,mount_tag=root,security_model=passthrough,multidevs=remap,readonly=on",
               "-virtfs", f"local,path={outdir},mount_tag=out,security_model=passthrough",
               "-nographic", "-no-reboot", "-nic", "none", "-serial", "mon:stdio", "-monitor", "none"]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            console, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            console, _ = proc.communicate()
            console += b"\nOVLRUN-VM: qemu killed after timeout\n"
        seconds = time.monotonic() - start
        status_file = outdir / "status"
        status = int(status_file.read_text()) if status_file.exists() else None
        output = (outdir / "output").read_text(errors="replace") if (outdir / "output").exists() else ""
        return Result(status, output, console.decode(errors="replace"), seconds)
    finally:
        shutil.rmtree(outdir, ignore_errors=True)


def qemu_available() -> bool:
    return shutil.which("qemu-system-x86_64") is not None and os.path.exists(BUSYBOX)


if __name__ == "__main__":
    import sys

    from tests.vm.kernels import fetch

    suite, *command = sys.argv[1:]
    r = run(fetch(suite), shlex.join(command) + "\n" if command else "uname -r; cat /proc/filesystems\n")
    print(r.console[-3000:] if r.status is None else "", r.output, f"status={r.status} {r.seconds:.1f}s", sep="\n")
