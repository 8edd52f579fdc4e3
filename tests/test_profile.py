"""Profile parsing, validation and lookup (pure parsing; the CLI cases run ovlrun)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ovlrun.errors import OvlrunError
from ovlrun.profile.locate import open_profile
from ovlrun.profile.parse import parse_profile
from ovlrun.profile.patterns import Pattern, overlap
from tests.conftest import World, requires_overlay, requires_root

GOOD = '''
description = "pipeline 2024"
network = "host"
[[tree]]
root = "/sw"
localise = ["thing/UIIDA/versionXX", "apps/*/2.1/lib"]
[[tree]]
root = "/opt/other/"
localise = ["x?/lib"]
'''


def load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "prof.toml"
    path.write_text(text)
    return parse_profile(path)


def test_good_profile(tmp_path: Path) -> None:
    p = load(tmp_path, GOOD)
    assert p.description == "pipeline 2024"  # type: ignore[attr-defined]
    trees = p.trees  # type: ignore[attr-defined]
    assert [t.root for t in trees] == ["/sw", "/opt/other"]
    assert [pat.text for pat in trees[0].patterns] == ["thing/UIIDA/versionXX", "apps/*/2.1/lib"]
    assert trees[0].patterns[1].matches("apps/foo/2.1/lib")
    assert not trees[0].patterns[1].matches("apps/foo/bar/2.1/lib")  # '*' stays in one component
    assert trees[1].patterns[0].matches("xy/lib") and not trees[1].patterns[0].matches("xyz/lib")


def test_toml_1_0_features_are_not_dropped(tmp_path: Path) -> None:
    # Dotted keys and inline tables in arrays: the old `toml` package mishandles some of these.
    p = load(tmp_path, 'tree = [{root = "/sw", localise = ["a/1", "b/2"]}]\ndescription = """multi\nline"""\n')
    assert [pat.text for pat in p.trees[0].patterns] == ["a/1", "b/2"]  # type: ignore[attr-defined]


BAD = [
    ("bogus = 1\n[[tree]]\nroot='/sw'\nlocalise=['a']", "bogus: unknown key"),
    ("description = 3\n[[tree]]\nroot='/sw'\nlocalise=['a']", "description: must be a string, not an integer"),
    ("network = 'bridge'\n[[tree]]\nroot='/sw'\nlocalise=['a']", "network: must be one of"),
    ("description = 'x'", "tree: missing"),
    ("tree = 'sw'", "tree: must be an array of tables"),
    ("tree = []", "tree: empty: a profile needs at least one [[tree]] table"),
    ("[[tree]]\nroot='/sw'\nlocalise=[]", "tree[0].localise: empty"),
    ("missing_root = 'ignore'\n[[tree]]\nroot='/sw'\nlocalise=['a']", "missing_root: must be one of"),
    ("[[tree]]\nlocalise=['a']", "tree[0].root: missing"),
    ("[[tree]]\nroot='/sw'", "tree[0].localise: missing"),
    ("[[tree]]\nroot=1\nlocalise=['a']", "tree[0].root: must be a string"),
    ("[[tree]]\nroot='sw'\nlocalise=['a']", "tree[0].root: 'sw' is not an absolute path"),
    ("[[tree]]\nroot='/sw/../etc'\nlocalise=['a']", "tree[0].root: '/sw/../etc' has '.' or '..'"),
    ("[[tree]]\nroot='/'\nlocalise=['a']", "tree[0].root: '/' cannot be"),
    ("[[tree]]\nroot='/sw'\nlocalise='a'", "tree[0].localise: must be an array of strings, not a string"),
    ("[[tree]]\nroot='/sw'\nlocalise=[1]", "tree[0].localise[0]: must be a string, not an integer"),
    ("[[tree]]\nroot='/sw'\nlocalise=['/abs']", "tree[0].localise[0]: '/abs' is absolute"),
    ("[[tree]]\nroot='/sw'\nlocalise=['a/../../etc']", "tree[0].localise[0]: 'a/../../etc' has an empty, '.' or '..'"),
    ("[[tree]]\nroot='/sw'\nlocalise=['']", "tree[0].localise[0]: empty pattern"),
    ("[[tree]]\nroot='/sw'\nlocalise=['a//b']", "has an empty"),
    ("[[tree]]\nroot='/sw'\nlocalise=['a']\nfoo=1", "tree[0].foo: unknown key"),
    ("[[tree]]\nroot='/sw'\nlocalise=['a/b', 'a/b']", "tree[0].localise[1]: '/sw/a/b' overlaps tree[0].localise[0]"),
    ("[[tree]]\nroot='/sw'\nlocalise=['a', 'a/b/c']", "tree[0].localise[1]: '/sw/a/b/c' overlaps"),
    ("[[tree]]\nroot='/sw'\nlocalise=['apps/*/lib', 'apps/x/lib/sub']", "overlaps"),
    ("[[tree]]\nroot='/sw'\nlocalise=['apps/x*/lib', 'apps/*y/lib']", "overlaps"),
    ("[[tree]]\nroot='/sw'\nlocalise=['a/b']\n[[tree]]\nroot='/sw/a'\nlocalise=['b/c']",
     "tree[1].localise[0]: '/sw/a/b/c' overlaps tree[0].localise[0]"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_validation_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(OvlrunError) as info:
        load(tmp_path, text)
    assert str(tmp_path / "prof.toml") in info.value.message
    assert message in info.value.message


def test_non_overlapping_globs_are_fine(tmp_path: Path) -> None:
    load(tmp_path, "[[tree]]\nroot='/sw'\nlocalise=['apps/*/2.1/lib', 'apps/*/2.2/lib', 'a/x*', 'a/y*']")


def test_toml_syntax_error_names_line(tmp_path: Path) -> None:
    with pytest.raises(OvlrunError) as info:
        load(tmp_path, "description = 'x'\n\n[[tree]\nroot='/sw'\n")
    assert "TOML syntax error" in info.value.message and "line 3" in info.value.message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "prof.toml"
    path.write_bytes(b"description = '\xff'\n")
    with pytest.raises(OvlrunError, match="not UTF-8"):
        parse_profile(path)


def test_pattern_literal_characters() -> None:
    # '[' and '\' are literal, unlike fnmatch.
    assert Pattern.parse("a[1]/b\\c").matches("a[1]/b\\c")
    assert not Pattern.parse("a[1]").matches("a1")
    assert overlap(("sw", "a"), ("sw", "a", "b"))
    assert not overlap(("sw", "a"), ("sw", "b"))


def locate(spec: str, dirs: list[str] | None = None) -> str:
    located = open_profile(spec, dirs)
    located.close()
    return located.path


def test_lookup_order(tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    (second / "x.toml").write_text("")
    assert locate("x", [str(first), str(second)]) == str(second / "x.toml")
    (first / "x.toml").write_text("")
    assert locate("x", [str(first), str(second)]) == str(first / "x.toml")
    with pytest.raises(OvlrunError, match="no profile named 'y'"):
        locate("y", [str(first), str(second)])
    with pytest.raises(OvlrunError, match="invalid profile name"):
        locate("-rf", [str(first)])
    with pytest.raises(OvlrunError, match="does not exist"):
        locate(str(tmp_path / "missing.toml"))
    # What is not a regular file is not a profile (and a FIFO is not waited for).
    (first / "x.toml").unlink()
    os.mkfifo(first / "x.toml")
    assert locate("x", [str(first), str(second)]) == str(second / "x.toml")
    with pytest.raises(OvlrunError, match="does not exist"):
        locate(str(first / "x.toml"))


@requires_root
@requires_overlay
def test_cli_reports_errors_without_traceback(world: World) -> None:
    world.write_profile("bad", "[[tree]]\nroot = 'relative'\nlocalise = ['a']\n")
    for args in (["--profile", "bad", "--", "true"], ["snapshot", "build", "--profile", "bad"],
                 ["profile", "check", "bad"]):
        result = world.ovlrun(*args)
        assert result.returncode == 125, result
        assert "Traceback" not in result.stderr
        assert "bad.toml: tree[0].root: 'relative' is not an absolute path" in result.stderr
    world.write_profile("syntax", "[[tree]]\nroot = '/sw'\nlocalise = [\n")
    result = world.ovlrun("profile", "check", "syntax")
    assert result.returncode == 125 and "line 4" in result.stderr and "Traceback" not in result.stderr
    world.write_profile("syntax2", "[[tree]]\nroot = = '/sw'\n")
    result = world.ovlrun("profile", "check", "syntax2")
    assert result.returncode == 125 and "line 2" in result.stderr


def test_profile_path_spec(world: World) -> None:
    path = world.simple_profile("byname")
    result = world.ovlrun("profile", "check", str(path))
    assert result.returncode == 0, result.stderr
    assert "byname" in result.stdout
