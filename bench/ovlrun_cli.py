"""How the benchmarks invoke ovlrun: command line, environment, profiles.

Only the stable CLI contract is used (profiles as TOML, OVLRUN_PROFILE_PATH,
OVLRUN_STORE, `snapshot build`, `snapshot list --json`, `--profile P -- CMD`),
never ovlrun's Python internals, so the benchmark measures what users run.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from bench.tree import BENCH_CACHE

REPO = Path(__file__).resolve().parents[1]
PROFILE_DIR = BENCH_CACHE / "profiles"
STORE_DIR = BENCH_CACHE / "store"
# The "before" side of side-by-side comparisons: a checkout of the commit before
# snapshot images (directory snapshots), run from its own source with this venv.
BASE_REPO = Path(os.environ.get("OVLRUN_BENCH_BASE", "/work/wt/base"))
COMPAT = Path(__file__).resolve().parent / "compat"


def available() -> bool:
    return (REPO / "ovlrun" / "__main__.py").exists()


@dataclass(frozen=True)
class Side:
    """One ovlrun checkout, run from its source tree, with its own store."""

    name: str
    repo: Path
    store: Path

    @property
    def path(self) -> list[str]:
        # The base commit imports `click`, which this venv's typer vendors: a shim.
        return [str(self.repo)] + ([str(COMPAT)] if self.repo != REPO else [])

    def env(self) -> dict[str, str]:
        e = env(self.store)
        e["PYTHONPATH"] = ":".join(self.path)
        if self.repo != REPO:  # leave the base checkout as it is (no __pycache__)
            e["PYTHONDONTWRITEBYTECODE"] = "1"
        return e

    def command(self) -> list[str]:
        # -P: `-m` would otherwise put the current directory first on sys.path, and a
        # caller whose cwd is this checkout would run this checkout's ovlrun on either side.
        return [sys.executable, "-P", "-m", "ovlrun"]

    def prefix(self, profile: str) -> list[str]:
        return [*self.command(), "--profile", profile, "--"]

    def snapshot_build(self, profile: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.command(), "snapshot", "build", "--profile", profile],
                              env=self.env(), cwd="/", check=True, capture_output=True, text=True)

    def write_launcher(self, target: Path) -> Path:
        """An isolated launcher (python -I -S, as `make install` writes) for this checkout.

        Both sides get the same kind of script, so a launch comparison measures ovlrun,
        not how it was installed.  -I ignores PYTHON* variables; OVLRUN_STORE and
        OVLRUN_PROFILE_PATH are honoured for root callers that are not under sudo.
        """
        paths = [*self.path, sysconfig.get_paths()["purelib"]]
        module = "ovlrun.cli.main" if (self.repo / "ovlrun" / "cli" / "main.py").exists() else "ovlrun.cli"
        code = f"import sys; sys.path[:0] = {paths!r}; from {module} import main; sys.exit(main())"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -I -S -c {shlex.quote(code)} \"$@\"\n")
        target.chmod(0o755)
        return target


IMAGE_SIDE = Side("image", REPO, BENCH_CACHE / "store-image")
DIR_SIDE = Side("directory", BASE_REPO, BENCH_CACHE / "store-dir")


def command() -> list[str]:
    """The installed console script if present, else `python3 -m ovlrun`.

    The script next to this interpreter is preferred over PATH: under pyenv,
    PATH's `ovlrun` is a bash shim that re-resolves the version on every call
    (tens of ms) and would be charged to ovlrun's launch time.
    """
    beside = Path(sys.executable).parent / "ovlrun"
    if beside.exists():
        return [str(beside)]
    exe = shutil.which("ovlrun")
    if exe:
        return [exe]
    return [sys.executable, "-m", "ovlrun"]


def env(store: Path = STORE_DIR) -> dict[str, str]:
    e = dict(os.environ)
    e["OVLRUN_PROFILE_PATH"] = str(PROFILE_DIR)
    e["OVLRUN_STORE"] = str(store)
    # `python3 -m ovlrun` needs the repo on sys.path when not pip-installed.
    e["PYTHONPATH"] = str(REPO)
    return e


def write_profile(name: str, root: Path, patterns: list[str], description: str) -> Path:
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    lines = [f"description = {json.dumps(description)}", "", "[[tree]]",
             f"root = {json.dumps(str(root))}",
             "localise = [" + ", ".join(json.dumps(p) for p in patterns) + "]", ""]
    path = PROFILE_DIR / f"{name}.toml"
    path.write_text("\n".join(lines))
    return path


def prefix(profile: str) -> list[str]:
    return [*command(), "--profile", profile, "--"]


def snapshot_build(profile: str, store: Path = STORE_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*command(), "snapshot", "build", "--profile", profile],
                          env=env(store), cwd=REPO, check=True, capture_output=True, text=True)


def snapshot_list(store: Path = STORE_DIR) -> list[dict[str, object]]:
    out = subprocess.run([*command(), "snapshot", "list", "--json"], env=env(store), cwd=REPO,
                         check=True, capture_output=True, text=True).stdout
    data = json.loads(out)
    return data if isinstance(data, list) else data.get("snapshots", [])
