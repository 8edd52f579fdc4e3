"""``network = "none"``: a private network namespace with only loopback up.

pyroute2 costs ~200 ms to import, so this module is imported only for profiles that ask
for it; every other launch pays nothing.
"""

from __future__ import annotations

from ovlrun.errors import OvlrunError
from ovlrun.linux import syscalls


def isolate_network() -> None:
    try:
        syscalls.unshare(syscalls.CLONE_NEWNET)
    except OSError as e:
        raise OvlrunError(f"cannot create a private network namespace: {e}") from None
    from pyroute2 import IPRoute

    # A new network namespace has "lo" but down: 127.0.0.1 would be unreachable.
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname="lo")
        ipr.link("set", index=index, state="up")
