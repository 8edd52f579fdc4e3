"""Fetch and unpack Debian's stock kernels for the VM tests, cached outside the repo.

apt runs under a private configuration (its own sources list, lists and cache under
``CACHE``): the host's apt sources are never changed.  The mirror is the one the host is
configured with (``/etc/apt/sources.list*``), so this works wherever apt works.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("OVLRUN_VM_CACHE", "/var/cache/ovlrun-vm"))
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# suite -> what the kernel is called in reports
SUITES = {"bookworm": "6.1", "trixie": "6.12"}


@dataclass(frozen=True)
class Kernel:
    suite: str
    release: str  # uname -r, e.g. 6.1.0-37-amd64
    vmlinuz: Path
    modules: Path  # .../lib/modules/RELEASE (with modules.dep)


def host_mirror() -> str:
    """The Debian mirror URL the host's apt already uses (deb822 or one-line format)."""
    files = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.sources")),
             *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]
    for name in files:
        try:
            text = Path(name).read_text()
        except OSError:
            continue
        for m in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.M):
            url = m.group(1)
            if url.rstrip("/").endswith("/debian"):
                return url.rstrip("/")
    return DEFAULT_MIRROR


def _apt(suite: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    root = CACHE / "apt" / suite
    opts = [f"-oDir::Etc::sourcelist={root / 'sources.list'}", f"-oDir::Etc::sourceparts={root / 'sources.list.d'}",
            f"-oDir::State::Lists={root / 'lists'}", f"-oDir::Cache={root / 'cache'}",
            f"-oDir::State::status={root / 'status'}", "-oAPT::Get::List-Cleanup=0",
            "-oAcquire::Languages=none", "-oAPT::Architecture=amd64", "-oAPT::Architectures=amd64",
            "-oDebug::NoLocking=1"]
    return subprocess.run(["apt-get" if args[0] in ("update", "download") else "apt-cache", *opts, *args],
                          cwd=cwd, text=True, capture_output=True, timeout=600, check=True)


def _prepare_apt(suite: str) -> None:
    root = CACHE / "apt" / suite
    for sub in ("sources.list.d", "lists/partial", "cache/archives/partial"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "status").touch()
    (root / "sources.list").write_text(f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
                                       f"{host_mirror()} {suite} main\n")


def fetch(suite: str) -> Kernel:
    """Download (once) and unpack ``linux-image-*-amd64`` of ``suite``; run depmod on it.

    Not ``-cloud-amd64``: those kernels lack 9p, which the guest's root is.
    """
    unpacked = CACHE / "kernels" / suite
    done = unpacked / ".done"
    if not done.exists():
        _prepare_apt(suite)
        _apt(suite, "update")
        depends = _apt(suite, "depends", "linux-image-amd64").stdout
        m = re.search(r"Depends: (linux-image-[0-9][^\s]*-amd64)\b", depends)
        if not m:
            raise RuntimeError(f"no kernel image package in {suite}: {depends}")
        package = m.group(1)
        debs = CACHE / "debs" / suite
        debs.mkdir(parents=True, exist_ok=True)
        for old in debs.glob("*.deb"):
            old.unlink()
        _apt(suite, "download", package, cwd=debs)
        (deb,) = debs.glob("*.deb")
        shutil.rmtree(unpacked, ignore_errors=True)
        unpacked.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True, timeout=300)
        release = _release(unpacked)
        # Kernel .debs ship no modules.dep (postinst runs depmod); build it for the guest.
        # depmod -b BASE looks in BASE/lib/modules; trixie ships usr/lib/modules.
        base = unpacked / "usr" if (unpacked / "usr/lib/modules" / release).is_dir() else unpacked
        subprocess.run(["depmod", "-b", str(base), release], check=True, timeout=300)
        done.write_text(release + "\n")
    release = done.read_text().strip()
    return Kernel(suite, release, unpacked / "boot" / f"vmlinuz-{release}", _modules_dir(unpacked, release))


def _release(unpacked: Path) -> str:
    (vmlinuz,) = (unpacked / "boot").glob("vmlinuz-*")
    return vmlinuz.name.removeprefix("vmlinuz-")


def _modules_dir(unpacked: Path, release: str) -> Path:
    for sub in ("usr/lib/modules", "lib/modules"):
        if (unpacked / sub / release).is_dir():
            return unpacked / sub / release
    raise RuntimeError(f"no modules for {release} in {unpacked}")


if __name__ == "__main__":
    import sys

    for s in sys.argv[1:] or list(SUITES):
        print(fetch(s))
