"""The configurations every workload runs in, and how to make them cold.

All configurations present the software tree at the same path (SHARED_ROOT),
so the workloads are byte-for-byte identical:

  direct        benchnfs stand-in mounted at SHARED_ROOT, job run as is
  ovlrun-noloc  stand-in + ovlrun with a profile that localises none of the
                releases the job uses (the namespace and an unrelated overlay)
  ovlrun-loc    stand-in + ovlrun with the used releases localised
  ovlrun-loc-dir  the same, with the directory snapshots of the commit before images
                (bench.ovlrun_cli.DIR_SIDE: the "before" side)
  local         the tree's local copy bind-mounted read-only at SHARED_ROOT:
                the physical limit (no remote server at all)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench import ovlrun_cli
from bench.mounts import bind_ro, drop_caches, is_mountpoint, umount
from bench.standin.server import StandIn
from bench.tree import TREE_DIR

SHARED_ROOT = Path("/srv/ovlrun-bench")

LOC_PROFILE = "bench-loc"
NOLOC_PROFILE = "bench-noloc"

# Everything the workloads touch, as ovlrun localise patterns (disjoint).
LOC_PATTERNS = ["sw/python/3.11", "sw/pystack/2024.1", "sw/pystack/2024.2",
                "sw/pystack/2025.1", "sw/tools/*/*", "sw/libs/*/*"]
# A release none of the workloads use: ovlrun runs, but localises nothing used.
NOLOC_PATTERNS = ["sw/pystack/2022.2"]


@dataclass
class Config:
    name: str
    uses_standin: bool
    profile: str | None = None
    side: ovlrun_cli.Side | None = None  # None: this checkout with the default store

    def prefix(self) -> list[str]:
        if not self.profile:
            return []
        return self.side.prefix(self.profile) if self.side else ovlrun_cli.prefix(self.profile)

    def env(self) -> dict[str, str]:
        return self.side.env() if self.side else ovlrun_cli.env()

    def snapshot_build(self) -> None:
        assert self.profile
        if self.side:
            self.side.snapshot_build(self.profile)
        else:
            ovlrun_cli.snapshot_build(self.profile)


CONFIGS: dict[str, Config] = {
    "direct": Config("direct", True),
    "ovlrun-noloc": Config("ovlrun-noloc", True, NOLOC_PROFILE),
    "ovlrun-loc": Config("ovlrun-loc", True, LOC_PROFILE),
    "ovlrun-loc-dir": Config("ovlrun-loc-dir", True, LOC_PROFILE, ovlrun_cli.DIR_SIDE),
    "local": Config("local", False),
}


def write_profiles() -> None:
    ovlrun_cli.write_profile(LOC_PROFILE, SHARED_ROOT, LOC_PATTERNS,
                             "bench: every release the workloads use is localised")
    ovlrun_cli.write_profile(NOLOC_PROFILE, SHARED_ROOT, NOLOC_PATTERNS,
                             "bench: ovlrun without localising the used releases")


@dataclass
class SharedTree:
    """Owns what is mounted at SHARED_ROOT for the configuration under test."""

    latency_us: int = 1000
    negative_timeout: float = 1.0
    standin: StandIn | None = field(default=None, init=False)
    _bound: bool = field(default=False, init=False)

    def setup(self, cfg: Config) -> None:
        self.teardown()
        if cfg.uses_standin:
            self.standin = StandIn(TREE_DIR, SHARED_ROOT, latency_us=self.latency_us,
                                   negative_timeout=self.negative_timeout)
            self.standin.mount()
        else:
            bind_ro(TREE_DIR, SHARED_ROOT)
            self._bound = True

    def make_cold(self) -> None:
        """Remount the stand-in (fresh client caches) and drop all caches."""
        if self.standin:
            self.standin.unmount()
        drop_caches()
        if self.standin:
            self.standin.mount()

    def teardown(self) -> None:
        if self.standin:
            self.standin.unmount()
            self.standin = None
        if self._bound:
            if is_mountpoint(SHARED_ROOT):
                umount(SHARED_ROOT)
            self._bound = False
