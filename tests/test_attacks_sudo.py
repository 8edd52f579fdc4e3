# ruff: noqa: F811  (pytest fixtures imported from tests.attacks_support are redefined as arguments)
"""Issue 9, attack 1 and 5e-5g: what a user can make root do through sudo.

Only the launch (``ovlrun --profile NAME ...``) and ``ovlrun enter JOBID`` are for sudo
callers.  Every administrative subcommand refuses a sudo caller itself (first line of
defence), and the shipped sudoers drop-in grants only the launch and enter shapes
(second line).  ``profile check`` needs no root: users run it with their own rights.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.attacks_support import (
    SECRET_NAME,
    SHIPPED_SUDOERS,
    broad_sudoers,  # noqa: F401 (fixture)
    shipped_sudoers,  # noqa: F401 (fixture)
    su,
    user_dir,
    victim,  # noqa: F401 (fixture)
)
from tests.conftest import REPO, TEST_UID, World, requires_overlay, requires_root

pytestmark = [requires_root, requires_overlay]

ADMIN_COMMANDS = [
    ("snapshot", "build", "--profile", "p"),
    ("snapshot", "build", "--profile", "p", "--rebuild"),
    ("snapshot", "list"),
    ("snapshot", "verify", "--all"),
    ("snapshot", "refresh", "--all"),
    ("snapshot", "gc", "--grace", "0"),
    ("snapshot", "gc", "--dry-run"),
    ("snapshot", "publish", "--to", "/var/tmp/ovlrun-attack-published", "--all"),
    ("snapshot", "fetch", "--from", "/var/tmp/ovlrun-attack-published", "--all"),
    ("profile", "check", "p"),
    ("profile", "check", "/etc/shadow"),
    ("doctor",),
    ("status",),
]


@pytest.mark.parametrize("args", ADMIN_COMMANDS, ids=lambda a: "-".join(a).replace("/", "_"))
def test_admin_subcommands_refuse_sudo_callers(world: World, args: tuple[str, ...]) -> None:
    world.simple_profile()
    world.build()
    (world.sw / "app" / "1.0" / "README").write_text("changed after the build\n")
    index = (world.store / "index.json").read_bytes()
    snapshots = sorted(p.name for p in (world.store / "snapshots").rglob("*") if p.parent.parent.name == "snapshots")
    result = world.as_sudo(*args, uid=TEST_UID)
    assert result.returncode == 125, result
    assert "is not available through sudo" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    # Nothing was done as root: no new, rebuilt or collected snapshot.
    assert (world.store / "index.json").read_bytes() == index
    assert sorted(p.name for p in (world.store / "snapshots").rglob("*")
                  if p.parent.parent.name == "snapshots") == snapshots


def test_shipped_sudoers_grants_only_launch_and_enter(world: World, shipped_sudoers: Path, test_user: str) -> None:
    check = subprocess.run(["visudo", "-cf", str(SHIPPED_SUDOERS)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    world.simple_profile()
    world.build()
    entry = world.admin_entry()
    spy = user_dir(world.base / "spy")
    user_dir(spy / "d")
    (world.base / "u.toml").write_text(f'[[tree]]\nroot = "{spy}"\nlocalise = ["d"]\n')
    # What users need reaches ovlrun...
    for shape in ("--profile p --", "--profile=p --", "-p p --", "-p p"):
        r = su(test_user, f"sudo -n {entry} {shape} id -u")
        assert r.returncode == 0 and r.stdout.strip() == str(TEST_UID), (shape, r)
    r = su(test_user, f"sudo -n {entry} enter 12345 -- true")
    assert r.returncode == 125 and "ovlrun: job 12345 has no ovlrun namespace" in r.stderr, r
    # ...and nothing else does: sudo itself refuses (-n: it would ask for a password).
    for args in (f"snapshot build --profile {world.base}/u.toml", "snapshot gc --grace 0", "snapshot list",
                 "profile check /etc/shadow", "doctor", "status", "--help", f"--strict --profile {world.base}/u.toml"):
        r = su(test_user, f"sudo -n {entry} {args}")
        assert r.returncode == 1 and r.stderr.startswith("sudo:") and "ovlrun" not in r.stderr, (args, r)
    assert str(spy) not in (world.store / "index.json").read_text()


def test_sudo_user_cannot_list_another_users_directory_with_admin_commands(
        world: World, broad_sudoers: Path, test_user: str, victim: Path) -> None:
    """The reported attack, through a drop-in that (like the old shipped one) grants any
    arguments: build a snapshot of your own directory, swap it for a symlink to another
    user's 0700 directory, verify.  ovlrun itself must refuse every step."""
    world.simple_profile()
    world.build()
    entry = world.admin_entry()
    spy = user_dir(world.base / "spy")
    user_dir(spy / "d")
    profile = world.base / "spy.toml"
    profile.write_text(f'[[tree]]\nroot = "{spy}"\nlocalise = ["d"]\n')
    os.chown(profile, TEST_UID, TEST_UID)
    outputs = []
    for step in (f"sudo -n {entry} snapshot build --profile {profile}",
                 f"rmdir {spy}/d && ln -s {victim} {spy}/d",
                 f"sudo -n {entry} snapshot verify --profile {profile}",
                 f"sudo -n {entry} snapshot refresh --profile {profile}",
                 f"sudo -n {entry} profile check /etc/shadow"):
        r = su(test_user, step)
        outputs.append(r.stdout + r.stderr)
        if step.startswith("sudo"):
            assert r.returncode == 125 and "is not available through sudo" in r.stderr, (step, r)
    assert not any(SECRET_NAME in o for o in outputs), outputs
    assert not any("line" in o for o in outputs[-1:]), outputs  # no syntax position from /etc/shadow
    assert str(spy) not in (world.store / "index.json").read_text()


def _user_python(test_user: str, world: World, args: str) -> subprocess.CompletedProcess[str]:
    env = f"PYTHONPATH={REPO} OVLRUN_STORE={world.store} OVLRUN_PROFILE_PATH={world.profiles} LC_ALL=C.UTF-8"
    return su(test_user, f"cd / && env {env} {sys.executable} -m ovlrun {args}")


def test_profile_check_needs_no_root_and_reads_with_the_users_rights(world: World, test_user: str) -> None:
    world.simple_profile()
    world.build()
    r = _user_python(test_user, world, "profile check p")
    assert r.returncode == 0 and "OK" in r.stdout and "1 snapshot(s) built" in r.stdout, r
    r = _user_python(test_user, world, "profile check /etc/shadow")
    assert r.returncode == 125 and "cannot read profile /etc/shadow: Permission denied" in r.stderr, r
    assert "Traceback" not in r.stderr


def _limited(megabytes: int) -> None:
    limit = megabytes << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def test_profile_check_refuses_huge_and_deeply_nested_profiles(world: World) -> None:
    deep = world.base / "deep.toml"
    deep.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    r = world.ovlrun("profile", "check", str(deep))
    assert r.returncode == 125 and "nested too deeply" in r.stderr and "Traceback" not in r.stderr, r
    huge = world.base / "huge.toml"
    with open(huge, "wb") as f:
        f.truncate(512 << 20)  # sparse: costs no disk
    # With the size cap the check needs far less than this; without it, it runs out.
    r = world.ovlrun("profile", "check", str(huge), preexec_fn=lambda: _limited(400))
    assert r.returncode == 125 and "larger than" in r.stderr, r
    assert "Traceback" not in r.stderr and "MemoryError" not in r.stderr


@pytest.mark.parametrize("job_id", ["\u00b2", "\u0661\u0662", "\uff11"])
def test_enter_accepts_only_ascii_digit_job_ids(world: World, job_id: str) -> None:
    r = world.as_sudo("enter", job_id, "--", "true", uid=TEST_UID)
    assert r.returncode == 125 and "invalid job id" in r.stderr and "Traceback" not in r.stderr, r


def test_generated_launcher_keeps_the_stdlib_first(tmp_path: Path) -> None:
    """Issue 9, 5e (fixed under issue 11): the launcher root runs puts the standard library
    before the package directories it adds, so no module there shadows a stdlib one."""
    target = tmp_path / "ovlrun"
    r = subprocess.run([sys.executable, "-m", "ovlrun.cli.install_launcher", "--from-checkout", str(target)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd="/")
    assert r.returncode == 0, r.stderr
    # Run the launcher with its final import replaced by a report of sys.path.
    text = target.read_text()
    assert "from ovlrun.cli.main import main; sys.exit(main())" in text
    target.write_text(text.replace(
        "from ovlrun.cli.main import main; sys.exit(main())",
        "import json; print(json.dumps([sys.path, sys.flags.isolated, sys.flags.no_site, 'site' in sys.modules]))"))
    out = subprocess.run([str(target)], capture_output=True, text=True, check=True, cwd="/",
                         env={**os.environ, "PYTHONPATH": "/nonexistent"}).stdout
    path, isolated, no_site, site_loaded = json.loads(out)
    assert isolated and no_site and not site_loaded and "/nonexistent" not in path
    stdlib = sysconfig.get_paths()["stdlib"]
    assert path.index(stdlib) < path.index(str(REPO))
    assert all(path.index(stdlib) < path.index(p) for p in path if "site-packages" in p)
