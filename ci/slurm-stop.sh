#!/usr/bin/env bash
# Stop the Slurm daemons started by ci/slurm-setup.sh (by their pid files only: other
# Slurm or munge processes on the machine are left alone), and detach whatever
# job_container mounts a killed job may have left under the BasePath.  Safe to run when
# nothing is running.  Knob: OVLRUN_SLURM_STATE, as for the setup script.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=ci/slurm-lib.sh
. "$here/slurm-lib.sh"

state="${OVLRUN_SLURM_STATE:-/var/spool/ovlrun-slurm}"
stop_daemons "$state/run"
# The BasePath's per-job private binds and .ns binds of jobs killed with slurmd.
detach_under "$state/jc"
exit 0
