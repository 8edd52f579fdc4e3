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
decide what a job sees), so DIR is opened from / following no symlink, and DIR, every
directory and file read from it must be owned by the image owner and not
group/other-writable, checked with ``fstat`` on the very fd that is read; every name is
opened with ``O_NOFOLLOW`` relative to the fd of its directory, so no symlink is ever
followed.  The image owner decides what a release looks like, never where a mount lands
or what enters a node's store:

- only paths this node's profiles give a tree root are fetched (the profile's tree for
  ``--profile`` and the Prolog; for ``--all``, any of the node's profiles' trees), and
  the manifest's tree root must be that one;
- its source and source identity must be what this node finds itself: ``source_root``
  the real path of the tree root here, ``source`` the path below it reached without any
  symlink or mount crossing (:func:`ovlrun.linux.files.open_release`, as build and
  launch open it), ``source_ino`` that directory's inode;
- the image's size (from DIR's index, equal to the manifest's) must be within the site's
  ``max_image_bytes`` and fit the store's free space before a byte is copied, and the
  copy stops at that size; its sha256 must match; and it must be an image ovlrun writes
  (:func:`ovlrun.store.image.reader.check_image`: superblock, bounds, types, xattrs,
  redirects), all before it enters the store's index;
- a version the node has replaced is never made current again (no rollback);
- one fetch per node at a time (``locks/fetch.lock``), held by the fetch's bounded
  workers too, so a stalled DIR costs one stuck worker per node, not one per Prolog.

Every access to DIR runs in a bounded worker (:func:`ovlrun.store.bounded.run_bounded`):
a stalled or unreachable DIR costs at most the timeout, and the node keeps what it has.

Modules: :mod:`~ovlrun.store.fleet.directory` (DIR's layout, index and trusted opening),
:mod:`~ovlrun.store.fleet.publish` (publish, gc of DIR), :mod:`~ovlrun.store.fleet.fetch`
(fetch, and the Prolog's fetch for a job).
"""
