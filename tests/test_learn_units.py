"""learn's parts that need no tracer: reading strace and bpftrace output, resolving
relative paths, attributing paths to release directories, proposals, summaries."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ovlrun.errors import OvlrunError
from ovlrun.learn import bpftrace, propose, strace, summaries
from ovlrun.learn.events import AT_EMPTY_PATH, Lookup, Raw
from ovlrun.learn.report import Tally
from ovlrun.learn.resolve import Resolver
from ovlrun.learn.trees import Attributor, TreeSpec, parse_tree_option
from ovlrun.profile.patterns import Pattern
from ovlrun.store.siteconfig import Owner


def hexs(text: str) -> str:
    return '"' + "".join(f"\\x{b:02x}" for b in os.fsencode(text)) + '"'


def test_strace_lines_hex_strings_resumed_calls_and_descriptor_paths() -> None:
    p = strace.Parser()
    odd = 'we"ird, ) = name\n\udcff'
    lines = [f"10 openat(AT_FDCWD<{hexs('/w')[1:-1]}>, {hexs('lib/x.so')}, O_RDONLY|O_CLOEXEC) = -1 ENOENT (No such "
             "file or directory)",
             f"10  newfstatat(3<{hexs('/sw/app')[1:-1]}>, {hexs(odd)}, {{st_mode=S_IFREG|0644, ...}}, 0) = 0",
             f"10 newfstatat(3<{hexs('/sw/x')[1:-1]}>, \"\", {{st_mode=S_IFREG}}, AT_EMPTY_PATH) = 0",
             "10 vfork( <unfinished ...>",
             f"11 execve({hexs('/bin/ls')}, [{hexs('ls')}], 0x7ffd /* 3 vars */ <unfinished ...>",
             "10 <... vfork resumed>)              = 11",
             "11 <... execve resumed>)             = 0",
             f"11 openat(AT_FDCWD<{hexs('/w')[1:-1]}>, {hexs('/d')}, O_RDONLY|O_DIRECTORY) = 3<{hexs('/d')[1:-1]}>",
             "11 +++ exited with 2 +++", "10 +++ killed by SIGKILL +++", "garbage"]
    out = [p.feed(line) for line in lines]
    first = out[0]
    assert isinstance(first, Raw)
    assert (first.syscall, first.path, first.dirpath, first.ret) == ("openat", "lib/x.so", "/w", -2)
    second = out[1]
    assert isinstance(second, Raw) and second.path == odd and second.dirpath == "/sw/app"
    third = out[2]
    assert isinstance(third, Raw) and third.flags & AT_EMPTY_PATH and third.path == ""
    assert out[3] is None and out[4] is None
    fork = out[5]
    assert isinstance(fork, Raw) and (fork.what, fork.ret) == ("fork", 11)
    execve = out[6]
    assert isinstance(execve, Raw) and (execve.syscall, execve.path, execve.ret) == ("execve", "/bin/ls", 0)
    opened = out[7]
    assert isinstance(opened, Raw) and opened.ret == 3 and opened.flags
    exited, killed = out[8], out[9]
    assert isinstance(exited, strace.Exit) and exited.status == 2
    assert isinstance(killed, strace.Exit) and killed.signal == "SIGKILL"
    assert out[10] is None and p.unparsed == 1


def test_bpftrace_lines() -> None:
    line = json.dumps({"type": "printf", "data": 'L 77 1 10 11 -2 -100 0 /sw/a b\n"c\n'}).encode()
    stamp, raw = bpftrace.parse(line, 200)
    assert stamp == 77 and isinstance(raw, Raw)
    assert (raw.syscall, raw.pid, raw.tid, raw.ret, raw.path) == ("openat", 10, 11, -2, '/sw/a b\n"c')
    long_path = "/" + "x" * 198
    _, raw = bpftrace.parse(json.dumps({"type": "printf", "data": f"E 5 -2 3 3 {long_path}\n"}).encode(), 200)
    assert isinstance(raw, Raw) and raw.syscall == "execve" and raw.truncated
    _, lost = bpftrace.parse(b'{"type": "lost_events", "data": {"events": 12}}', 200)
    assert isinstance(lost, bpftrace.Control) and lost.data == 12
    _, fork = bpftrace.parse(json.dumps({"type": "printf", "data": "F 9 10 10 12\n"}).encode(), 200)
    assert isinstance(fork, Raw) and (fork.what, fork.pid, fork.ret) == ("fork", 10, 12)


def test_resolver_follows_forks_chdir_and_directory_fds() -> None:
    r = Resolver("/start")
    got = list(r.feed(Raw("lookup", "openat", 1, 1, 3, -100, 0o200000, "/sw/app")))
    got += list(r.feed(Raw("lookup", "chdir", 1, 1, 0, path="../elsewhere")))
    got += list(r.feed(Raw("fork", "clone", 1, 1, 2)))
    got += list(r.feed(Raw("lookup", "openat", 2, 2, -2, 3, 0, "lib/x.so")))
    got += list(r.feed(Raw("lookup", "stat", 2, 2, -2, path="y")))
    got += list(r.feed(Raw("lookup", "openat", 1, 1, -2, 9, 0, "z")))  # fd 9: unknown
    got += list(r.feed(Raw("lookup", "newfstatat", 1, 1, 0, 3, AT_EMPTY_PATH, "")))  # fstat: not a lookup
    assert [(g.path, g.exact) for g in got] == [("/sw/app", True), ("/elsewhere", True), ("/sw/app/lib/x.so", True),
                                               ("/elsewhere/y", True), ("z", False)]
    assert got[0].kind == "diropen" and r.unresolved == 1


def tree(root: str, depth: int | None = None, patterns: tuple[str, ...] = ()) -> TreeSpec:
    return TreeSpec(root, root, depth, tuple(Pattern.parse(p) for p in patterns))


def test_release_directories_from_depth_patterns_and_shape() -> None:
    a = Attributor([tree("/sw"), tree("/opt/x", depth=1), tree("/p", patterns=("thing/UIIDA/versionXX",))])
    paths = ["/sw/app/1.0/lib/x", "/sw/app", "/sw/app/current/bin/y", "/sw/misc/file", "/opt/x/tool/bin",
             "/p/thing/UIIDA/versionYY/lib/z", "/p/thing/UIIDA", "/elsewhere/a"]
    a.learn(paths)
    places = {p: a.place(p) for p in paths}
    assert places["/sw/app/1.0/lib/x"].release == "app/1.0"  # type: ignore[union-attr]
    assert places["/sw/app"].release == ""  # type: ignore[union-attr]  # top levels
    assert places["/sw/app/current/bin/y"].release == "app/current"  # type: ignore[union-attr]
    misc = places["/sw/misc/file"]
    assert misc is not None and misc.release is None and misc.top == "misc"
    assert places["/opt/x/tool/bin"].release == "tool"  # type: ignore[union-attr]
    assert places["/p/thing/UIIDA/versionYY/lib/z"].release == "thing/UIIDA/versionYY"  # type: ignore[union-attr]
    assert places["/p/thing/UIIDA"].release == ""  # type: ignore[union-attr]
    assert places["/elsewhere/a"] is None
    assert parse_tree_option("/sw:3") == ("/sw", 3) and parse_tree_option("/a:b") == ("/a:b", None)
    with pytest.raises(OvlrunError):
        parse_tree_option("/sw:0")


def test_proposal_skips_what_cannot_be_localised_and_globs_siblings(tmp_path: Path) -> None:
    sw = tmp_path / "sw"
    for rel in ("app/1.0", "app/1.1", "lib/2.0", "we*rd/1.0"):
        (sw / rel).mkdir(parents=True)
    (sw / "app" / "latest").symlink_to("1.1")
    (sw / "out").symlink_to("/etc")
    t = tree(str(sw))
    c = propose.Candidate
    candidates = [c(str(sw), "app/1.0", 10, 5, 1), c(str(sw), "app/latest", 4, 2, 0), c(str(sw), "app/9.9", 3, 3, 0),
                  c(str(sw), "lib/2.0", 2, 0, 0), c(str(sw), "we*rd/1.0", 3, 3, 0), c(str(sw), "out", 5, 5, 0)]
    chosen = propose.choose(candidates, [t], min_enoent=1, glob=False)
    assert [(x.pattern, x.saved) for x in chosen.chosen] == [("app/1.0", 9), ("app/1.1", 4)]
    assert chosen.chosen[1].note == "via the symlink app/latest"
    reasons = dict(chosen.skipped)
    assert reasons[f"{sw}/app/9.9"] == "missing" and "outside the tree" in reasons[f"{sw}/out"]
    assert "'*' or '?'" in reasons[f"{sw}/we*rd/1.0"]
    text = propose.render(chosen, 'quotes " and \\ ', "test")
    profile = propose.check(text, "x.toml")
    assert [p.text for p in profile.trees[0].patterns] == ["app/1.0", "app/1.1"]
    globbed = propose.choose(candidates, [t], min_enoent=0, glob=True)
    assert sorted(x.pattern for x in globbed.chosen) == ["app/*", "lib/2.0"]
    propose.check(propose.render(globbed, "g", "test"), "g.toml")


def test_tally_residual_counts_only_what_a_snapshot_answers(tmp_path: Path) -> None:
    sw = tmp_path / "sw"
    (sw / "app" / "1.0").mkdir(parents=True)
    (sw / "app" / "2.0").mkdir(parents=True)
    t = Tally([tree(str(sw))], localised=[str(sw / "app" / "1.0")])
    for path, kind, error in ((f"{sw}/app/1.0/x", "stat", 2), (f"{sw}/app/1.0/y", "open", 0),
                              (f"{sw}/app/2.0/x", "stat", 2), (f"{sw}/app/2.0/y", "stat", 0), ("/usr/z", "stat", 2)):
        t.add(Lookup("x", kind, 1, path, error, True))
    t.finish()
    r = t.residual()
    assert (r["local"], r["remote"], r["remote_enoent"], r["remote_opens"]) == (1, 3, 1, 1)
    assert t.outside.lookups == 1 and t.releases[(str(sw), "app/1.0")].local == 1


def test_summaries_are_bounded_and_read_only_from_the_trusted_owner(tmp_path: Path) -> None:
    s = summaries.empty("n1", "bpftrace", 0.0)
    s["trees"]["/sw"] = {"releases": {f"r{i}/1.0": [i + 1, i % 3, 0, 0] for i in range(50)}, "top": [0] * 4,
                         "unrecognised": {}}
    summaries.bound(s, 20)
    assert len(s["trees"]["/sw"]["releases"]) == 20 and s["dropped"]["entries"] == 30
    best = sorted(((i % 3, i + 1) for i in range(50)), reverse=True)[:20]
    assert sorted((c[1], c[0]) for c in s["trees"]["/sw"]["releases"].values()) == sorted(best)
    if os.geteuid() != 0:
        return
    d = tmp_path / "pub"
    d.mkdir()
    (d / "n1.json").write_bytes(summaries.encode(s))
    owner = Owner("root", 0, 0)
    assert [x["node"] for x in summaries.read_dir(str(d), owner)] == ["n1"]
    (d / "n1.json").chmod(0o666)
    with pytest.raises(OvlrunError, match="writable by group or others"):
        summaries.read_dir(str(d), owner)
    (d / "n1.json").unlink()
    (d / "n2.json").symlink_to("/etc/passwd")
    with pytest.raises(OvlrunError, match="symlink"):
        summaries.read_dir(str(d), owner)
    (d / "n2.json").unlink()
    (d / "n3.json").write_text('{"format": 1, "node": "n3", "trees": {"/sw": {"releases": {"a": [1, -1, 0, 0]}}}}')
    with pytest.raises(OvlrunError, match="not a node summary"):
        summaries.read_dir(str(d), owner)
