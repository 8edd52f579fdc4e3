"""ovlrun: per-job read-only overlays that localise metadata of a shared software tree."""

__version__ = "0.1.0"
