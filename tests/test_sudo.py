"""sudo use: the caller's environment reaches the job exactly, ovlrun's own root process is
never steered by it, and what a sudo caller may not choose is refused clearly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TEST_UID, World, requires_overlay, requires_root

pytestmark = [requires_root, requires_overlay]


@pytest.fixture
def sudoers(world: World, test_user: str) -> Iterator[Path]:
    if shutil.which("sudo") is None:
        pytest.skip("sudo is not installed (make setup installs it)")
    entry = world.admin_entry()
    rule = Path(f"/etc/sudoers.d/ovlrun-test-{os.getpid()}")
    rule.write_text(f"{test_user} ALL=(root) NOPASSWD: {entry}\n")
    rule.chmod(0o440)
    check = subprocess.run(["visudo", "-cf", str(rule)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    try:
        yield entry
    finally:
        rule.unlink()


def test_job_sees_callers_environment_exactly(world: World, sudoers: Path, test_user: str) -> None:
    world.simple_profile()
    world.build()
    out = world.base / "out"
    out.mkdir()
    os.chown(out, TEST_UID, -1)
    caller = ("export MYVAR='two  spaces' LD_LIBRARY_PATH=/opt/x/lib PYTHONPATH=/opt/py PATH=/opt/bin:/usr/bin:/bin; "
              f"env -0 | sort -z > {out}/caller.env; "
              f"sudo -n {sudoers} --profile p -- /bin/sh -c 'env -0 | sort -z' > {out}/job.env")
    result = subprocess.run(["su", test_user, "-c", caller], capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    # bash sets "_" to the command it runs (env for one, sudo for the other): not compared.
    caller_env = {v for v in (out / "caller.env").read_bytes().split(b"\0") if not v.startswith(b"_=")}
    job_env = {v for v in (out / "job.env").read_bytes().split(b"\0") if not v.startswith(b"_=")}
    # Exactly the caller's environment plus OVLRUN_PROFILE and OVLRUN_JOB_ID (and what the
    # job's /bin/sh sets for itself at start-up: PWD, SHLVL).
    job_id = next(v for v in job_env if v.startswith(b"OVLRUN_JOB_ID=launch-"))
    assert caller_env - job_env == set()
    assert job_env - caller_env <= {b"OVLRUN_PROFILE=p", job_id, b"SHLVL=1", b"PWD=/"}
    assert b"OVLRUN_PROFILE=p" in job_env
    for var in (b"MYVAR=two  spaces", b"LD_LIBRARY_PATH=/opt/x/lib", b"PYTHONPATH=/opt/py", b"PATH=/opt/bin:/usr/bin:/bin"):
        assert var in job_env
    assert not any(v.startswith(b"SUDO_") for v in job_env)
    # And the job ran as the caller.
    who = subprocess.run(["su", test_user, "-c", f"sudo -n {sudoers} --profile p -- id -u"],
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert who.stdout.strip() == str(TEST_UID), who.stderr


ABUSES = [
    ({"OVLRUN_STORE": "/home/evil/store"}, ["--profile", "p", "--", "true"], "OVLRUN_STORE is only honoured for root"),
    ({"OVLRUN_PROFILE_PATH": "/home/evil"}, ["--profile", "p", "--", "true"], "OVLRUN_PROFILE_PATH is only honoured"),
    ({}, ["--profile", "/home/evil/p.toml", "--", "true"], "profile files by path are only accepted from root"),
    ({}, ["--profile", "./p.toml", "--", "true"], "profile files by path are only accepted from root"),
    ({}, ["--profile", "p", "--user", "root", "--", "true"], "--user is only for root"),
    ({"PYTHONPATH": "/home/evil"}, ["--profile", "p", "--", "true"], "sudo passed PYTHONPATH"),
    ({"LD_PRELOAD": "/home/evil/x.so"}, ["--profile", "p", "--", "true"], "sudo passed LD_PRELOAD"),
]


@pytest.mark.parametrize(("env", "args", "message"), ABUSES)
def test_sudo_caller_abuses_are_refused(world: World, env: dict[str, str], args: list[str], message: str) -> None:
    world.simple_profile()
    world.build()
    # LD_PRELOAD must not really be preloaded into the test's interpreter: point it nowhere
    # harmful (a missing file only makes ld.so warn).
    result = world.as_sudo(*args, uid=TEST_UID, extra_env=env)
    assert result.returncode == 125, result
    assert message in result.stderr and "Traceback" not in result.stderr


def test_profile_in_writable_directory_is_refused_for_sudo_callers(world: World) -> None:
    world.simple_profile()
    world.build()
    world.profiles.chmod(0o777)
    result = world.as_sudo("--profile", "p", "--", "true", uid=TEST_UID)
    assert result.returncode == 125
    assert "must be owned by root and not group/other-writable" in result.stderr
    # Root itself may still use it (it could write it anyway).
    assert world.ovlrun("--profile", "p", "--", "true").returncode == 0


def test_interactive_login_shell_in_a_pty(world: World, test_user: str) -> None:
    pexpect = pytest.importorskip("pexpect", reason="pexpect is a test dependency (pip install -e .[test])")
    rel = world.sw / "app" / "1.0"
    world.simple_profile()
    world.build()
    (rel / "lib" / "added-later.so").write_text("")
    env = {"PATH": "/usr/bin:/bin", "TERM": "dumb", "SUDO_UID": str(TEST_UID), "SUDO_GID": str(TEST_UID),
           "LC_ALL": "C.UTF-8"}
    child = pexpect.spawn(str(world.admin_entry()), ["--profile", "p"], env=env, encoding="utf-8", timeout=30,
                          cwd="/")
    try:
        child.sendline("echo WHO=$(id -un) PROFILE=$OVLRUN_PROFILE SHELL0=$0")
        child.expect(r"WHO=(\S+) PROFILE=(\S+) SHELL0=(\S+)")
        assert child.match.groups()[:2] == (test_user, "p")
        # Quotes split the marker so the echoed command line itself cannot match it.
        child.sendline(f"ls {rel}/lib | tr '\\n' ' '; echo EN''D")
        child.expect("END")
        assert "libfoo.so.1" in child.before and "added-later.so" not in child.before
        child.sendline("exit 4")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 4


def test_network_none(world: World) -> None:
    world.write_profile("net", f'network = "none"\n[[tree]]\nroot = "{world.sw}"\nlocalise = ["app/1.0"]\n')
    world.build("net")
    script = ("import socket\n"
              "print(sorted(name for _, name in socket.if_nameindex()))\n"
              "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1)\n"
              "c = socket.create_connection(s.getsockname(), timeout=5); a, _ = s.accept()\n"
              "c.sendall(b'ping'); print(a.recv(4).decode())\n")
    result = world.ovlrun("--profile", "net", "--", sys.executable, "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["['lo']", "ping"]
    import socket

    assert sorted(name for _, name in socket.if_nameindex()) != ["lo"], "host has only lo: test proves nothing"
