#!/usr/bin/env bash
# Stop the Slurm daemons started by ci/slurm-setup.sh (by their pid files
# only: other Slurm or munge processes on the machine are left alone), and
# detach whatever job_container mounts a killed job may have left under the
# BasePath.  Safe to run when nothing is running.
set -uo pipefail

state="${OVLRUN_SLURM_STATE:-/var/spool/ovlrun-slurm}"
wait_s="${OVLRUN_SLURM_STOP_TIMEOUT:-20}"

log() { printf 'slurm-stop: %s\n' "$*" >&2; }

stop_pid() {  # $1 = name, $2 = pid file
    local name="$1" pf="$2" pid deadline
    [ -s "$pf" ] || return 0
    pid="$(cat "$pf")"
    # Only a live process with the daemon's name: the pid may have been recycled.
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$name" ]; then
        rm -f "$pf"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null
    deadline=$((SECONDS + wait_s))
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "$name (pid $pid) ignored SIGTERM for ${wait_s}s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null
            break
        fi
        sleep 0.1
    done
    rm -f "$pf"
    log "stopped $name (pid $pid)"
}

# slurmd first: it owns the job steps; then the controller; then munge.
stop_pid slurmd "$state/run/slurmd.pid"
stop_pid slurmctld "$state/run/slurmctld.pid"
stop_pid munged "$state/run/munged.pid"

# Leftover mounts below the BasePath (the BasePath's own private bind, .ns
# binds of jobs that were killed with slurmd).  Deepest first.
if [ -d "$state/jc" ]; then
    awk -v base="$state/jc" '$5 == base || index($5, base "/") == 1 { print $5 }' \
        /proc/self/mountinfo | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null && log "detached $m"
    done
fi
exit 0
