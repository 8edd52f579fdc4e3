"""Per-job statistics (issue 16, item 3): what every launch and Slurm job was given, what
``learn --profile`` saw the job save, the bounded history of ended jobs, ``ovlrun jobs``,
and ``learn``/``jobs`` as entries of the one command table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ovlrun.jobs import history
from ovlrun.jobs.records import JobRecord
from ovlrun.jobs.stats import given, snapshot_time
from ovlrun.linux.kernel import probe
from tests.attacks_support import slurm_env, su
from tests.conftest import REPO, TEST_UID, TEST_USER, World, requires_overlay, requires_root, snapshot_dir
from tests.learn_support import learn

NODE = "attacknode"  # slurm_env's SLURMD_NODENAME


def _snapshot_name(world: World, path: Path) -> str:
    """"KEY/ID" of the snapshot serving ``path``."""
    directory = snapshot_dir(world, path)
    return f"{directory.parent.name}/{directory.name}"


# -- the command table ---------------------------------------------------------------------

def test_learn_and_jobs_are_commands_with_one_line_usage_errors(world: World) -> None:
    r = world.ovlrun("--help")
    assert r.returncode == 0 and "learn" in r.stdout and "jobs" in r.stdout, r.stdout
    r = world.ovlrun("learn", "--help")
    assert r.returncode == 0 and "--profile" in r.stdout and "--tracer" in r.stdout, r
    for argv, status in ((["learn", "--no-such-option", "--", "true"], 125),  # a wrapper, as env(1)
                         (["learn", "propose", "--no-such-option"], 2),
                         (["learn", "watch", "--interval", "soon"], 2),
                         (["jobs", "--no-such-option"], 2),
                         (["jobs", "--limit", "0"], 2)):
        r = world.ovlrun(*argv)
        assert r.returncode == status, (argv, r)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"ovlrun {argv[0]}"), (argv, r.stderr)
        assert "Traceback" not in r.stderr and r.stdout == ""


@requires_root
@pytest.mark.parametrize(("argv", "why"), [
    (["learn", "--", "true"], "run it without sudo"),
    (["learn", "--profile", "p", "--", "true"], "run it without sudo"),
    (["learn", "watch"], "run it without sudo"),
    (["jobs"], "for the administrator"),
])
def test_learn_and_jobs_are_refused_through_sudo(world: World, argv: list[str], why: str) -> None:
    world.simple_profile()
    r = world.as_sudo(*argv, uid=TEST_UID)
    assert r.returncode == 125 and why in r.stderr and "through sudo" in r.stderr, r
    assert len(r.stderr.splitlines()) == 1 and r.stdout == ""
    assert not world.rundir.exists()


@requires_root
def test_jobs_as_a_user_is_one_line_and_125(world: World, test_user: str) -> None:
    r = su(TEST_USER, f"cd / && PYTHONPATH={REPO} {sys.executable} -I -m ovlrun jobs 2>&1; echo rc=$?")
    lines = r.stdout.splitlines()
    assert lines[-1] == "rc=125" and len(lines) == 2, r.stdout
    assert lines[0] == "ovlrun: ovlrun jobs must run as root (job records are root's alone)", r.stdout


# -- given: every launch -------------------------------------------------------------------

@requires_overlay
def test_every_launch_records_what_the_job_was_given(world: World, test_user: str) -> None:
    """The record names the localised path, its snapshot and age, and the path the
    profile names without a built snapshot; status inside the job shows the same from its
    mount table."""
    built = time.time()
    world.simple_profile()
    world.build()
    world.simple_profile(patterns=("app/1.0", "app/1.1"))  # app/1.1 has no snapshot
    script = f'echo "$OVLRUN_JOB_ID"; {sys.executable} -m ovlrun status --json'
    r = world.ovlrun("--profile", "p", "--user", TEST_USER, "--", "/bin/sh", "-c", script, cwd="/")
    assert r.returncode == 0, r.stderr
    job_id, status_json = r.stdout.split("\n", 1)
    record = json.loads((world.rundir / f"{job_id}.json").read_text())
    snapshot = _snapshot_name(world, world.sw / "app" / "1.0")
    data_only = probe().data_only_layers
    got = record["stats"]["given"]
    age = got["localised"][0]["age"]
    assert isinstance(age, int) and 0 <= age <= time.time() - built + 1, got
    assert got == {"localised": [{"path": str(world.sw / "app" / "1.0"), "snapshot": snapshot, "age": age}],
                   "unlocalised": [str(world.sw / "app" / "1.1")], "data_only": data_only, "oldest_age": age,
                   "method": probe().method}
    shown = json.loads(status_json)["stats"]["given"]
    assert shown["localised"][0]["path"] == str(world.sw / "app" / "1.0")
    assert shown["localised"][0]["snapshot"] == snapshot
    assert shown["data_only"] == data_only and "unlocalised" not in shown
    assert 0 <= shown["oldest_age"] <= time.time() - built + 1


def test_snapshot_age_comes_from_the_id_alone() -> None:
    # The launch reads no manifest: the ID's build time is the snapshot's age.
    assert snapshot_time("20250107T101201Z-0123abcd") == 1736244721.0
    assert snapshot_time("20240229T000000Z-x") == 1709164800.0  # a leap day
    for bad in ("", "2025-01-07T10:12:01Z", "20251307T101201Z-x", "2025010xT101201Z-x", "20250107 101201Z-x"):
        assert snapshot_time(bad) is None, bad
    g = given([("/sw/a/1", "k/20250107T101201Z-x"), ("/sw/b/1", "k/odd-id")], ["/sw/c/1"], True, 1736244721.0 + 90)
    assert g["oldest_age"] == 90
    assert [p["age"] for p in g["localised"]] == [90, None]  # type: ignore[attr-defined]


# -- learned: learn --profile, and ovlrun jobs ---------------------------------------------

@requires_root
@requires_overlay
def test_learn_profile_records_what_the_job_saved_and_jobs_lists_it(world: World, test_user: str) -> None:
    """learn --profile runs the job as a launch: its record ends in the history with
    learn's figures; a failed lookup in the localised release is answered locally, one
    in the unlocalised release reaches the tree."""
    world.simple_profile()
    world.build()
    out = world.base / "out"
    out.mkdir()
    out.chmod(0o777)
    script = (f"ls {world.sw}/app/1.0/no-such-file; ls {world.sw}/app/1.1/no-such-file; "
              f"cat {world.sw}/app/1.0/README {world.sw}/app/1.1/README; exit 3")
    r = learn(world, "--tracer", "strace", "--profile", "p", "--user", TEST_USER, "--tree", str(world.sw),
              "--json", "--report", str(out / "report.json"), "--", "/bin/sh", "-c", script, cwd="/")
    assert r.returncode == 3, r.stderr  # CMD's status is learn's
    report = json.loads((out / "report.json").read_text())
    job_id = report["job_id"]
    assert job_id and not (world.rundir / f"{job_id}.json").exists()
    record = json.loads((world.rundir / ".ended" / f"{job_id}.json").read_text())
    assert record["ended"] >= record["started"] > 0
    assert record["stats"]["given"]["localised"][0]["path"] == str(world.sw / "app" / "1.0")
    learned = record["stats"]["learned"]
    assert learned["tracer"] == "strace" and learned["complete"] is True, learned
    assert learned["local"] > 0 and learned["remote"] > 0, learned
    assert learned["remote_enoent"] >= 1 and learned["enoent"] > learned["remote_enoent"], learned
    assert learned["local"] + learned["remote"] == learned["lookups"], learned
    assert learned["remote_enoent"] == report["residual"]["remote_enoent"]

    listed = world.ovlrun("jobs", "--json")
    assert listed.returncode == 0, listed.stderr
    mine = [j for j in json.loads(listed.stdout) if j["job_id"] == job_id]
    assert len(mine) == 1 and mine[0]["status"] == "ended" and mine[0]["stats"]["learned"] == learned
    table = world.ovlrun("jobs")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:3] == ["JOB", "USER", "PROFILE"]
    row = next(line.split() for line in rows if line.split()[0] == job_id)
    share = f"{100 * learned['local'] / learned['lookups']:.0f}%"
    assert row[1:3] == [TEST_USER, "p"] and share in row and row[-2] == str(learned["remote_enoent"]), row


@requires_root
def test_jobs_on_a_node_without_records(world: World) -> None:
    r = world.ovlrun("jobs")
    assert r.returncode == 0 and "(no job records on this node)" in r.stdout, r
    assert json.loads(world.ovlrun("jobs", "--json").stdout) == []


# -- the Slurm Epilog's history ------------------------------------------------------------

@requires_root
@requires_overlay
def test_epilog_keeps_the_record_with_what_the_job_was_given(world: World, test_user: str) -> None:
    world.simple_profile()
    world.build()
    job_id = str(960_000_000 + os.getpid() % 1_000_000)
    env = slurm_env(world, job_id)
    hook = [sys.executable, "-m", "ovlrun", "slurm"]
    r = subprocess.run([*hook, "prolog"], env=env, capture_output=True, text=True, timeout=120, cwd="/")
    try:
        assert r.returncode == 0 and "1 localised path(s)" in r.stderr, r.stderr
        running = json.loads((world.rundir / NODE / f"{job_id}.json").read_text())
        assert running["stats"]["given"]["localised"][0]["path"] == str(world.sw / "app" / "1.0")
    finally:
        r = subprocess.run([*hook, "epilog"], env=env, capture_output=True, text=True, timeout=120, cwd="/")
        assert r.returncode == 0, r.stderr
    ended = json.loads((world.rundir / NODE / ".ended" / f"{job_id}.json").read_text())
    assert ended["ended"] >= ended["started"] and ended["stats"]["given"] == running["stats"]["given"]
    listed = json.loads(world.ovlrun("jobs", "--json").stdout)
    assert [(j["job_id"], j["node"], j["status"]) for j in listed] == [(job_id, NODE, "ended")]


@requires_root
def test_the_history_is_bounded(tmp_path: Path) -> None:
    """prune keeps the newest records and drops old ones, whatever else the directory holds."""
    tmp_path.chmod(0o711)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        now = time.time()
        for i in range(5):
            JobRecord(str(100 + i), 0, 0, "root", started=now).save(fd, views=False)
            os.utime(tmp_path / f"{100 + i}.json", (now - 10 * (5 - i), now - 10 * (5 - i)))
        (tmp_path / "notes.txt").write_text("not a record\n")
        assert history.prune(fd, now=now, keep=3) == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == ["102.json", "103.json", "104.json", "notes.txt"]
        assert history.prune(fd, now=now, keep=3, max_age=25) == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["103.json", "104.json", "notes.txt"]
    finally:
        os.close(fd)


# -- learn --inline (issue 17, item 3) -----------------------------------------------------

@requires_root
def test_learn_proposes_the_inline_set_from_what_the_job_opened(world: World) -> None:
    """The kinds of files the job opened below the proposed release, up to --inline-max,
    with what the image grows by (every such file of the release, opened or not)."""
    lib = world.sw / "app" / "1.0" / "lib"
    (lib / "libbig.so.2").write_bytes(b"\0" * (64 << 10))  # opened, over the limit: stays metacopy
    (lib / "python" / "other.py").write_text("X = 1\n")  # not opened, grows the image all the same
    (lib / "python" / "data").write_text("no extension\n")
    script = (f"ls {world.sw}/app/1.0/lib/nothere; cat {lib}/libfoo.so.1 {lib}/libbig.so.2 {lib}/python/mod.py "
              f"{lib}/python/mod.py {lib}/python/data >/dev/null")
    proposal = world.base / "learned.toml"
    report_file = world.base / "report.json"
    r = learn(world, "--tracer", "strace", "--tree", str(world.sw), "--inline", "--inline-max", "16KiB",
              "--output", str(proposal), "--json", "--report", str(report_file), "--", "/bin/sh", "-c", script,
              cwd="/")
    assert r.returncode == 0, r.stderr
    [inline] = json.loads(report_file.read_text())["proposal"]["inline"]
    foo, mod, other = (lib / "libfoo.so.1").stat().st_size, (lib / "python" / "mod.py").stat().st_size, 6
    assert inline["root"] == str(world.sw) and inline["max_bytes"] == 16 << 10
    assert inline["kinds"] == [
        {"pattern": "**/*.py", "files": 1, "opens": 2, "opened_bytes": mod, "larger": 0},
        {"pattern": "**/*.so*", "files": 1, "opens": 1, "opened_bytes": foo, "larger": 1}]
    assert (inline["growth_files"], inline["growth_bytes"]) == (3, foo + mod + other)
    text = proposal.read_text()
    assert 'inline_max = "16KiB"' in text and '"**/*.so*"' in text, text
    check = world.ovlrun("profile", "check", str(proposal))
    assert check.returncode == 0 and "inline **/*.py, **/*.so* (files up to 16 KiB)" in check.stdout, check
    # Without --inline, nothing of it.
    r = learn(world, "--tracer", "strace", "--tree", str(world.sw), "--output", str(proposal), "--", "/bin/sh", "-c",
              script, cwd="/")
    assert r.returncode == 0 and "inline" not in proposal.read_text(), r.stderr


def test_learn_refuses_a_bad_inline_max_before_running_the_job(world: World) -> None:
    marker = world.base / "ran"
    r = learn(world, "--tracer", "strace", "--tree", str(world.sw), "--inline", "--inline-max", "lots", "--",
              "/bin/sh", "-c", f"touch {marker}")
    assert r.returncode == 125 and not marker.exists(), r
    assert r.stderr.splitlines() == ["ovlrun: --inline-max: 'lots' is not a size (write it as bytes, or with B, KiB, "
                                     'MiB or GiB: "256KiB")'], r.stderr
