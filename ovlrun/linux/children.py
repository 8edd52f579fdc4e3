"""Work done in a forked child, and how its outcome crosses back to the parent.

Two kinds of children do work for ovlrun: bounded workers that touch a shared tree that
may stall (:mod:`ovlrun.store.bounded`), and helpers that switch into a job's mount
namespace (:mod:`ovlrun.linux.namespaces`).  Both report through a pipe with
:func:`outcome`, and the parent turns the bytes back into the value, or into the very
exception the child raised, with :func:`result`: an :class:`~ovlrun.errors.OvlrunError`
keeps its class and exit status, an ``OSError`` its class, errno, call and path
(pickle; both define ``__reduce__`` for it), so the caller adds its context once, as if
the work had run in its own process.  A bug (any other exception) arrives as its
traceback text.

:func:`die_with_parent` makes a child follow its parent: killed with SIGKILL when the
parent dies, so a worker the parent gave up on never outlives it.
"""

from __future__ import annotations

import os

from ovlrun.errors import OvlrunError
from ovlrun.linux import syscalls

# pickle (which imports re) and traceback are imported where used, in the child and on
# its report's way back: the launch path imports this module (through namespaces) and
# never forks.

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    T = TypeVar("T")


class ChildFailed(RuntimeError):
    """A child failed with an exception that is neither OvlrunError nor OSError (a bug);
    the message carries its traceback."""


def outcome(fn: Callable[[], object]) -> bytes:
    """Run ``fn`` (in the child) and return what :func:`result` makes of it, pickled."""
    import pickle
    import traceback

    report: tuple[str, object]
    try:
        report = ("ok", fn())
    except (OvlrunError, OSError) as e:
        report = ("error", e)
    except BaseException:
        report = ("bug", traceback.format_exc())
    try:
        return pickle.dumps(report)
    except Exception:  # an unpicklable result or exception: a bug too
        return pickle.dumps(("bug", traceback.format_exc()))


def result(data: bytes, what: str) -> object:
    """The value a child's :func:`outcome` carried, or its exception raised again here;
    ``what`` names the work in a bug's message."""
    import pickle

    kind, payload = pickle.loads(data)
    if kind == "ok":
        return payload
    if kind == "error":
        assert isinstance(payload, BaseException)
        raise payload
    raise ChildFailed(f"{what}: worker failed:\n{payload}")


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` dies (PR_SET_PDEATHSIG).  Set it again after any
    credential change: the kernel clears it then (:func:`ovlrun.linux.privileges.drop_to`
    does).  If the parent is already gone, no signal will come: exit now."""
    if TYPE_CHECKING:
        import signal as _signal
    else:
        import _signal  # not signal: its enum wrappers cost a launch's mount worker ~1 ms

    syscalls.set_pdeathsig(_signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
