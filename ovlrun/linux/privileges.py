"""Users the job can run as, and dropping root to one in a fixed, verified order.

The order, each step relying on the one before: keepcaps off -> empty the capability
bounding set (needs CAP_SETPCAP, so while still root) -> supplementary groups -> gid ->
uid (a uid change from 0 with keepcaps off clears the permitted, effective and ambient
sets) -> no_new_privs (set-uid binaries in the job cannot regain anything).  Then every
id and capability set is verified and ``setuid(0)`` must fail; if anything is off,
nothing is exec'd: trust the resulting state, not the calls that should have made it.
Which user that is (sudo caller, ``--user``) is policy: :mod:`ovlrun.launch.caller`.
"""

from __future__ import annotations

import os
import pwd

from ovlrun.errors import OvlrunError
from ovlrun.linux import syscalls

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: this module is on the launch path
    from collections.abc import Callable
    from typing import Any

CAP_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


# Plain classes, not NamedTuple/dataclass: this module is on every launch's path, and
# ``typing`` alone costs ~10 ms to import on a -I -S interpreter.
class Identity:
    __slots__ = ("gid", "groups", "home", "name", "shell", "uid")

    def __init__(self, name: str, uid: int, gid: int, groups: tuple[int, ...], home: str, shell: str) -> None:
        self.name = name
        self.uid = uid
        self.gid = gid
        self.groups = groups
        self.home = home
        self.shell = shell

    def __repr__(self) -> str:
        return f"Identity({self.name!r}, uid={self.uid}, gid={self.gid}, groups={self.groups})"

    def may_read(self, st: os.stat_result) -> bool:
        """Whether the permission bits of ``st`` let this identity read the file (owner,
        then group, then others, as the kernel decides; ACLs are not consulted, so a file
        an ACL opens counts as closed: the careful side)."""
        if st.st_uid == self.uid:
            return bool(st.st_mode & 0o400)
        if st.st_gid == self.gid or st.st_gid in self.groups:
            return bool(st.st_mode & 0o040)
        return bool(st.st_mode & 0o004)

    @classmethod
    def of_uid(cls, uid: int, gid: int | None = None) -> Identity:
        return cls._from_pw(pwd.getpwuid, uid, f"uid {uid} has no entry in the password database", gid)

    @classmethod
    def of_name(cls, name: str) -> Identity:
        return cls._from_pw(pwd.getpwnam, name, f"no such user: {name!r}", None)

    @classmethod
    def _from_pw(cls, lookup: Callable[[Any], pwd.struct_passwd], key: object, missing: str,
                 gid: int | None) -> Identity:
        try:
            pw = lookup(key)
        except KeyError:
            raise OvlrunError(missing) from None
        primary = pw.pw_gid if gid is None else gid
        groups = tuple(sorted(set(os.getgrouplist(pw.pw_name, primary))))
        return cls(pw.pw_name, pw.pw_uid, primary, groups, pw.pw_dir, pw.pw_shell or "/bin/sh")


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return syscalls.last_capability()


def capability_sets() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v, 16) for k, _, v in (line.partition(":\t") for line in f) if k in CAP_SETS}


def drop_to(ident: Identity) -> None:
    """Irreversibly become ``ident`` with no capabilities; raise if the result is not exact.

    A parent-death signal (PR_SET_PDEATHSIG, e.g. of a bounded worker) survives the drop:
    the kernel clears it on a credential change, so it is set again, and delivered at once
    if the parent died meanwhile.
    """
    death = syscalls.get_pdeathsig()
    parent = os.getppid()
    try:
        syscalls.prctl(syscalls.PR_SET_KEEPCAPS, 0)
        for cap in range(_last_cap() + 1):
            syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap)
        os.setgroups(list(ident.groups))
        os.setresgid(ident.gid, ident.gid, ident.gid)
        os.setresuid(ident.uid, ident.uid, ident.uid)
        syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
    except OSError as e:
        raise OvlrunError(f"cannot drop privileges to {ident.name}: {e.strerror}") from None
    if death:
        syscalls.set_pdeathsig(death)
        if os.getppid() != parent:
            os.kill(os.getpid(), death)
    verify_dropped(ident)


def verify_dropped(ident: Identity) -> None:
    problems = []
    if os.getresuid() != (ident.uid,) * 3:
        problems.append(f"uids are {os.getresuid()}")
    if os.getresgid() != (ident.gid,) * 3:
        problems.append(f"gids are {os.getresgid()}")
    if tuple(sorted(set(os.getgroups()))) != ident.groups:
        problems.append(f"groups are {sorted(os.getgroups())}")
    nonzero = {k: v for k, v in capability_sets().items() if v}
    if nonzero:
        problems.append("capabilities remain: " + ", ".join(f"{k}={v:x}" for k, v in nonzero.items()))
    try:
        os.setuid(0)
        problems.append("setuid(0) succeeded")
    except PermissionError:
        pass
    if problems:
        raise OvlrunError(f"privilege drop to {ident.name} not complete ({'; '.join(problems)}); refusing to run")
