"""Property-based fuzzing of profile parsing and validation (hypothesis).

10,000+ generated profiles in all: parsed data straight into ``validate`` (every shape
tomllib can produce), raw and mutated TOML text through ``parse_profile``, and a sample
through the real CLI in child processes.  The property: a profile is either accepted
and sane, or rejected with an ``OvlrunError`` whose message names the file; never any
other exception; nothing mounted on the host (the ``world`` fixture checks that).
"""

from __future__ import annotations

import datetime
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ovlrun.errors import OvlrunError
from ovlrun.profile.parse import Profile, parse_profile, validate
from ovlrun.profile.patterns import overlap
from tests.conftest import World, requires_overlay, requires_root


def fuzz(n: int) -> settings:
    return settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
PATH = Path("/etc/ovlrun/profiles/fuzz.toml")

# Strings biased towards what matters: separators, globs, dots, odd bytes.
pieces = st.sampled_from(["", "/", "//", ".", "..", "*", "?", "a", "b", "sw", "lib", "[", "\\", ":", ",", " ", "\n",
                          "\x00", "é", "\udcff", "x" * 300, "apps", "2.1", "~"])
odd_text = st.lists(pieces, max_size=8).map("".join) | st.text(max_size=40)
scalars = st.one_of(odd_text, st.integers(), st.floats(allow_nan=True), st.booleans(),
                    st.datetimes().map(lambda d: d.replace(tzinfo=datetime.UTC)), st.dates(), st.times())
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner,
                                                                                           max_size=4), max_leaves=12)
roots = st.one_of(st.lists(pieces, min_size=1, max_size=5).map(lambda p: "/" + "/".join(p)), odd_text, values)
pattern_lists = st.one_of(st.lists(st.lists(pieces, min_size=1, max_size=4).map("/".join), max_size=5), values)
trees = st.dictionaries(st.sampled_from(["root", "localise", "extra", "Root"]), values, max_size=3) | st.fixed_dictionaries(
    {"root": roots, "localise": pattern_lists})
profiles = st.fixed_dictionaries({}, optional={
    "description": st.one_of(odd_text, values),
    "network": st.one_of(st.sampled_from(["host", "none", "bridge", ""]), values),
    "tree": st.one_of(st.lists(trees, max_size=3), values),
    "bogus": values,
})


def check_accepted(profile: Profile) -> None:
    assert profile.trees and all(tree.patterns for tree in profile.trees)
    entries = []
    for tree in profile.trees:
        assert tree.root.startswith("/") and tree.root != "/" and "\0" not in tree.root
        assert ".." not in tree.root.split("/") and "." not in tree.root.split("/")
        for pattern in tree.patterns:
            assert pattern.components and all(c not in ("", ".", "..") for c in pattern.components)
            entries.append(tuple(p for p in tree.root.split("/") if p) + pattern.components)
    for i in range(len(entries)):
        for j in range(i + 1, len(entries)):
            assert not overlap(entries[i], entries[j])


def check(result: object) -> None:
    if isinstance(result, OvlrunError):
        assert result.message.startswith(f"{PATH}: ") or result.message.startswith(f"{PATH}:"), result.message
        assert "Traceback" not in result.message and result.message.strip()
    else:
        assert isinstance(result, Profile)
        check_accepted(result)


def run_validate(data: dict[str, object]) -> object:
    try:
        return validate(data, PATH, "fuzz")
    except OvlrunError as e:
        return e


@fuzz(6000)
@given(profiles)
def test_fuzz_validate_structured(data: dict[str, object]) -> None:
    check(run_validate(data))


@fuzz(500)
@given(st.lists(st.fixed_dictionaries({"root": st.sampled_from(["/sw", "/sw/a", "/opt", "/sw/"]),
                                       "localise": st.lists(st.lists(st.sampled_from(["a", "b", "*", "?", "a*", "*b"]),
                                                                     min_size=1, max_size=3).map("/".join),
                                                            min_size=1, max_size=4)}), min_size=1, max_size=3))
def test_fuzz_overlap_rules(tables: list[dict[str, object]]) -> None:
    check(run_validate({"tree": tables}))


GOOD = '''description = "pipeline"
network = "host"
[[tree]]
root = "/sw"
localise = ["thing/UIIDA/versionXX", "apps/*/2.1/lib"]
'''
_DIR = Path(tempfile.mkdtemp(prefix="ovlrun-fuzz-"))


def run_parse(raw: bytes) -> object:
    path = _DIR / "fuzz.toml"
    path.write_bytes(raw)
    try:
        result: object = parse_profile(path, "fuzz")
    except OvlrunError as e:
        assert e.message.startswith(f"{path}"), e.message
        return None
    assert isinstance(result, Profile)
    check_accepted(result)
    return result


@fuzz(2000)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_fuzz_parse_raw(raw: bytes) -> None:
    run_parse(raw)


@fuzz(2000)
@given(st.lists(st.tuples(st.integers(0, len(GOOD)), st.integers(0, 4),
                          st.sampled_from(["", "[", "]", "\"", "'", "=", "\n", "*", "/", "..", "#", "\\", "\x00",
                                           "[[tree]]\n", "root = '/x'\n", "localise = []\n", ",", "{", "}"])),
                max_size=4))
def test_fuzz_parse_mutated(edits: list[tuple[int, int, str]]) -> None:
    text = GOOD
    for pos, cut, insert in edits:
        pos = min(pos, len(text))
        text = text[:pos] + insert + text[pos + cut:]
    run_parse(text.encode("utf-8", "surrogatepass"))


@requires_root
@requires_overlay
@settings(deadline=None, database=None, max_examples=30, suppress_health_check=list(HealthCheck))
@given(raw=st.sampled_from([b"", b"[[tree]]", b"tree = 1", b"\xff\xfe", GOOD.encode()])
       | st.lists(st.sampled_from(["[[tree]]\n", "root = '/nonexistent/sw'\n", "localise = ['a/*', 'b']\n",
                                   "network = 'none'\n", "description = 1\n", "x\n", "root = '/'\n"]),
                  max_size=5).map(lambda parts: "".join(parts).encode()))
def test_fuzz_through_the_cli(world: World, raw: bytes) -> None:
    path = world.profiles / "f.toml"
    path.write_bytes(raw)
    for args in (["profile", "check", str(path)], ["--profile", str(path), "--", "true"]):
        r = world.ovlrun(*args, timeout=60)
        assert r.returncode in (0, 125), (args, r)
        assert "Traceback" not in r.stderr, r.stderr
        if r.returncode == 125:
            assert r.stderr.startswith("ovlrun: "), r.stderr
