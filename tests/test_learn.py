"""``ovlrun learn`` on real workloads with real tracers: what it proposes, what a profile
built from the proposal leaves reaching the tree, and bpftrace against strace."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TEST_UID, TEST_USER, World, requires_overlay, requires_root
from tests.learn_support import LEARN, events, learn, report, require_bpftrace, rows
from tests.learn_workloads import build

WORKLOADS = ("libsearch", "imports", "pathsearch")
pytestmark = [requires_root, requires_overlay]


def _out(world: World) -> Path:
    out = world.base / "out"
    out.mkdir(exist_ok=True)
    os.chown(out, TEST_UID, TEST_UID)  # a user's learn writes its report here too
    return out


def _run_as(uid: int) -> dict[str, object]:
    return {} if uid == 0 else {"user": uid, "group": uid, "extra_groups": []}


@pytest.mark.parametrize("name", WORKLOADS)
@pytest.mark.parametrize("tracer", ["strace", "bpftrace"])
def test_proposal_names_every_release_directory_with_failed_lookups(world: World, test_user: str, tracer: str,
                                                                     name: str) -> None:
    """strace runs as an unprivileged user (its use case), bpftrace as root; the proposal
    is exactly the release directories with ENOENT lookups, and profile check accepts it."""
    if tracer == "bpftrace":
        require_bpftrace(world)
    w = build(name, world.sw)
    out = _out(world)
    uid = 0 if tracer == "bpftrace" else TEST_UID
    r = learn(world, "--tracer", tracer, "--tree", str(world.sw), "--json", "--report", str(out / "r.json"),
              "--output", str(out / "p.toml"), "--", *w.command, env=w.env, cwd=out, **_run_as(uid))
    assert r.returncode == 0, r.stderr
    data = report(out / "r.json")
    assert data["tracer"].startswith(tracer) and data["complete"], data["notes"]
    failing = {rel for rel, row in rows(data).items() if row["enoent"]}
    assert failing and failing <= set(w.releases)
    assert {p["pattern"] for p in data["proposal"]["patterns"]} == failing
    check = world.ovlrun("profile", "check", str(out / "p.toml"))
    assert check.returncode == 0, check.stderr
    assert all(str(world.sw / rel) in check.stdout for rel in failing)


@pytest.mark.parametrize("name", WORKLOADS)
def test_with_the_proposed_profile_no_failed_lookup_reaches_the_tree(world: World, test_user: str, name: str) -> None:
    """Learn (bpftrace), build the proposal into a private store, then learn again inside
    its job view two ways: learn driving the launch as root (bpftrace, job as the test
    user), and the user's way, learn with strace inside ``ovlrun --profile --user``.  A
    profile that localises something else leaves the failures reaching the tree (so the
    residual can fail)."""
    require_bpftrace(world)
    w = build(name, world.sw)
    out = _out(world)
    learned = world.profiles / "learned.toml"
    r = learn(world, "--tracer", "bpftrace", "--tree", str(world.sw), "--output", str(learned), "--",
              *w.command, env=w.env, cwd=out)
    assert r.returncode == 0, r.stderr
    world.build("learned")
    world.simple_profile("other", ("app/1.0",))
    world.build("other")

    def residual(profile: str, report_file: Path) -> dict[str, int]:
        r = learn(world, "--tracer", "bpftrace", "--profile", profile, "--user", TEST_USER, "--json", "--report",
                  str(report_file), "--", *w.command, env=w.env, cwd=out)
        assert r.returncode == 0, r.stderr
        data = report(report_file)
        assert data["localised"], "the job view has no localised paths"
        return data["residual"]  # type: ignore[no-any-return]

    assert residual("other", out / "other.json")["remote_enoent"] > 0
    root_view = residual("learned", out / "learned.json")
    assert root_view["remote_enoent"] == 0
    assert root_view["local"] > 0
    inside = world.ovlrun("--profile", "learned", "--user", TEST_USER, "--", *LEARN, "--tracer", "strace", "--tree",
                          str(world.sw), "--json", "--report", str(out / "inside.json"), "--", *w.command,
                          env=w.env, cwd=out, timeout=300)
    assert inside.returncode == 0, inside.stderr
    user_view = report(out / "inside.json")
    assert user_view["tracer"] == "strace"
    assert user_view["residual"]["remote_enoent"] == 0
    assert user_view["residual"]["local"] == root_view["local"]


def test_bpftrace_and_strace_see_the_same_lookups_event_for_event(world: World) -> None:
    """The same job under both tracers: the same lookups (syscall, path, result), one for
    one; and the tree's failed opens agree with a plain strace run's own output."""
    require_bpftrace(world)
    w = build("libsearch", world.sw)
    out = _out(world)
    for tracer in ("bpftrace", "strace"):
        r = learn(world, "--tracer", tracer, "--tree", str(world.sw), "--events", str(out / f"{tracer}.events"),
                  "--json", "--report", str(out / f"{tracer}.json"), "--", *w.command, env=w.env, cwd=out)
        assert r.returncode == 0, r.stderr
    seen = events(out / "bpftrace.events")
    assert len(seen) > 1000
    assert seen == events(out / "strace.events")
    assert report(out / "bpftrace.json")["rows"] == report(out / "strace.json")["rows"]
    plain = subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat", "-e", "signal=none", "-o",
                            str(out / "plain"), "--", *w.command], env=w.env, cwd=out, capture_output=True)
    assert plain.returncode == 0
    pattern = re.compile(r'openat\(AT_FDCWD, "' + re.escape(str(world.sw)) + r'/[^"]*", [^)]*\) += -1 ENOENT')
    failed_opens = sum(bool(pattern.search(line)) for line in (out / "plain").read_text().splitlines())
    assert failed_opens > 100
    assert failed_opens == sum(1 for s, p, res in seen if s == "openat" and p.startswith(f"{world.sw}/")
                               and res == "ENOENT")


def test_bpftrace_finds_the_job_from_inside_a_pid_namespace(world: World) -> None:
    """learn run inside a PID namespace (a container, a fresh root, a job step with its
    own namespace) knows its job by a pid bpftrace does not use: bpftrace's ``pid`` and
    ``tid`` are the host's.  The job must still be found and its lookups counted."""
    require_bpftrace(world)
    w = build("libsearch", world.sw)
    out = _out(world)
    full = {"OVLRUN_STORE": str(world.store), "OVLRUN_PROFILE_PATH": str(world.profiles), "LC_ALL": "C.UTF-8",
            "PATH": "/usr/bin:/bin", **w.env}
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", *LEARN, "--tracer", "bpftrace", "--tree",
                        str(world.sw), "--json", "--report", str(out / "r.json"), "--", *w.command],
                       env=full, cwd=out, text=True, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = report(out / "r.json")
    failing = {rel for rel, row in rows(data).items() if row["enoent"]}
    assert failing and failing <= set(w.releases), data
