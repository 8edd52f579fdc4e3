"""ovlrun on kernel NFS, run inside a VM guest (see tests/vm/harness.py, tests/vm/nfs.py).

The guest's own knfsd exports a tmpfs tree; the guest mounts it over loopback, once per
configuration (NFSv4.2 and NFSv3, default options and ``lookupcache=positive``), and
runs real ``python -m ovlrun`` commands on it, Slurm-free:

- ``snapshot build`` from NFS, ``snapshot verify`` clean, ``publish`` to an image
  directory on NFS (as the image owner, root being squashed) and ``fetch`` into a second
  store, whose snapshots every job below uses;
- every file reads the same through the job view as on the server (type, mode, owner,
  size, mtime, bytes, link target);
- absent names are ENOENT, answered without a LOOKUP reaching the server (counted from
  /proc/self/mountstats inside the job; in a release's top directory only where the
  kernel has data-only layers, README "Supported kernels");
- a release added on the server after the build is visible in the next job, a name
  added to a localised release is not;
- a file deleted on the server from a localised release, and a whole release deleted
  while the client still caches it, behave as README's "What ovlrun promises" says;
- nothing is left mounted, and the NFS mount unmounts (nothing holds it).

The server's tree is changed on the server's side (its tmpfs), as an administrator
would, never through the client.  Prints one ``NFS {...}`` JSON line per configuration
and exits 1 if any check failed.  ``--source DIR`` runs another checkout's ovlrun (e.g.
the unfixed code, to see that these checks can fail); the checks themselves, and the
mountstats reader used inside the jobs, are this checkout's.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ovlrun.linux import mountstats  # noqa: E402
from tests.vm import nfs  # noqa: E402

# (NFS version, extra mount options); the first two get every check, the
# lookupcache=positive ones (no negative dentries cached) the launch and lookup checks.
CONFIGS = (("4.2", ""), ("3", ""), ("4.2", "lookupcache=positive"), ("3", "lookupcache=positive"))
IMAGE_OWNER = "daemon"  # owns the image directory on the (root-squashing) export
MISSES = 40  # absent names stat'ed per directory


def tag_of(version: str, options: str) -> str:
    return f"v{version}" + ("-" + options.replace("=", "-") if options else "")


def make_tree(sw: Path) -> None:
    """Two releases to localise (app/1.0, app/1.1), world-readable: the export squashes root."""
    for rel in ("1.0", "1.1"):
        d = sw / "app" / rel
        for sub in ("bin", "lib/python/pkg", "lib/deep/a/b", "share/doc"):
            (d / sub).mkdir(parents=True)
        (d / "lib" / "libfoo.so.1").write_bytes(b"\x7fELF" + bytes(range(256)) * 64)
        (d / "lib" / "libfoo.so").symlink_to("libfoo.so.1")
        (d / "lib" / "python" / "mod.py").write_text(f"VERSION = '{rel}'\n")
        (d / "lib" / "python" / "pkg" / "__init__.py").write_text("")
        for i in range(12):
            (d / "lib" / "python" / "pkg" / f"m{i}.py").write_text(f"X = {i}\n" * (i + 1))
            (d / "share" / "doc" / f"page {i}.txt").write_text(f"page {i} of {rel}\n")
        (d / "lib" / "deep" / "a" / "b" / "data.bin").write_bytes(os.urandom(70000))
        (d / "lib" / "data.txt").write_text(f"data of {rel}\n")
        (d / "bin" / "tool").write_text(f"#!/bin/sh\necho tool {rel}\n")
        (d / "bin" / "tool").chmod(0o755)
        (d / "README").write_text(f"app {rel}\n")
    subprocess.run(["chmod", "-R", "a+rX", str(sw)], check=True, timeout=60)


def describe(root: str) -> dict[str, list[object]]:
    """relpath -> [kind, mode, uid, gid, size, mtime_ns, sha256 or link target], every entry."""
    out: dict[str, list[object]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames) + ([""] if dirpath == root else []):
            path = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            else:
                content = ""
            out[os.path.relpath(path, root)] = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                                                st.st_gid, st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                                                st.st_mtime_ns, content]
    return out


def _errno_name(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def read_paths(paths: list[str]) -> dict[str, list[str]]:
    """[stat, open] of each path: "ok" / sha256 of the bytes, or the errno name."""
    out = {}
    for path in paths:
        try:
            os.stat(path)
            seen_stat = "ok"
        except OSError as e:
            seen_stat = _errno_name(e)
        try:
            with open(path, "rb") as f:
                seen_open = hashlib.sha256(f.read()).hexdigest()
        except OSError as e:
            seen_open = _errno_name(e)
        out[path] = [seen_stat, seen_open]
    return out


def probe(point: str, steps: list[list[object]]) -> list[object]:
    """Run inside a job: what the job sees, step by step ([ACTION, ARGS...]), with the
    NFS requests each step cost (mountstats of the mount at ``point``)."""
    results: list[object] = []
    for action, *args in steps:
        paths = [str(a) for a in args]
        before = mountstats.read()
        if action == "describe":
            result: object = {root: describe(root) for root in paths}
        elif action == "misses":  # stat MISSES absent names in each directory: errno names, LOOKUPs sent
            seen: dict[str, list[str]] = {}
            counts: dict[str, int] = {}
            for d in paths:
                names = set()
                ops_before = mountstats.read()[point]
                for i in range(MISSES):
                    try:
                        os.stat(os.path.join(d, f"absent-{i}.so"))
                        names.add("exists")
                    except OSError as e:
                        names.add(_errno_name(e))
                counts[d] = mountstats.delta({point: ops_before}, mountstats.read())[point].ops.get("LOOKUP", 0)
                seen[d] = sorted(names)
            result = {"errors": seen, "lookups": counts}
        elif action == "read":
            result = read_paths(paths)
        elif action == "overlays":  # localised paths mounted in this job
            with open("/proc/self/mountinfo") as f:
                result = sum(" - overlay ovlrun " in line for line in f)
        else:
            raise SystemExit(f"unknown action {action}")
        delta = mountstats.delta(before, mountstats.read()).get(point)
        results.append({"result": result, "ops": delta.nonzero() if delta else None})
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default=str(REPO), help="checkout whose ovlrun is tested")
    parser.add_argument("--configs", default=",".join(tag_of(*c) for c in CONFIGS))
    parser.add_argument("--probe", nargs=2, help=argparse.SUPPRESS)  # POINT STEPS_JSON (inside a job)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe[0], json.loads(args.probe[1]))))
        return 0
    nfs.start_server()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": args.source, "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([sys.executable, "-m", "ovlrun", "doctor", "--json"], env=env, capture_output=True, text=True,
                       timeout=300, cwd="/")
    method = json.loads(r.stdout or "{}").get("method", "?")
    wanted = args.configs.split(",")
    failed_any = False
    for version, options in CONFIGS:
        if tag_of(version, options) in wanted:
            report = check_config(args.source, method, version, options)
            failed_any |= bool(report["failed"])
            print("NFS " + json.dumps(report), flush=True)
    return 1 if failed_any else 0


def check_config(source: str, method: str, version: str, options: str) -> dict[str, object]:
    tag = tag_of(version, options)
    full = not options  # the lookupcache=positive configurations skip the fleet and verify
    checks: dict[str, object] = {"config": tag, "launch method": method}
    failed: list[str] = []

    def check(name: str, ok: bool, detail: object = None) -> None:
        checks[name] = "ok" if ok else f"FAILED: {detail}"
        if not ok:
            failed.append(name)

    server = Path(nfs.EXPORT) / tag
    point = f"{nfs.BASE}/mnt-{tag}"
    base = Path(tempfile.mkdtemp(prefix=f"ovlrun-nfs-{tag}-", dir="/var/tmp"))
    base.chmod(0o755)
    shutil.rmtree(server, ignore_errors=True)
    make_tree(server / "sw")
    images_server = server / "images"
    images_server.mkdir()
    owner = subprocess.run(["id", "-u", IMAGE_OWNER], capture_output=True, text=True, timeout=30).stdout.strip()
    os.chown(images_server, int(owner), int(owner))
    checks["mount options"] = nfs.mount(version, point, options)
    sw, images = f"{point}/{tag}/sw", f"{point}/{tag}/images"
    rel, rel2 = f"{sw}/app/1.0", f"{sw}/app/1.1"
    (base / "profiles").mkdir()
    (base / "profiles" / "p.toml").write_text(f'[[tree]]\nroot = "{sw}"\nlocalise = ["app/1.0", "app/1.1"]\n')
    config = base / "ovlrun.toml"
    config.write_text(f'image_owner = "{IMAGE_OWNER}"\n')
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
           "PYTHONPATH": source, "PYTHONDONTWRITEBYTECODE": "1", "OVLRUN_CONFIG": str(config),
           "OVLRUN_STORE": str(base / "store"), "OVLRUN_PROFILE_PATH": str(base / "profiles")}
    node2 = {**env, "OVLRUN_STORE": str(base / "store2")}

    def ovlrun(*argv: str, node: dict[str, str] = node2) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ovlrun", *argv], env=node, text=True, capture_output=True,
                              timeout=300, cwd=base)

    def job(*steps: list[object], strict: bool = False) -> tuple[subprocess.CompletedProcess[str], list[Any]]:
        """One job running the probe steps; their results (empty if the job failed)."""
        r = ovlrun("--profile", "p", *(["--strict"] if strict else []), "--", sys.executable, "-S",
                   str(Path(__file__).resolve()), "--probe", point, json.dumps(steps))
        try:
            return r, [step["result"] for step in json.loads(r.stdout)]
        except (ValueError, KeyError):
            return r, [{} for _ in steps]

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    try:
        data_only = method != "mount-fallback"
        r = ovlrun("snapshot", "build", "--profile", "p", node=env)
        check("snapshot build from NFS", r.returncode == 0, r.stderr.strip())
        if full:
            r = ovlrun("snapshot", "verify", "--profile", "p", node=env)
            check("snapshot verify clean", r.returncode == 0, (r.returncode, r.stdout[-800:], r.stderr.strip()))
            r = ovlrun("snapshot", "publish", "--to", images, "--all", node=env)
            published = sorted(p for p in images_server.rglob("*") if p.is_file())
            owners = {p.stat().st_uid for p in published} | {images_server.stat().st_uid}
            # index.json, .lock, an image and a manifest per release
            check("publish to NFS as the image owner", r.returncode == 0 and len(published) == 6
                  and owners == {int(owner)}, (r.returncode, r.stderr.strip(), [str(p) for p in published], owners))
            r = ovlrun("snapshot", "fetch", "--from", images, "--all")
            check("fetch from NFS", r.returncode == 0, r.stderr.strip())
            index = json.loads((base / "store2" / "index.json").read_text())["sources"] if r.returncode == 0 else {}
            same = [sha((base / s / index[p] / "image.erofs").read_bytes())
                    for p in (rel, rel2) for s in ("store", "store2") if p in index]
            check("fetched images identical", len(same) == 4 and same[0] == same[1] and same[2] == same[3], same)
        else:
            shutil.copytree(base / "store", base / "store2", symlinks=True)

        # Job 1: the view, absent names, and reading the files changed below (so that
        # the client caches their handles and pages, as after any earlier job).
        changed, victim = f"{rel}/lib/python/mod.py", f"{rel}/lib/data.txt"
        expected = {p: describe(str(server / "sw" / "app" / v)) for p, v in ((rel, "1.0"), (rel2, "1.1"))}
        r, (view, overlays, misses, _) = job(["describe", rel, rel2], ["overlays"],
                                            ["misses", f"{rel}/lib", f"{rel}/lib/python/pkg", rel],
                                            ["read", changed, victim])
        check("every file reads the same through the job view", r.returncode == 0 and view == expected,
              (r.returncode, r.stderr.strip(), _diff(expected, view or {})))
        check("both releases localised", overlays == 2, (overlays, r.stderr.strip()))
        errors, lookups = misses.get("errors", {}), misses.get("lookups", {})
        checks["LOOKUPs for absent names (lib, lib/python/pkg, top)"] = [lookups.get(d) for d in
                                                                          (f"{rel}/lib", f"{rel}/lib/python/pkg", rel)]
        check("absent names are ENOENT", len(errors) == 3 and all(v == ["ENOENT"] for v in errors.values()), errors)
        check("absent names below the top cost no LOOKUP",
              lookups.get(f"{rel}/lib") == 0 and lookups.get(f"{rel}/lib/python/pkg") == 0, lookups)
        # README "Supported kernels": the release's top directory is answered locally with
        # data-only layers; with the fallback (6.1) its misses reach the server.
        top = lookups.get(rel)
        check("absent names in the top directory: as README says", top == 0 if data_only else (top or 0) > 0,
              (method, top))

        # On the server: a new release, a name added to a localised one, a file changed
        # in place and one deleted.  Job 2 is the first job after that; then (plain NFS
        # read for comparison) the client's caches are dropped, and job 3 looks again.
        (server / "sw" / "app" / "2.0").mkdir(mode=0o755)
        (server / "sw" / "app" / "2.0" / "NEW").write_text("new\n")
        (server / "sw" / "app" / "1.0" / "lib" / "added-later.so").write_text("late\n")
        (server / "sw" / "app" / "1.0" / "lib" / "python" / "mod.py").write_text("VERSION = '9.9'\n")
        (server / "sw" / "app" / "1.0" / "lib" / "data.txt").unlink()
        r, (first,) = job(["read", f"{sw}/app/2.0/NEW", f"{rel}/lib/added-later.so", changed, victim])
        check("new release visible, later addition hidden",
              {k: first.get(k) for k in (f"{sw}/app/2.0/NEW", f"{rel}/lib/added-later.so")}
              == {f"{sw}/app/2.0/NEW": ["ok", sha(b"new\n")], f"{rel}/lib/added-later.so": ["ENOENT", "ENOENT"]},
              (r.returncode, r.stderr.strip(), first))
        direct = read_paths([changed, victim])  # plain NFS, outside any job
        drop_caches()
        # Job 3 also reads the release deleted next (the client caches it again).
        r, (later,) = job(["read", changed, victim, f"{rel2}/README"])
        name = {sha(b"VERSION = '1.0'\n"): "old data", sha(b"VERSION = '9.9'\n"): "new data",
                sha(b"data of 1.0\n"): "old data"}
        seen = [[[name.get(x, x) for x in got.get(p, ["?", "?"])] for p in (changed, victim)]
                for got in (first, direct, later)]
        checks["changed file [stat, open]: first job, plain NFS, after dropped caches"] = [s[0] for s in seen]
        checks["deleted file [stat, open]: first job, plain NFS, after dropped caches"] = [s[1] for s in seen]
        promised = changed_and_deleted(data_only, version)
        check("changed and deleted files: as README says",
              allowed(seen[0][0], promised["changed first"]) and allowed(seen[2][0], promised["changed later"])
              and allowed(seen[0][1], promised["deleted first"]) and allowed(seen[2][1], promised["deleted later"]),
              seen)

        # A release deleted on the server while the client caches it.
        shutil.rmtree(server / "sw" / "app" / "1.1")
        r, (got,) = job(["read", f"{rel}/README", f"{rel2}/README"])
        check("deleted release: skipped with a warning, the job runs",
              r.returncode == 0 and f"{rel2} (localised path {rel2}) is missing on the shared tree; skipped" in r.stderr
              and got == {f"{rel}/README": ["ok", sha(b"app 1.0\n")], f"{rel2}/README": ["ENOENT", "ENOENT"]},
              (r.returncode, r.stderr.strip(), got))
        r, _ = job(["read", f"{rel}/README"], strict=True)
        check("deleted release: an error with --strict",
              r.returncode == 125 and f"{rel2} (localised path {rel2}) is missing on the shared tree" in r.stderr,
              (r.returncode, r.stderr.strip()))
    except Exception as e:  # a broken step: report it, then still clean up
        check("no unexpected error", False, repr(e))
    finally:
        left = [line for line in open("/proc/self/mountinfo") if " - overlay " in line or " - erofs " in line]
        check("nothing left mounted", not left, left)
        try:
            nfs.umount(point)
            check("NFS mount released", True)
        except RuntimeError as e:
            check("NFS mount released", False, str(e))
        shutil.rmtree(base, ignore_errors=True)
    return {"failed": failed, **checks}


def drop_caches() -> None:
    """Forget what the client (and the server, same kernel) cached: dentries, attributes, pages."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def changed_and_deleted(data_only: bool, version: str) -> dict[str, list[set[str]]]:
    """What README promises for a file changed in place and one deleted on the server:
    per [stat, open] of the localised file, the results allowed in the first job after the
    change on a client that had them cached, and once the client's caches are gone
    (README "What ovlrun promises").

    overlayfs opens the file below by the entry the client has cached, without the
    close-to-open check a plain open makes, so until the client's attribute cache of the
    file expires (3-60 s by default) an NFSv3 client may still serve its cached pages (old
    data, even of a deleted file), and the server may answer ESTALE for a deleted file
    (at the open; on 6.1, whose lookup walks to the file below, also at stat).  Without
    data-only layers (6.1) a deleted file's metacopy has no data below it: EIO.  Which of
    these the first job sees depends on timing; what it sees later does not.
    """
    ok, old, new = "ok", "old data", "new data"
    stale = {"ESTALE"} | ({old} if version == "3" else set())
    if data_only:
        deleted_first, deleted_later = [{ok}, stale | {"ENOENT"}], [{ok}, {"ENOENT"}]
    else:
        deleted_first, deleted_later = [{ok, "ESTALE", "EIO"}, stale | {"EIO"}], [{"EIO"}, {"EIO"}]
    return {"changed first": [{ok}, {new} | ({old} if version == "3" else set())], "changed later": [{ok}, {new}],
            "deleted first": deleted_first, "deleted later": deleted_later}


def allowed(seen: list[str], promise: list[set[str]]) -> bool:
    return len(seen) == len(promise) and all(s in p for s, p in zip(seen, promise, strict=True))


def _diff(expected: dict[str, dict[str, list[object]]], seen: dict[str, dict[str, list[object]]]) -> list[str]:
    out = []
    for root, entries in expected.items():
        got = seen.get(root, {})
        for name in sorted(set(entries) | set(got)):
            if entries.get(name) != got.get(name):
                out.append(f"{root}/{name}: server {entries.get(name)} job {got.get(name)}")
    return out[:10]


if __name__ == "__main__":
    sys.exit(main())
