"""The mount phase runs in a worker process, and the launch waits for it within a bound.

A request the shared tree's server (or a FUSE daemon) has taken is waited for in D state,
which not even SIGKILL ends (fs/fuse/dev.c request_wait_answer; NFS hard mounts), and a
process is not reaped until every thread of it has exited.  So mount threads of the
launch's own would hold the launch for as long as the tree stalls: measured with the
stalling FUSE stand-in, a launch whose mount thread stalled printed its message at the
deadline, but its exit status reached the caller only when the stall ended.

Instead the launch forks a worker (same credentials, same mount namespace: what it
mounts is the job's) that reports each item as soon as it is done, and waits for the
reports at most ``timeout`` seconds.  Past that it gives up (:class:`MountStalled`, exit
125): the worker is left with a pending SIGKILL (and PR_SET_PDEATHSIG) and exits as soon
as its request completes, taking nothing with it, since its mounts are in the job's
namespace, which dies with it.  Costs one fork per launch (1-3 ms of CPU), so a mount
phase that cannot stall (every image and tree root on a local file system:
``ovlrun.launch.mount``) skips it: :func:`run_here` runs the same work in the launch's
own process and hands back its failures exactly as a worker's would come back.

On the launch path: standard library modules that are builtins or already loaded;
nothing after the first mount.
"""

from __future__ import annotations

import _thread
import marshal
import os
import select
import time

from ovlrun.errors import OvlrunError
from ovlrun.linux.children import die_with_parent
from ovlrun.linux.files import write_all

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
    from collections.abc import Callable

    Report = Callable[[int, BaseException | None], None]
else:
    # signal's functions without its enum wrappers: importing enum costs a launch ~1 ms.
    import _signal

# How long the mount phase may wait for the shared tree (every lookup, the overlays'
# statfs, the missing-path check) before the launch gives up: a healthy tree answers in
# milliseconds, and a stalled one must not hold a job start (or a Prolog) for ever.
DEFAULT_MOUNT_TIMEOUT = 60.0


class MountStalled(OvlrunError):
    """The shared tree did not answer within the mount phase's bound."""


def mount_timeout() -> float:
    """The mount phase's bound: ``OVLRUN_MOUNT_TIMEOUT`` (seconds; root callers only, see
    :mod:`ovlrun.launch.caller`) or :data:`DEFAULT_MOUNT_TIMEOUT`."""
    raw = os.environ.get("OVLRUN_MOUNT_TIMEOUT")
    if raw is None:
        return DEFAULT_MOUNT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise OvlrunError(f"OVLRUN_MOUNT_TIMEOUT={raw!r}: expected a number of seconds > 0")
    return value


def run_in_worker(labels: list[str], work: Callable[[Report], None], failures: dict[str, type[OvlrunError]],
                  timeout: float) -> list[BaseException | None]:
    """Run ``work(report)`` in a forked worker; return each item's failure (or None).

    ``work`` must call ``report(i, failure)`` once for every item ``i`` (``labels[i]``
    names it in the stall message).  A failure crosses back as its class name (rebuilt
    from ``failures``, else :class:`OvlrunError`), its message and its ``root_problem``
    attribute if it has one.  An error of ``work`` itself is raised here.
    """
    try:
        r, w = os.pipe()
    except OSError as e:
        raise OvlrunError(f"cannot start mounting: {e.strerror}") from None
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError as e:
        os.close(r)
        os.close(w)
        raise OvlrunError(f"cannot start mounting: {e.strerror}") from None
    if pid == 0:  # pragma: no cover - runs in the worker
        status = 1
        try:
            os.close(r)
            status = _worker(labels, work, w, parent)
        finally:
            os._exit(status)
    os.close(w)
    try:
        return _collect(labels, failures, r, pid, timeout)
    finally:
        os.close(r)


def _worker(labels: list[str], work: Callable[[Report], None], w: int, parent: int) -> int:
    die_with_parent(parent)
    # Report only through the pipe: a worker left behind in a stalled request must not
    # keep the caller's stdout/stderr open (whoever reads them would wait for EOF).
    os.closerange(0, 3)
    null = os.open(os.devnull, os.O_RDWR)  # fd 0: the lowest free
    os.dup2(null, 1)
    os.dup2(null, 2)
    lock = _thread.allocate_lock()

    def report(i: int, failure: BaseException | None) -> None:
        _send(w, lock, _record(labels, i, failure))

    message = _run(work, report)
    if message is not None:
        _send(w, lock, (-1, "OvlrunError", message, ""))
    return 0


def run_here(labels: list[str], work: Callable[[Report], None], failures: dict[str, type[OvlrunError]]
             ) -> list[BaseException | None]:
    """:func:`run_in_worker` without the worker, for a mount phase that cannot stall (no
    remote file system on the way: :func:`ovlrun.linux.mountinfo.all_local`): the same
    work in this process, and each failure as the launch would get it back from a worker
    (the same records, rebuilt the same way), so both ways behave alike."""
    result: list[BaseException | None] = [None] * len(labels)
    reported: set[int] = set()

    def report(i: int, failure: BaseException | None) -> None:
        reported.add(i)
        result[i] = _rebuild(_record(labels, i, failure), failures)

    message = _run(work, report)
    if message is not None:
        raise OvlrunError(message)
    if len(reported) != len(labels):
        raise OvlrunError("internal error while mounting: an item was not reported")
    return result


def _run(work: Callable[[Report], None], report: Report) -> str | None:
    """``work(report)``; the message of its own failure, if it failed."""
    try:
        work(report)
    except (KeyboardInterrupt, SystemExit):
        raise
    except OvlrunError as e:
        return e.message
    except OSError as e:
        return f"cannot mount the localised paths: {e}"
    except BaseException as e:
        return f"internal error while mounting: {e!r}"
    return None


def _record(labels: list[str], i: int, failure: BaseException | None) -> tuple[int, str, str, str]:
    """What crosses back for item ``i``: (i, class name or "", message, root problem)."""
    if failure is None:
        return (i, "", "", "")
    if isinstance(failure, OvlrunError):
        return (i, type(failure).__name__, failure.message, str(getattr(failure, "root_problem", "")))
    if isinstance(failure, OSError):  # a call's failure the work gave no context
        return (i, "OvlrunError", f"cannot localise {labels[i]}: {failure}", "")
    # a bug: told, never a traceback to the user
    return (i, "OvlrunError", f"internal error while mounting {labels[i]}: {failure!r}", "")


def _rebuild(record: tuple[int, str, str, str], classes: dict[str, type[OvlrunError]]) -> BaseException | None:
    _, kind, message, problem = record
    if not kind:
        return None
    failure = classes.get(kind, OvlrunError)(message)
    if problem:
        failure.root_problem = problem  # type: ignore[attr-defined]
    return failure


def _send(w: int, lock: _thread.LockType, record: tuple[int, str, str, str]) -> None:
    data = marshal.dumps(record)
    frame = len(data).to_bytes(4, "little") + data
    with lock:  # whole frames only: threads report concurrently
        write_all(w, frame)


def _collect(labels: list[str], classes: dict[str, type[OvlrunError]], r: int, pid: int,
             timeout: float) -> list[BaseException | None]:
    """The launch's side: read the worker's reports until each item has one, or give up."""
    failures: list[BaseException | None] = [None] * len(labels)
    done: set[int] = set()
    buffer = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([r], [], [], left)[0]:
            os.kill(pid, _signal.SIGKILL)
            stalled = [label for i, label in enumerate(labels) if i not in done]
            if not stalled:
                raise OvlrunError(f"the mount worker did not finish within {timeout:g}s; refusing to run the job")
            raise MountStalled(f"the shared tree did not answer within {timeout:g}s while localising "
                               f"{', '.join(stalled)}; refusing to run the job (stalled or unreachable server?)")
        chunk = os.read(r, 65536)
        if not chunk:
            break
        buffer += chunk
        while len(buffer) >= 4 and len(buffer) >= 4 + int.from_bytes(buffer[:4], "little"):
            size = int.from_bytes(buffer[:4], "little")
            record = marshal.loads(buffer[4:4 + size])
            buffer = buffer[4 + size:]
            i = record[0]
            if i < 0:
                os.waitpid(pid, 0)
                raise OvlrunError(record[2])
            done.add(i)
            failures[i] = _rebuild(record, classes)
    _, wstatus = os.waitpid(pid, 0)
    if len(done) != len(labels):
        raise OvlrunError(f"the mount worker exited early (status {os.waitstatus_to_exitcode(wstatus)})")
    return failures
