#!/usr/bin/env bash
# Install and start a single-node Slurm from this machine's own apt (Debian 12: Slurm
# 22.05; Debian 13: 24.11) for ovlrun's Slurm tests and for developers.  Idempotent: a
# re-run with an unchanged configuration and live daemons only waits for the node to be
# idle; a changed configuration restarts the daemons (ci/slurm-lib.sh).
#
# PID 1 is not systemd on our machines, so the daemons are started by hand in the
# foreground mode (-D) in their own sessions, with pid files that ci/slurm-stop.sh uses
# to stop exactly these processes.
#
# Everything of the instance lives under $OVLRUN_SLURM_STATE, never under /tmp (every job
# gets a private /tmp): its slurm.conf (in etc/: clients need SLURM_CONF=$state/etc/slurm.conf),
# state, spool, logs, pid files and job_container BasePath.  With its own state directory
# and ports, a second instance (say in a container sharing this machine's network) runs
# beside this one.
#
# Environment knobs (and those of ci/slurm-lib.sh: OVLRUN_SLURM_MODE, ...):
#   OVLRUN_SLURM_STATE      state directory (default /var/spool/ovlrun-slurm)
#   OVLRUN_SLURM_PORT_BASE  slurmctld's port; slurmd's is the next one (default 6817)
#   OVLRUN_SLURM_PYTHON     interpreter for the generated hooks (default: python3)
#   OVLRUN_SLURM_NO_INSTALL=1  skip apt-get (packages already present)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
# shellcheck source=ci/slurm-lib.sh
. "$here/slurm-lib.sh"

[ "$(id -u)" = 0 ] || die "must run as root"
root="" in_ns=()
state="${OVLRUN_SLURM_STATE:-/var/spool/ovlrun-slurm}"
pids="$state/run"
node="$(hostname -s)"
cluster=ovlrun
port_base="${OVLRUN_SLURM_PORT_BASE:-6817}"
hook_python="${OVLRUN_SLURM_PYTHON:-$(command -v python3)}"
# The real interpreter, not a pyenv shim: hooks run without PATH or PYENV_*.
hook_python="$("$hook_python" -c 'import sys; print(sys.executable)')"

need_pkgs=()
for p in slurmctld slurmd slurm-client munge; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
        || need_pkgs+=("$p")
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    [ "${OVLRUN_SLURM_NO_INSTALL:-0}" = 1 ] && die "missing packages: ${need_pkgs[*]}"
    log "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # The package scripts try to start services through invoke-rc.d; without systemd
    # that fails harmlessly or is skipped.
    apt-get update -q >/dev/null || apt-get update -q
    apt-get install -y -q --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

instance_stop() { OVLRUN_SLURM_STATE="$state" "$here/slurm-stop.sh"; }
instance_ok() { true; }
instance_prepare() { true; }
slurm_up
