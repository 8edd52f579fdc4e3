"""Snapshot images: EROFS filesystem images that ovlrun writes itself, straight from a walk.

- :mod:`.format`: the EROFS on-disk structures and constants the images use;
- :mod:`.tree`: the in-memory tree (:class:`~.tree.Node`) that is written and read back;
- :mod:`.layout`: where every record goes (inode kinds, nids, inline tails, data blocks);
- :mod:`.writer`: :func:`~.writer.write_image`, one sequential pass;
- :mod:`.reader`: :func:`~.reader.read_image`, the checker (``snapshot verify``, tests).
"""
