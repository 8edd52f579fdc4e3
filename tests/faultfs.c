/*
 * faultfs: a read-only passthrough FUSE filesystem for ovlrun's tests that can inject
 * faults (EIO, EACCES, stalls) and counts the requests it serves.
 *
 *   faultfs BACKING MOUNTPOINT CTLDIR
 *
 * CTLDIR/faults   rules, one per line: "OP MODE PATH" (PATH last: it may hold spaces),
 *                 OP in getattr|readdir|readlink|open|read|* , MODE in eio|eacces|estale|stall
 *                 (estale: what an NFS client returns for a file deleted on the server);
 *                 re-read whenever the file is replaced.  A stall blocks that request
 *                 until CTLDIR/release exists (at most 120 s), then serves it normally.
 * CTLDIR/counters uint64 counters, mmap'ed and updated live: getattr, opendir, readdir
 *                 calls, readlink, open, read.  (High-level API: a kernel LOOKUP and a
 *                 GETATTR both arrive as getattr.)
 *
 * Prints "ready" on stdout once mounted.  Multi-threaded, so one stalled request does
 * not stop the others.
 */
#define FUSE_USE_VERSION 31
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

enum { C_GETATTR, C_OPENDIR, C_READDIR, C_READLINK, C_OPEN, C_READ, C_N };

struct rule { char op[16]; char mode[16]; char path[4096]; };

static char backing[4096], ctl[4096];
static volatile uint64_t *counters;
static struct rule rules[64];
static int nrules;
static struct stat rules_st;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void count(int c) { __atomic_fetch_add(&counters[c], 1, __ATOMIC_SEQ_CST); }

static void full(char *out, size_t n, const char *path) { snprintf(out, n, "%s%s", backing, path); }

static void load_rules(void) {
	char f[8192];
	struct stat st;
	snprintf(f, sizeof f, "%s/faults", ctl);
	if (stat(f, &st) != 0) { nrules = 0; memset(&rules_st, 0, sizeof rules_st); return; }
	if (st.st_ino == rules_st.st_ino && st.st_size == rules_st.st_size &&
	    st.st_mtim.tv_sec == rules_st.st_mtim.tv_sec && st.st_mtim.tv_nsec == rules_st.st_mtim.tv_nsec)
		return;
	FILE *fp = fopen(f, "r");
	if (!fp) return;
	rules_st = st;
	nrules = 0;
	char line[8192];
	while (nrules < 64 && fgets(line, sizeof line, fp)) {
		line[strcspn(line, "\n")] = 0;
		struct rule *r = &rules[nrules];
		int used = 0;
		if (sscanf(line, "%15s %15s %n", r->op, r->mode, &used) == 2 && used > 0) {
			snprintf(r->path, sizeof r->path, "%s", line + used);
			nrules++;
		}
	}
	fclose(fp);
}

/* 0 to serve the request, or a negative errno to fail it. */
static int fault(const char *op, const char *path) {
	char mode[16] = "";
	pthread_mutex_lock(&lock);
	load_rules();
	for (int i = 0; i < nrules; i++) {
		if ((strcmp(rules[i].op, op) == 0 || strcmp(rules[i].op, "*") == 0) && strcmp(rules[i].path, path) == 0) {
			snprintf(mode, sizeof mode, "%s", rules[i].mode);
			break;
		}
	}
	pthread_mutex_unlock(&lock);
	if (strcmp(mode, "eio") == 0) return -EIO;
	if (strcmp(mode, "eacces") == 0) return -EACCES;
	if (strcmp(mode, "estale") == 0) return -ESTALE;
	if (strcmp(mode, "stall") == 0) {
		char rel[8192];
		snprintf(rel, sizeof rel, "%s/release", ctl);
		for (int i = 0; i < 12000 && access(rel, F_OK) != 0; i++) {
			struct timespec ts = {0, 10 * 1000 * 1000};
			nanosleep(&ts, NULL);
		}
	}
	return 0;
}

static int ff_getattr(const char *path, struct stat *st, struct fuse_file_info *fi) {
	(void)fi;
	char p[8192];
	count(C_GETATTR);
	int e = fault("getattr", path);
	if (e) return e;
	full(p, sizeof p, path);
	return lstat(p, st) == 0 ? 0 : -errno;
}

static int ff_readlink(const char *path, char *buf, size_t size) {
	char p[8192];
	count(C_READLINK);
	int e = fault("readlink", path);
	if (e) return e;
	full(p, sizeof p, path);
	ssize_t n = readlink(p, buf, size - 1);
	if (n < 0) return -errno;
	buf[n] = 0;
	return 0;
}

static int ff_opendir(const char *path, struct fuse_file_info *fi) {
	char p[8192];
	count(C_OPENDIR);
	int e = fault("readdir", path);
	if (e) return e;
	full(p, sizeof p, path);
	DIR *d = opendir(p);
	if (!d) return -errno;
	fi->fh = (uint64_t)(uintptr_t)d;
	return 0;
}

static int ff_readdir(const char *path, void *buf, fuse_fill_dir_t filler, off_t off, struct fuse_file_info *fi,
		      enum fuse_readdir_flags flags) {
	(void)path; (void)off; (void)flags;
	count(C_READDIR);
	DIR *d = (DIR *)(uintptr_t)fi->fh;
	rewinddir(d);
	struct dirent *de;
	while ((de = readdir(d)) != NULL)
		if (filler(buf, de->d_name, NULL, 0, 0)) break;
	return 0;
}

static int ff_releasedir(const char *path, struct fuse_file_info *fi) {
	(void)path;
	closedir((DIR *)(uintptr_t)fi->fh);
	return 0;
}

static int ff_open(const char *path, struct fuse_file_info *fi) {
	char p[8192];
	count(C_OPEN);
	int e = fault("open", path);
	if (e) return e;
	if ((fi->flags & O_ACCMODE) != O_RDONLY) return -EROFS;
	full(p, sizeof p, path);
	int fd = open(p, O_RDONLY);
	if (fd < 0) return -errno;
	fi->fh = (uint64_t)fd;
	return 0;
}

static int ff_read(const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
	count(C_READ);
	int e = fault("read", path);
	if (e) return e;
	ssize_t n = pread((int)fi->fh, buf, size, off);
	return n < 0 ? -errno : (int)n;
}

static int ff_release(const char *path, struct fuse_file_info *fi) {
	(void)path;
	close((int)fi->fh);
	return 0;
}

static int ff_statfs(const char *path, struct statvfs *sv) {
	(void)path;
	return statvfs(backing, sv) == 0 ? 0 : -errno;
}

/* Inode numbers from the backing tree, as NFS file ids are: stable for the life of a
 * file (ovlrun records a release's inode at build and checks it at launch). */
static void *ff_init(struct fuse_conn_info *conn, struct fuse_config *cfg) {
	(void)conn;
	cfg->use_ino = 1;
	return NULL;
}

static const struct fuse_operations ops = {
	.init = ff_init, .getattr = ff_getattr, .readlink = ff_readlink, .opendir = ff_opendir, .readdir = ff_readdir,
	.releasedir = ff_releasedir, .open = ff_open, .read = ff_read, .release = ff_release, .statfs = ff_statfs,
};

int main(int argc, char **argv) {
	if (argc != 4) { fprintf(stderr, "usage: %s BACKING MOUNTPOINT CTLDIR\n", argv[0]); return 2; }
	if (!realpath(argv[1], backing) || !realpath(argv[3], ctl)) { perror("realpath"); return 2; }
	char cpath[8192];
	snprintf(cpath, sizeof cpath, "%s/counters", ctl);
	int cfd = open(cpath, O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (cfd < 0 || ftruncate(cfd, C_N * sizeof(uint64_t)) != 0) { perror("counters"); return 2; }
	counters = mmap(NULL, C_N * sizeof(uint64_t), PROT_READ | PROT_WRITE, MAP_SHARED, cfd, 0);
	if (counters == MAP_FAILED) { perror("mmap"); return 2; }
	char *fargv[] = {argv[0], "-o", "ro,allow_other,fsname=faultfs,subtype=faultfs", NULL};
	struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
	struct fuse *f = fuse_new(&args, &ops, sizeof ops, NULL);
	if (!f) return 1;
	if (fuse_mount(f, argv[2]) != 0) return 1;
	printf("ready\n");
	fflush(stdout);
	int rc = fuse_loop_mt(f, 0);
	fuse_unmount(f);
	fuse_destroy(f);
	return rc ? 1 : 0;
}
