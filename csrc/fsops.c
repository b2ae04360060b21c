/* FUSE requests, answered in C on libfuse's worker threads.
 *
 * The data never changes, so every answer may be cached by the kernel for a year; open
 * and opendir answer ENOSYS, which makes the kernel stop sending them and keep file pages
 * and directory listings cached (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR). */
#include "serve.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

static void init(void *userdata, struct fuse_conn_info *conn)
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

struct node *file_ino_split(fuse_ino_t ino, int *layer, uint32_t *row_i)
{
    *layer = (int)((ino >> ROW_BITS) & (LAYER_MAX - 1));
    *row_i = (uint32_t)(ino & (ROW_MAX - 1));
    return node_get((ino & ~FILE_INO_BIT) >> 30);
}

/* A file or symlink inode: its directory node, layer and row (with a record reference). */
int file_of(fuse_ino_t ino, struct node **n, int *layer, uint32_t *row_i, struct row *r,
                   struct record **rec)
{
    int err = 0;
    *n = file_ino_split(ino, layer, row_i);
    if (!*n || *layer >= srv.nlayers)
        return ENOENT;
    *rec = node_record(*n, *layer, &err);
    if (!*rec)
        return err;
    if (*row_i >= (*rec)->count || (*rec)->bad[*row_i]) {
        record_put(*rec);
        return EIO;
    }
    row_get(*rec, *row_i, r);
    return 0;
}

static struct node *dir_of(fuse_ino_t ino)
{
    return ino & FILE_INO_BIT ? NULL : node_get(ino - 1);
}

static void entry_from_hit(struct node *dir, const struct hit *h, struct fuse_entry_param *e)
{
    memset(e, 0, sizeof(*e));
    e->attr_timeout = e->entry_timeout = srv.timeout;
    if (h->kind == KIND_DIR) {
        e->ino = h->child->id + 1;
        stat_dir(h->child, &e->attr);
    } else {
        e->ino = file_ino(dir->id, h->layer, h->row_i);
        stat_row(&h->row, e->ino, &e->attr);
    }
}

static void lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct node *dir = dir_of(parent);
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
    entry_from_hit(dir, &h, &e);
    if (h.kind == KIND_FILE)
        lmdbfs_prefetch(dir, h.layer, h.rec, h.row_i, &h.row, 0);
    record_put(h.rec);
    fuse_reply_entry(req, &e);
}

static void getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)fi;
    struct stat st;
    if (!(ino & FILE_INO_BIT)) {
        struct node *n = node_get(ino - 1);
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
        int err = file_of(ino, &n, &layer, &i, &r, &rec);
        if (err) {
            fuse_reply_err(req, err);
            return;
        }
        stat_row(&r, ino, &st);
        record_put(rec);
    }
    fuse_reply_attr(req, &st, srv.timeout);
}

static void readlink_(fuse_req_t req, fuse_ino_t ino)
{
    struct node *n;
    struct record *rec;
    struct row r;
    int layer;
    uint32_t i;
    int err = ino & FILE_INO_BIT ? file_of(ino, &n, &layer, &i, &r, &rec) : EINVAL;
    if (err) {
        fuse_reply_err(req, err);
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

static void open_(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    if ((fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC))
        fuse_reply_err(req, EROFS);
    else
        fuse_reply_err(req, ENOSYS);  /* no OPEN/RELEASE round trips from now on */
}

static void opendir_(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    (void)fi;
    fuse_reply_err(req, ENOSYS);  /* no OPENDIR either; listings are cached */
}

/* One listing entry; returns its size in buf, or 0 when it did not fit. */
size_t add_entry(fuse_req_t req, char *buf, size_t room, int plus, const char *name, size_t len,
                        struct fuse_entry_param *e, off_t cookie)
{
    char tmp[NAME_MAX_LEN + 1];
    memcpy(tmp, name, len);
    tmp[len] = 0;
    size_t need = plus ? fuse_add_direntry_plus(req, buf, room, tmp, e, cookie)
                       : fuse_add_direntry(req, buf, room, tmp, &e->attr, cookie);
    return need > room ? 0 : need;
}

static int list_single(fuse_req_t req, struct node *dir, int layer, char *buf, size_t size, size_t *pos, off_t off,
                       int plus)
{
    int err = 0;
    struct record *rec = node_record(dir, layer, &err);
    if (!rec)
        return err;
    for (uint64_t i = off > 2 ? (uint64_t)off - 2 : 0; i < rec->count; i++) {
        if (rec->bad[i])
            continue;
        struct row r;
        struct fuse_entry_param e;
        row_get(rec, (uint32_t)i, &r);
        memset(&e, 0, sizeof(e));
        e.attr_timeout = e.entry_timeout = srv.timeout;
        if (r.kind == KIND_DIR) {  /* a directory's number is its node's, listed or looked up */
            struct node *child = tree_child_single(dir, layer, rec, (uint32_t)i, &r, &err);
            if (!child)
                break;
            e.ino = child->id + 1;
            stat_dir(child, &e.attr);
        } else {
            e.ino = file_ino(dir->id, layer, (uint32_t)i);
            stat_row(&r, e.ino, &e.attr);
        }
        size_t used = add_entry(req, buf + *pos, size - *pos, plus, row_name(rec, &r), r.name_len, &e, (off_t)i + 3);
        if (!used)
            break;
        *pos += used;
    }
    record_put(rec);
    return *pos ? 0 : err;
}

static void readdir_common(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, int plus)
{
    struct node *dir = dir_of(ino);
    if (!dir) {
        fuse_reply_err(req, ino & FILE_INO_BIT ? ENOTDIR : ENOENT);
        return;
    }
    char *buf = malloc(size ? size : 1);
    size_t pos = 0;
    int err = 0, single = -1;
    if (!buf) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    struct fuse_entry_param e;
    memset(&e, 0, sizeof(e));
    e.attr.st_mode = S_IFDIR;
    e.attr.st_ino = ino;
    for (off_t dot = 0; dot < 2; dot++) {
        size_t used;
        if (off <= dot && (used = add_entry(req, buf + pos, size - pos, plus, "..", (size_t)dot + 1, &e, dot + 1)))
            pos += used;
    }
    if (node_sources(dir) == 1)
        for (int i = 0; i < dir->nlayers; i++)
            if (dir->l[i].state == L_PRESENT || dir->l[i].state == L_BAD)
                single = i;
    if (single >= 0)
        err = list_single(req, dir, single, buf, size, &pos, off, plus);
    else
        err = list_merged(req, dir, buf, size, &pos, off, plus);
    if (err && !pos)
        fuse_reply_err(req, err);
    else
        fuse_reply_buf(req, buf, pos);
    free(buf);
}

static void readdir_(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    (void)fi;
    readdir_common(req, ino, size, off, 0);
}

static void readdirplus_(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    (void)fi;
    readdir_common(req, ino, size, off, 1);
}

static void statfs_(fuse_req_t req, fuse_ino_t ino)
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

static void ioctl_(fuse_req_t req, fuse_ino_t ino, unsigned int cmd, void *arg, struct fuse_file_info *fi,
                   unsigned flags, const void *in_buf, size_t in_bufsz, size_t out_bufsz)
{
    (void)arg, (void)fi, (void)flags, (void)in_buf, (void)in_bufsz, (void)out_bufsz;
    if (cmd == TCGETS)  /* Python's open() asks isatty() of every file, then reads it */
        lmdbfs_push(ino);
    fuse_reply_err(req, ENOTTY);
}

/* Everything that would change the tree (the mount is read-only; these only answer
 * if the kernel asks anyway). */
static void erofs_setattr(fuse_req_t req, fuse_ino_t i, struct stat *a, int s, struct fuse_file_info *f)
{ (void)i, (void)a, (void)s, (void)f; fuse_reply_err(req, EROFS); }
static void erofs_mknod(fuse_req_t req, fuse_ino_t p, const char *n, mode_t m, dev_t d)
{ (void)p, (void)n, (void)m, (void)d; fuse_reply_err(req, EROFS); }
static void erofs_mkdir(fuse_req_t req, fuse_ino_t p, const char *n, mode_t m)
{ (void)p, (void)n, (void)m; fuse_reply_err(req, EROFS); }
static void erofs_unlink(fuse_req_t req, fuse_ino_t p, const char *n)
{ (void)p, (void)n; fuse_reply_err(req, EROFS); }
static void erofs_symlink(fuse_req_t req, const char *l, fuse_ino_t p, const char *n)
{ (void)l, (void)p, (void)n; fuse_reply_err(req, EROFS); }
static void erofs_rename(fuse_req_t req, fuse_ino_t p, const char *n, fuse_ino_t q, const char *m, unsigned f)
{ (void)p, (void)n, (void)q, (void)m, (void)f; fuse_reply_err(req, EROFS); }
static void erofs_link(fuse_req_t req, fuse_ino_t i, fuse_ino_t p, const char *n)
{ (void)i, (void)p, (void)n; fuse_reply_err(req, EROFS); }
static void erofs_write(fuse_req_t req, fuse_ino_t i, const char *b, size_t s, off_t o, struct fuse_file_info *f)
{ (void)i, (void)b, (void)s, (void)o, (void)f; fuse_reply_err(req, EROFS); }
static void erofs_create(fuse_req_t req, fuse_ino_t p, const char *n, mode_t m, struct fuse_file_info *f)
{ (void)p, (void)n, (void)m, (void)f; fuse_reply_err(req, EROFS); }
static void erofs_setxattr(fuse_req_t req, fuse_ino_t i, const char *n, const char *v, size_t s, int f)
{ (void)i, (void)n, (void)v, (void)s, (void)f; fuse_reply_err(req, EROFS); }
static void erofs_removexattr(fuse_req_t req, fuse_ino_t i, const char *n)
{ (void)i, (void)n; fuse_reply_err(req, EROFS); }

const struct fuse_lowlevel_ops lmdbfs_ops = {
    .init = init,
    .lookup = lookup,
    .getattr = getattr,
    .readlink = readlink_,
    .open = open_,
    .read = lmdbfs_read,
    .opendir = opendir_,
    .readdir = readdir_,
    .readdirplus = readdirplus_,
    .statfs = statfs_,
    .ioctl = ioctl_,
    .setattr = erofs_setattr,
    .mknod = erofs_mknod,
    .mkdir = erofs_mkdir,
    .unlink = erofs_unlink,
    .rmdir = erofs_unlink,
    .symlink = erofs_symlink,
    .rename = erofs_rename,
    .link = erofs_link,
    .write = erofs_write,
    .create = erofs_create,
    .setxattr = erofs_setxattr,
    .removexattr = erofs_removexattr,
};
