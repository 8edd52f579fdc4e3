#!/usr/bin/env bash
# A single-node Slurm 24.11 (Debian 13 "trixie": slurmd 24.11.x) on this machine, next
# to the host's own Slurm of ci/slurm-setup.sh, for the tests in tests/slurm/.
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
#    trixie python3) and $OVLRUN_SLURM_TEST_DIR (the tests' trees, profiles and stores).
# 4. munged, slurmctld and slurmd of trixie are started in that namespace (nsenter) by
#    ci/slurm-lib.sh, the same code and configuration as for the host's Slurm, with pid
#    files in $OVLRUN_TRIXIE_NS/pids.  Their own ports, node name (ovl2411, the
#    namespace's host name), configuration and munge socket: the host's instance is
#    left alone.
#
# Environment knobs (and those of ci/slurm-lib.sh: OVLRUN_SLURM_MODE, ...):
#   OVLRUN_TRIXIE_ROOT      cached trixie root (default /var/lib/ovlrun-ci/trixie)
#   OVLRUN_TRIXIE_NS        where the namespaces are pinned (default /var/lib/ovlrun-ci/ns2411)
#   OVLRUN_TRIXIE_MIRROR    Debian mirror (default: the host's apt mirror)
#   OVLRUN_SLURM_PORT_BASE  the host instance's slurmctld port (default 6817): this one
#                           takes BASE+100 and BASE+101 (default 6917/6918)
#   OVLRUN_SLURM_TEST_DIR   host directory bound into the root (default /var/tmp/ovlrun-slurm-worlds)
# Inside the root, Slurm keeps its state (and slurm.conf, in etc/) under
# /var/spool/ovlrun-slurm2411.
set -euo pipefail
# One brace group, read whole before it runs: editing or checking out this file while
# it runs (it may run for minutes) cannot change what it does.
{
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
# shellcheck source=ci/slurm-lib.sh
. "$here/slurm-lib.sh"
root="${OVLRUN_TRIXIE_ROOT:-/var/lib/ovlrun-ci/trixie}"
nsdir="${OVLRUN_TRIXIE_NS:-/var/lib/ovlrun-ci/ns2411}"
share="${OVLRUN_SLURM_TEST_DIR:-/var/tmp/ovlrun-slurm-worlds}"
node=ovl2411
cluster=ovlrun2411
port_base=$((${OVLRUN_SLURM_PORT_BASE:-6817} + 100))
state=/var/spool/ovlrun-slurm2411  # inside the root
pkgs=(slurmctld slurmd slurm-client munge python3 python3-venv
      python3-typer python3-prctl python3-pyroute2)

[ "$(id -u)" = 0 ] || die "must run as root"
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
    # shellcheck disable=SC2016 # expanded by the inner shell
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
    # shellcheck disable=SC2016 # a dpkg-query format, not a shell expansion
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
in_ns=(nsenter --mount="$nsdir/mnt" --uts="$nsdir/uts" --)
ns_alive() {
    [ "$(cat "$nsdir/binds" 2>/dev/null)" = "$binds" ] \
        && "${in_ns[@]}" test -e /.ovlrun-debootstrap-done 2>/dev/null \
        && [ "$("${in_ns[@]}" hostname 2>/dev/null)" = "$node" ] \
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

# --- 4. the daemons: ci/slurm-lib.sh, as for the host's Slurm ----------------------
grep -q "[[:space:]]$node\$" "$root/etc/hosts" || printf '127.0.0.1\t%s\n' "$node" >>"$root/etc/hosts"
pids="$nsdir/pids"   # host paths of our pid files (outside the root: survive its rebuild)
hook_python=/usr/bin/python3
instance_stop() { "$here/slurm2411-stop.sh"; }
instance_ok() { ns_alive; }
instance_prepare() { make_ns; }
slurm_up
log "total $((SECONDS - t0))s"
exit 0
}
