"""README's quick start on fresh Debian 12 (bookworm) and 13 (trixie) roots.

Each run unpacks a pristine minbase root (debootstrapped once, cached in
/var/cache/ovlrun-fresh), copies ``git archive HEAD`` into it (what is committed is what a
user clones) and runs README's quick start in it as root, with Debian's PATH and nothing
else in the environment: ``apt-get install make``, ``make demo``, ``make test`` (the whole
suite inside, with OVLRUN_NESTED=1).  See tests/freshroot.py for the root, its
namespaces and what it shares with the host.

``OVLRUN_FRESH_COMMIT=REV`` tests another commit (e.g. an old main, to see this fail).
Reports with per-stage timings go to /var/tmp/ovlrun-fresh-logs/.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from tests import freshroot
from tests.conftest import REPO, requires_root

COMMIT = os.environ.get("OVLRUN_FRESH_COMMIT", "HEAD")


def quick_start_commands(readme: str) -> list[str]:
    """The command lines of README's Quick start block, comments stripped."""
    section = readme.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "README's Quick start has no ```sh block"
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.split("#", 1)[0].strip()]


def test_readme_quick_start_is_what_the_fresh_roots_run() -> None:
    assert quick_start_commands((REPO / "README.md").read_text()) == [freshroot.PREREQUISITE,
                                                                        *freshroot.QUICK_START]


@requires_root
@pytest.mark.parametrize("suite", sorted(freshroot.SUITES, key=freshroot.SUITES.__getitem__))
def test_quick_start_on_fresh_debian(suite: str) -> None:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the fresh roots get a git archive of HEAD")
    before = freshroot.mounts_under(freshroot.SCRATCH)
    result = freshroot.run(suite, COMMIT)
    report = result.report()
    (freshroot.LOGS / f"{suite}-{result.commit}.report").write_text(report + "\n")
    if not result.ok:
        pytest.fail(f"{report}\n--- last lines of the log:\n{result.tail}", pytrace=False)
    # run() removed the root after checking no process is rooted in it; nothing it
    # mounted reached this namespace.
    assert freshroot.mounts_under(freshroot.SCRATCH) == before


@requires_root
def test_fresh_root_dies_with_its_runner() -> None:
    """A runner killed outright (no cleanup code runs) takes every process of its root
    with it, daemons that left their session included; nothing was ever mounted here; the
    next run removes the scratch root it left."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the fresh roots get a git archive of HEAD")
    before = freshroot.mounts_under(freshroot.SCRATCH)
    daemon = "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo READY; exec sleep 600"
    runner = subprocess.Popen([sys.executable, "-m", "tests.freshroot", "--echo", "--command", daemon, "bookworm"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert runner.stdout is not None
    pid_ns = ""
    try:
        for line in runner.stdout:
            if line.startswith(f"{freshroot.MARK} pidns "):
                pid_ns = line.split()[2]
            if line.strip() == "READY":
                break
        assert pid_ns, "the root's init never said which PID namespace it is"
        scratch = [p for p in freshroot.SCRATCH.glob(f"{freshroot.SCRATCH_PREFIX}bookworm-pid{runner.pid}-*")]
        assert len(scratch) == 1, scratch
        # init, the step's shell (now sleep) and the daemon
        assert len(freshroot.processes_in(pid_ns)) >= 3
    finally:
        runner.kill()
        runner.wait()
    deadline = time.monotonic() + 60
    while freshroot.processes_in(pid_ns) and time.monotonic() < deadline:
        time.sleep(0.05)  # the kernel empties a PID namespace asynchronously
    assert freshroot.processes_in(pid_ns) == []
    assert freshroot.mounts_under(freshroot.SCRATCH) == before
    assert scratch[0].exists()
    freshroot.remove_stale_scratch()
    assert not scratch[0].exists()
