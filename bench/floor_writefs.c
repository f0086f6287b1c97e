/* floor_writefs: a minimal writable libfuse3 LOW-LEVEL file system, the floor of a `cp -r`
 * into a FUSE mount on this kernel. It keeps a tree of folders and files in memory; a file's
 * bytes are discarded and only its size is kept. No fsync, no persistence: a probe, not a
 * product.
 *
 *   floor_writefs [--st] [-d] MOUNTPOINT
 *
 * It mounts the way a writeback blobfs mount does where that matters to a copy: no
 * writeback_cache, no default_permissions, entry and attribute timeouts of 1 s, libfuse's
 * default max_write, the multithreaded loop (10 idle threads) unless --st.
 * SIGUSR1 writes the per-opcode request counts to stderr (also written at exit).
 * Build: gcc -O2 -Wall -o floor_writefs floor_writefs.c $(pkg-config --cflags --libs fuse3)
 */
#define FUSE_USE_VERSION 312
#define _GNU_SOURCE
#include <fuse_lowlevel.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

struct node {
	char *name;
	fuse_ino_t parent;
	mode_t mode;
	off_t size;
	struct timespec mtime;
	fuse_ino_t next;          /* next in the hash chain of (parent, name) */
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct node *nodes;   /* inode i is nodes[i]; 0 unused, 1 = root */
static size_t nnodes, ncap;
static fuse_ino_t *buckets;  /* heads of the (parent, name) hash chains */
static size_t nbuckets;
static const double TMO = 1.0;

enum { C_LOOKUP, C_GETATTR, C_SETATTR, C_MKDIR, C_CREATE, C_OPEN, C_WRITE, C_FLUSH, C_RELEASE,
       C_OPENDIR, C_READDIR, C_RELEASEDIR, C_STATFS, C_FORGET, C_NCOUNT };
static const char *cname[C_NCOUNT] = { "LOOKUP", "GETATTR", "SETATTR", "MKDIR", "CREATE", "OPEN",
    "WRITE", "FLUSH", "RELEASE", "OPENDIR", "READDIR", "RELEASEDIR", "STATFS", "FORGET" };
static atomic_ulong cnt[C_NCOUNT];
#define COUNT(c) atomic_fetch_add_explicit(&cnt[c], 1, memory_order_relaxed)

static uint64_t hash(fuse_ino_t parent, const char *s)
{
	uint64_t h = 1469598103934665603ULL ^ parent;
	while (*s) h = (h ^ (unsigned char)*s++) * 1099511628211ULL;
	return h;
}

static void rehash(void)
{
	free(buckets);
	nbuckets = nbuckets ? nbuckets * 2 : 1024;
	buckets = calloc(nbuckets, sizeof *buckets);
	for (fuse_ino_t i = 2; i < nnodes; i++) {
		uint64_t b = hash(nodes[i].parent, nodes[i].name) & (nbuckets - 1);
		nodes[i].next = buckets[b];
		buckets[b] = i;
	}
}

/* callers hold the lock */
static fuse_ino_t find(fuse_ino_t parent, const char *name)
{
	for (fuse_ino_t i = buckets[hash(parent, name) & (nbuckets - 1)]; i; i = nodes[i].next)
		if (nodes[i].parent == parent && !strcmp(nodes[i].name, name)) return i;
	return 0;
}

static fuse_ino_t add(fuse_ino_t parent, const char *name, mode_t mode)
{
	if (nnodes == ncap) nodes = realloc(nodes, (ncap *= 2) * sizeof *nodes);
	fuse_ino_t i = nnodes++;
	nodes[i] = (struct node){ strdup(name), parent, mode, 0, { 0, 0 }, 0 };
	clock_gettime(CLOCK_REALTIME, &nodes[i].mtime);
	if (nnodes > nbuckets) rehash();
	else {
		uint64_t b = hash(parent, name) & (nbuckets - 1);
		nodes[i].next = buckets[b];
		buckets[b] = i;
	}
	return i;
}

static void fill_stat(fuse_ino_t ino, struct stat *st)
{
	struct node *n = &nodes[ino];
	memset(st, 0, sizeof *st);
	st->st_ino = ino;
	st->st_mode = n->mode;
	st->st_nlink = S_ISDIR(n->mode) ? 2 : 1;
	st->st_uid = getuid(); st->st_gid = getgid();
	st->st_size = n->size; st->st_blksize = 4096; st->st_blocks = (n->size + 511) / 512;
	st->st_mtim = st->st_ctim = st->st_atim = n->mtime;
}

static void entry_of(fuse_ino_t ino, struct fuse_entry_param *e)
{
	memset(e, 0, sizeof *e);
	e->ino = ino; e->generation = 1; e->attr_timeout = TMO; e->entry_timeout = TMO;
	fill_stat(ino, &e->attr);
}

static int valid(fuse_ino_t ino) { return ino >= 1 && ino < nnodes; }

static void fs_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	COUNT(C_LOOKUP);
	struct fuse_entry_param e;
	pthread_mutex_lock(&lock);
	fuse_ino_t i = valid(parent) ? find(parent, name) : 0;
	if (i) entry_of(i, &e);
	pthread_mutex_unlock(&lock);
	if (!i) fuse_reply_err(req, ENOENT); else fuse_reply_entry(req, &e);
}

static void fs_forget(fuse_req_t req, fuse_ino_t ino, uint64_t n) { (void)ino; (void)n; COUNT(C_FORGET); fuse_reply_none(req); }
static void fs_forget_multi(fuse_req_t req, size_t c, struct fuse_forget_data *f) { (void)c; (void)f; COUNT(C_FORGET); fuse_reply_none(req); }

static void fs_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)fi; COUNT(C_GETATTR);
	struct stat st;
	pthread_mutex_lock(&lock);
	int ok = valid(ino);
	if (ok) fill_stat(ino, &st);
	pthread_mutex_unlock(&lock);
	if (!ok) fuse_reply_err(req, ENOENT); else fuse_reply_attr(req, &st, TMO);
}

static void fs_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi)
{
	(void)fi; COUNT(C_SETATTR);
	struct stat st;
	pthread_mutex_lock(&lock);
	int ok = valid(ino);
	if (ok) {
		struct node *n = &nodes[ino];
		if (to_set & FUSE_SET_ATTR_MODE) n->mode = (n->mode & S_IFMT) | (attr->st_mode & 07777);
		if (to_set & FUSE_SET_ATTR_SIZE) n->size = attr->st_size;
		if (to_set & FUSE_SET_ATTR_MTIME) n->mtime = attr->st_mtim;
		if (to_set & FUSE_SET_ATTR_MTIME_NOW) clock_gettime(CLOCK_REALTIME, &n->mtime);
		fill_stat(ino, &st);
	}
	pthread_mutex_unlock(&lock);
	if (!ok) fuse_reply_err(req, ENOENT); else fuse_reply_attr(req, &st, TMO);
}

static void make(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi)
{
	struct fuse_entry_param e;
	int err = 0;
	pthread_mutex_lock(&lock);
	if (!valid(parent) || !S_ISDIR(nodes[parent].mode)) err = ENOTDIR;
	else if (find(parent, name)) err = EEXIST;
	else entry_of(add(parent, name, mode), &e);
	pthread_mutex_unlock(&lock);
	if (err) fuse_reply_err(req, err);
	else if (fi) fuse_reply_create(req, &e, fi);
	else fuse_reply_entry(req, &e);
}

static void fs_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{ COUNT(C_MKDIR); make(req, parent, name, S_IFDIR | (mode & 07777), NULL); }

static void fs_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi)
{ COUNT(C_CREATE); make(req, parent, name, S_IFREG | (mode & 07777), fi); }

static void fs_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	COUNT(C_OPEN);
	pthread_mutex_lock(&lock);
	int ok = valid(ino) && !S_ISDIR(nodes[ino].mode);
	if (ok && (fi->flags & O_TRUNC)) nodes[ino].size = 0;
	pthread_mutex_unlock(&lock);
	if (!ok) fuse_reply_err(req, EISDIR); else fuse_reply_open(req, fi);
}

static void fs_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off, struct fuse_file_info *fi)
{
	(void)buf; (void)fi; COUNT(C_WRITE);
	pthread_mutex_lock(&lock);
	int ok = valid(ino);
	if (ok && off + (off_t)size > nodes[ino].size) nodes[ino].size = off + size;
	pthread_mutex_unlock(&lock);
	if (!ok) fuse_reply_err(req, EBADF); else fuse_reply_write(req, size);
}

static void fs_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{ (void)ino; (void)fi; COUNT(C_FLUSH); fuse_reply_err(req, 0); }
static void fs_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{ (void)ino; (void)fi; COUNT(C_RELEASE); fuse_reply_err(req, 0); }

static void fs_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	COUNT(C_OPENDIR);
	pthread_mutex_lock(&lock);
	int ok = valid(ino) && S_ISDIR(nodes[ino].mode);
	pthread_mutex_unlock(&lock);
	if (!ok) fuse_reply_err(req, ENOTDIR); else fuse_reply_open(req, fi);
}

/* readdir by a linear walk: enough for `ls` of a small tree, not meant to be fast */
static void fs_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	(void)fi; COUNT(C_READDIR);
	char *buf = malloc(size);
	size_t pos = 0;
	pthread_mutex_lock(&lock);
	for (off_t k = off; k < (off_t)nnodes; k++) {  /* offset k: 0 ".", 1 "..", k >= 2 inode k */
		if (k >= 2 && nodes[k].parent != ino) continue;
		const char *name = k == 0 ? "." : k == 1 ? ".." : nodes[k].name;
		struct stat st; fill_stat(k < 2 ? ino : (fuse_ino_t)k, &st);
		size_t len = fuse_add_direntry(req, buf + pos, size - pos, name, &st, k + 1);
		if (len > size - pos) break;
		pos += len;
	}
	pthread_mutex_unlock(&lock);
	fuse_reply_buf(req, buf, pos);
	free(buf);
}
static void fs_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{ (void)ino; (void)fi; COUNT(C_RELEASEDIR); fuse_reply_err(req, 0); }

static void fs_statfs(fuse_req_t req, fuse_ino_t ino)
{
	(void)ino; COUNT(C_STATFS);
	struct statvfs s = { .f_bsize = 4096, .f_frsize = 4096, .f_blocks = 1 << 24, .f_bfree = 1 << 23,
			     .f_bavail = 1 << 23, .f_files = 1 << 24, .f_ffree = 1 << 23, .f_namemax = 255 };
	fuse_reply_statfs(req, &s);
}

static void dump(int sig)
{
	(void)sig;
	char out[1024]; size_t p = 0;
	for (int c = 0; c < C_NCOUNT; c++) {
		const char *s = cname[c]; while (*s) out[p++] = *s++;
		out[p++] = '=';
		char d[24]; int n = 0; unsigned long v = atomic_load(&cnt[c]);
		do { d[n++] = '0' + v % 10; v /= 10; } while (v);
		while (n) out[p++] = d[--n];
		out[p++] = c + 1 < C_NCOUNT ? ' ' : '\n';
	}
	if (write(2, out, p) < 0) {}
}

int main(int argc, char **argv)
{
	int debug = 0, st = 0; const char *mnt = NULL;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--st")) st = 1;
		else if (!strcmp(argv[i], "-d")) debug = 1;
		else if (!mnt) mnt = argv[i];
		else { fprintf(stderr, "unknown argument %s\n", argv[i]); return 2; }
	}
	if (!mnt) { fprintf(stderr, "usage: %s [--st] [-d] MOUNTPOINT\n", argv[0]); return 2; }
	ncap = 1024; nodes = calloc(ncap, sizeof *nodes); nnodes = 2;
	nodes[1] = (struct node){ strdup(""), 1, S_IFDIR | 0755, 0, { 0, 0 }, 0 };
	clock_gettime(CLOCK_REALTIME, &nodes[1].mtime);
	rehash();

	struct fuse_lowlevel_ops ops = {
		.lookup = fs_lookup, .forget = fs_forget, .forget_multi = fs_forget_multi,
		.getattr = fs_getattr, .setattr = fs_setattr, .mkdir = fs_mkdir, .create = fs_create,
		.open = fs_open, .write = fs_write, .flush = fs_flush, .release = fs_release,
		.opendir = fs_opendir, .readdir = fs_readdir, .releasedir = fs_releasedir,
		.statfs = fs_statfs,
	};
	char *fargv[] = { argv[0], "-o", "fsname=floor_writefs,subtype=floor_writefs", debug ? "-d" : NULL, NULL };
	struct fuse_args args = FUSE_ARGS_INIT(debug ? 4 : 3, fargv);
	struct fuse_session *se = fuse_session_new(&args, &ops, sizeof ops, NULL);
	if (!se) return 1;
	if (fuse_set_signal_handlers(se)) return 1;
	signal(SIGUSR1, dump);
	if (fuse_session_mount(se, mnt)) return 1;
	int ret;
	if (st) ret = fuse_session_loop(se);
	else {
		struct fuse_loop_config *cfg = fuse_loop_cfg_create();
		fuse_loop_cfg_set_max_threads(cfg, 10);
		ret = fuse_session_loop_mt(se, cfg);
		fuse_loop_cfg_destroy(cfg);
	}
	dump(0);
	fuse_session_unmount(se);
	fuse_remove_signal_handlers(se);
	fuse_session_destroy(se);
	return ret ? 1 : 0;
}
