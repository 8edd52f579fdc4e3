"""The site configuration, ``/etc/ovlrun/ovlrun.toml``: where a fleet's published
snapshot images are and which account may have written them, and which trees ``ovlrun
learn`` counts lookups in.

::

    image_dir = "/sw/.ovlrun-images"   # what `snapshot fetch` (no --from) and the Slurm Prolog read
    image_owner = "swadmin"            # account (name or uid) that owns DIR and everything in it
    fetch_timeout = 5                  # seconds the Prolog may spend fetching a job's images
    max_image_bytes = "4GiB"           # a published image larger than this is never fetched
    [[learn_tree]]                     # a tree `ovlrun learn` and `learn watch` count lookups in
    root = "/sw"
    release_depth = 2                  # where its release directories are: /sw/APP/VERSION (optional)

Every key is optional; without the file, nothing is fetched implicitly and the image
owner is root.  The file decides what root mounts on every node, so it is read only if
root owns it and neither group nor others may write it, and an unknown key is an error
naming the file and the key (a misspelt ``image_owner`` silently meaning "root" is the
kind of quiet wrongness the profile parser refuses too).  ``OVLRUN_CONFIG`` points
elsewhere (tests, staging); like ``OVLRUN_STORE`` it is honoured for root callers only.
"""

from __future__ import annotations

import os
import posixpath
import pwd
import tomllib
from typing import NamedTuple

from ovlrun.errors import OvlrunError
from ovlrun.linux.files import UntrustedError, open_trusted
from ovlrun.profile.parse import parse_size

DEFAULT_CONFIG = "/etc/ovlrun/ovlrun.toml"
DEFAULT_FETCH_TIMEOUT = 5.0
# A published image is copied into every node's store: one larger than this is refused
# before a byte is copied (a snapshot image holds metadata and the inlined files; a
# million entries take a few hundred MB).  The store's free space is checked too.
DEFAULT_MAX_IMAGE_BYTES = 4 << 30
MAX_IMAGE_BYTES_LIMIT = 1 << 40
KEYS = ("image_dir", "image_owner", "fetch_timeout", "max_image_bytes", "learn_tree")
LEARN_TREE_KEYS = ("root", "release_depth")
MAX_RELEASE_DEPTH = 32


class Owner(NamedTuple):
    """The account trusted to have written published images (and that publish writes as)."""

    name: str
    uid: int
    gid: int


class LearnTree(NamedTuple):
    """A shared tree ``learn`` attributes lookups to; ``release_depth``: how many
    components below ``root`` its release directories are (None: learn finds out)."""

    root: str
    release_depth: int | None = None


class SiteConfig(NamedTuple):
    path: str  # the file it came from ("" for the defaults)
    image_dir: str | None = None
    image_owner: Owner = Owner("root", 0, 0)
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    learn_trees: tuple[LearnTree, ...] = ()


def config_path(environ: dict[str, str] | None = None) -> str:
    """``OVLRUN_CONFIG`` (root callers only), else the default."""
    env = os.environ if environ is None else environ
    override = env.get("OVLRUN_CONFIG")
    if override:
        # Defence in depth: admin commands are refused to sudo callers before they get
        # here, and a launch never reads this file.
        if env.get("SUDO_UID", "0").strip("0") or os.geteuid() != 0:
            raise OvlrunError("OVLRUN_CONFIG is only honoured for root callers")
        return override
    return DEFAULT_CONFIG


def resolve_owner(value: object, where: str = "image_owner") -> Owner:
    """An account name or uid -> :class:`Owner` (the gid is the account's, or the uid's own
    number for a uid without a passwd entry)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise OvlrunError(f"{where}: must be an account name or a uid")
    try:
        entry = pwd.getpwnam(value) if isinstance(value, str) else pwd.getpwuid(value)
    except KeyError:
        if isinstance(value, int) and value >= 0:
            return Owner(str(value), value, value)
        raise OvlrunError(f"{where}: no such account {value!r}") from None
    return Owner(entry.pw_name, entry.pw_uid, entry.pw_gid)


def load_site_config(path: str | None = None) -> SiteConfig:
    """Read and check the site configuration; the defaults if the file does not exist."""
    path = config_path() if path is None else path
    try:
        fd = open_trusted(path)  # checked on the fd it reads, not on whatever the name points to later
    except FileNotFoundError:
        return SiteConfig("")
    except OSError as e:
        raise OvlrunError(f"cannot read site configuration {path}: {e.strerror}") from None
    except UntrustedError as e:
        if e.wrong_type:
            raise OvlrunError(f"site configuration {path} is not a regular file") from None
        raise OvlrunError(f"refusing site configuration {path}: it must be owned by root and not "
                          f"group/other-writable ({e.problem})") from None
    with os.fdopen(fd, "rb") as f:
        raw = f.read()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise OvlrunError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise OvlrunError(f"{path}: TOML syntax error: {e}") from None
    return validate(data, path)


def validate(data: dict[str, object], path: str) -> SiteConfig:
    for key in data:
        if key not in KEYS:
            raise OvlrunError(f"{path}: {key}: unknown key (allowed: {', '.join(sorted(KEYS))})")
    image_dir = data.get("image_dir")
    if image_dir is not None:
        image_dir = _absolute(image_dir, f"{path}: image_dir")
    owner = Owner("root", 0, 0)
    if "image_owner" in data:
        owner = resolve_owner(data["image_owner"], f"{path}: image_owner")
    timeout = data.get("fetch_timeout", DEFAULT_FETCH_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
        raise OvlrunError(f"{path}: fetch_timeout: must be a number of seconds, more than 0 and at most 3600")
    try:
        max_image_bytes = parse_size(data.get("max_image_bytes", DEFAULT_MAX_IMAGE_BYTES), MAX_IMAGE_BYTES_LIMIT)
    except ValueError as e:
        raise OvlrunError(f"{path}: max_image_bytes: {e}") from None
    return SiteConfig(path, image_dir, owner, float(timeout), max_image_bytes,
                      _learn_trees(data.get("learn_tree", []), path))


def _absolute(value: object, where: str) -> str:
    """An absolute path without '..' components, normalised; an error naming ``where``."""
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise OvlrunError(f"{where}: must be an absolute path")
    if any(c == ".." for c in value.split("/")):
        raise OvlrunError(f"{where}: {value!r} has '..' components")
    return posixpath.normpath(value)


def _learn_trees(value: object, path: str) -> tuple[LearnTree, ...]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise OvlrunError(f"{path}: learn_tree: must be tables ([[learn_tree]] with root = ...)")
    out: list[LearnTree] = []
    for i, table in enumerate(value, 1):
        where = f"{path}: learn_tree #{i}"
        for key in table:
            if key not in LEARN_TREE_KEYS:
                raise OvlrunError(f"{where}: {key}: unknown key (allowed: {', '.join(LEARN_TREE_KEYS)})")
        if "root" not in table:
            raise OvlrunError(f"{where}: root: missing")
        root = _absolute(table["root"], f"{where}: root")
        if root == "/":
            raise OvlrunError(f"{where}: root: the root directory cannot be a software tree")
        depth = table.get("release_depth")
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int)
                                  or not 1 <= depth <= MAX_RELEASE_DEPTH):
            raise OvlrunError(f"{where}: release_depth: must be a whole number from 1 to {MAX_RELEASE_DEPTH}")
        if any(t.root == root for t in out):
            raise OvlrunError(f"{where}: root: {root} is named twice")
        out.append(LearnTree(root, depth))
    return tuple(out)
