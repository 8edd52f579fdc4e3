"""How the benchmarks invoke ovlrun: command line, environment, profiles.

Only the stable CLI contract is used (profiles as TOML, OVLRUN_PROFILE_PATH,
OVLRUN_STORE, `snapshot build`, `snapshot list --json`, `--profile P -- CMD`),
never ovlrun's Python internals, so the benchmark measures what users run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.tree import BENCH_CACHE

REPO = Path(__file__).resolve().parents[1]
PROFILE_DIR = BENCH_CACHE / "profiles"
STORE_DIR = BENCH_CACHE / "store"


def available() -> bool:
    return (REPO / "ovlrun" / "cli.py").exists()


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
