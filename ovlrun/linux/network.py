"""``network = "none"``: a private network namespace with only loopback up.

pyroute2 costs ~200 ms to import, so this module is imported only for profiles that ask
for it; every other launch pays nothing.
"""

from __future__ import annotations

from ovlrun.linux import syscalls


def isolate_network() -> None:
    """Move this process into a new network namespace and bring its loopback up; raises
    the failing call's OSError (the caller says what it was for)."""
    syscalls.unshare(syscalls.CLONE_NEWNET)
    from pyroute2 import IPRoute

    # A new network namespace has "lo" but down: 127.0.0.1 would be unreachable.
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname="lo")
        ipr.link("set", index=index, state="up")
