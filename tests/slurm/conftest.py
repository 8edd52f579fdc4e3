"""Fixtures for the Slurm tests: one world per session, and real single-node Slurms.

``slurm`` is parametrised over every instance and mode (tests/slurm/cluster.py): the
host's own Slurm and Debian 13's 24.11 in a debootstrapped root, each in the modes
contain, runinjob and clonens.  Each runs its ci/ setup script when first needed and its
stop script when the next one takes over, so one Slurm runs at a time and none is left
running.  A mode the slurmd does not have is skipped with the setup script's reason;
every test skips when not root; any other failure to start Slurm is an error.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from ..conftest import TEST_UID, TEST_USER
from .cluster import INSTANCES, MODES, TRIXIE, Instance, Slurm, parse_version
from .world import World, make_world, remove_world

PARAMS = [(instance, mode) for instance in INSTANCES for mode in MODES]


@pytest.fixture(scope="session")
def slurm_world(test_user: str) -> Iterator[World]:
    """The session's tree, profiles and snapshots (test_user: skips unless root)."""
    world = make_world()
    yield world
    remove_world(world)


def _trixie_skip_reason() -> str | None:
    if os.environ.get("OVLRUN_NESTED") == "1":
        return ("nested environment (OVLRUN_NESTED=1): the debootstrapped Slurm 24.11 root runs on the "
                "host in the same CI run")
    if shutil.which("slurmd"):
        r = subprocess.run(["slurmd", "-V"], capture_output=True, text=True)
        if r.returncode == 0 and parse_version(r.stdout)[:2] == (24, 11):
            return f"the host's own Slurm is {r.stdout.split()[-1]}: the host instance runs these tests on 24.11"
    return None


def _ensure_user_in_root(instance: Instance) -> None:
    """The test user in the instance's root too (slurmd resolves it there; files use the uid)."""
    assert instance.root is not None
    root = str(instance.root)
    if subprocess.run(["chroot", root, "getent", "passwd", TEST_USER], capture_output=True).returncode:
        subprocess.run(["chroot", root, "useradd", "--create-home", "--uid", str(TEST_UID), "--shell", "/bin/bash",
                        TEST_USER], check=True)


@pytest.fixture(scope="session", params=PARAMS, ids=[f"{i}-{m}" for i, m in PARAMS])
def slurm(request: pytest.FixtureRequest, slurm_world: World) -> Iterator[Slurm]:
    name, mode = request.param
    instance = INSTANCES[name]
    if instance is TRIXIE and (reason := _trixie_skip_reason()):
        pytest.skip(reason)
    hook_env = instance.host_path(instance.state / "hook.env")
    try:
        instance.start(mode)  # may skip (this slurmd lacks the mode), or fail half-started
        if instance.root is not None:
            _ensure_user_in_root(instance)
        log = slurm_world.base / f"hooks-{name}.log"
        # The generated hooks source this: it points them at the world's profiles and store.
        hook_env.write_text("".join(f"{k}={shlex.quote(v)}; export {k}\n"
                                    for k, v in slurm_world.hook_env(log).items()))
        at_start = Slurm(instance, mode, instance.version(), slurm_world, log, [])
        at_start.overlays_at_start = at_start.overlays_in_slurmd_ns()
        if instance.nsdir is not None:
            assert at_start.overlays_at_start == [], "the root's namespace is ours alone: no overlay before a job"
        yield at_start
    finally:
        instance.stop_all()
        hook_env.unlink(missing_ok=True)
