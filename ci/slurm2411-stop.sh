#!/usr/bin/env bash
# Stop what ci/slurm2411-setup.sh started: munged, slurmctld and slurmd of the trixie
# root (by their pid files only), the job processes left in that root's namespace, and
# unpin the namespace, which drops every mount made in it (jobs' included).  The host's
# instance of ci/slurm-setup.sh and anything else on the machine are left alone.
# --daemons-only: stop the daemons but keep the namespace.
# Safe to run when nothing is running.  The cached root is kept.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=ci/slurm-lib.sh
. "$here/slurm-lib.sh"

nsdir="${OVLRUN_TRIXIE_NS:-/var/lib/ovlrun-ci/ns2411}"
stop_daemons "$nsdir/pids"
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
