/*
 * benchnfs: a read-only FUSE mirror of a local directory that behaves, for
 * benchmarking purposes, like a shared NFS software tree.
 *
 *  - every request that reaches the "server" is counted by type;
 *  - every request that would be a network round trip on NFS gets an injected
 *    latency (default 1 ms, a LAN RTT), changeable at run time;
 *  - kernel caching is NFS-like: entry/attr timeouts (default 1 s, NFS's
 *    acregmin is 3 s and many sites lower it), negative entries cached for a
 *    configurable time (0 = not cached, like lookupcache=positive), page
 *    cache kept across opens (close-to-open with unchanged attributes).
 *
 * Counters live in a small control file mapped MAP_SHARED: the benchmark
 * reads it at any moment without a round trip through the filesystem (which
 * would itself be counted) and without signals or races.  Layout (all little
 * endian, see bench/standin/counters.py):
 *     char     magic[8]  = "BENCHNFS"
 *     uint32   version   = 1
 *     uint32   nops
 *     uint64   latency_ns          (read on every request: writable live)
 *     uint64   reserved[5]
 *     char     names[nops][24]
 *     uint64   counts[nops]
 *
 * Written in C against the libfuse3 low-level API rather than pyfuse3 so
 * that the server's own CPU cost (a few microseconds per request) stays far
 * below the injected latency and does not distort the results.
 */
#define FUSE_USE_VERSION 312
#define _GNU_SOURCE
#include <fuse_lowlevel.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

enum op {
	OP_LOOKUP, OP_LOOKUP_ENOENT, OP_GETATTR, OP_READLINK, OP_OPEN, OP_READ,
	OP_READ_BYTES, OP_OPENDIR, OP_READDIR, OP_READDIRPLUS, OP_STATFS,
	OP_GETXATTR, OP_LISTXATTR, OP_ACCESS, OP_FORGET, OP_FLUSH, OP_RELEASE,
	OP_RELEASEDIR, OP_REJECTED, OP_READDIR_EOF, NOPS
};

static const char *op_names[NOPS] = {
	"lookup", "lookup_enoent", "getattr", "readlink", "open", "read",
	"read_bytes", "opendir", "readdir", "readdirplus", "statfs",
	"getxattr", "listxattr", "access", "forget", "flush", "release",
	"releasedir", "rejected", "readdir_eof",
};

struct ctl {
	char magic[8];
	uint32_t version;
	uint32_t nops;
	_Atomic uint64_t latency_ns;
	uint64_t reserved[5];
	char names[NOPS][24];
	_Atomic uint64_t counts[NOPS];
};

static struct ctl *ctl;
static int root_fd = -1;
static double entry_timeout = 1.0, attr_timeout = 1.0, negative_timeout = 1.0;
static enum { XATTR_PASSTHROUGH, XATTR_NONE } xattr_mode = XATTR_PASSTHROUGH;

static void count(enum op op, uint64_t n)
{
	atomic_fetch_add_explicit(&ctl->counts[op], n, memory_order_relaxed);
}

/* One simulated round trip: count it and wait for the configured latency. */
static void round_trip(enum op op)
{
	count(op, 1);
	uint64_t ns = atomic_load_explicit(&ctl->latency_ns, memory_order_relaxed);
	if (ns) {
		struct timespec ts = { .tv_sec = ns / 1000000000ull,
				       .tv_nsec = ns % 1000000000ull };
		while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
			;
	}
}

/*
 * Inode table.  The FUSE inode number is the backing file's st_ino (the
 * backing tree is on one filesystem, so it is unique), except the root which
 * is FUSE_ROOT_ID.  Each node remembers one path relative to the backing
 * root; nodes are never freed (the tree is bounded, ~100k entries), so forget
 * only needs counting.
 */
struct node {
	fuse_ino_t ino;
	struct node *next;
	char path[];
};

#define NBUCKETS (1u << 18)
static struct node *buckets[NBUCKETS];
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
static struct node *root_node;

static struct node *node_get(fuse_ino_t ino)
{
	if (ino == FUSE_ROOT_ID)
		return root_node;
	pthread_mutex_lock(&table_lock);
	struct node *n = buckets[ino % NBUCKETS];
	while (n && n->ino != ino)
		n = n->next;
	pthread_mutex_unlock(&table_lock);
	return n;
}

static void node_put(fuse_ino_t ino, const char *path)
{
	pthread_mutex_lock(&table_lock);
	struct node **b = &buckets[ino % NBUCKETS];
	for (struct node *n = *b; n; n = n->next)
		if (n->ino == ino) {
			pthread_mutex_unlock(&table_lock);
			return;
		}
	size_t len = strlen(path);
	struct node *n = malloc(sizeof(*n) + len + 1);
	if (!n) {
		pthread_mutex_unlock(&table_lock);
		return;
	}
	n->ino = ino;
	memcpy(n->path, path, len + 1);
	n->next = *b;
	*b = n;
	pthread_mutex_unlock(&table_lock);
}

static int child_path(char *buf, size_t size, const struct node *parent, const char *name)
{
	int r;
	if (parent == root_node)
		r = snprintf(buf, size, "%s", name);
	else
		r = snprintf(buf, size, "%s/%s", parent->path, name);
	return (r < 0 || (size_t)r >= size) ? -ENAMETOOLONG : 0;
}

static fuse_ino_t fuse_ino_of(const struct stat *st)
{
	return st->st_ino;
}

/* Stat a path relative to the backing root and fill a FUSE entry. */
static int make_entry(const char *path, struct fuse_entry_param *e)
{
	memset(e, 0, sizeof(*e));
	if (fstatat(root_fd, path, &e->attr, AT_SYMLINK_NOFOLLOW) == -1)
		return -errno;
	e->ino = fuse_ino_of(&e->attr);
	e->attr.st_ino = e->ino;
	e->attr_timeout = attr_timeout;
	e->entry_timeout = entry_timeout;
	node_put(e->ino, path);
	return 0;
}

static void bn_init(void *userdata, struct fuse_conn_info *conn)
{
	(void)userdata;
	/* Like NFS READDIRPLUS: let the kernel get attributes with listings. */
	if (conn->capable & FUSE_CAP_READDIRPLUS)
		conn->want |= FUSE_CAP_READDIRPLUS;
	if (conn->capable & FUSE_CAP_READDIRPLUS_AUTO)
		conn->want |= FUSE_CAP_READDIRPLUS_AUTO;
	/* Read-only tree: the kernel may cache symlink targets. */
	if (conn->capable & FUSE_CAP_CACHE_SYMLINKS)
		conn->want |= FUSE_CAP_CACHE_SYMLINKS;
}

static void bn_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	round_trip(OP_LOOKUP);
	struct node *p = node_get(parent);
	char path[PATH_MAX];
	struct fuse_entry_param e;
	if (!p) {
		fuse_reply_err(req, ESTALE);
		return;
	}
	int r = child_path(path, sizeof(path), p, name);
	if (r == 0)
		r = make_entry(path, &e);
	if (r == -ENOENT) {
		count(OP_LOOKUP_ENOENT, 1);
		if (negative_timeout > 0) {
			/* ino 0 + entry_timeout = a cached negative dentry. */
			memset(&e, 0, sizeof(e));
			e.entry_timeout = negative_timeout;
			fuse_reply_entry(req, &e);
			return;
		}
	}
	if (r)
		fuse_reply_err(req, -r);
	else
		fuse_reply_entry(req, &e);
}

static void bn_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
	(void)ino; (void)nlookup;
	count(OP_FORGET, 1);
	fuse_reply_none(req);
}

static void bn_forget_multi(fuse_req_t req, size_t n, struct fuse_forget_data *f)
{
	(void)f;
	count(OP_FORGET, n);
	fuse_reply_none(req);
}

static void bn_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)fi;
	round_trip(OP_GETATTR);
	struct node *n = node_get(ino);
	struct stat st;
	if (!n) {
		fuse_reply_err(req, ESTALE);
		return;
	}
	if (fstatat(root_fd, n->path, &st, AT_SYMLINK_NOFOLLOW) == -1) {
		fuse_reply_err(req, errno);
		return;
	}
	st.st_ino = ino;
	fuse_reply_attr(req, &st, attr_timeout);
}

static void bn_readlink(fuse_req_t req, fuse_ino_t ino)
{
	round_trip(OP_READLINK);
	struct node *n = node_get(ino);
	char buf[PATH_MAX + 1];
	if (!n) {
		fuse_reply_err(req, ESTALE);
		return;
	}
	ssize_t len = readlinkat(root_fd, n->path, buf, sizeof(buf) - 1);
	if (len == -1) {
		fuse_reply_err(req, errno);
		return;
	}
	buf[len] = '\0';
	fuse_reply_readlink(req, buf);
}

static void bn_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	round_trip(OP_OPEN);
	struct node *n = node_get(ino);
	if (!n) {
		fuse_reply_err(req, ESTALE);
		return;
	}
	if ((fi->flags & O_ACCMODE) != O_RDONLY) {
		fuse_reply_err(req, EROFS);
		return;
	}
	int fd = openat(root_fd, n->path, O_RDONLY | O_NOFOLLOW);
	if (fd == -1) {
		fuse_reply_err(req, errno);
		return;
	}
	fi->fh = fd;
	/* close-to-open: file unchanged, so keep its cached pages. */
	fi->keep_cache = 1;
	fuse_reply_open(req, fi);
}

static void bn_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	(void)ino;
	round_trip(OP_READ);
	struct fuse_bufvec buf = FUSE_BUFVEC_INIT(size);
	buf.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
	buf.buf[0].fd = fi->fh;
	buf.buf[0].pos = off;
	count(OP_READ_BYTES, size);
	fuse_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
}

static void bn_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino; (void)fi;
	count(OP_FLUSH, 1);
	fuse_reply_err(req, 0);
}

static void bn_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	count(OP_RELEASE, 1);
	close(fi->fh);
	fuse_reply_err(req, 0);
}

struct dirh {
	DIR *dp;
	off_t offset;
	struct dirent *entry;
};

static void bn_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	round_trip(OP_OPENDIR);
	struct node *n = node_get(ino);
	if (!n) {
		fuse_reply_err(req, ESTALE);
		return;
	}
	struct dirh *d = calloc(1, sizeof(*d));
	int fd = openat(root_fd, n == root_node ? "." : n->path, O_RDONLY | O_DIRECTORY);
	if (!d || fd == -1) {
		int err = fd == -1 ? errno : ENOMEM;
		free(d);
		if (fd != -1)
			close(fd);
		fuse_reply_err(req, err);
		return;
	}
	d->dp = fdopendir(fd);
	fi->fh = (uintptr_t)d;
	fi->cache_readdir = 1;
	fi->keep_cache = 1;
	fuse_reply_open(req, fi);
}

static void do_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset,
		       struct fuse_file_info *fi, int plus)
{
	round_trip(plus ? OP_READDIRPLUS : OP_READDIR);
	struct dirh *d = (struct dirh *)(uintptr_t)fi->fh;
	struct node *dn = node_get(ino);
	char *buf = calloc(1, size), *p = buf;
	size_t rem = size;
	if (!buf || !dn) {
		free(buf);
		fuse_reply_err(req, buf ? ESTALE : ENOMEM);
		return;
	}
	if (offset != d->offset) {
		seekdir(d->dp, offset);
		d->entry = NULL;
		d->offset = offset;
	}
	for (;;) {
		if (!d->entry) {
			errno = 0;
			d->entry = readdir(d->dp);
			if (!d->entry)
				break;
		}
		const char *name = d->entry->d_name;
		off_t next = d->entry->d_off;
		size_t used;
		int dot = strcmp(name, ".") == 0 || strcmp(name, "..") == 0;
		if (plus && !dot) {
			struct fuse_entry_param e;
			char path[PATH_MAX];
			if (child_path(path, sizeof(path), dn, name) || make_entry(path, &e)) {
				d->entry = NULL;
				d->offset = next;
				continue;
			}
			used = fuse_add_direntry_plus(req, p, rem, name, &e, next);
		} else if (plus) {
			struct fuse_entry_param e;
			memset(&e, 0, sizeof(e));
			e.attr.st_ino = d->entry->d_ino;
			e.attr.st_mode = d->entry->d_type << 12;
			used = fuse_add_direntry_plus(req, p, rem, name, &e, next);
		} else {
			struct stat st;
			memset(&st, 0, sizeof(st));
			st.st_ino = d->entry->d_ino;
			st.st_mode = d->entry->d_type << 12;
			used = fuse_add_direntry(req, p, rem, name, &st, next);
		}
		if (used > rem)
			break; /* entry stays in d->entry for the next call */
		p += used;
		rem -= used;
		d->entry = NULL;
		d->offset = next;
	}
	/* FUSE has no EOF flag: the kernel always asks once more and gets an
	 * empty reply.  NFS READDIRPLUS returns eof with the last batch, so
	 * these probes are counted apart (they are included in readdir*). */
	if (size == rem)
		count(OP_READDIR_EOF, 1);
	fuse_reply_buf(req, buf, size - rem);
	free(buf);
}

static void bn_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		       struct fuse_file_info *fi)
{
	do_readdir(req, ino, size, off, fi, 0);
}

static void bn_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
			   struct fuse_file_info *fi)
{
	do_readdir(req, ino, size, off, fi, 1);
}

static void bn_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	count(OP_RELEASEDIR, 1);
	struct dirh *d = (struct dirh *)(uintptr_t)fi->fh;
	closedir(d->dp);
	free(d);
	fuse_reply_err(req, 0);
}

static void bn_statfs(fuse_req_t req, fuse_ino_t ino)
{
	(void)ino;
	round_trip(OP_STATFS);
	struct statvfs sv;
	if (fstatvfs(root_fd, &sv) == -1)
		fuse_reply_err(req, errno);
	else
		fuse_reply_statfs(req, &sv);
}

/* xattrs are read through /proc/self/fd so symlinks are not followed. */
static int xattr_path(char *buf, size_t size, struct node *n)
{
	int r = snprintf(buf, size, "/proc/self/fd/%d/%s", root_fd,
			 n == root_node ? "." : n->path);
	return (r < 0 || (size_t)r >= size) ? -ENAMETOOLONG : 0;
}

static void bn_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
	round_trip(OP_GETXATTR);
	if (xattr_mode == XATTR_NONE) {
		/* ENOSYS: the kernel stops asking (like NFSv3: no xattrs). */
		fuse_reply_err(req, ENOSYS);
		return;
	}
	struct node *n = node_get(ino);
	char path[PATH_MAX + 64];
	if (!n || xattr_path(path, sizeof(path), n)) {
		fuse_reply_err(req, n ? ENAMETOOLONG : ESTALE);
		return;
	}
	if (size == 0) {
		ssize_t r = lgetxattr(path, name, NULL, 0);
		if (r == -1)
			fuse_reply_err(req, errno);
		else
			fuse_reply_xattr(req, r);
		return;
	}
	char *buf = malloc(size);
	ssize_t r = buf ? lgetxattr(path, name, buf, size) : -1;
	if (r == -1)
		fuse_reply_err(req, buf ? errno : ENOMEM);
	else
		fuse_reply_buf(req, buf, r);
	free(buf);
}

static void bn_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
	round_trip(OP_LISTXATTR);
	if (xattr_mode == XATTR_NONE) {
		fuse_reply_err(req, ENOSYS);
		return;
	}
	struct node *n = node_get(ino);
	char path[PATH_MAX + 64];
	if (!n || xattr_path(path, sizeof(path), n)) {
		fuse_reply_err(req, n ? ENAMETOOLONG : ESTALE);
		return;
	}
	if (size == 0) {
		ssize_t r = llistxattr(path, NULL, 0);
		if (r == -1)
			fuse_reply_err(req, errno);
		else
			fuse_reply_xattr(req, r);
		return;
	}
	char *buf = malloc(size);
	ssize_t r = buf ? llistxattr(path, buf, size) : -1;
	if (r == -1)
		fuse_reply_err(req, buf ? errno : ENOMEM);
	else
		fuse_reply_buf(req, buf, r);
	free(buf);
}

static void bn_access(fuse_req_t req, fuse_ino_t ino, int mask)
{
	(void)ino; (void)mask;
	/* Only reached without default_permissions; NFS ACCESS is a round trip. */
	round_trip(OP_ACCESS);
	fuse_reply_err(req, 0);
}

static void bn_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
		       struct fuse_file_info *fi)
{
	(void)ino; (void)attr; (void)to_set; (void)fi;
	count(OP_REJECTED, 1);
	fuse_reply_err(req, EROFS);
}

static const struct fuse_lowlevel_ops ops = {
	.init = bn_init,
	.lookup = bn_lookup,
	.forget = bn_forget,
	.forget_multi = bn_forget_multi,
	.getattr = bn_getattr,
	.setattr = bn_setattr,
	.readlink = bn_readlink,
	.open = bn_open,
	.read = bn_read,
	.flush = bn_flush,
	.release = bn_release,
	.opendir = bn_opendir,
	.readdir = bn_readdir,
	.readdirplus = bn_readdirplus,
	.releasedir = bn_releasedir,
	.statfs = bn_statfs,
	.getxattr = bn_getxattr,
	.listxattr = bn_listxattr,
	.access = bn_access,
};

static struct ctl *map_ctl(const char *path, uint64_t latency_ns)
{
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd == -1 || ftruncate(fd, sizeof(struct ctl)) == -1) {
		perror(path);
		exit(1);
	}
	struct ctl *c = mmap(NULL, sizeof(*c), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (c == MAP_FAILED) {
		perror("mmap");
		exit(1);
	}
	close(fd);
	memcpy(c->magic, "BENCHNFS", 8);
	c->version = 1;
	c->nops = NOPS;
	atomic_store(&c->latency_ns, latency_ns);
	for (int i = 0; i < NOPS; i++)
		strncpy(c->names[i], op_names[i], sizeof(c->names[i]) - 1);
	return c;
}

static void usage(const char *prog)
{
	fprintf(stderr,
		"usage: %s [--latency-us N] [--entry-timeout S] [--attr-timeout S]\n"
		"          [--negative-timeout S] [--xattr passthrough|none]\n"
		"          [--threads N] --counters FILE BACKING_DIR MOUNTPOINT\n", prog);
	exit(2);
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "latency-us", required_argument, 0, 'l' },
		{ "entry-timeout", required_argument, 0, 'e' },
		{ "attr-timeout", required_argument, 0, 'a' },
		{ "negative-timeout", required_argument, 0, 'n' },
		{ "xattr", required_argument, 0, 'x' },
		{ "threads", required_argument, 0, 't' },
		{ "counters", required_argument, 0, 'c' },
		{ 0, 0, 0, 0 },
	};
	uint64_t latency_us = 1000;
	unsigned threads = 16;
	const char *counters = NULL;
	int c;
	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (c) {
		case 'l': latency_us = strtoull(optarg, NULL, 10); break;
		case 'e': entry_timeout = atof(optarg); break;
		case 'a': attr_timeout = atof(optarg); break;
		case 'n': negative_timeout = atof(optarg); break;
		case 't': threads = (unsigned)atoi(optarg); break;
		case 'c': counters = optarg; break;
		case 'x':
			if (strcmp(optarg, "none") == 0)
				xattr_mode = XATTR_NONE;
			else if (strcmp(optarg, "passthrough") == 0)
				xattr_mode = XATTR_PASSTHROUGH;
			else
				usage(argv[0]);
			break;
		default: usage(argv[0]);
		}
	}
	if (!counters || argc - optind != 2)
		usage(argv[0]);
	const char *backing = argv[optind], *mountpoint = argv[optind + 1];

	root_fd = open(backing, O_RDONLY | O_DIRECTORY);
	if (root_fd == -1) {
		perror(backing);
		return 1;
	}
	root_node = calloc(1, sizeof(*root_node) + 2);
	root_node->ino = FUSE_ROOT_ID;
	strcpy(root_node->path, ".");
	ctl = map_ctl(counters, latency_us * 1000);

	/* allow_other: root's overlayfs (and ovlrun's jobs) must reach it. */
	char *fargv[] = { argv[0], "-o",
		"ro,allow_other,default_permissions,fsname=benchnfs,subtype=benchnfs", NULL };
	struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
	struct fuse_session *se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
	if (!se)
		return 1;
	if (fuse_set_signal_handlers(se) || fuse_session_mount(se, mountpoint)) {
		fuse_session_destroy(se);
		return 1;
	}
	struct fuse_loop_config *cfg = fuse_loop_cfg_create();
	fuse_loop_cfg_set_max_threads(cfg, threads);
	fuse_loop_cfg_set_idle_threads(cfg, threads);
	int ret = fuse_session_loop_mt(se, cfg);
	fuse_loop_cfg_destroy(cfg);
	fuse_session_unmount(se);
	fuse_remove_signal_handlers(se);
	fuse_session_destroy(se);
	return ret ? 1 : 0;
}
