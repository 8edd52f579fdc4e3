"""strace: learn's tracer for users without root, and reading what it prints.

``strace -f -xx -y``: every string in hex (``"\\x2f\\x73\\x77"``), so a path is
recovered byte for byte and nothing in one (quotes, commas, ``) = ``) can confuse the
parser; ``-y`` prints the path behind every descriptor argument, ``AT_FDCWD`` included
(``AT_FDCWD</work>``), which resolves relative lookups without following the job.
With ``-f`` and several processes lines interleave as
``<unfinished ...>`` / ``<... NAME resumed>``; :class:`Parser` joins them.
"""

from __future__ import annotations

import errno
import os
import re

from ovlrun.learn.events import (
    AT_EMPTY_PATH,
    AT_FDCWD,
    FCHDIR,
    LOOKUP_SYSCALLS,
    O_CLOEXEC,
    O_DIRECTORY,
    O_PATH,
    PROCESS_SYSCALLS,
    Raw,
)

FLAG_BITS = {"O_DIRECTORY": O_DIRECTORY, "O_PATH": O_PATH, "O_CLOEXEC": O_CLOEXEC, "AT_EMPTY_PATH": AT_EMPTY_PATH}
TRACED = (*(s.name for s in LOOKUP_SYSCALLS), FCHDIR, *PROCESS_SYSCALLS)
_HEX_STRING = r'"((?:\\x[0-9a-f]{2})*)"(\.\.\.)?'
_PATH = re.compile(_HEX_STRING)
_DIRFD = re.compile(r'(AT_FDCWD|-?\d+)(?:<((?:\\x[0-9a-f]{2})*)>)?')
_FLAG = re.compile(r"\b(O_DIRECTORY|O_PATH|O_CLOEXEC|AT_EMPTY_PATH)\b")
_CALL = re.compile(r"^(.*)\)\s+= (.*)$", re.DOTALL)  # greedy: the last ") = " (a resumed line pads it)
_EXIT = re.compile(r"\+\+\+ (?:exited with (\d+)|killed by (SIG\w+)(?: \(core dumped\))?) \+\+\+")


def command(program: str, output: str, pid: int) -> list[str]:
    """strace following ``pid`` and its descendants, writing to ``output`` ("?name": a
    syscall this architecture lacks is skipped, not an error)."""
    return [program, "-f", "-xx", "-y", "-e", "signal=none", "-e", "trace=" + ",".join("?" + s for s in TRACED),
            "-o", output, "-p", str(pid)]


def _hex(text: str) -> str:
    return os.fsdecode(bytes.fromhex(text.replace("\\x", "")))


def _errno(name: str) -> int:
    value = getattr(errno, name, None)
    return value if isinstance(value, int) else errno.EIO


class Exit:
    """A process's end as strace reports it: its status, or the signal that killed it."""

    __slots__ = ("pid", "signal", "status")

    def __init__(self, pid: int, status: int | None, signal: str | None) -> None:
        self.pid = pid
        self.status = status
        self.signal = signal


class Parser:
    """Turns strace's output, line by line, into :class:`Raw` records and :class:`Exit`s."""

    def __init__(self) -> None:
        self.pending: dict[int, str] = {}
        self.unparsed = 0

    def feed(self, line: str) -> Raw | Exit | None:
        pid_text, _, text = line.rstrip("\n").partition(" ")
        if not pid_text.isdigit():
            self.unparsed += bool(line.strip())
            return None
        pid = int(pid_text)
        text = text.lstrip(" ")
        if text.startswith("<... "):
            head = self.pending.pop(pid, None)
            _, sep, tail = text.partition(" resumed>")
            if head is None or not sep:
                self.unparsed += 1
                return None
            text = head + tail
        elif text.endswith(" <unfinished ...>"):
            self.pending[pid] = text[: -len(" <unfinished ...>")]
            return None
        if text.startswith("+++"):
            found = _EXIT.search(text)
            if found is None:
                return None
            return Exit(pid, int(found.group(1)) if found.group(1) else None, found.group(2))
        if text.startswith("---"):
            return None
        return self._syscall(pid, text)

    def _syscall(self, pid: int, text: str) -> Raw | None:
        name, paren, rest = text.partition("(")
        call = _CALL.match(rest)
        if not paren or call is None:
            self.unparsed += 1
            return None
        args, result = call.group(1), call.group(2).strip()
        ret = self._return(result)
        if name in PROCESS_SYSCALLS:
            return Raw("fork", name, pid, pid, ret)
        dirfd, dirpath = AT_FDCWD, None
        found = _DIRFD.match(args)
        if name == FCHDIR:
            if found is not None:
                dirfd = AT_FDCWD if found.group(1) == "AT_FDCWD" else int(found.group(1))
                dirpath = _hex(found.group(2)) if found.group(2) is not None else None
            return Raw("fchdir", FCHDIR, pid, pid, ret, dirfd, 0, "", dirpath)
        path = _PATH.search(args)
        if path is None:
            self.unparsed += 1
            return None
        if found is not None and found.end() < path.start():  # *at: a directory fd comes first
            dirfd = AT_FDCWD if found.group(1) == "AT_FDCWD" else int(found.group(1))
            if found.group(2) is not None:
                candidate = _hex(found.group(2))
                dirpath = candidate if candidate.startswith("/") else None
        flags = 0
        for token in _FLAG.findall(args):
            flags |= FLAG_BITS[token]
        return Raw("lookup", name, pid, pid, ret, dirfd, flags, _hex(path.group(1)), dirpath,
                   truncated=path.group(2) is not None)

    @staticmethod
    def _return(result: str) -> int:
        head = result.split(" ", 2)
        if head[0] == "?":
            return 0
        try:
            value = int(head[0].split("<", 1)[0], 0)
        except ValueError:
            return -errno.EIO
        if value < 0 and len(head) > 1:
            return -_errno(head[1])
        return value
