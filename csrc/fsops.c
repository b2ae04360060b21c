/* FUSE requests (fsops.h), answered in C on libfuse's worker threads (or ring threads:
 * uring.c hands them the same way). Every handler is lo_<request>, as in libfuse's
 * example/passthrough_ll.c.
 *
 * The data never changes, so every answer may be cached by the kernel for a year; open
 * and opendir answer ENOSYS, which makes the kernel stop sending them and keep file pages
 * and directory listings cached (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR). */
#include "fsops.h"

#include "listing.h"
#include "read.h"
#include "tree.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

static void lo_init(void *userdata, struct fuse_conn_info *conn)
{
    (void)userdata;
    unsigned want = FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE | FUSE_CAP_READDIRPLUS |
                    FUSE_CAP_CACHE_SYMLINKS | FUSE_CAP_PARALLEL_DIROPS | FUSE_CAP_ASYNC_READ;
    conn->want |= want & conn->capable;
    conn->want &= ~(unsigned)(FUSE_CAP_READDIRPLUS_AUTO | FUSE_CAP_AUTO_INVAL_DATA);
    if (srv.max_background) {
        conn->max_background = srv.max_background;
        conn->congestion_threshold = srv.congestion;
    }
    if (srv.notify_fd >= 0) {
        ssize_t ignored = write(srv.notify_fd, "1", 1);
        (void)ignored;
        close(srv.notify_fd);
        srv.notify_fd = -1;
    }
}

static void lo_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct node *dir = tree_dir(parent);
    struct hit h;
    struct fuse_entry_param e;
    size_t len = strlen(name);
    if (!dir) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    if (len > NAME_MAX_LEN) {
        fuse_reply_err(req, ENAMETOOLONG);
        return;
    }
    int rc = tree_resolve(dir, name, len, &h);
    if (rc == -ENOENT) {  /* negative entry, cached as long as any other answer */
        memset(&e, 0, sizeof(e));
        e.entry_timeout = srv.timeout;
        fuse_reply_entry(req, &e);
        return;
    }
    if (rc) {
        fuse_reply_err(req, -rc);
        return;
    }
    tree_entry(dir, &h, &e);
    if (h.kind == KIND_FILE)
        read_prefetch(dir, h.layer, h.rec, h.row_i, &h.row, 0);
    record_put(h.rec);
    fuse_reply_entry(req, &e);
}

static void lo_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)fi;
    struct stat st;
    if (!ino_is_file(ino)) {
        struct node *n = tree_dir(ino);
        if (!n) {
            fuse_reply_err(req, ENOENT);
            return;
        }
        stat_dir(n, &st);
    } else {
        struct node *n;
        struct record *rec;
        struct row r;
        int layer;
        uint32_t i;
        int err = tree_file(ino, &n, &layer, &i, &r, &rec);
        if (err) {
            fuse_reply_err(req, -err);
            return;
        }
        stat_row(&r, ino, &st);
        record_put(rec);
    }
    fuse_reply_attr(req, &st, srv.timeout);
}

static void lo_readlink(fuse_req_t req, fuse_ino_t ino)
{
    struct node *n;
    struct record *rec;
    struct row r;
    int layer;
    uint32_t i;
    int err = ino_is_file(ino) ? tree_file(ino, &n, &layer, &i, &r, &rec) : -EINVAL;
    if (err) {
        fuse_reply_err(req, -err);
        return;
    }
    char *target = r.kind == KIND_SYMLINK ? malloc((size_t)r.target_len + 1) : NULL;
    if (target) {
        memcpy(target, row_name(rec, &r) + r.name_len, r.target_len);
        target[r.target_len] = 0;
        fuse_reply_readlink(req, target);
        free(target);
    } else {
        fuse_reply_err(req, r.kind == KIND_SYMLINK ? ENOMEM : EINVAL);
    }
    record_put(rec);
}

static void lo_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    if ((fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC))
        fuse_reply_err(req, EROFS);
    else
        fuse_reply_err(req, ENOSYS);  /* no OPEN/RELEASE round trips from now on */
}

static void lo_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    (void)fi;
    fuse_reply_err(req, ENOSYS);  /* no OPENDIR either; listings are cached */
}

static void lo_readdir_any(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, int plus)
{
    struct node *dir = tree_dir(ino);
    if (!dir) {
        fuse_reply_err(req, ino_is_file(ino) ? ENOTDIR : ENOENT);
        return;
    }
    char *buf = malloc(size ? size : 1);
    size_t used = 0;
    if (!buf) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    int err = listing_fill(req, dir, ino, buf, size, off, plus, &used);
    if (err)
        fuse_reply_err(req, -err);
    else
        fuse_reply_buf(req, buf, used);
    free(buf);
}

static void lo_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    (void)fi;
    lo_readdir_any(req, ino, size, off, 0);
}

static void lo_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    (void)fi;
    lo_readdir_any(req, ino, size, off, 1);
}

static void lo_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    (void)fi;
    read_reply(req, ino, size, off);
}

static void lo_statfs(fuse_req_t req, fuse_ino_t ino)
{
    (void)ino;
    struct statvfs s;
    memset(&s, 0, sizeof(s));
    s.f_bsize = s.f_frsize = 4096;
    s.f_blocks = srv.statfs_blocks;
    s.f_files = srv.statfs_files;
    s.f_namemax = NAME_MAX_LEN;
    fuse_reply_statfs(req, &s);
}

static void lo_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned int cmd, void *arg, struct fuse_file_info *fi,
                   unsigned flags, const void *in_buf, size_t in_bufsz, size_t out_bufsz)
{
    (void)arg, (void)fi, (void)flags, (void)in_buf, (void)in_bufsz, (void)out_bufsz;
    if (cmd == TCGETS)  /* Python's open() asks isatty() of every file, then reads it */
        read_push(ino);
    fuse_reply_err(req, ENOTTY);
}

/* Everything that would change the tree (the mount is read-only; these only answer
 * if the kernel asks anyway). */
static void lo_erofs_setattr(fuse_req_t req, fuse_ino_t i, struct stat *a, int s, struct fuse_file_info *f)
{ (void)i, (void)a, (void)s, (void)f; fuse_reply_err(req, EROFS); }
static void lo_erofs_mknod(fuse_req_t req, fuse_ino_t p, const char *n, mode_t m, dev_t d)
{ (void)p, (void)n, (void)m, (void)d; fuse_reply_err(req, EROFS); }
static void lo_erofs_mkdir(fuse_req_t req, fuse_ino_t p, const char *n, mode_t m)
{ (void)p, (void)n, (void)m; fuse_reply_err(req, EROFS); }
static void lo_erofs_unlink(fuse_req_t req, fuse_ino_t p, const char *n)
{ (void)p, (void)n; fuse_reply_err(req, EROFS); }
static void lo_erofs_symlink(fuse_req_t req, const char *l, fuse_ino_t p, const char *n)
{ (void)l, (void)p, (void)n; fuse_reply_err(req, EROFS); }
static void lo_erofs_rename(fuse_req_t req, fuse_ino_t p, const char *n, fuse_ino_t q, const char *m, unsigned f)
{ (void)p, (void)n, (void)q, (void)m, (void)f; fuse_reply_err(req, EROFS); }
static void lo_erofs_link(fuse_req_t req, fuse_ino_t i, fuse_ino_t p, const char *n)
{ (void)i, (void)p, (void)n; fuse_reply_err(req, EROFS); }
static void lo_erofs_write(fuse_req_t req, fuse_ino_t i, const char *b, size_t s, off_t o, struct fuse_file_info *f)
{ (void)i, (void)b, (void)s, (void)o, (void)f; fuse_reply_err(req, EROFS); }
static void lo_erofs_create(fuse_req_t req, fuse_ino_t p, const char *n, mode_t m, struct fuse_file_info *f)
{ (void)p, (void)n, (void)m, (void)f; fuse_reply_err(req, EROFS); }
static void lo_erofs_setxattr(fuse_req_t req, fuse_ino_t i, const char *n, const char *v, size_t s, int f)
{ (void)i, (void)n, (void)v, (void)s, (void)f; fuse_reply_err(req, EROFS); }
static void lo_erofs_removexattr(fuse_req_t req, fuse_ino_t i, const char *n)
{ (void)i, (void)n; fuse_reply_err(req, EROFS); }

const struct fuse_lowlevel_ops lo_ops = {
    .init = lo_init,
    .lookup = lo_lookup,
    .getattr = lo_getattr,
    .readlink = lo_readlink,
    .open = lo_open,
    .read = lo_read,
    .opendir = lo_opendir,
    .readdir = lo_readdir,
    .readdirplus = lo_readdirplus,
    .statfs = lo_statfs,
    .ioctl = lo_ioctl,
    .setattr = lo_erofs_setattr,
    .mknod = lo_erofs_mknod,
    .mkdir = lo_erofs_mkdir,
    .unlink = lo_erofs_unlink,
    .rmdir = lo_erofs_unlink,
    .symlink = lo_erofs_symlink,
    .rename = lo_erofs_rename,
    .link = lo_erofs_link,
    .write = lo_erofs_write,
    .create = lo_erofs_create,
    .setxattr = lo_erofs_setxattr,
    .removexattr = lo_erofs_removexattr,
};
