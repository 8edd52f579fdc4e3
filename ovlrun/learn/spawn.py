"""Starting helper processes (the tracers) that cannot outlive learn.

A tracer gets ``PR_SET_PDEATHSIG=SIGKILL`` before it execs, so however learn ends
(SIGKILL included) the tracer goes with it: bpftrace's programs are detached when its
descriptors close, strace's tracees are detached by the kernel and keep running.  The
child may need to do something as itself before the exec (enter a private mount
namespace and mount tracefs there, see :mod:`ovlrun.learn.bpftrace`): ``setup`` runs in
the child and returns the argv to exec; what goes wrong there reaches the parent as an
:class:`OvlrunError` through a close-on-exec pipe (EOF on that pipe: the exec worked).
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable

import prctl

from ovlrun.errors import OvlrunError


def find_program(name: str) -> str | None:
    """``name`` on PATH, or in the sbin directories root's PATH usually has."""
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin")


def spawn(setup: Callable[[], list[str]], *, env: dict[str, str], stdout: int | None = None,
          stderr: int | None = None, keep_fds: tuple[int, ...] = (), stdin_null: bool = True) -> int:
    """Fork, run ``setup`` in the child, exec the argv it returns; the child's pid.

    The child's stdin is /dev/null (a tracer must not compete with the job for the
    terminal) unless ``stdin_null`` is False (strace starting the job: the job's stdin);
    ``stdout``/``stderr`` replace the child's (None: inherited).  Every
    other descriptor is closed except ``keep_fds``.
    """
    parent = os.getpid()
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child execs or exits)
        try:
            os.close(err_r)
            prctl.set_pdeathsig(signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(1)  # learn died before the line above: no signal would come
            if stdin_null:
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            if stdout is not None:
                os.dup2(stdout, 1)
            if stderr is not None:
                os.dup2(stderr, 2)
            for fd in keep_fds:
                os.set_inheritable(fd, True)
            _close_all_but(err_w, *keep_fds)
            argv = setup()
            os.execve(argv[0], argv, env)
        except OvlrunError as e:
            os.write(err_w, e.message.encode(errors="replace"))
        except OSError as e:
            os.write(err_w, f"{e.filename or 'exec'}: {e.strerror}".encode(errors="replace"))
        except BaseException as e:
            os.write(err_w, f"{type(e).__name__}: {e}".encode(errors="replace"))
        os._exit(127)
    os.close(err_w)
    with os.fdopen(err_r, "rb") as f:
        message = f.read()
    if message:
        os.waitpid(pid, 0)
        raise OvlrunError(message.decode(errors="replace"))
    return pid


def _close_all_but(*keep: int) -> None:  # pragma: no cover (child only)
    """Close every descriptor from 3 up but ``keep``: nothing of learn's leaks into a tracer."""
    low = 3
    for fd in sorted(set(keep)):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 1 << 20)
