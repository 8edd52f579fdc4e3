"""The NFS stand-in: a counting, latency-injecting read-only FUSE mirror."""
