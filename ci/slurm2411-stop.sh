#!/usr/bin/env bash
# Stop what ci/slurm2411-setup.sh started: munged, slurmctld and slurmd of the trixie
# root (by their pid files only), the job processes left in that root's namespace, and
# unpin the namespace, which drops every mount made in it (jobs' included).  The 22.05
# instance of ci/slurm-setup.sh and anything else on the machine are left alone.
# --daemons-only: stop the daemons but keep the namespace.
# Safe to run when nothing is running.  The cached root is kept.
set -uo pipefail

nsdir="${OVLRUN_TRIXIE_NS:-/var/lib/ovlrun-ci/ns2411}"
wait_s="${OVLRUN_SLURM_STOP_TIMEOUT:-20}"
pids="$nsdir/pids"

log() { printf 'slurm2411-stop: %s\n' "$*" >&2; }

stop_pid() {  # $1 = name, $2 = pid file
    local name="$1" pf="$2" pid deadline
    [ -s "$pf" ] || return 0
    pid="$(cat "$pf")"
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$name" ]; then
        rm -f "$pf"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null
    deadline=$((SECONDS + wait_s))
    # Until it is gone or a zombie: our PID 1 reaps orphans only every few seconds.
    while kill -0 "$pid" 2>/dev/null && [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" != Z ]; do
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

stop_pid slurmd "$pids/slurmd.pid"
stop_pid slurmctld "$pids/slurmctld.pid"
stop_pid munged "$pids/munged.pid"
[ "${1:-}" = --daemons-only ] && exit 0

if [ -e "$nsdir/mnt" ] && mountpoint -q "$nsdir/mnt"; then
    # Processes still in our namespace (slurmstepd and job tasks of killed jobs): they
    # were started by our daemons.  Identified by namespace inode, not by name.
    ns="$(stat -L -c %i "$nsdir/mnt")"
    for p in /proc/[0-9]*; do
        [ "$(stat -L -c %i "$p/ns/mnt" 2>/dev/null)" = "$ns" ] || continue
        kill -KILL "${p#/proc/}" 2>/dev/null && log "killed leftover ${p#/proc/} ($(cat "$p/comm" 2>/dev/null))"
    done
fi
for f in mnt uts; do
    mountpoint -q "$nsdir/$f" 2>/dev/null && umount "$nsdir/$f" && log "unpinned $f namespace"
done
rm -f "$nsdir/binds"
# The private bind the namespace files lived on (setup makes it again).
mountpoint -q "$nsdir" 2>/dev/null && umount "$nsdir" && log "detached $nsdir"
exit 0
