"""The launcher end to end: real namespaces, real overlays, real privilege drop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ovlrun.linux.kernel import probe
from tests.conftest import NOBODY, REPO, World, host_mounts, requires_overlay, requires_root

pytestmark = [requires_root, requires_overlay]


def built(world: World, patterns: tuple[str, ...] = ("app/1.0",)) -> Path:
    world.simple_profile(patterns=patterns)
    world.build()
    return world.sw / "app" / "1.0"


def test_reads_data_through_localised_view(world: World) -> None:
    rel = built(world)
    result = world.job(f"cat {rel}/lib/python/mod.py; cmp {rel}/lib/libfoo.so.1 /proc/self/fd/3 3<{rel}/lib/libfoo.so.1 "
                       f"&& echo same; {rel}/bin/tool; readlink {rel}/lib/libfoo.so; echo $OVLRUN_PROFILE")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["VERSION = '1.0'", "same", "tool 1.0", "libfoo.so.1", "p"]
    # And the overlay really was there: mountinfo inside the job shows it.
    inside = world.job("grep ' overlay ' /proc/self/mountinfo")
    assert f" {rel} " in inside.stdout
    # data-only layer (datadir+= or ::) unless the kernel lacks it (6.1: fallback layout)
    data_only = "datadir+=" in inside.stdout or "::" in inside.stdout
    assert data_only == probe().data_only_layers, inside.stdout


def test_data_matches_source_bytes(world: World) -> None:
    rel = built(world)
    result = world.ovlrun("--profile", "p", "--", sys.executable, "-c",
                          f"import sys; sys.stdout.write(open('{rel}/lib/libfoo.so.1','rb').read().hex())")
    assert bytes.fromhex(result.stdout) == (rel / "lib" / "libfoo.so.1").read_bytes()


def test_absent_name_is_enoent(world: World) -> None:
    rel = built(world)
    result = world.ovlrun("--profile", "p", "--", sys.executable, "-c",
                          f"import os\ntry:\n os.stat('{rel}/lib/nothere.so')\nexcept FileNotFoundError:\n print('ENOENT')")
    assert result.stdout.strip() == "ENOENT", result.stderr


def test_snapshot_hides_later_additions_but_new_releases_appear(world: World) -> None:
    rel = built(world)
    (rel / "lib" / "added-later.so").write_text("late\n")  # releases are immutable: this is a violation
    (world.sw / "app" / "2.0").mkdir()  # a new release: must be visible
    (world.sw / "app" / "2.0" / "NEW").write_text("new\n")
    result = world.job(f"ls {rel}/lib; echo --; cat {world.sw}/app/2.0/NEW; test -e {rel}/lib/added-later.so || echo hidden")
    assert result.returncode == 0, result.stderr
    listing, rest = result.stdout.split("--\n")
    assert "added-later.so" not in listing and "libfoo.so.1" in listing
    assert rest.splitlines() == ["new", "hidden"]
    # Outside the job the file is there (the shared tree itself is untouched).
    assert (rel / "lib" / "added-later.so").exists()


def test_writes_fail_with_erofs(world: World) -> None:
    rel = built(world)
    result = world.ovlrun("--profile", "p", "--", sys.executable, "-c",
                          "import errno,os\n"
                          f"for op in (lambda: open('{rel}/new','w'), lambda: os.mkdir('{rel}/lib/d'),\n"
                          f"           lambda: os.chmod('{rel}/README', 0o600), lambda: open('{rel}/README','a')):\n"
                          "    try:\n        op(); print('WROTE')\n"
                          "    except OSError as e:\n        print(errno.errorcode[e.errno])")
    assert result.stdout.split() == ["EROFS"] * 4, result.stderr


def test_exit_codes(world: World) -> None:
    built(world)
    assert world.job("exit 0").returncode == 0
    assert world.job("exit 7").returncode == 7
    assert world.ovlrun("--profile", "p", "--", "no-such-command-xyz").returncode == 127
    not_exec = world.base / "notexec"
    not_exec.write_text("#!/bin/sh\n")
    not_exec.chmod(0o644)
    r = world.ovlrun("--profile", "p", "--", str(not_exec))
    assert r.returncode == 126 and "Permission denied" in r.stderr
    for bad in (["--profile", "missing", "--", "true"], ["--nope"], ["--profile"], []):
        r = world.ovlrun(*bad)
        assert r.returncode == 125, (bad, r)
        assert "Traceback" not in r.stderr


def test_signal_status_like_bare_command(world: World) -> None:
    built(world)
    # exec, not fork: the shell's own SIGTERM is the job's status.
    assert world.job("kill -TERM $$").returncode == -signal.SIGTERM


def test_runs_as_sudo_user_without_capabilities(world: World) -> None:
    rel = built(world)
    result = world.as_sudo("--profile", "p", "--", "/bin/sh", "-c",
                           f"id -u; id -g; grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|Uid|Gid|NoNewPrivs):' /proc/self/status; "
                           f"cat {rel}/README", uid=NOBODY)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == [str(NOBODY), str(NOBODY)]
    status = dict(line.split(":\t") for line in lines[2:-1])
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, (cap, status[cap])
    assert status["Uid"].split() == [str(NOBODY)] * 4
    assert status["Gid"].split() == [str(NOBODY)] * 4
    assert status["NoNewPrivs"] == "1"
    assert lines[-1] == "app 1.0"


def test_user_option_and_refused_under_sudo(world: World) -> None:
    built(world)
    assert world.ovlrun("--profile", "p", "--user", "nobody", "--", "id", "-u").stdout.strip() == str(NOBODY)
    r = world.as_sudo("--profile", "p", "--user", "root", "--", "id", "-u", uid=NOBODY)
    assert r.returncode == 125 and "--user is only for root" in r.stderr


def test_not_root_exits_125(world: World) -> None:
    built(world)
    # The test interpreter may live under /root (unreadable to nobody): run a world-readable
    # copy of the package with the system python instead.
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if system_python is None:
        pytest.skip("no system python3 in /usr/bin for the unprivileged run")
    shutil.copytree(REPO / "ovlrun", world.base / "pkg" / "ovlrun", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([system_python, "-m", "ovlrun", "--profile", "p", "--", "true"], capture_output=True, text=True,
                       env={**world.env, "PYTHONPATH": str(world.base / "pkg")}, cwd="/",
                       preexec_fn=lambda: os.setuid(NOBODY), timeout=60)
    assert r.returncode == 125, r
    assert "must run as root" in r.stderr and "sudo" in r.stderr


def test_cwd_inside_localised_path(world: World) -> None:
    rel = built(world)
    (rel / "lib" / "added-later.so").write_text("late\n")
    result = world.job("ls; pwd", cwd=rel / "lib")
    assert result.returncode == 0, result.stderr
    assert "added-later.so" not in result.stdout and "libfoo.so.1" in result.stdout
    assert result.stdout.splitlines()[-1] == str(rel / "lib")


def test_missing_snapshot_warns_or_fails_strict(world: World) -> None:
    world.simple_profile(patterns=("app/1.0", "app/1.1"))
    world.ovlrun("snapshot", "build", "--profile", "p")
    # Remove 1.1 from the index by building a profile with only 1.0 into a fresh store.
    fresh = {"OVLRUN_STORE": str(world.base / "store2")}
    world.write_profile("one", f'[[tree]]\nroot = "{world.sw}"\nlocalise = ["app/1.0"]\n')
    assert world.ovlrun("snapshot", "build", "--profile", "one", env=fresh).returncode == 0
    r = world.ovlrun("--profile", "p", "--", "true", env=fresh)
    assert r.returncode == 0
    warnings = [line for line in r.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and f"{world.sw}/app/1.1" in warnings[0]
    assert "ovlrun snapshot build --profile p" in warnings[0]
    r = world.ovlrun("--profile", "p", "--strict", "--", "true", env=fresh)
    assert r.returncode == 125 and "no snapshot for" in r.stderr


def test_host_mount_table_unchanged_even_after_sigkill(world: World) -> None:
    built(world)
    before = host_mounts()
    for _ in range(3):
        assert world.job("true").returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "ovlrun", "--profile", "p", "--", "/bin/sh", "-c",
                             "grep -c ' overlay ovlrun ' /proc/self/mountinfo; exec sleep 600"],
                            env=world.env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "1"  # the job is up, with its overlay mounted
    assert host_mounts() == before
    proc.kill()
    proc.wait(timeout=30)
    assert host_mounts() == before


def test_shell_when_no_command(world: World) -> None:
    built(world)
    r = world.ovlrun("--profile", "p", input="echo in-shell $OVLRUN_PROFILE\nexit 3\n")
    assert r.returncode == 3 and "in-shell p" in r.stdout


def test_status_inside_job(world: World) -> None:
    rel = built(world)
    r = world.ovlrun("--profile", "p", "--", sys.executable, "-m", "ovlrun", "status")
    assert r.returncode == 0, r.stderr
    mode = "data-only" if probe().data_only_layers else "fallback (shared tree as regular lower layer)"
    assert "profile: p" in r.stdout and str(rel) in r.stdout and mode in r.stdout
    r = world.ovlrun("--profile", "p", "--", sys.executable, "-m", "ovlrun", "status", "--json")
    info = json.loads(r.stdout)
    assert info["profile"] == "p"
    assert [(m["path"], m["mode"]) for m in info["localised"]] == [(str(rel), mode)]
    assert info["localised"][0]["snapshot"].startswith(str(world.store) + "/snapshots/")


def test_doctor(world: World) -> None:
    r = world.ovlrun("doctor")
    assert r.returncode == 0 and "data_only_layers" in r.stdout
    info = json.loads(world.ovlrun("doctor", "--json").stdout)
    assert info["overlay"] is True and info["method"] == probe().method == info["usable_methods"][0]
    # An accepted key is only trusted once an unknown one was seen rejected (6.1 accepts all).
    assert info["probe"]["unknown key"] == "EINVAL" or info["method"] == "mount-fallback"
