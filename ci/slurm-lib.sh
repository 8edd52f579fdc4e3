# Sourced by ci/slurm-setup.sh (the host's own Slurm), ci/slurm2411-setup.sh (Debian
# 13's Slurm 24.11 in a debootstrapped root) and their stop scripts: the one slurm.conf /
# job_container.conf / cgroup.conf, the generated hooks, and how the daemons are started,
# waited for and stopped.  Sourcing only defines (and sets who, for messages).
#
# The caller sets, before calling slurm_up (the stop functions need nothing):
#   root       host path of the instance's root directory ("" for the host itself)
#   in_ns      array: the prefix that runs a command in the instance's namespaces (() on the host)
#   state      state directory as the instance sees it (slurm.conf, spool, BasePath, logs, hooks)
#   pids       host directory of the pid files of the daemons started here
#   node       the node name (the host name the instance's processes see)
#   cluster    ClusterName
#   port_base  slurmctld listens on port_base, slurmd on port_base + 1
#   hook_python  interpreter the generated hooks run ovlrun with (a path in the instance)
#   repo       this checkout (the hooks run ovlrun from it; same path in the instance)
# and defines three functions: instance_stop (stops everything of the instance: its
# daemons, and for a root its namespace), instance_ok (true if the instance's own
# environment, e.g. its namespace, is still usable) and instance_prepare (makes that
# environment again after a stop).
#
# Environment knobs read here (both scripts):
#   OVLRUN_SLURM_MODE     contain | runinjob | clonens: how job_container/tmpfs hands ovlrun
#                         the job's namespace (docs/slurm.md); default by slurmd version:
#                         runinjob for 24.05 and later, contain before.  A mode the slurmd
#                         cannot do exits 77 (the tests skip on it) with the reason.
#   OVLRUN_SLURM_TIMEOUT  seconds to wait for the node to become idle (60)
#   OVLRUN_SLURM_STOP_TIMEOUT  seconds a daemon gets to stop before SIGKILL (20)
#   OVLRUN_SLURM_PROLOG, OVLRUN_SLURM_EPILOG, OVLRUN_SLURM_TASK_PROLOG: hooks to use
#                         instead of the generated ones (paths in the instance)
# shellcheck shell=bash
# shellcheck disable=SC2154 # the variables above are the caller's

who="$(basename "$0" .sh)"  # the script that sourced this: prefix of its messages
log() { printf '%s: %s\n' "$who" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
EXIT_UNSUPPORTED=77  # the requested mode does not exist in this Slurm version

# --- processes -------------------------------------------------------------------------
alive() {  # $1 = pid file; true if that pid still runs the daemon named like the file
    local pid
    [ -s "$1" ] || return 1
    pid="$(cat "$1")"
    # A pid file can outlive its process (machine reused, daemons killed): check the name
    # too, so a recycled pid is never mistaken for our daemon; a zombie has exited.
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$(basename "$1" .pid)" ] \
        && [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" != Z ]
}

stop_pid() {  # $1 = name, $2 = pid file; only a live process with the daemon's name
    local name="$1" pf="$2" pid deadline
    [ -s "$pf" ] || return 0
    pid="$(cat "$pf")"
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$name" ]; then
        rm -f "$pf"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null
    deadline=$((SECONDS + ${OVLRUN_SLURM_STOP_TIMEOUT:-20}))
    # Until it is gone or a zombie: a PID 1 that is not an init reaps orphans late.
    while kill -0 "$pid" 2>/dev/null && [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" != Z ]; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "$name (pid $pid) ignored SIGTERM, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null
            break
        fi
        sleep 0.1
    done
    rm -f "$pf"
    log "stopped $name (pid $pid)"
}

stop_daemons() {  # $1 = pid directory.  slurmd first (it owns the job steps), then the
    # controller, then munged (only if started here: its pid file is ours).
    stop_pid slurmd "$1/slurmd.pid"
    stop_pid slurmctld "$1/slurmctld.pid"
    stop_pid munged "$1/munged.pid"
}

detach_under() {  # $1 = directory: lazily detach every mount at or below it, deepest first
    [ -d "$1" ] || return 0
    awk -v base="$1" '$5 == base || index($5, base "/") == 1 { print $5 }' /proc/self/mountinfo \
        | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null && log "detached $m"
    done
}

# --- versions and modes ----------------------------------------------------------------
slurmd_version() {  # e.g. 22.05.8 (slurmd -V: "slurm-wlm 22.05.8" or "slurm 24.11.5")
    if [ -n "$root" ]; then chroot "$root" /usr/sbin/slurmd -V; else slurmd -V; fi | awk '{ print $2; exit }'
}
version_ge() { printf '%s\n%s\n' "$2" "$1" | sort -V -C; }  # $1 >= $2

mode_problem() {  # $1 = mode, $2 = slurmd version: why this Slurm cannot do it, or nothing
    case "$1" in
        contain) ;;
        runinjob) version_ge "$2" 24.05 || echo "PrologFlags=RunInJob needs Slurm 24.05 or later; slurmd is $2" ;;
        clonens) version_ge "$2" 24.11 || echo "CloneNSScript needs Slurm 24.11 or later; slurmd is $2" ;;
        *) echo "OVLRUN_SLURM_MODE=$1: use contain, runinjob or clonens" ;;
    esac
}

# --- configuration ---------------------------------------------------------------------
write_hook() {  # $1 = file name, $2 = ovlrun slurm subcommand, $3 = early-exit test
    # slurmd runs hooks with an almost empty environment (no PATH, no PYTHONPATH), so
    # everything is spelled out.  "$state/hook.env" (written by tests) adds environment
    # such as OVLRUN_PROFILE_PATH / OVLRUN_STORE.
    local f="$hstate/hooks/$1" tmp
    tmp="$(mktemp "$f.XXXXXX")"
    cat >"$tmp" <<EOF
#!/bin/sh
# Generated by $who: run ovlrun's Slurm $2 hook from $repo.
$3
[ -r "$state/hook.env" ] && . "$state/hook.env"
PYTHONPATH="$repo\${PYTHONPATH:+:\$PYTHONPATH}"
export PYTHONPATH
exec "$hook_python" -m ovlrun slurm $2
EOF
    chmod 755 "$tmp"
    mv -f "$tmp" "$f"
}

write_config() {  # $1 = directory: slurm.conf, job_container.conf, cgroup.conf for $mode
    local prolog_flags=Contain clone_ns="" marker="# managed by ovlrun ci/slurm-lib.sh"
    case "$mode" in
        runinjob) prolog_flags=Contain,RunInJob ;;
        # On the BasePath line: 24.11.5 ignores a CloneNSScript= on a line of its own.
        # CloneNSScript_Wait: the default 10 s fails the job's launch when a Python
        # start-up on a loaded CI machine is slow; the script takes 0.1-0.3 s.
        clonens) clone_ns=" CloneNSScript=$state/hooks/clone-ns CloneNSScript_Wait=30" ;;
    esac
    cat >"$1/slurm.conf" <<EOF
$marker
# mode: $mode, slurmd $version
ClusterName=$cluster
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port_base
SlurmdPort=$((port_base + 1))
# root keeps the state directories simple on a throw-away test node.
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/slurmd
SlurmctldPidFile=$state/run/slurmctld.pid
SlurmdPidFile=$state/run/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=debug
# No cgroups: PID 1 is not systemd here.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
# cons_tres with CR_CPU lets two one-CPU jobs share the node (concurrency test).
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
# Short timeouts: a broken test job must not hold CI for long.
KillWait=5
MessageTimeout=20
MinJobAge=600
# Job ids of their own per instance (by port): instances that share a /run/ovlrun/jobs
# never write the same job record.  slurmctld -c starts again from here.
FirstJobId=$((port_base * 1000))
# ovlrun integration (docs/slurm.md).
JobContainerType=job_container/tmpfs
PrologFlags=$prolog_flags
Prolog=${OVLRUN_SLURM_PROLOG:-$state/hooks/prolog}
Epilog=${OVLRUN_SLURM_EPILOG:-$state/hooks/epilog}
TaskProlog=${OVLRUN_SLURM_TASK_PROLOG:-$state/hooks/task-prolog}
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=30 State=UP
EOF
    cat >"$1/job_container.conf" <<EOF
$marker
AutoBasePath=true
BasePath=$state/jc$clone_ns
EOF
    # 24.05+ would set up cgroups without this ("disabled" is new in 24.05); jobs need
    # none here (proctrack/linuxproc, task/none).
    if version_ge "$version" 24.05; then
        printf '%s\nCgroupPlugin=disabled\n' "$marker" >"$1/cgroup.conf"
    fi
}

munge_works() { "${in_ns[@]}" sh -c 'munge -n </dev/null | unmunge >/dev/null' 2>/dev/null; }

start_munged() {  # munged daemonises itself and writes its own pid file
    "${in_ns[@]}" sh -ec '
        if [ ! -s /etc/munge/munge.key ]; then
            install -d -o munge -g munge -m 700 /etc/munge
            (umask 077; dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null)
        fi
        chown munge:munge /etc/munge /etc/munge/munge.key
        install -d -o munge -g munge -m 755 /run/munge
        install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge
        rm -f /run/munge/munged.pid
        setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --pid-file=/run/munge/munged.pid'
    cp "$root/run/munge/munged.pid" "$pids/munged.pid"
    munge_works || die "munged started but munge/unmunge does not work"
}

start_clean() {
    # Every start is from a clean slate: the stop script ends the daemons (and a root's
    # namespace, so every mount in it), then what killed jobs leave on disk goes (step
    # sockets, job directories, and in a root its job records), and slurmctld starts with
    # -c (no saved jobs).  Otherwise a job killed mid-run keeps the node COMPLETING.
    log "starting slurmctld, slurmd (mode $mode, slurmd $version, ports $port_base/$((port_base + 1)))"
    instance_stop
    rm -f "$hstate/slurmd/${node}"_*
    rm -rf --one-file-system "$hstate/jc"
    # The host's run directory holds every ovlrun job's record on the machine: only a
    # root's own is ours to clear.
    [ -z "$root" ] || rm -rf --one-file-system "$root/run/ovlrun/jobs"
    mkdir -p "$hstate/jc"
    instance_prepare
    rm -f "$hstate/etc/cgroup.conf"
    cp "$new_conf"/* "$hstate/etc/"
    if munge_works; then
        log "using the munged already running"  # not ours: the stop script leaves it alone
    else
        start_munged
    fi
    start_daemon slurmctld -D -c -i
    start_daemon slurmd -D
}

start_daemon() {  # $1 = name, then its options
    # setsid: the daemon outlives this script.  -D keeps it in the foreground, and setsid
    # and nsenter exec it, so $! becomes the daemon's own pid once they have: wait for
    # that (on a loaded machine it takes a while), so that the pid file names the daemon.
    local name="$1" pid deadline=$((SECONDS + 10))
    setsid "${in_ns[@]}" "$@" >"$hstate/log/$name.out" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$pids/$name.pid"
    until alive "$pids/$name.pid"; do
        # Died (wait_idle says so, with its log) or not exec'd in time.
        kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ] || return 0
        sleep 0.05
    done
}

wait_idle() {  # $1 = seconds; sets st; false on timeout
    local deadline=$((SECONDS + $1)) d
    while :; do
        st="$("${in_ns[@]}" sinfo -h -n "$node" -o '%T' 2>/dev/null | head -n1 || true)"
        case "$st" in idle|mixed|allocated) return 0 ;; esac
        for d in slurmctld slurmd; do
            alive "$pids/$d.pid" || {
                tail -n 30 "$hstate/log/$d.out" "$hstate/log/$d.log" >&2 2>/dev/null || true
                die "$d died (logs in $hstate/log)"
            }
        done
        # A node left DOWN/DRAIN (e.g. by a failed Prolog) never becomes idle by itself.
        case "$st" in
            down*|drain*|fail*) "${in_ns[@]}" scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;
        esac
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# --- the whole start -------------------------------------------------------------------
slurm_up() {
    # Idempotent: daemons already running with this configuration are reused (only
    # waited for); a changed configuration, dead daemons or a wedged node restart them.
    local start=$SECONDS problem same=1 f
    hstate="$root$state"  # the state directory seen from the host
    case "$port_base" in ''|*[!0-9]*) die "OVLRUN_SLURM_PORT_BASE=$port_base: expected a port number" ;; esac
    case "$hstate/" in /tmp/*) die "the Slurm state ($hstate) must not be under /tmp: every job gets a private /tmp" ;; esac
    version="$(slurmd_version)"
    [ -n "$version" ] || die "cannot tell the slurmd version (slurmd -V)"
    if [ -z "${OVLRUN_SLURM_MODE:-}" ]; then
        if version_ge "$version" 24.05; then mode=runinjob; else mode=contain; fi
    else
        mode="$OVLRUN_SLURM_MODE"
    fi
    problem="$(mode_problem "$mode" "$version")"
    if [ -n "$problem" ]; then
        log "$problem"
        exit "$EXIT_UNSUPPORTED"
    fi
    # Clients and daemons find the configuration through SLURM_CONF (slurmd passes it on
    # to the hooks, and ovlrun reads job_container.conf next to it): nothing in /etc/slurm,
    # so two instances on one machine never share a configuration.
    export SLURM_CONF="$state/etc/slurm.conf"
    mkdir -p "$hstate"/{etc,ctld,slurmd,jc,log,hooks,run} "$pids"
    chmod 755 "$hstate" "$hstate/hooks"
    # shellcheck disable=SC2016 # expanded by the hook, not here
    write_hook prolog prolog 'case "${SLURM_JOB_COMMENT:-}" in *ovl:*) ;; *) exit 0 ;; esac'
    # shellcheck disable=SC2016
    write_hook epilog epilog '[ -e "${OVLRUN_JOB_RUNDIR:-/run/ovlrun/jobs}/${SLURM_JOB_ID:-none}.json" ] || exit 0'
    write_hook clone-ns clone-ns ''
    install -m 755 "$repo/contrib/slurm/ovlrun-task-prolog" "$hstate/hooks/task-prolog"

    new_conf="$(mktemp -d)"
    trap 'rm -rf "$new_conf"' EXIT
    write_config "$new_conf"
    for f in slurm.conf job_container.conf cgroup.conf; do
        if [ -e "$new_conf/$f" ] || [ -e "$hstate/etc/$f" ]; then
            cmp -s "$new_conf/$f" "$hstate/etc/$f" || same=0
        fi
    done

    if [ "$same" = 1 ] && instance_ok && munge_works \
        && alive "$pids/slurmctld.pid" && alive "$pids/slurmd.pid"; then
        log "daemons already running with this configuration (mode $mode)"
        # Running but wedged (say a job killed under it keeps the node COMPLETING): restart.
        if ! wait_idle 15; then
            log "node $node still ${st:-unreachable} after 15s: restarting from a clean slate"
            start_clean
        fi
    else
        start_clean
    fi
    if ! wait_idle "${OVLRUN_SLURM_TIMEOUT:-60}"; then
        tail -n 30 "$hstate/log/slurmctld.log" "$hstate/log/slurmd.log" >&2 2>/dev/null || true
        die "node $node not idle after ${OVLRUN_SLURM_TIMEOUT:-60}s (state: ${st:-unknown})"
    fi
    log "node $node is $st after $((SECONDS - start))s (mode $mode, slurmd $version, SLURM_CONF=$SLURM_CONF${root:+ in $root})"
}
