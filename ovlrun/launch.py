"""Launching a job: private mount namespace, localising overlays, drop, exec.

Plan first, then execute (mkosi style): :func:`plan` reads only the local store's index
and manifests (never the shared tree) and decides which paths get which snapshot; only
then does :func:`enter_private_namespace` + :func:`mount_plan` change anything, inside a
namespace that dies with the job, so nothing can be left mounted on the host.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NamedTuple

from ovlrun import syscalls
from ovlrun.errors import EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, OvlrunError
from ovlrun.kernel import Features, probe
from ovlrun.overlay import OverlaySpec, SourceMissing, mount_overlay
from ovlrun.privileges import Identity, drop_to
from ovlrun.profile import Profile
from ovlrun.store import Snapshot, SnapshotMissing, Store

Warn = Callable[[str], None]
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def warn_stderr(message: str) -> None:
    print(f"ovlrun: warning: {message}", file=sys.stderr)


class Localised(NamedTuple):
    path: str  # as the profile names it
    snapshot: Snapshot
    data_only: bool
    root: str = ""  # the profile tree's root (to tell a deleted release from an unmounted tree)

    @property
    def source(self) -> str:
        return self.snapshot.manifest.source


def plan(profile: Profile, store: Store, features: Features, *, strict: bool, warn: Warn) -> list[Localised]:
    """Which localised paths this job gets, from the store index alone."""
    index = store.read_index()
    chosen: dict[str, str] = {}
    roots: dict[str, str] = {}
    missing: list[str] = []
    for tree in profile.trees:
        prefix = tree.root.rstrip("/") + "/"
        for pattern in tree.patterns:
            if pattern.is_literal:
                path = tree.path_of(pattern.text)
                if path in index:
                    chosen[path] = index[path]
                    roots[path] = tree.root
                else:
                    missing.append(path)
                continue
            hits = [p for p in index if p.startswith(prefix) and pattern.matches(p[len(prefix):])]
            if not hits:
                missing.append(tree.path_of(pattern.text))
            chosen.update((p, index[p]) for p in hits)
            roots.update((p, tree.root) for p in hits)
    result = []
    for path, relative in sorted(chosen.items()):
        try:
            snapshot = store.load(relative)
        except SnapshotMissing:
            # gc removed it after we read the index (its source was deleted): same as unbuilt.
            missing.append(path)
            continue
        store.check_trusted(snapshot)
        result.append(Localised(path, snapshot, features.data_only_layers, roots[path]))
    for path in missing:
        message = (f"no snapshot for {path}; it stays unlocalised "
                   f"(build it with: ovlrun snapshot build --profile {profile.name})")
        if strict:
            raise OvlrunError(message.replace("; it stays unlocalised", ""))
        warn(message)
    return result


def enter_private_namespace() -> None:
    """Become the only member of a new mount namespace that cannot affect the host.

    MS_SLAVE (not private) so mounts the host makes later (e.g. automounted NFS
    releases) still appear in the job, while nothing the job mounts propagates out.
    """
    try:
        syscalls.unshare(syscalls.CLONE_NEWNS)
        syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_SLAVE)
    except OSError as e:
        raise OvlrunError(f"cannot create a private mount namespace: {e}") from None


def mount_plan(localised: list[Localised], features: Features, *, strict: bool, warn: Warn,
               missing_root: str = "fail") -> list[Localised]:
    """Mount every planned overlay; a vanished source is skipped (or fatal with strict)."""
    mounted = []
    absent_roots: set[str] = set()
    for item in localised:
        spec = OverlaySpec(target=item.source, snapshot_tree=str(item.snapshot.tree), data=item.source)
        try:
            mount_overlay(spec, features)  # resolves the source once; no separate existence check
        except SourceMissing:
            if item.root in absent_roots:
                continue
            if not _tree_root_available(item, missing_root, warn):
                absent_roots.add(item.root)
                continue
            message = f"{item.source} (localised path {item.path}) is missing on the shared tree"
            if strict:
                raise OvlrunError(message) from None
            warn(message + "; skipped")
            continue
        mounted.append(item)
    return mounted


def _tree_root_available(item: Localised, missing_root: str, warn: Warn) -> bool:
    """A localised source is missing: was the release deleted, or is the tree not there?

    Only reached on that failure path, so a normal launch pays nothing for it.  A missing
    or empty root (an unmounted NFS mount point) is an error even without --strict: every
    path of the tree would be missing and the job could only fail later, less clearly.
    A profile with ``missing_root = "unlocalised"`` runs the job without that tree's
    overlays instead (returns False after a warning).
    """
    if not item.root:
        return True
    try:
        problem = "is empty (not mounted?)" if not os.listdir(item.root) else ""
    except OSError as e:
        problem = f"is not available ({e.strerror}; not mounted?)"
    if not problem:
        return True
    if missing_root == "unlocalised":
        warn(f"shared tree root {item.root} {problem}; running without localising it")
        return False
    raise OvlrunError(f"shared tree root {item.root} {problem}; refusing to run the job there "
                      "(profiles may allow it with missing_root = \"unlocalised\")")


def mount_profile(profile: Profile, store: Store, *, strict: bool, warn: Warn) -> list[Localised]:
    """Plan and mount the profile's overlays in the current (already private) namespace."""
    features = probe()
    if not features.overlay:
        raise OvlrunError("this kernel has no overlayfs (modprobe overlay)")
    return mount_plan(plan(profile, store, features, strict=strict, warn=warn), features, strict=strict, warn=warn,
                      missing_root=profile.missing_root)


def find_executable(name: str, path_var: str) -> str | None:
    """execvp(3)'s search done up front (as root, inside the namespace) so that after the
    privilege drop nothing but execve() remains.  A non-executable match is returned so
    execve() reports EACCES (-> 126), as a shell would."""
    if "/" in name:
        return name
    fallback = None
    for d in path_var.split(":"):
        candidate = os.path.join(d or ".", name)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            fallback = fallback or candidate
    return fallback


def exec_command(argv: list[str], environ: dict[str, str], identity: Identity | None) -> int:
    """Drop to ``identity`` and exec; returns an exit status only if exec failed."""
    path = find_executable(argv[0], environ.get("PATH", DEFAULT_PATH))
    if path is None:
        print(f"ovlrun: {argv[0]}: command not found", file=sys.stderr)
        return EXIT_NOT_FOUND
    if identity is not None:
        drop_to(identity)
    try:
        os.execve(path, argv, environ)
    except OSError as e:
        print(f"ovlrun: {argv[0]}: {e.strerror}", file=sys.stderr)
        return EXIT_NOT_FOUND if isinstance(e, FileNotFoundError) else EXIT_CANNOT_EXECUTE
    raise AssertionError("unreachable")  # pragma: no cover


def shell_argv(identity: Identity | None) -> list[str]:
    """The user's login shell, from the password database, started as a login shell."""
    shell = identity.shell if identity else Identity.of_uid(0).shell
    return [shell, "-l"]


def run_job(profile: Profile, command: list[str], *, identity: Identity | None, strict: bool,
            store: Store | None = None, environ: dict[str, str] | None = None) -> int:
    if os.geteuid() != 0:
        raise OvlrunError("ovlrun must run as root: use 'sudo ovlrun ...', a scheduler prolog, or a root shell")
    env = dict(os.environ if environ is None else environ)
    try:
        cwd: str | None = os.getcwd()
    except OSError:
        cwd = None
    enter_private_namespace()
    mount_profile(profile, store or Store.open(), strict=strict, warn=warn_stderr)
    if profile.network == "none":
        from ovlrun.network import isolate_network  # pyroute2 is slow to import: only here

        isolate_network()
    # Re-enter the working directory by path: if it lies in a localised subtree the job's
    # cwd is now the overlay's view of it, not the shared tree's inode below the mount.
    try:
        os.chdir(cwd or "/")
    except OSError:
        os.chdir("/")
    env["OVLRUN_PROFILE"] = profile.name
    argv = command or shell_argv(identity)
    if identity is not None and not command:
        env.setdefault("HOME", identity.home)
    sys.stdout.flush()
    sys.stderr.flush()
    return exec_command(argv, env, identity)
