"""Job records: one small file per job, written by root, read by the hooks after the one
that wrote it, by ``ovlrun enter``, by gc and by whatever lists jobs.

Every launch writes one (kind ``launch``), and so does every Slurm Prolog for a job that
asked for a profile (kind ``slurm``).  Layout, under ``/run/ovlrun/jobs`` (a tmpfs: records
go with a reboot; ``OVLRUN_JOB_RUNDIR`` elsewhere, for root callers only)::

    RUNDIR/                      root, 0711: users may open their own view files by name,
                                 not list whose jobs run here
    RUNDIR/ID.json               the record: root, 0600 (issue 18: profile names,
                                 messages and mounts are nobody else's business)
    RUNDIR/JOBID.env             a Slurm job's view for its user (the TaskProlog exports it,
    RUNDIR/JOBID.messages        prints the messages; ``ovlrun status`` reads the profile):
                                 owned by the job's user, 0400, made by root with O_EXCL |
                                 O_NOFOLLOW and never read by root for any decision
    RUNDIR/JOBID/.ns             a namespace a Prolog pinned without a job_container plugin
    RUNDIR/.ended/ID.json        ended jobs' records, a bounded history (jobs/history.py)
    RUNDIR/NODE/...              the same for another slurmd node of this host

A Slurm record lives from the Prolog to the Epilog, which moves it into the history.  A
launch execs its command (the command *is* the job process), so nobody writes its end
(unless learn ran it): the record says what identifies the job's liveness -- the
process id with its start time (``pid``, ``pid_start``, from ``/proc/PID/stat``) and
its mount namespace's inode (``ns_ino``) -- and :meth:`JobRecord.alive` infers the rest;
``prune_ended`` removes old ones.

States: ``preparing`` (saved before anything is mounted, so whatever a killed hook left
can be found and removed), ``requested`` (a later hook, CloneNSScript, mounts),
``localised``, ``unlocalised`` (the job runs on the plain shared tree; messages say why).

On the launch path: imports os and stat only.
Records are JSON, written by hand here (:func:`encode`) because the json module imports
re; readers are cold and use json.
"""

from __future__ import annotations

import os

from ovlrun.errors import OvlrunError
from ovlrun.linux.files import UntrustedError, open_trusted, write_atomic

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

DEFAULT_RUNDIR = "/run/ovlrun/jobs"
RUNDIR_MODE = 0o711
RECORD_SUFFIX = ".json"
LAUNCH, SLURM = "launch", "slurm"
PREPARING, REQUESTED, LOCALISED, UNLOCALISED = "preparing", "requested", "localised", "unlocalised"
MAX_RECORD = 16 << 20  # a record larger than this is not one of ours
LAUNCH_RECORD_KEEP = 86400.0  # seconds the record of an ended launch is kept (prune_ended)


def rundir() -> str:
    """Directory of job records; tests point it elsewhere with OVLRUN_JOB_RUNDIR."""
    return os.environ.get("OVLRUN_JOB_RUNDIR") or DEFAULT_RUNDIR


def host_node() -> str:
    """This host's short name: the node name of its one slurmd, usually."""
    return os.uname().nodename.split(".")[0]


def valid_node_name(node: str) -> bool:
    return bool(node) and node[0] != "." and all(c.isascii() and (c.isalnum() or c in "._-") for c in node)


def valid_job_id(job_id: str) -> bool:
    """A scheduler's job id: ASCII digits only (``str.isdigit`` also accepts '²')."""
    return bool(job_id) and job_id.isascii() and job_id.isdigit()


def launch_id(pid: int, pid_start: int) -> str:
    """The id of the launch running as process ``pid`` started at ``pid_start`` (clock
    ticks after boot): unique on this host until it reboots."""
    return f"{LAUNCH}-{pid}-{pid_start}"


def valid_record_id(record_id: str) -> bool:
    """A job id, or a :func:`launch_id`: never a path."""
    if valid_job_id(record_id):
        return True
    kind, _, rest = record_id.partition("-")
    pid, _, start = rest.partition("-")
    return kind == LAUNCH and valid_job_id(pid) and valid_job_id(start)


def record_dir(node: str | None = None) -> str:
    """Where the records of slurmd node ``node`` live: the run directory itself for the
    host's own node (and for launches), a subdirectory per node name for the others
    (Slurm's multiple-slurmd: several nodes on one host, where one job id can run on two
    of them)."""
    base = rundir()
    if not node or node == host_node():
        return base
    if not valid_node_name(node):
        raise OvlrunError(f"invalid node name {node!r}")
    return os.path.join(base, node)


def process_start(pid: int | str = "self") -> int:
    """When process ``pid`` started, in clock ticks after boot (/proc/PID/stat field 22):
    with the pid, what tells this process from a later one that reuses its number."""
    fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    try:
        stat = os.read(fd, 4096)
    finally:
        os.close(fd)
    # The command name (field 2) is in parentheses and may contain anything: count fields
    # after its closing one.
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def open_record_dir(node: str | None = None) -> int:
    """An fd of the record directory of ``node``, made if missing (root, 0711; ``/run/ovlrun``
    0755); it must be root's and not writable by others.  Records are written relative to
    it, so a launch opens it before its first mount and resolves nothing afterwards.
    Raises OSError, or OvlrunError for a directory root must not write into."""
    path = record_dir(node)
    try:
        return _open_dir(path)
    except FileNotFoundError:
        pass
    base = rundir()
    os.makedirs(os.path.dirname(base.rstrip("/")) or "/", mode=0o755, exist_ok=True)
    for directory in (base, path) if path != base else (base,):
        try:
            os.mkdir(directory, RUNDIR_MODE)
        except FileExistsError:
            pass
    return _open_dir(path)


def _open_dir(path: str) -> int:
    try:
        return open_trusted(path, directory=True)
    except UntrustedError as e:
        raise OvlrunError(f"refusing job record directory {path}: {e.problem}") from None


# The fields of a record, in the order a record file lists them.
FIELDS = ("job_id", "kind", "user", "uid", "gid", "profile", "state", "node", "started", "ended", "pid", "pid_start",
          "ns_ino", "ns_path", "ns_owned", "localised", "messages", "stats")


class JobRecord:
    """What ovlrun decided for one job; written by root, trusted only as root wrote it.

    ``job_id``: the scheduler's id (digits) or a launch's (:func:`launch_id`); ``kind``:
    ``launch`` or ``slurm``; ``uid``/``gid``/``user``: whose job; ``profile`` (None: no
    request); ``state`` (see the module docstring); ``localised``: the paths mounted;
    ``messages``: warnings for the user and the administrator; ``ns_path``: a pinned
    namespace file, ``ns_owned`` if ovlrun made it (and must remove it); ``ns_ino``: the
    job's mount namespace's inode (0: unknown); ``pid``/``pid_start``: the launched
    process (0: none); ``node``: the slurmd node name ("" this host's own); ``started``,
    ``ended``: Unix times (``ended`` None while unknown); ``stats``: per-job statistics
    (JSON values: numbers, strings, booleans, None, lists, dicts with string keys).
    """

    __slots__ = ("ended", "gid", "job_id", "kind", "localised", "messages", "node", "ns_ino", "ns_owned",
                 "ns_path", "pid", "pid_start", "profile", "started", "state", "stats", "uid", "user")

    def __init__(self, job_id: str, uid: int, gid: int, user: str, *, kind: str = SLURM,
                 profile: str | None = None, state: str = REQUESTED, localised: list[str] | None = None,
                 messages: list[str] | None = None, ns_path: str | None = None, ns_owned: bool = False,
                 ns_ino: int = 0, pid: int = 0, pid_start: int = 0, node: str = "", started: float = 0.0,
                 ended: float | None = None, stats: dict[str, object] | None = None) -> None:
        self.job_id = job_id
        self.kind = kind
        self.uid = uid
        self.gid = gid
        self.user = user
        self.profile = profile
        self.state = state
        self.localised = [] if localised is None else localised
        self.messages = [] if messages is None else messages
        self.ns_path = ns_path
        self.ns_owned = ns_owned
        self.ns_ino = ns_ino
        self.pid = pid
        self.pid_start = pid_start
        self.node = node
        self.started = started
        self.ended = ended
        self.stats: dict[str, object] = {} if stats is None else stats

    def __repr__(self) -> str:
        return f"JobRecord({self.job_id!r}, kind={self.kind!r}, user={self.user!r}, state={self.state!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JobRecord) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in FIELDS}

    @classmethod
    def from_dict(cls, data: object) -> JobRecord:
        """A record from its JSON data; ValueError if it is not one.  Keys it does not know
        are ignored (a newer ovlrun's), missing ones take their defaults (an older one's)."""
        if not isinstance(data, dict):
            raise ValueError("not a job record")
        known = {k: v for k, v in data.items() if k in cls.__slots__}
        missing = [k for k in ("job_id", "uid", "gid", "user") if k not in known]
        if missing:
            raise ValueError(f"job record lacks {', '.join(missing)}")
        for key, value in known.items():
            # bool is an int to isinstance: only ns_owned may be one.
            if not isinstance(value, _TYPES[key]) or (isinstance(value, bool) and key != "ns_owned"):
                raise ValueError(f"job record field {key!r} has the wrong type")
        if not all(isinstance(m, str) for m in known.get("localised", []) + known.get("messages", [])):
            raise ValueError("job record lists hold strings only")
        job_id, uid, gid, user = (known.pop(k) for k in ("job_id", "uid", "gid", "user"))
        return cls(job_id, uid, gid, user, **known)

    # -- where it lives --------------------------------------------------------------

    @staticmethod
    def path_for(job_id: str, node: str | None = None, suffix: str = RECORD_SUFFIX) -> Path:
        """The record's file (with ``suffix``, a view file's).  A Path: for the cold
        readers; a launch writes relative to its directory's fd and never asks."""
        from pathlib import Path

        check_id(job_id)
        return Path(record_dir(node), job_id + suffix)

    @classmethod
    def messages_path(cls, job_id: str, node: str | None = None) -> Path:
        return cls.path_for(job_id, node, ".messages")

    @classmethod
    def env_path(cls, job_id: str, node: str | None = None) -> Path:
        return cls.path_for(job_id, node, ".env")

    # -- writing -----------------------------------------------------------------------

    def save(self, dir_fd: int | None = None, *, views: bool = True) -> None:
        """Write (replace) the record, root-only, in its node's record directory, or in the
        one ``dir_fd`` holds (a launch opened it before its first mount).  The user's view
        files are written beside it (``views``; a record moving into the history has none):
        a Slurm job's environment and messages."""
        own = dir_fd is None
        if dir_fd is None:
            dir_fd = open_record_dir(self.node)
        try:
            check_id(self.job_id)  # it becomes a file name
            # Not fsynced: a record means nothing after a crash (its jobs are gone, and /run
            # is normally a tmpfs), and a launch must not wait for a disk.
            write_atomic(self.job_id + RECORD_SUFFIX, encode(self.to_dict()).encode(), 0o600, dir_fd=dir_fd,
                         durable=False)
            if views and self.kind == SLURM:
                self._save_views(dir_fd)
        finally:
            if own:
                os.close(dir_fd)

    def _save_view(self, dir_fd: int, suffix: str, text: str) -> None:
        """A file of the record's for its user: owned by them, 0400, replaced atomically
        in root's directory (they cannot write there); root never reads it back."""
        write_atomic(self.job_id + suffix, text.encode(), 0o400, dir_fd=dir_fd, owner=(self.uid, -1), durable=False)

    def _save_views(self, dir_fd: int) -> None:
        # The messages as plain lines, for readers without Python: the optional Slurm
        # TaskProlog is a shell script running as the user, possibly unable to reach the
        # interpreter that runs ovlrun.
        notes = "".join(m.replace("\n", " ") + "\n" for m in self.messages)
        # What a launch puts in a job's environment, for the TaskProlog to export and
        # `ovlrun status` to read (profile names are [A-Za-z0-9_.+-], job ids digits).
        env = f"OVLRUN_PROFILE={self.profile}\nOVLRUN_JOB_ID={self.job_id}\n" if self.state == LOCALISED else ""
        for suffix, text in ((".messages", notes), (".env", env)):
            self._save_view(dir_fd, suffix, text)

    @classmethod
    def remove(cls, job_id: str, node: str | None = None) -> None:
        for path in (cls.path_for(job_id, node), cls.messages_path(job_id, node), cls.env_path(job_id, node)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    # -- reading (root) ----------------------------------------------------------------

    @classmethod
    def load(cls, job_id: str, node: str | None = None) -> JobRecord | None:
        """The record, None if there is none; OvlrunError if root did not write it,
        ValueError if it is not a record."""
        return cls.load_path(cls.path_for(job_id, node))

    @classmethod
    def find(cls, job_id: str) -> JobRecord | None:
        """The record of job ``job_id`` on whichever node of this host runs it (``enter``):
        an error if several do (a job spanning nodes of a multiple-slurmd host)."""
        base = rundir()
        name = job_id + RECORD_SUFFIX
        candidates = [str(cls.path_for(job_id))] + [os.path.join(base, d, name) for d in node_dirs(base)]
        found = [p for p in candidates if os.path.lexists(p)]
        if len(found) > 1:
            nodes = ", ".join(os.path.basename(os.path.dirname(p)) if os.path.dirname(p) != base else host_node()
                              for p in found)
            raise OvlrunError(f"job {job_id} runs on several nodes of this host ({nodes}); "
                              "enter it from a session on the node you mean")
        return cls.load_path(found[0]) if found else None

    @classmethod
    def all(cls, kind: str | None = None, within: str = "") -> list[JobRecord]:
        """Every readable, trusted record (of ``kind``, if given) of every node of this host
        (in each node's subdirectory ``within``, e.g. the history of ended jobs);
        unreadable ones are skipped."""
        base = rundir()
        out = []
        for directory in [base] + [os.path.join(base, d) for d in node_dirs(base)]:
            directory = os.path.join(directory, within) if within else directory
            try:
                names = sorted(os.listdir(directory))
            except OSError:
                continue
            for name in names:
                record_id = name[:-len(RECORD_SUFFIX)]
                if not name.endswith(RECORD_SUFFIX) or not valid_record_id(record_id):
                    continue
                if kind is not None and valid_job_id(record_id) != (kind == SLURM):
                    continue  # told by the name, before reading it (gc reads Slurm ones only)
                try:
                    record = cls.load_path(os.path.join(directory, name))
                except (OvlrunError, ValueError):
                    continue
                if record is not None:
                    out.append(record)
        return out

    @classmethod
    def load_path(cls, path: str | Path, dir_fd: int | None = None) -> JobRecord | None:
        """The record in file ``path`` (relative to ``dir_fd`` if given), None if there is
        none; OvlrunError if root did not write it, ValueError if it is not a record."""
        import json

        try:
            # Only a record root wrote: the directory could be misconfigured.
            fd = open_trusted(str(path), dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise OvlrunError(f"{path}: {e.strerror}") from None
        except UntrustedError as e:
            raise OvlrunError(f"{path}: {e.problem}; refusing to use it") from None
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_RECORD + 1)
        if len(raw) > MAX_RECORD:
            raise ValueError(f"{path}: larger than {MAX_RECORD} bytes")
        return cls.from_dict(json.loads(raw))

    # -- liveness ----------------------------------------------------------------------

    def alive(self) -> bool:
        """Is the job still running?  A launch: its process (same pid, same start time) is;
        a Slurm job: its record is running until the Epilog ends it (jobs/history.py)."""
        if self.ended is not None:
            return False
        if self.kind != LAUNCH:
            return True
        try:
            return bool(self.pid) and process_start(self.pid) == self.pid_start
        except (OSError, ValueError, IndexError):
            return False


_TYPES: dict[str, type | tuple[type, ...]] = {
    "job_id": str, "kind": str, "uid": int, "gid": int, "user": str, "profile": (str, type(None)), "state": str,
    "localised": list, "messages": list, "ns_path": (str, type(None)), "ns_owned": bool, "ns_ino": int, "pid": int,
    "pid_start": int, "node": str, "started": (int, float), "ended": (int, float, type(None)), "stats": dict}


def check_id(job_id: str) -> None:
    if not valid_record_id(job_id):
        # Job ids come from the environment of a root hook or the command line of
        # `ovlrun enter`; never let them name a path outside the run directory.
        raise OvlrunError(f"invalid job id {job_id!r}: expected digits")


def node_dirs(base: str) -> list[str]:
    """Subdirectories of ``base`` that hold another slurmd node's records."""
    try:
        return sorted(d for d in os.listdir(base) if valid_node_name(d) and not valid_job_id(d)
                      and os.path.isdir(os.path.join(base, d)))
    except OSError:
        return []


def prune_ended(max_age: float, now: float) -> int:
    """Remove the records of launches that ended (see :meth:`JobRecord.alive`) and started
    more than ``max_age`` seconds before ``now``; returns how many."""
    removed = 0
    for record in JobRecord.all(LAUNCH):
        if now - record.started > max_age and not record.alive():
            JobRecord.remove(record.job_id)
            removed += 1
    return removed


# -- JSON, by hand ---------------------------------------------------------------------

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def _string(s: str) -> str:
    if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s:
        return f'"{s}"'
    out = []
    for ch in s:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code < 0x10000:  # includes the lone surrogates of undecodable bytes in paths
            out.append(f"\\u{code:04x}")
        else:
            code -= 0x10000
            out.append(f"\\u{0xD800 | code >> 10:04x}\\u{0xDC00 | code & 0x3FF:04x}")
    return '"' + "".join(out) + '"'


def encode(value: object) -> str:
    """``value`` as JSON text, as ``json.dumps(value)`` (ASCII, surrogates escaped) would
    write it, without importing json; TypeError for what JSON cannot hold."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise TypeError("JSON has no NaN or infinity")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(encode(v) for v in value) + "]"
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("JSON object keys are strings")
        return "{" + ", ".join(f"{_string(k)}: {encode(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"{type(value).__name__} is not JSON")
