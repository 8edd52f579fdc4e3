"""The command line as users meet it: help, usage errors, exit statuses, the shell a job
without a command gets, and what a sudo caller may run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import TEST_UID, World, requires_overlay, requires_root

HELP = [["--help"], ["-h"], ["snapshot", "--help"], ["snapshot", "build", "--help"], ["snapshot", "list", "-h"],
        ["snapshot", "verify", "--help"], ["snapshot", "refresh", "--help"], ["snapshot", "gc", "--help"],
        ["profile", "--help"], ["profile", "check", "--help"], ["doctor", "--help"], ["status", "--help"],
        ["slurm", "--help"], ["slurm", "prolog", "--help"], ["slurm", "epilog", "--help"],
        ["slurm", "clone-ns", "--help"], ["enter", "--help"]]

# (argv, exit status): admin commands exit 2 like every typer program; the launch and
# enter are wrappers and exit 125 like env(1).
WRONG = [(["snapshot", "gc", "--grace", "-1"], 2), (["snapshot", "bogus"], 2), (["snapshot", "build"], 2),
         (["snapshot", "build", "--profile", "x", "--timeout", "0"], 2), (["doctor", "--bogus"], 2),
         (["snapshot", "list", "extra"], 2), (["snapshot", "verify", "--json=3"], 2), (["profile", "check"], 2),
         (["profile", "check", "a", "b"], 2), (["status", "--x"], 2), (["slurm", "bogus"], 2),
         (["slurm", "prolog", "extra"], 2), (["snapshot", "gc", "--grace", "soon"], 2), (["doctor", "-p"], 2),
         (["--bogus"], 125), (["-p"], 125), (["--profile"], 125), (["--user", "x"], 125), (["enter"], 125),
         (["--strict", "--", "true"], 125)]


def run(world: World, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return world.ovlrun(*args, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("argv", HELP, ids=" ".join)
def test_every_help_exits_0(world: World, argv: list[str]) -> None:
    r = run(world, *argv)
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout and r.stderr == ""


def test_wrong_usages_print_one_line_and_no_traceback(world: World) -> None:
    assert len(WRONG) == 20
    for argv, status in WRONG:
        r = run(world, *argv)
        assert r.returncode == status, (argv, r)
        assert "Traceback" not in r.stderr and r.stdout == "", (argv, r)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("ovlrun"), (argv, r.stderr)


def test_version(world: World) -> None:
    r = run(world, "--version")
    assert r.returncode == 0 and r.stdout.startswith("ovlrun ")


def test_broken_pipe_is_quiet(world: World) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before ovlrun writes: EPIPE on the first write
    try:
        r = subprocess.run([sys.executable, "-m", "ovlrun", "--help"], stdout=write_end, stderr=subprocess.PIPE,
                           env=world.env, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert "Exception ignored" not in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["doctor"]], ids=" ".join)
def test_an_error_no_code_path_expected_is_one_line_and_125(world: World, argv: list[str]) -> None:
    """The CLI edge's safety net: an OSError nothing turned into a message (here: stdout is
    /dev/full, ENOSPC) is one line and 125, never a traceback (issue 18 item 6)."""
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "ovlrun", *argv], stdout=full, stderr=subprocess.PIPE,
                           env=world.env, text=True, timeout=60)
    assert r.returncode == 125, r.stderr
    assert r.stderr.startswith("ovlrun: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert "No space left on device" in r.stderr, r.stderr


@requires_root
def test_status_outside_a_job_exits_1(world: World) -> None:
    r = run(world, "status")
    assert r.returncode == 1 and r.stdout.startswith("not inside an ovlrun job")


@requires_root
def test_profile_check_applies_the_trust_rule_of_sudo_launches(world: World) -> None:
    path = world.simple_profile()
    assert run(world, "profile", "check", "p").returncode == 0
    path.chmod(0o664)  # group-writable: every sudo launch and Slurm job refuses it
    r = run(world, "profile", "check", "p")
    assert r.returncode == 1 and "sudo launches and Slurm jobs would refuse it" in r.stderr, r
    refused = world.as_sudo("--profile", "p", "--", "true", uid=TEST_UID)
    assert refused.returncode == 125 and "must be owned by root and not group/other-writable" in refused.stderr


@requires_root
@pytest.mark.parametrize(("argv", "why"), [
    (["snapshot", "build", "--profile", "p"], "for the administrator"),
    (["snapshot", "gc", "--grace", "0"], "for the administrator"),
    (["doctor"], "for the administrator"),
    (["slurm", "prolog"], "for the administrator"),
    (["profile", "check", "/etc/shadow"], "run it without sudo"),
    (["status"], "run it without sudo"),
])
def test_sudo_callers_get_only_the_launch_and_enter(world: World, argv: list[str], why: str) -> None:
    world.simple_profile()
    r = world.as_sudo(*argv, uid=TEST_UID)
    assert r.returncode == 125 and why in r.stderr and "through sudo" in r.stderr, r
    assert r.stdout == "" and not world.store.exists()


@requires_root
@requires_overlay
def test_no_command_gives_the_callers_shell_non_login_in_their_environment(world: World, test_user: str) -> None:
    world.simple_profile()
    world.build()
    env = {"SHELL": "/bin/bash", "PATH": "/opt/mine/bin:/usr/bin:/bin"}
    script = 'echo "$PATH"; shopt -q login_shell && echo login || echo non-login\n'
    r = world.as_sudo("--profile", "p", uid=TEST_UID, extra_env=env, input=script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["/opt/mine/bin:/usr/bin:/bin", "non-login"]
    r = world.as_sudo("--profile", "p", "--login", uid=TEST_UID, extra_env=env, input=script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "login"


@requires_root
@requires_overlay
def test_script_without_shebang_runs_with_sh(world: World) -> None:
    world.simple_profile()
    world.build()
    script = world.base / "no-shebang"
    script.write_text('echo "ran with $0 $1"\n')
    script.chmod(0o755)
    r = run(world, "--profile", "p", "--", str(script), "arg")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"ran with {script} arg\n"
