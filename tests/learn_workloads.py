"""Real workloads on a shared tree, for learn's tests and benchmarks.

- ``libsearch``: a program linked (gcc) against ``libneedle.so``, which only the last of
  10 release directories on LD_LIBRARY_PATH has; the real ld.so searches them all (and
  their glibc-hwcaps subdirectories), for libneedle and for libc itself.
- ``imports``: a Python import storm over 10 releases on PYTHONPATH (modules found in
  the last releases, every interpreter start probing all of them).
- ``pathsearch``: a shell finding commands through a PATH of 50 release directories.

Each is ``sw/NAME<i>/1.0/...``: the release directories are ``NAME<i>/1.0``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

PYTHON = "/usr/bin/python3"


class Workload(NamedTuple):
    name: str
    command: list[str]
    env: dict[str, str]
    releases: list[str]  # the release directories it searches, relative to the tree root


def base_env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/"}


def libsearch(sw: Path, dirs: int = 10, runs: int = 5) -> Workload:
    if shutil.which("gcc") is None:
        raise RuntimeError("gcc is needed to build the library search workload")
    releases = [f"lib{i}/1.0" for i in range(dirs)]
    for rel in releases:
        (sw / rel / "lib").mkdir(parents=True, exist_ok=True)
    src = sw / "needle" / "1.0" / "src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "needle.c").write_text("int needle(void) { return 42; }\n")
    (src / "main.c").write_text("#include <stdio.h>\nint needle(void);\n"
                                "int main(void) { printf(\"%d\\n\", needle()); return 0; }\n")
    last = sw / releases[-1] / "lib"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(last / "libneedle.so"), str(src / "needle.c")], check=True)
    (sw / "needle" / "1.0" / "bin").mkdir(exist_ok=True)
    exe = sw / "needle" / "1.0" / "bin" / "needle"
    subprocess.run(["gcc", "-o", str(exe), str(src / "main.c"), f"-L{last}", "-lneedle"], check=True)
    env = {**base_env(), "LD_LIBRARY_PATH": ":".join(str(sw / r / "lib") for r in releases)}
    script = " ; ".join([str(exe)] * runs) + " >/dev/null"
    return Workload("libsearch", ["/bin/sh", "-c", script], env, releases)


def imports(sw: Path, releases_n: int = 10, modules: int = 8) -> Workload:
    releases = [f"py{i}/1.0" for i in range(releases_n)]
    names = []
    for i, rel in enumerate(releases):
        d = sw / rel / "lib" / "python"
        (d / f"pkg{i}").mkdir(parents=True, exist_ok=True)
        (d / f"pkg{i}" / "__init__.py").write_text(f"from . import sub{i}\n")
        (d / f"pkg{i}" / f"sub{i}.py").write_text("X = 1\n")
        for j in range(modules):
            (d / f"m{i}_{j}.py").write_text(f"VALUE = {i * 100 + j}\n")
        if i >= releases_n // 2:
            names += [f"m{i}_{j}" for j in range(modules)] + [f"pkg{i}"]
    env = {**base_env(), "PYTHONPATH": ":".join(str(sw / r / "lib" / "python") for r in releases),
           "PYTHONDONTWRITEBYTECODE": "1"}
    code = "import " + ", ".join(names) + "; import json, email.mime.text, http.client"
    return Workload("imports", [PYTHON, "-c", code], env, releases)


def pathsearch(sw: Path, entries: int = 50) -> Workload:
    releases = [f"tool{i}/1.0" for i in range(entries)]
    for rel in releases:
        (sw / rel / "bin").mkdir(parents=True, exist_ok=True)
    for i, name in ((entries - 1, "hello"), (entries // 2, "hello2")):
        tool = sw / releases[i] / "bin" / name
        tool.write_text("#!/bin/sh\nexit 0\n")
        tool.chmod(0o755)
    env = {**base_env(), "PATH": ":".join(str(sw / r / "bin") for r in releases) + ":/usr/bin:/bin"}
    script = "hello; hello2; hash -r; hello; command -v nothere >/dev/null; true"
    return Workload("pathsearch", ["/bin/sh", "-c", script], env, releases)


BUILDERS = {"libsearch": libsearch, "imports": imports, "pathsearch": pathsearch}
WORKLOADS = tuple(BUILDERS)


def build(name: str, sw: Path) -> Workload:
    workload = BUILDERS[name](sw)
    for dirpath, dirnames, filenames in os.walk(sw):
        for n in dirnames:
            os.chmod(os.path.join(dirpath, n), 0o755)
        for n in filenames:
            p = os.path.join(dirpath, n)
            os.chmod(p, os.stat(p).st_mode | 0o444)
    return workload
