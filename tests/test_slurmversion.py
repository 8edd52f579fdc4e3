"""ovlrun.hooks.slurmversion: which slurmd versions let the Prolog prepare the job directory."""

from __future__ import annotations

import pytest

from ovlrun.hooks import slurmversion


@pytest.mark.parametrize(("text", "version"), [
    ("slurm-wlm 24.11.5\n", (24, 11, 5)),  # Debian 13
    ("slurm-wlm 22.05.8\n", (22, 5, 8)),  # Debian 12
    ("slurm 23.02.5\n", (23, 2, 5)),  # upstream
    ("Python 3.11.2\n", None),
])
def test_version_line(text: str, version: tuple[int, int, int] | None) -> None:
    m = slurmversion._VERSION.match(text.strip())
    assert (tuple(int(g) for g in m.groups()) if m else None) == version


@pytest.mark.parametrize(("version", "refused"), [
    ((22, 5, 8), False), ((23, 2, 4), False), ((23, 2, 5), True), ((24, 11, 5), True), (None, False),
])
def test_create_mode_problem(monkeypatch: pytest.MonkeyPatch, version: tuple[int, int, int] | None,
                             refused: bool) -> None:
    monkeypatch.setattr(slurmversion, "parent_slurmd_version", lambda: version)
    problem = slurmversion.create_mode_problem()
    assert (problem is not None) == refused
    if problem:
        assert "RunInJob" in problem and "CloneNSScript" in problem


def test_not_run_by_slurmd() -> None:
    assert slurmversion.parent_slurmd_version() is None  # pytest's parent is a shell, not slurmd
