"""`make install` and `make uninstall` for real, into a private prefix: a root-owned venv of
Debian's python3 with ovlrun from a wheel, the isolated launcher, the sudoers drop-in."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, requires_root

pytestmark = requires_root


@pytest.fixture(scope="module")
def installed() -> Iterator[dict[str, Path]]:
    if not os.path.exists("/usr/bin/python3") or shutil.which("visudo") is None:
        pytest.skip("needs Debian's /usr/bin/python3 and sudo's visudo")
    base = Path(tempfile.mkdtemp(prefix="ovlrun-install-", dir="/var/tmp"))
    base.chmod(0o755)
    dirs = {"PREFIX": base / "prefix", "SYSCONFDIR": base / "etc", "SUDOERS_DIR": base / "etc" / "sudoers.d"}
    make = ["make", "-C", str(REPO), *(f"{k}={v}" for k, v in dirs.items())]
    # The PATH a fresh Debian root shell has: no pyenv, no other Python first.
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8"}
    r = subprocess.run([*make, "install"], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    yield {**dirs, "make": base, "env": base}
    r = subprocess.run([*make, "uninstall"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (dirs["PREFIX"] / "sbin" / "ovlrun").exists() and not (dirs["PREFIX"] / "lib" / "ovlrun").exists()
    assert not (dirs["SUDOERS_DIR"] / "ovlrun").exists() and (dirs["SYSCONFDIR"] / "ovlrun" / "profiles").is_dir()
    shutil.rmtree(base, ignore_errors=True)


def test_launcher_runs_only_the_installed_package(installed: dict[str, Path]) -> None:
    prefix = installed["PREFIX"]
    launcher = prefix / "sbin" / "ovlrun"
    text = launcher.read_text()
    venv = prefix / "lib" / "ovlrun" / "venv"
    assert f"{venv}/bin/python" in text and " -I -S " in text
    assert str(REPO) not in text, "the source checkout must not be on the root launcher's sys.path"
    # The package the venv imports is its own copy, installed from a wheel.
    where = subprocess.run([str(venv / "bin" / "python"), "-I", "-c", "import ovlrun; print(ovlrun.__file__)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(f"{venv}/lib/") and "site-packages" in where
    # -I: PYTHONPATH and the working directory cannot put other code first.
    evil = installed["make"] / "evil"
    (evil / "ovlrun").mkdir(parents=True, exist_ok=True)
    (evil / "ovlrun" / "__init__.py").write_text("raise SystemExit('evil code ran')\n")
    r = subprocess.run([str(launcher), "--version"], env={"PYTHONPATH": str(evil), "PATH": "/usr/bin:/bin"},
                       cwd=evil, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("ovlrun "), r.stderr
    user_command = prefix / "bin" / "ovlrun"
    assert os.path.realpath(user_command) == str(launcher)


def test_every_subcommand_help_from_the_installed_venv(installed: dict[str, Path]) -> None:
    launcher = installed["PREFIX"] / "sbin" / "ovlrun"
    for argv in (["--help"], ["snapshot", "--help"], ["profile", "check", "--help"], ["doctor", "--help"],
                 ["status", "--help"], ["slurm", "--help"], ["enter", "--help"]):
        r = subprocess.run([str(launcher), *argv], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
        assert r.returncode == 0 and "Traceback" not in r.stderr, (argv, r.stderr)


def test_sudoers_drop_in_is_0440_and_valid(installed: dict[str, Path]) -> None:
    rule = installed["SUDOERS_DIR"] / "ovlrun"
    st = rule.stat()
    assert stat.S_IMODE(st.st_mode) == 0o440 and st.st_uid == 0
    assert str(installed["PREFIX"] / "sbin" / "ovlrun") in rule.read_text()
    assert subprocess.run(["visudo", "-cqf", str(rule)]).returncode == 0
