"""Command lines of ``ovlrun slurm HOOK`` and ``ovlrun enter JOBID [--] [CMD...]``.

Parsed by hand, like the launch: a Prolog runs for every job, and ``enter``'s command
must pass through untouched (its options are the command's, not ours).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from ovlrun.errors import OvlrunError

SLURM_USAGE = """\
usage: ovlrun slurm {prolog,epilog,clone-ns}

Slurm hooks (run by slurmd as root; see docs/slurm.md for slurm.conf and
job_container.conf).  A job asks for a profile with: sbatch --comment=ovl:NAME
  prolog    Prolog: prepare the job's namespace with the profile's overlays
  epilog    Epilog: remove what the prolog made
  clone-ns  CloneNSScript (Slurm 24.11+): mount into $SLURM_NS
Hooks exit 0 on a user's mistake (the job runs unlocalised; the log says why)."""

ENTER_USAGE = """\
usage: sudo ovlrun enter JOBID [--] [CMD [ARG...]]

Run CMD (default: your login shell) as yourself inside the mount namespace that
ovlrun's prolog prepared for job JOBID on this node, with that job's localised view.
Only the job's owner (or root) may enter it."""


def slurm_main(argv: list[str]) -> int:
    """``ovlrun slurm HOOK``."""
    from ovlrun.hooks import slurm

    hooks: dict[str, Callable[[], int]] = {"prolog": slurm.prolog, "epilog": slurm.epilog,
                                           "clone-ns": slurm.clone_ns_script}
    if len(argv) == 1 and argv[0] in ("-h", "--help"):
        print(SLURM_USAGE)
        return 0
    if len(argv) != 1 or argv[0] not in hooks:
        print(SLURM_USAGE, file=sys.stderr)
        return 2
    if os.environ.get("SUDO_UID") or os.geteuid() != 0:
        # The sudoers rule for ovlrun lets users run it as root; the hooks trust their
        # environment (job id, owner) and are for slurmd alone.
        raise OvlrunError("Slurm hooks are run by slurmd as root, not by users or through sudo")
    return hooks[argv[0]]()


def enter_main(argv: list[str]) -> int:
    """``ovlrun enter JOBID [--] [CMD...]``."""
    if argv[:1] in (["-h"], ["--help"]):
        print(ENTER_USAGE)
        return 0
    if not argv:
        raise OvlrunError(ENTER_USAGE)
    job_id, command = argv[0], argv[1:]
    if command[:1] == ["--"]:
        command = command[1:]
    from ovlrun.hooks.enter import enter

    return enter(job_id, command)
