#!/usr/bin/env bash
# A single-node Slurm 24.11 (Debian 13 "trixie": slurmd 24.11.x) on this machine, next
# to the Slurm 22.05 of ci/slurm-setup.sh, for the tests in tests/slurm2411/.
# Idempotent: a warm re-run with an unchanged configuration and live daemons only waits
# for the node to be idle; a changed configuration restarts the daemons.
#
# 1. A trixie root is debootstrapped once, cached in $OVLRUN_TRIXIE_ROOT (default
#    /var/lib/ovlrun-ci/trixie; never under /tmp or the repo), from the Debian mirror
#    this machine's apt already uses.  The host's apt sources are never touched.
# 2. Packages are installed in it (slurmctld, slurmd, slurm-client, munge, python3,
#    python3-venv and ovlrun's dependencies as Debian packages: python3-typer,
#    python3-prctl, python3-pyroute2; no compiler, no PyPI).
# 3. The root is not entered with chroot(2) but made the root of a private mount (and
#    UTS) namespace with pivot_root(2), pinned on files in $OVLRUN_TRIXIE_NS.  Why: Slurm
#    puts job steps into the job's namespace with setns(2), and setns(CLONE_NEWNS) resets
#    the caller's root to the namespace's root mount; in a plain chroot every job step
#    would escape to the host's root.  Side effects: nothing a job mounts ever shows up in
#    the host's mount table, and stopping (ci/slurm2411-stop.sh) drops every mount at once.
#    Bound in at the same paths: this checkout (read-only; the hooks run it with the
#    trixie python3) and $OVLRUN_SLURM2411_SHARE (the tests' tree, profiles and store).
# 4. munged, slurmctld and slurmd of trixie are started in that namespace (nsenter), -D
#    in their own sessions, with pid files under $state/run (host paths).  Their own
#    ports (6917/6918), node name (ovl2411, the namespace's host name), /etc/slurm and
#    munge socket: the 22.05 instance of ci/slurm-setup.sh is left alone.
#
# Environment knobs:
#   OVLRUN_TRIXIE_ROOT      cached trixie root (default /var/lib/ovlrun-ci/trixie)
#   OVLRUN_TRIXIE_NS        where the namespaces are pinned (default /var/lib/ovlrun-ci/ns2411)
#   OVLRUN_TRIXIE_MIRROR    Debian mirror (default: the host's apt mirror)
#   OVLRUN_SLURM2411_MODE   runinjob | clonens | contain (default runinjob): how
#                           job_container/tmpfs and the hooks are configured (docs/slurm.md);
#                           contain is the 22.05 configuration, which 24.11 does not support
#   OVLRUN_SLURM2411_SHARE  host directory bound into the root (default /var/tmp/ovlrun-slurm2411-test)
#   OVLRUN_SLURM2411_TIMEOUT  seconds to wait for the node to become idle (60)
# Inside the root, Slurm keeps its state under /var/spool/ovlrun-slurm2411.
set -euo pipefail
# One brace group, read whole before it runs: editing or checking out this file while
# it runs (it may run for minutes) cannot change what it does.
{
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
root="${OVLRUN_TRIXIE_ROOT:-/var/lib/ovlrun-ci/trixie}"
nsdir="${OVLRUN_TRIXIE_NS:-/var/lib/ovlrun-ci/ns2411}"
mode="${OVLRUN_SLURM2411_MODE:-runinjob}"
share="${OVLRUN_SLURM2411_SHARE:-/var/tmp/ovlrun-slurm2411-test}"
timeout_s="${OVLRUN_SLURM2411_TIMEOUT:-60}"
node=ovl2411
ctld_port=6917
slurmd_port=6918
state_in=/var/spool/ovlrun-slurm2411       # path inside the root
state="$root$state_in"                     # the same, seen from the host
marker="# managed by ovlrun ci/slurm2411-setup.sh"
pkgs=(slurmctld slurmd slurm-client munge python3 python3-venv
      python3-typer python3-prctl python3-pyroute2)

log() { printf 'slurm2411-setup: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
case "$mode" in runinjob|clonens|contain) ;; *) die "OVLRUN_SLURM2411_MODE=$mode: use runinjob, clonens or contain" ;; esac
case "$root" in /tmp/*|"$repo"/*) die "OVLRUN_TRIXIE_ROOT must be outside /tmp and the repo" ;; esac
t0=$SECONDS

# --- 1. debootstrap -----------------------------------------------------------------
host_mirror() {  # the host's configured Debian mirror (deb822 or one-line sources)
    local m=""
    m="$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)"
    [ -n "$m" ] || m="$(awk '$1 == "deb" && $0 !~ /security/ && $0 ~ /debian/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1)"
    printf '%s\n' "${m:-http://deb.debian.org/debian}"
}
mirror="${OVLRUN_TRIXIE_MIRROR:-$(host_mirror)}"

if [ ! -e "$root/.ovlrun-debootstrap-done" ]; then
    command -v debootstrap >/dev/null || die "debootstrap is not installed"
    log "debootstrapping trixie (minbase) from $mirror into $root"
    rm -rf "$root.partial"
    mkdir -p "$(dirname "$root")"
    debootstrap --variant=minbase --components=main trixie "$root.partial" "$mirror" \
        >"$(dirname "$root")/debootstrap.log" 2>&1 \
        || { tail -n 20 "$(dirname "$root")/debootstrap.log" >&2; die "debootstrap failed"; }
    rm -rf "$root"
    mv "$root.partial" "$root"
    touch "$root/.ovlrun-debootstrap-done"
    log "debootstrap done after $((SECONDS - t0))s"
fi

in_root_tmp() {  # run a command chrooted in $root with /proc and /dev, in a throw-away namespace
    unshare --mount --propagation private /bin/sh -ec '
        r="$1"; shift
        mount -t proc proc "$r/proc"
        mount --rbind /dev "$r/dev"
        exec chroot "$r" "$@"' sh "$root" "$@"
}

pkg_stamp="$root/.ovlrun-packages"
if [ "$(cat "$pkg_stamp" 2>/dev/null)" != "${pkgs[*]}" ]; then
    log "installing ${pkgs[*]} in $root"
    # No daemon may start from a package script: we start them ourselves below.
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
    cp -L /etc/resolv.conf "$root/etc/resolv.conf"
    in_root_tmp env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 apt-get update -q >/dev/null
    in_root_tmp env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 \
        apt-get install -y -q --no-install-recommends "${pkgs[@]}" \
        >"$(dirname "$root")/apt-install.log" 2>&1 \
        || { tail -n 30 "$(dirname "$root")/apt-install.log" >&2; die "apt-get install failed"; }
    in_root_tmp apt-get clean
    printf '%s\n' "${pkgs[*]}" >"$pkg_stamp"
    log "packages installed after $((SECONDS - t0))s: $(in_root_tmp dpkg-query -W -f='${Version}' slurmd) slurmd"
fi

# --- 3. the namespace the daemons live in -------------------------------------------
# Pinned on $nsdir/mnt and $nsdir/uts (bind mounts of nsfs files, which need a private
# mount to live on).  $nsdir/binds says what is bound in; a mismatch rebuilds it.
mkdir -p "$nsdir" "$share"
chmod 755 "$share"
binds="root=$root repo=$repo share=$share node=$node"
# Mount namespace ids (ioctl NS_GET_MNTNS_ID), read by the root's python3 from fd 3.
nsid_helper="$root/usr/local/bin/ovlrun-ci-nsid"
cat >"$nsid_helper" <<'EOF'
#!/usr/bin/python3
import fcntl, struct
print(struct.unpack("Q", fcntl.ioctl(3, 0x8008b705, bytes(8)))[0])
EOF
chmod 755 "$nsid_helper"
ns_id() { chroot "$root" /usr/local/bin/ovlrun-ci-nsid 3<"$1"; }
cpu_ids() {  # "CPU ID" per online CPU: the id a mount namespace made there gets now
    local c
    for c in $(seq 0 $(($(nproc) - 1))); do
        # shellcheck disable=SC2016 # expanded by the inner shell
        printf '%s %s\n' "$c" "$(taskset -c "$c" unshare --mount sh -c 'chroot "$1" /usr/local/bin/ovlrun-ci-nsid 3</proc/self/ns/mnt' sh "$root")"
    done
}
best_cpu() { cpu_ids | sort -k2,2n | head -n1 | cut -d' ' -f1; }
ns_id_is_lowest() {  # true if every mount namespace made from now on gets a larger id than ours
    local ours
    ours="$(ns_id "$nsdir/mnt")" || return 1
    cpu_ids | awk -v ours="$ours" '$2 <= ours { bad = 1 } END { exit bad }'
}
in_ns() { nsenter --mount="$nsdir/mnt" --uts="$nsdir/uts" -- "$@"; }
ns_alive() {
    [ "$(cat "$nsdir/binds" 2>/dev/null)" = "$binds" ] \
        && in_ns test -e /.ovlrun-debootstrap-done 2>/dev/null \
        && [ "$(in_ns hostname 2>/dev/null)" = "$node" ] \
        && ns_id_is_lowest
}
make_ns() {
    # Linux 6.18 hands out namespace ids from per-CPU batches, so a namespace made
    # later on another CPU can have a smaller id, and mount(2) refuses to bind a
    # mount namespace whose id is not larger than the caller's (mnt_ns_loop: EINVAL).
    # job_container/tmpfs binds each job's new namespace from slurmstepd, which lives
    # in ours: ours must have a smaller id than any namespace made after it.  So it is
    # made on the CPU that hands out the smallest ids now (then checked below).
    local cpu
    mountpoint -q "$nsdir" || mount --bind "$nsdir" "$nsdir"
    mount --make-private "$nsdir"
    cpu="$(best_cpu)"
    log "creating the mount+UTS namespace on CPU $cpu: pivot_root into $root"
    mkdir -p "$root$repo" "$root$share" "$root/.oldroot"
    touch "$nsdir/mnt" "$nsdir/uts"
    # shellcheck disable=SC2016 # expanded by the inner shell
    taskset -c "$cpu" unshare --mount="$nsdir/mnt" --uts="$nsdir/uts" --propagation private /bin/sh -ec '
        r="$1" repo="$2" share="$3" node="$4"
        mount --bind "$r" "$r"                # pivot_root needs a mount point
        mount -t proc proc "$r/proc"
        mount --rbind /sys "$r/sys"
        mount --rbind /dev "$r/dev"
        mount --bind "$repo" "$r$repo"
        mount -o remount,bind,ro "$r$repo"
        mount --bind "$share" "$r$share"
        hostname "$node"
        cd "$r"
        pivot_root . .oldroot
        umount -l /.oldroot' sh "$root" "$repo" "$share" "$node"
    printf '%s\n' "$binds" >"$nsdir/binds"
    ns_alive || die "the namespace in $nsdir does not work (id $(ns_id "$nsdir/mnt"); next ids: $(cpu_ids | tr '\n' ' '))"
}

# --- 4. configuration --------------------------------------------------------------
grep -q "[[:space:]]$node\$" "$root/etc/hosts" || printf '127.0.0.1\t%s\n' "$node" >>"$root/etc/hosts"
mkdir -p "$state"/{ctld,slurmd,jc,log,hooks,run}
chmod 755 "$state" "$state/hooks"

# Generated hooks: slurmd runs them with an almost empty environment, so spell
# everything out.  They run this checkout with trixie's python3 through the CLI entry
# point.  "$state_in/hook.env" (written by tests) adds OVLRUN_PROFILE_PATH etc.
write_hook() {  # $1 = file name, $2 = ovlrun slurm subcommand, $3 = early-exit test
    local f="$state/hooks/$1" tmp
    tmp="$(mktemp "$f.XXXXXX")"
    cat >"$tmp" <<EOF
#!/bin/sh
# Generated by ci/slurm2411-setup.sh: run ovlrun's Slurm $2 hook from $repo.
$3
[ -r "$state_in/hook.env" ] && . "$state_in/hook.env"
PYTHONPATH="$repo\${PYTHONPATH:+:\$PYTHONPATH}"
export PYTHONPATH
exec /usr/bin/python3 -m ovlrun slurm $2
EOF
    chmod 755 "$tmp"
    mv -f "$tmp" "$f"
}
# shellcheck disable=SC2016 # expanded by the hook, not here
write_hook prolog prolog 'case "${SLURM_JOB_COMMENT:-}" in *ovl:*) ;; *) exit 0 ;; esac'
# shellcheck disable=SC2016
write_hook epilog epilog '[ -e "${OVLRUN_JOB_RUNDIR:-/run/ovlrun/jobs}/${SLURM_JOB_ID:-none}.json" ] || exit 0'
write_hook clone-ns clone-ns ''
install -m 755 "$repo/contrib/slurm/ovlrun-task-prolog" "$state/hooks/task-prolog"

case "$mode" in
    runinjob) prolog_flags=Contain,RunInJob clone_ns="" ;;
    # On the BasePath line: 24.11.5 ignores a CloneNSScript= on a line of its own.
    # CloneNSScript_Wait: the default 10 s fails the job's launch if a Python start-up on a
    # loaded CI machine is slow; the script takes 0.1-0.3 s.
    clonens)  prolog_flags=Contain clone_ns=" CloneNSScript=$state_in/hooks/clone-ns CloneNSScript_Wait=30" ;;
    # The 21.08-23.11 configuration, to show what it does on 24.11 (docs/slurm.md).
    contain)  prolog_flags=Contain clone_ns="" ;;
esac
new_conf="$(mktemp)" new_jc="$(mktemp)" new_cg="$(mktemp)"
trap 'rm -f "$new_conf" "$new_jc" "$new_cg"' EXIT
cat >"$new_conf" <<EOF
$marker
# mode: $mode
ClusterName=ovlrun2411
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$state_in/ctld
SlurmdSpoolDir=$state_in/slurmd
SlurmctldPidFile=$state_in/run/slurmctld.pid
SlurmdPidFile=$state_in/run/slurmd.pid
SlurmctldLogFile=$state_in/log/slurmctld.log
SlurmdLogFile=$state_in/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=debug
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
KillWait=5
MessageTimeout=20
MinJobAge=600
JobContainerType=job_container/tmpfs
PrologFlags=$prolog_flags
Prolog=$state_in/hooks/prolog
Epilog=$state_in/hooks/epilog
TaskProlog=$state_in/hooks/task-prolog
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=30 State=UP
EOF
cat >"$new_jc" <<EOF
$marker
AutoBasePath=true
BasePath=$state_in/jc$clone_ns
EOF
# PID 1 is not systemd and jobs need no cgroups (proctrack/linuxproc, task/none).
cat >"$new_cg" <<EOF
$marker
CgroupPlugin=disabled
EOF

conf_dir="$root/etc/slurm"
same_conf=1
cmp -s "$new_conf" "$conf_dir/slurm.conf" || same_conf=0
cmp -s "$new_jc" "$conf_dir/job_container.conf" || same_conf=0
cmp -s "$new_cg" "$conf_dir/cgroup.conf" || same_conf=0

alive() {  # $1 = pid file; true if that pid still runs the daemon named like the file
    local pid
    [ -s "$1" ] || return 1
    pid="$(cat "$1")"
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$(basename "$1" .pid)" ] \
        && [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" != Z ]  # exited, not reaped yet
}
munge_works() { in_ns sh -c 'munge -n </dev/null | unmunge >/dev/null' 2>/dev/null; }
pids="$nsdir/pids"   # host paths of our pid files (outside the root: survive its rebuild)
mkdir -p "$pids"

start_clean() {
    # Every start is from a clean slate: the stop script ends the daemons, whatever job
    # processes are left in the namespace, and the namespace itself (and so every mount
    # in it); then what killed jobs leave on disk goes (slurmd's step sockets, job
    # directories, ovlrun's job records), and slurmctld starts with -c (no saved jobs).
    # Otherwise a job killed mid-run keeps the node COMPLETING for good.
    log "starting munged, slurmctld, slurmd ($mode)"
    "$here/slurm2411-stop.sh"
    rm -f "$state/slurmd/${node}"_*
    rm -rf --one-file-system "$state/jc" "$root/run/ovlrun/jobs"
    mkdir -p "$state/jc"
    make_ns
    install -m 644 "$new_conf" "$conf_dir/slurm.conf"
    install -m 644 "$new_jc" "$conf_dir/job_container.conf"
    install -m 644 "$new_cg" "$conf_dir/cgroup.conf"
    in_ns sh -ec 'install -d -o munge -g munge -m 755 /run/munge
                  install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge
                  chown munge:munge /etc/munge /etc/munge/munge.key
                  rm -f /run/munge/munged.pid
                  setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --pid-file=/run/munge/munged.pid'
    cp "$root/run/munge/munged.pid" "$pids/munged.pid"
    munge_works || die "munged started but munge/unmunge does not work"
    # setsid: the daemons outlive this script; nsenter execs them (no fork), so $! is
    # the daemon's own pid.
    setsid nsenter --mount="$nsdir/mnt" --uts="$nsdir/uts" -- /usr/sbin/slurmctld -D -c -i \
        >"$state/log/slurmctld.out" 2>&1 </dev/null &
    echo $! >"$pids/slurmctld.pid"
    setsid nsenter --mount="$nsdir/mnt" --uts="$nsdir/uts" -- /usr/sbin/slurmd -D \
        >"$state/log/slurmd.out" 2>&1 </dev/null &
    echo $! >"$pids/slurmd.pid"
}

wait_idle() {  # $1 = seconds; sets st; false on timeout
    local deadline=$((SECONDS + $1))
    while :; do
        st="$(in_ns sinfo -h -n "$node" -o '%T' 2>/dev/null | head -n1 || true)"
        case "$st" in idle|mixed|allocated) return 0 ;; esac
        for d in slurmctld slurmd; do
            alive "$pids/$d.pid" || {
                tail -n 30 "$state/log/$d.out" "$state/log/$d.log" >&2 2>/dev/null || true
                die "$d died (logs in $state/log)"
            }
        done
        case "$st" in
            down*|drain*|fail*) in_ns scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;
        esac
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# --- start, or reuse what runs, and wait for the node --------------------------------
st=""
start=$SECONDS
if ns_alive && [ "$same_conf" = 1 ] && munge_works \
    && alive "$pids/slurmctld.pid" && alive "$pids/slurmd.pid"; then
    log "daemons already running with this configuration ($mode)"
    # Running but wedged (say a job killed under it keeps the node COMPLETING): restart.
    if ! wait_idle 15; then
        log "node $node still ${st:-unreachable} after 15s: restarting from a clean slate"
        start_clean
    fi
else
    start_clean
fi
if ! wait_idle "$timeout_s"; then
    tail -n 30 "$state/log/slurmctld.log" "$state/log/slurmd.log" >&2 2>/dev/null || true
    die "node $node not idle after ${timeout_s}s (state: ${st:-unknown})"
fi
log "node $node is $st after $((SECONDS - start))s; total $((SECONDS - t0))s (mode $mode, root $root)"
exit 0
}
