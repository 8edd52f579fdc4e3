"""The suite's launch subset on Debian's own kernels, each booted under qemu (tests/vm).

Per kernel (6.1 = Debian 12 bookworm, 6.12 = Debian 13 trixie), one guest boot runs,
on this machine's root filesystem (9p) with the store on a guest tmpfs:

1. ``tests/vm/guest_smoke.py --fresh-boot``: the first launch after boot, with overlay.ko
   not loaded, then snapshot build, launch, data read, ENOENT, opacity, read-only, exit
   codes, doctor, nothing left mounted;
2. ``tests/vm/features.py``: which mount methods work (really mounted, data read);
3. pytest on tests/test_mount.py (every method the kernel has, odd and long layer paths)
   and the launch tests of tests/test_launch.py that need no extra user;
4. ``tests/vm/guest_nfs.py``: the guest's own kernel NFS server exporting a tmpfs tree,
   mounted over loopback as NFSv4.2 and NFSv3 (default options and
   ``lookupcache=positive``), and ovlrun on it: build, verify, publish/fetch, job views,
   lookups counted from mountstats, changes on the server (test_nfs).

``make test`` runs them (``OVLRUN_VM_TESTS=0`` skips them; ``make test-fast`` deselects
them with the other "environment" tests, and nested in the fresh-Debian test they skip:
tests/conftest.py): the first run downloads two kernel packages, then both boot at once
under TCG, ~9 minutes in all on 2 cores (the NFS part ~4 of them).  ``make vm-test`` runs
only these.  Needs root, qemu-system-x86, busybox-static, cpio, kmod (depmod, modprobe)
and, for the NFS part, nfs-kernel-server (its userland runs in the guest from the host's
root).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from tests.conftest import REPO

TYPE_CHECKING = False
if TYPE_CHECKING:
    from tests.vm.harness import Result
    from tests.vm.kernels import Kernel

ENABLED = os.environ.get("OVLRUN_VM_TESTS") == "1"
pytestmark = pytest.mark.skipif(not ENABLED or os.geteuid() != 0,
                                reason="VM kernel tests: set OVLRUN_VM_TESTS=1 (root, qemu; see make vm-test)")

LAUNCH_TESTS = " or ".join((
    "test_reads_data_through_localised_view", "test_data_matches_source_bytes", "test_absent_name_is_enoent",
    "test_snapshot_hides_later_additions_but_new_releases_appear", "test_writes_fail_with_erofs",
    "test_exit_codes", "test_signal_status_like_bare_command", "test_cwd_inside_localised_path",
    "test_missing_snapshot_warns_or_fails_strict", "test_host_mount_table_unchanged_even_after_sigkill",
    "test_status_inside_job", "test_doctor"))


def guest_script(source: str = str(REPO), pytest_subset: bool = True, nfs: bool = True) -> str:
    """The sh script the guest runs; its exit status is the test's verdict."""
    py = shlex.quote(sys.executable)
    lines = [
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8",
        "export PYTHONDONTWRITEBYTECODE=1",  # the guest's root is read-only
        f"cd {shlex.quote(str(REPO))}",
        "status=0",
        # First: nothing may load overlay.ko before the smoke test's first launch.
        f"{py} -m tests.vm.guest_smoke --fresh-boot --source {shlex.quote(source)} || status=1",
        f"PYTHONPATH={shlex.quote(source)} {py} -m tests.vm.features | tr -d '\\n' | sed 's/^/FEATURES /'; echo",
    ]
    if pytest_subset:
        lines.append(f"{py} -m pytest -q -p no:cacheprovider -o addopts= tests/test_mount.py tests/test_launch.py "
                     f"-k {shlex.quote(LAUNCH_TESTS + ' or test_mount')} || status=1")
    if nfs:  # its verdict is test_nfs's (the NFS lines), not the exit status
        lines += ["start=$(date +%s)",
                  f"{py} -m tests.vm.guest_nfs --source {shlex.quote(source)}",
                  'echo "NFS-SECONDS $(( $(date +%s) - start ))"']
    lines.append("exit $status")
    return "\n".join(lines) + "\n"


def _report(output: str, tag: str) -> dict[str, object]:
    for line in output.splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])  # type: ignore[no-any-return]
    return {}


SUITES = ("bookworm", "trixie")


@pytest.fixture(scope="module")
def guests() -> Iterator[dict[str, tuple[Kernel, Future[Result]]]]:
    """Both guests boot at once: each runs mostly one Python process at a time (qemu
    used ~0.9 of a core when they ran one after the other), so on 2 cores the pair takes
    about as long as the slower one.  The kernels are fetched first, one by one (apt)."""
    from tests.vm import harness, kernels

    if not harness.qemu_available():
        pytest.fail("qemu-system-x86_64 or /bin/busybox (busybox-static) missing")
    fetched = {suite: kernels.fetch(suite) for suite in SUITES}
    with ThreadPoolExecutor(max_workers=len(SUITES)) as pool:
        # 1500 s per guest, concurrently: normally 150-280 s on a loaded 2-core machine,
        # plus 300-450 s for the NFS part.
        yield {suite: (k, pool.submit(harness.run, k, guest_script(), 1500)) for suite, k in fetched.items()}


@pytest.mark.parametrize("suite", SUITES)
def test_kernel(guests: dict[str, tuple[Kernel, Future[Result]]], suite: str) -> None:
    kernel, future = guests[suite]
    result = future.result()
    smoke, features = _report(result.output, "SMOKE"), _report(result.output, "FEATURES")
    print(f"\n{suite} {kernel.release}: {result.seconds:.1f}s, status {result.status}")
    print(json.dumps({"smoke": smoke, "features": features}, indent=1))
    print("\n".join(line for line in result.output.splitlines()
                    if " passed" in line or " failed" in line or line.startswith(("FAILED", "SKIPPED", "ERROR"))))
    assert result.status is not None, "the guest never reported (boot failure or timeout):\n" + result.console[-4000:]
    assert result.status == 0, result.output[-6000:]
    assert smoke.get("failed") == [], smoke


@pytest.mark.parametrize("suite", SUITES)
def test_nfs(guests: dict[str, tuple[Kernel, Future[Result]]], suite: str) -> None:
    """ovlrun on the guest's kernel NFS, per configuration (tests/vm/guest_nfs.py)."""
    from tests.vm.guest_nfs import CONFIGS, tag_of

    kernel, future = guests[suite]
    result = future.result()
    reports = {r["config"]: r for r in _reports(result.output, "NFS")}
    seconds = next((line.split()[1] for line in result.output.splitlines() if line.startswith("NFS-SECONDS ")), "?")
    print(f"\n{suite} {kernel.release}: NFS part {seconds}s")
    print(json.dumps(reports, indent=1))
    assert result.status is not None, "the guest never reported (boot failure or timeout):\n" + result.console[-4000:]
    missing = [tag_of(*c) for c in CONFIGS if tag_of(*c) not in reports]
    assert not missing, f"no report for {missing}:\n" + result.output[-6000:]
    failed = {tag: r["failed"] for tag, r in reports.items() if r["failed"]}
    assert not failed, json.dumps({tag: {k: v for k, v in reports[tag].items() if k in failed[tag]}
                                   for tag in failed}, indent=1)


def _reports(output: str, tag: str) -> list[dict[str, object]]:
    return [json.loads(line[len(tag) + 1:]) for line in output.splitlines() if line.startswith(tag + " ")]
