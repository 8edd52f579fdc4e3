"""The launch smoke test, run inside a VM guest right after boot (see tests/vm/harness.py).

Only real ``python -m ovlrun`` commands, against a small tree on the guest's tmpfs, in
this order: the first launch happens with overlay.ko *not* loaded (the initramfs loads
only virtio/9p), as on a freshly booted Debian machine.  Checks: snapshot build, launch,
data read through the redirect, ENOENT, opacity against a later addition and a new
release, read-only, exit codes, doctor, nothing left mounted.  Prints one JSON line
``SMOKE {...}`` and exits 1 if any check failed.

Stdlib only and ovlrun is never imported here: ``--source DIR`` points the commands at
another checkout (e.g. the unfixed code, to see that this test can fail).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def overlay_registered() -> bool:
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == "overlay" for line in f if line.strip())


def overlay_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if " - overlay " in line]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default=str(REPO), help="checkout whose ovlrun is tested")
    parser.add_argument("--fresh-boot", action="store_true", help="overlay.ko must not be loaded yet (VM guest)")
    args = parser.parse_args()
    checks: dict[str, object] = {}
    failed: list[str] = []

    def check(name: str, ok: bool, detail: object = None) -> None:
        checks[name] = "ok" if ok else f"FAILED: {detail}"
        if not ok:
            failed.append(name)

    base = Path(tempfile.mkdtemp(prefix="ovlrun-smoke-", dir="/var/tmp"))
    base.chmod(0o755)
    sw, store, profiles = base / "sw", base / "store", base / "profiles"
    rel = sw / "app" / "1.0"
    (rel / "lib").mkdir(parents=True)
    (sw / "app" / "1.1").mkdir()
    profiles.mkdir()
    payload = bytes(range(256)) * 64
    (rel / "lib" / "libfoo.so.1").write_bytes(payload)
    (rel / "lib" / "mod.py").write_text("VERSION = '1.0'\n")
    (profiles / "p.toml").write_text(f'[[tree]]\nroot = "{sw}"\nlocalise = ["app/1.0"]\n')
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
           "PYTHONPATH": args.source, "PYTHONDONTWRITEBYTECODE": "1",
           "OVLRUN_STORE": str(store), "OVLRUN_PROFILE_PATH": str(profiles)}

    def ovlrun(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        # cwd: not the checkout, or "python -m" would import ovlrun from there, not --source.
        return subprocess.run([sys.executable, "-m", "ovlrun", *argv], env=env, text=True, capture_output=True,
                              timeout=timeout, cwd=base)

    def job(script: str) -> subprocess.CompletedProcess[str]:
        return ovlrun("--profile", "p", "--", "/bin/sh", "-c", script)

    checks["kernel"] = os.uname().release
    if args.fresh_boot:
        check("overlay.ko not loaded at boot", not overlay_registered(), "already registered: the case is not real")
    r = ovlrun("snapshot", "build", "--profile", "p")
    check("snapshot build", r.returncode == 0, r.stderr.strip())
    if args.fresh_boot:
        check("snapshot build loads no overlay", not overlay_registered(), "overlay registered by the build")
    start = time.monotonic()
    r = job(f"cat {rel}/lib/mod.py")
    checks["first launch seconds"] = round(time.monotonic() - start, 2)
    check("first launch (module not loaded)", r.returncode == 0 and r.stdout == "VERSION = '1.0'\n",
          (r.returncode, r.stdout, r.stderr.strip()))
    check("overlay autoloaded by the launch", overlay_registered(), "still not registered")
    r = ovlrun("--profile", "p", "--", sys.executable, "-c",
               f"import sys; sys.stdout.write(open('{rel}/lib/libfoo.so.1','rb').read().hex())")
    check("data read through the redirect", r.returncode == 0 and bytes.fromhex(r.stdout or "") == payload,
          (r.returncode, r.stderr.strip()))
    r = job(f"grep ' {rel} ' /proc/self/mountinfo")
    check("overlay mounted on the release", r.returncode == 0 and " - overlay ovlrun " in r.stdout, r.stdout)
    checks["mountinfo options"] = r.stdout.rsplit(" ", 1)[-1].strip()
    r = job(f"stat {rel}/lib/nothere.so")
    check("absent name is ENOENT", r.returncode == 1 and "No such file" in r.stderr, (r.returncode, r.stderr))
    (rel / "lib" / "added-later.so").write_text("late\n")
    (sw / "app" / "2.0").mkdir()
    (sw / "app" / "2.0" / "NEW").write_text("new\n")
    r = job(f"ls {rel}/lib; echo --; cat {sw}/app/2.0/NEW; test -e {rel}/lib/added-later.so || echo hidden")
    listing, _, rest = r.stdout.partition("--\n")
    check("opaque: later addition hidden, new release visible",
          r.returncode == 0 and "added-later.so" not in listing and "mod.py" in listing
          and rest.splitlines() == ["new", "hidden"], (r.returncode, r.stdout, r.stderr))
    r = job(f"touch {rel}/new 2>&1; mkdir {rel}/lib/d 2>&1; true")
    check("read-only (EROFS)", r.stdout.count("Read-only file system") == 2, r.stdout)
    codes = {"exit 0": job("exit 0").returncode, "exit 7": job("exit 7").returncode,
             "not found": ovlrun("--profile", "p", "--", "no-such-command-xyz").returncode,
             "bad profile": ovlrun("--profile", "missing", "--", "true").returncode}
    not_exec = base / "notexec"
    not_exec.write_text("#!/bin/sh\n")
    not_exec.chmod(0o644)
    codes["not executable"] = ovlrun("--profile", "p", "--", str(not_exec)).returncode
    check("exit codes", codes == {"exit 0": 0, "exit 7": 7, "not found": 127, "bad profile": 125,
                                  "not executable": 126}, codes)
    r = ovlrun("doctor", "--json")
    try:
        doctor = json.loads(r.stdout)
    except ValueError:
        doctor = {"unparsable": r.stdout[-300:], "stderr": r.stderr[-300:]}
    checks["doctor --json"] = doctor
    check("doctor", r.returncode == 0, r.stderr.strip())
    check("nothing left mounted", not overlay_mounts(), overlay_mounts())
    shutil.rmtree(base, ignore_errors=True)
    print("SMOKE " + json.dumps({"failed": failed, **checks}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
