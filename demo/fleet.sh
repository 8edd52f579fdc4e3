#!/bin/sh
# The fleet demo: one build host publishes its snapshot images to a directory on the
# shared filesystem; a second node (here: a second store on this machine) fetches them
# instead of walking the shared tree, and runs a job on them.
#
#   demo/fleet.sh [OVLRUN_COMMAND...]      (as root; after `ovlrun snapshot build --profile demo`)
#
# OVLRUN_DEMO_IMAGES: the published directory (default /srv/ovlrun-demo/images);
# OVLRUN_DEMO_NODE2: the second node's store (default /var/lib/ovlrun-demo-node2);
# OVLRUN_DEMO_PROFILE: the profile (default demo).
set -eu
[ $# -gt 0 ] || set -- /usr/local/sbin/ovlrun
IMAGES=${OVLRUN_DEMO_IMAGES:-/srv/ovlrun-demo/images}
NODE2=${OVLRUN_DEMO_NODE2:-/var/lib/ovlrun-demo-node2}
PROFILE=${OVLRUN_DEMO_PROFILE:-demo}

# Owned by root (the default image_owner), not group/other-writable: nodes refuse
# anything else.  On NFS with root squashed, set image_owner in /etc/ovlrun/ovlrun.toml
# and give DIR to that account instead.
install -d -m 0755 -o root -g root "$IMAGES"

echo "== build host: publish the current images of profile $PROFILE to $IMAGES"
"$@" snapshot publish --to "$IMAGES" --profile "$PROFILE"
echo "== publish again: nothing to do"
"$@" snapshot publish --to "$IMAGES" --profile "$PROFILE"

echo "== node 2 ($NODE2): fetch what it lacks (sha256-checked, large sequential reads)"
OVLRUN_STORE=$NODE2 "$@" snapshot fetch --from "$IMAGES" --profile "$PROFILE"
echo "== fetch again: up to date, only $IMAGES/index.json was read"
OVLRUN_STORE=$NODE2 "$@" snapshot fetch --from "$IMAGES" --profile "$PROFILE"

echo "== node 2's store looks as if it had built the snapshots itself"
OVLRUN_STORE=$NODE2 "$@" snapshot list

echo "== a job on node 2"
OVLRUN_STORE=$NODE2 "$@" --profile "$PROFILE" -- "$(dirname "$0")/job.sh"
