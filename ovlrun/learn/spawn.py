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
    """``name`` on PATH, or in the sbin directories root's PATH usually has;
    ``OVLRUN_LEARN_BPFTRACE``/``OVLRUN_LEARN_STRACE`` name another program (learn runs
    with its caller's rights and is refused through sudo, so this chooses nothing for
    anyone else)."""
    override = os.environ.get(f"OVLRUN_LEARN_{name.upper()}")
    if override:
        return shutil.which(override)
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin")


def spawn(setup: Callable[[], list[str]], *, env: dict[str, str], stdout: int | None = None,
          stderr: int | None = None) -> int:
    """Fork, run ``setup`` in the child, exec the argv it returns; the child's pid.

    The child's stdin is /dev/null (a tracer must not compete with the job for the
    terminal); ``stdout``/``stderr`` replace the child's (None: inherited); every other
    descriptor is closed, and the signals learn ignores or handles are back to default.
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
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_DFL)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            if stdout is not None:
                os.dup2(stdout, 1)
            if stderr is not None:
                os.dup2(stderr, 2)
            os.closerange(3, err_w)
            os.closerange(err_w + 1, 1 << 20)
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
