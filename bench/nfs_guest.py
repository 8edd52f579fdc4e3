"""The NFS operation-count benchmark, guest side (booted by bench/nfs_bench.py).

Runs as root in a VM guest (tests/vm/harness.py) with the guest's own knfsd
(tests/vm/nfs.py).  Per NFS configuration it builds a small software tree on the server,
mounts it, builds the snapshots of a profile localising every release, and runs three
real workloads, each directly on NFS and inside ``ovlrun --profile``, cold (client
caches dropped) and warm (at once again):

- ``libsearch``: ld.so loading 11 extension modules of Debian's python3 with
  LD_LIBRARY_PATH = 10 release directories holding copies of 10 of the libraries they
  need (the rest, and python3's own, are found in the system after all 10 fail);
- ``imports``: python3 importing 200 modules spread over 10 releases on PYTHONPATH
  (byte-compiled, as installed software is), after Python's own start-up searched them;
  also inside a profile that stores the ``.pyc`` files whole in its images (``inline``);
- ``lsR``: ``ls -lR`` of a release of 235 entries (copies of 8 stdlib packages).

Counts come from /proc/self/mountstats, read just before and after the workload by the
driver (inside the job for ovlrun, so the launch is not in them; launches are measured
on their own, cold and warm).  They are exact under TCG; the times are not meaningful
there and are only recorded.  Prints one ``NFSBENCH {...}`` line per configuration.

    python bench/nfs_guest.py run [--configs v4.2,v3] [--source CHECKOUT]
    python bench/nfs_guest.py driver POINT WORKLOAD SPEC_JSON      (what a job runs)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ovlrun.linux import mountstats  # noqa: E402
from tests.vm import nfs  # noqa: E402

CONFIGS = {"v4.2": ("4.2", ""), "v3": ("3", ""), "v4.2-positive": ("4.2", "lookupcache=positive"),
           "v3-positive": ("3", "lookupcache=positive")}
PYTHON = "/usr/bin/python3"  # the workloads' interpreter: Debian's, on the local (9p) root
LIBDIR = "/usr/lib/x86_64-linux-gnu"
# Extension modules whose libraries ld.so searches for; 10 of those libraries are copied
# into the 10 library releases (release i holds LIBS[i]), so a library in release i
# costs i failing candidates first, and the others all 10.
EXTENSIONS = ("_bz2", "_lzma", "_sqlite3", "_ctypes", "_uuid", "readline", "_curses", "_hashlib", "_ssl", "_crypt",
              "_dbm")
LIBS = ("libbz2.so.1.0", "liblzma.so.5", "libsqlite3.so.0", "libffi.so.8", "libuuid.so.1", "libreadline.so.8",
        "libncursesw.so.6", "libtinfo.so.6", "libcrypto.so.3", "libssl.so.3")
STDLIB_PACKAGES = ("email", "json", "http", "logging", "xml", "urllib", "unittest", "asyncio")
N_RELEASES, N_SUBMODULES, N_MODULES = 10, 15, 5


def make_tree(sw: Path) -> dict[str, object]:
    """The releases (on the server's side) and each workload's parameters (client paths
    are made by joining them to the client's tree root)."""
    for i, lib in enumerate(LIBS):
        d = sw / f"lib{i}" / "1.0" / "lib"
        d.mkdir(parents=True)
        shutil.copyfile(os.path.join(LIBDIR, lib), d / lib)  # the real file behind the soname link
        (d / "README").write_text(f"lib{i}\n")
    modules = []
    for i in range(N_RELEASES):
        d = sw / f"py{i}" / "1.0" / "lib" / "python"
        (d / f"pk{i}").mkdir(parents=True)
        (d / f"pk{i}" / "__init__.py").write_text("")
        for j in range(N_SUBMODULES):
            (d / f"pk{i}" / f"m{j}.py").write_text(f"VALUE = {i * 100 + j}\n")
            modules.append(f"pk{i}.m{j}")
        for j in range(N_MODULES):
            (d / f"mod{i}_{j}.py").write_text(f"import os\nVALUE = {j}\n")
            modules.append(f"mod{i}_{j}")
    doc = sw / "doc" / "1.0"
    for pkg in STDLIB_PACKAGES:
        shutil.copytree(f"/usr/lib/python3.11/{pkg}", doc / pkg, symlinks=True)
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(sw)], check=True, timeout=600,
                   env={"PATH": "/usr/bin:/bin"})
    subprocess.run(["chmod", "-R", "a+rX", str(sw)], check=True, timeout=60)
    return {"libsearch": {"dirs": [f"lib{i}/1.0/lib" for i in range(N_RELEASES)]},
            "imports": {"pythonpath": [f"py{i}/1.0/lib/python" for i in range(N_RELEASES)], "modules": modules},
            "lsR": {"root": "doc/1.0"}}


def workload_argv(workload: str, spec: dict[str, object], root: str) -> tuple[list[str], dict[str, str]]:
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}
    if workload == "libsearch":
        env["LD_LIBRARY_PATH"] = ":".join(os.path.join(root, d) for d in spec["dirs"])  # type: ignore[attr-defined]
        return [PYTHON, "-I", "-S", "-c", "import " + ", ".join(EXTENSIONS)], env
    if workload == "imports":
        env["PYTHONPATH"] = ":".join(os.path.join(root, d) for d in spec["pythonpath"])  # type: ignore[attr-defined]
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        code = "import " + ", ".join(spec["modules"]) + "\nprint(len(__import__('sys').modules))"  # type: ignore[arg-type]
        return [PYTHON, "-s", "-c", code], env
    return ["ls", "-lR", os.path.join(root, str(spec["root"]))], env


def driver(point: str, workload: str, spec_json: str) -> None:
    """Run one workload; print the NFS requests it cost (this mount only) as JSON."""
    spec = json.loads(spec_json)
    argv, env = workload_argv(workload, spec, spec["tree_root"])
    before = mountstats.read()[point]
    start = time.monotonic()
    r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    seconds = time.monotonic() - start
    after = mountstats.read()[point]
    d = mountstats.delta({point: before}, {point: after})[point]
    print(json.dumps({"ops": d.nonzero(), "errors": {k: v for k, v in d.errors.items() if v},
                      "seconds": round(seconds, 3), "status": r.returncode,
                      "stderr": r.stderr.decode(errors="replace")[-500:]}))


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def run_config(name: str, source: str) -> dict[str, object]:
    version, options = CONFIGS[name]
    server = Path(nfs.EXPORT) / f"bench-{name}"
    shutil.rmtree(server, ignore_errors=True)
    specs = make_tree(server / "sw")
    point = f"{nfs.BASE}/bench-{name}"
    shown = nfs.mount(version, point, options)
    tree_root = f"{point}/bench-{name}/sw"
    base = Path(f"/var/tmp/ovlrun-nfsbench-{name}")
    shutil.rmtree(base, ignore_errors=True)
    # The same profile twice: as is, and with the byte-compiled modules stored whole in
    # the images (issue 17: ``inline``), each in a store of its own (a store holds one
    # snapshot per release, built with its profile's inline settings).
    localise = 'localise = ["lib*/1.0", "py*/1.0", "doc/1.0"]'
    for variant, extra in (("plain", ""), ("inline", 'inline = ["**/*.pyc"]\n')):
        (base / variant).mkdir(parents=True)
        (base / variant / "p.toml").write_text(f'[[tree]]\nroot = "{tree_root}"\n{localise}\n{extra}')
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
           "PYTHONPATH": source, "PYTHONDONTWRITEBYTECODE": "1", "OVLRUN_STORE": str(base / "store"),
           "OVLRUN_PROFILE_PATH": str(base / "plain")}
    env_inline = {**env, "OVLRUN_STORE": str(base / "store-inline"), "OVLRUN_PROFILE_PATH": str(base / "inline")}

    def ovlrun(*argv: str, inline: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ovlrun", *argv], env=env_inline if inline else env, text=True,
                              capture_output=True, timeout=600, cwd=base)

    def outside(fn: object) -> tuple[dict[str, int], dict[str, int], object]:
        before = mountstats.read()[point]
        out = fn()  # type: ignore[operator]
        d = mountstats.delta({point: before}, {point: mountstats.read()[point]})[point]
        return d.nonzero(), {k: v for k, v in d.errors.items() if v}, out

    rows: list[dict[str, object]] = []
    method = json.loads(ovlrun("doctor", "--json").stdout or "{}").get("method", "?")
    drop_caches()
    ops, errors, r = outside(lambda: ovlrun("snapshot", "build", "--profile", "p"))
    if r.returncode != 0:  # type: ignore[attr-defined]
        raise SystemExit(f"build failed: {r.stderr}")  # type: ignore[attr-defined]
    rows.append({"workload": "snapshot build", "mode": "build", "temp": "cold", "ops": ops, "errors": errors})
    r = ovlrun("snapshot", "build", "--profile", "p", inline=True)
    if r.returncode != 0:
        raise SystemExit(f"build (inline) failed: {r.stderr}")
    for temp in ("cold", "warm"):
        if temp == "cold":
            drop_caches()
        ops, errors, r = outside(lambda: ovlrun("--profile", "p", "--", "true"))
        rows.append({"workload": "launch (true)", "mode": "ovlrun", "temp": temp, "ops": ops, "errors": errors,
                     "status": r.returncode})  # type: ignore[attr-defined]
    for workload, spec in specs.items():
        spec_json = json.dumps({**spec, "tree_root": tree_root})  # type: ignore[dict-item]
        drive = [sys.executable, str(Path(__file__).resolve()), "driver", point, workload, spec_json]
        for mode in ("direct", "ovlrun", "ovlrun-inline") if workload == "imports" else ("direct", "ovlrun"):
            for temp in ("cold", "warm"):
                if temp == "cold":
                    drop_caches()
                argv = drive if mode == "direct" else [sys.executable, "-m", "ovlrun", "--profile", "p", "--", *drive]
                run_env = env_inline if mode == "ovlrun-inline" else env
                whole_ops, _, r = outside(lambda argv=argv, run_env=run_env: subprocess.run(
                    argv, env=run_env, text=True, capture_output=True, timeout=600, cwd=base))
                try:
                    got = json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[attr-defined]
                except (ValueError, IndexError):
                    got = {"ops": {}, "errors": {}, "status": "no report", "stderr": r.stderr[-500:]}  # type: ignore[attr-defined]
                rows.append({"workload": workload, "mode": mode, "temp": temp, **got,
                             "ops with launch": whole_ops})
    shutil.rmtree(base, ignore_errors=True)
    nfs.umount(point)
    return {"kernel": os.uname().release, "method": method, "config": name, "mount": shown, "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--configs", default="v4.2,v3")
    run.add_argument("--source", default=str(REPO))
    drv = sub.add_parser("driver")
    drv.add_argument("point")
    drv.add_argument("workload")
    drv.add_argument("spec")
    args = ap.parse_args()
    if args.cmd == "driver":
        driver(args.point, args.workload, args.spec)
        return 0
    nfs.start_server()
    for name in args.configs.split(","):
        print("NFSBENCH " + json.dumps(run_config(name, args.source)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
