"""Fleets: build snapshot images once, publish them to a directory on the shared
filesystem, and let every node fetch them instead of walking the shared tree itself.

At 2,000 nodes, ``snapshot build`` on every node moves the metadata storm from job start
to build time.  Instead one build host builds, ``snapshot publish`` copies its current
images into DIR, and each node's ``snapshot fetch`` (or the Slurm Prolog, for a job whose
images are missing) copies the images it lacks: a few large sequential reads per release
instead of one request per entry.

Layout of DIR (owned by the image owner, see :mod:`ovlrun.store.siteconfig`)::

    DIR/index.json                 {"format": 1, "sources": {PATH: {"snapshot": "KEY/ID",
                                    "image_sha256", "image_bytes", "published"}}}, replaced
                                    atomically; names only complete KEY/ID directories
    DIR/KEY/ID/manifest.json       the build host's manifest, as in its store
    DIR/KEY/ID/image.erofs         the image (0644: node root is usually squashed to nobody)
    DIR/.lock                      flock serialising publishers and gc
    DIR/.stage.KEY.ID.RANDOM/      a version being written (renamed to KEY/ID when complete)
    DIR/.trash.RANDOM/             a version gc took out, being deleted

KEY and ID are those of the local store (``snapshots/KEY/ID``), so a fetched snapshot
lands exactly where a local build of the same snapshot would be.  Several versions of
one path coexist until ``snapshot gc --published DIR``; the index only ever names a
version whose directory was complete before the index was written, so a reader never
sees an index naming a missing image (gc removes only versions the index stopped
naming at least the grace period ago).

Trust: a node mounts what it fetches with root's trust (``trusted.overlay.*`` xattrs
decide what a job sees), so DIR, every directory and file read from it must be owned by
the image owner and not group/other-writable, checked with ``fstat`` on the very fd that
is read; every name is opened with ``O_NOFOLLOW`` relative to the fd of its directory,
so no symlink is ever followed; the image's sha256 must match the manifest's; and the
manifest may only localise a path under its tree root (and, with a profile, the root of
the profile's tree that selected it), whose source must resolve inside that root on this
node: an image owner can change what a release looks like, never mount over /etc.

Every access to DIR runs in a bounded worker (:func:`ovlrun.store.bounded.run_bounded`):
a stalled or unreachable DIR costs at most the timeout, and the node keeps what it has.

Modules: :mod:`~ovlrun.store.fleet.directory` (DIR's layout, index and trusted opening),
:mod:`~ovlrun.store.fleet.publish` (publish, gc of DIR), :mod:`~ovlrun.store.fleet.fetch`
(fetch, and the Prolog's fetch for a job).
"""
