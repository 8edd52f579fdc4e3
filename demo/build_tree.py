#!/usr/bin/env python3
"""Build the demo "shared software tree": versioned releases made of real files.

    /srv/ovlrun-demo/sw/pystack/<release>/lib/python3/   copy of this interpreter's stdlib
    /srv/ovlrun-demo/sw/libs/<release>/lib/              a few real shared libraries

Idempotent: existing releases are left alone (releases are immutable).
"""

from __future__ import annotations

import shutil
import sys
import sysconfig
from pathlib import Path

ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else "/srv/ovlrun-demo/sw")
RELEASES = ["2024.1", "2024.2", "2025.1"]
LIB_RELEASES = ["1.0", "2.0"]
SKIP = shutil.ignore_patterns("test", "tests", "idle_test", "__pycache__", "site-packages", "*.pyc")


def main() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for rel in RELEASES:
        dest = ROOT / "pystack" / rel / "lib" / "python3"
        if not dest.exists():
            shutil.copytree(stdlib, dest, ignore=SKIP, symlinks=True)
            (ROOT / "pystack" / rel / "RELEASE").write_text(f"pystack {rel}\n")
    libdir = Path("/usr/lib/x86_64-linux-gnu")
    libs = sorted(p for p in libdir.glob("lib*.so.*") if p.is_file() and not p.is_symlink())[:40]
    for rel in LIB_RELEASES:
        dest = ROOT / "libs" / rel / "lib"
        if not dest.exists():
            dest.mkdir(parents=True)
            for lib in libs:
                shutil.copy2(lib, dest / lib.name)
    for empty in ("tools/1.0/bin", "tools/2.0/bin", "compilers/gcc/12/lib", "compilers/gcc/13/lib"):
        (ROOT / empty).mkdir(parents=True, exist_ok=True)
    count = sum(1 for _ in ROOT.rglob("*"))
    print(f"demo tree at {ROOT}: {count} entries")


if __name__ == "__main__":
    main()
