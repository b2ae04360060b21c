/* lmdbfs._serve: the FUSE server in C (libfuse3 low-level API, multithreaded).
 *
 * Python validates each DB (meta record, index present) and hands this module a list of
 * LAYERS; the server then answers every request without the GIL. One layer is one packed
 * DB shown under a folder (prefix) of the mounted tree; directories present in several
 * layers merge, and for any other name the first layer holding it wins.
 *
 * Inode numbers (no per-file table):
 *   directory  ino = node id + 1            (root = 1; node ids are handed out on first sight)
 *   other      ino = 1<<63 | node << 30 | layer << 24 | row
 * so a directory record may hold at most 2^24 rows (ROW_MAX), a mount at most 64 layers
 * (LAYER_MAX) and 2^33 directories (NODE_MAX); past these limits requests get EIO.
 */
#ifndef LMDBFS_SERVE_H
#define LMDBFS_SERVE_H

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>

#include "source.h"

#define LAYER_MAX 64
#define ROW_BITS 24
#define ROW_MAX (1u << ROW_BITS)
#define NODE_BITS 33
#define NODE_MAX (1ull << NODE_BITS)
#define FILE_INO_BIT (1ull << 63)
#define RECORD_MAX (256u << 20)  /* larger directory records are refused (EIO) */
#define RECORD_HEAD_GUESS (16u << 10)  /* first read of a record: the head of ~300 entries */
#define NAME_MAX_LEN 255
#define HASH_CHUNK (1u << 20)    /* verification reads and hashes in steps this large */

#define KIND_FILE 1
#define KIND_DIR 2
#define KIND_SYMLINK 3
#define FLAG_INLINE 1

/* ---- one packed DB shown in the tree ---------------------------------------------- */
struct layer {
    int index;
    char *prefix;            /* folder in the mounted tree ("" = root), no slashes at the ends */
    size_t prefix_len;
    MDB_env *env;            /* index env (also holds the values unless vals_env is set) */
    MDB_dbi index_dbi;
    MDB_env *vals_env;       /* where key lookups go (an adopted DB's own env) */
    MDB_dbi main_dbi;
    struct source env_src, vals_src, data_src;  /* records (and inline bytes), key-looked-up values,
                                                  * data_off values; a remote layer's three share its
                                                  * block cache (source.h) */
    struct remote *remote;   /* NULL: a local DB */
    char *env_base, *vals_base;     /* map addresses, to turn value pointers into file offsets */
    size_t env_map, vals_map;
    uint64_t env_size, vals_size, data_size;
    int offsets_ok, keys_path;
    int verify;              /* check a file's xxh3 on its first read (no checksums: adopted) */
    char *key_prefix, *key_sep;
    size_t key_prefix_len, key_sep_len;
    uint32_t root_mode;
    int64_t root_mtime_ns;
    unsigned long lookups;   /* key lookups since the maps were last handed back */
};

/* ---- one decoded, validated directory record ---------------------------------------- */
struct row {
    uint32_t name_off;
    uint16_t name_len, target_len;
    uint8_t kind, flags;
    uint16_t mode;
    uint64_t size;
    int64_t mtime_ns;
    uint64_t checksum, data_off;
};

struct record {
    int refs;                /* atomic */
    size_t nbytes;
    unsigned char *mem;      /* rows, then names and link targets (inline bytes left out) */
    uint32_t count, blob_len;
    uint64_t tail_len;       /* while parsing a version-4 record: its inline bytes' length */
    int has_tail;            /* a version-4 record: inline bytes at data_off in the tail */
    const unsigned char *rows, *blob;
    unsigned char *bad;      /* one byte per row: nonzero = left out of listings, EIO */
    uint32_t *good, ngood;   /* rows that passed, in ascending name order (binary search) */
    uint64_t subdirs;
    struct record *prev, *next;   /* LRU, most recent first */
    struct node *owner;
    int layer;
};

void row_get(const struct record *rec, uint32_t i, struct row *out);
const char *row_name(const struct record *rec, const struct row *r);
/* Parse and check raw (the record as stored, at file_off in the index env's file: len
 * bytes of its total, see layer_fetch_record) into a compact copy; raw is not kept. On
 * failure returns NULL and fills why. An inline file's row then has FLAG_INLINE and
 * data_off = where its bytes lie in that file. */
/* A record's head length (header, path, rows, blob) as its 16-byte header gives it. */
uint64_t record_head_len(const unsigned char *raw);
struct record *record_parse(const unsigned char *raw, size_t len, size_t total, uint64_t file_off, const char *own,
                            size_t own_len, const struct layer *ly, char *why, size_t why_len);
void record_free(struct record *rec);
/* Row index of name, or -1. */
long record_find(const struct record *rec, const char *name, size_t len);

/* ---- directory nodes --------------------------------------------------------------- */
enum { L_NONE = 0, L_PRESENT, L_SYNTH, L_BAD };

struct lnode {
    uint8_t state;
    uint8_t logged;
    uint32_t head_len;           /* bytes the last fetch of its record needed (0: never fetched) */
    struct record *rec;          /* cached record (guarded by the cache lock) */
    uint8_t *bits;               /* per row: 1 verified, 2 mismatch (logged), 4 being checked */
    uint32_t nbits;
};

struct node {
    uint64_t id, parent;
    char *path;                  /* union path, no leading slash, "" = root */
    uint32_t path_len, name_off;
    uint32_t mode;               /* S_IFDIR | permission bits */
    int64_t mtime_ns;
    uint64_t nlink;
    struct node *hnext;
    int nlayers;
    struct lnode l[];            /* one per layer */
};

struct server {
    struct layer *layers;
    int nlayers;
    int verify;
    uid_t uid;
    gid_t gid;
    size_t cache_max;
    unsigned max_background, congestion;
    int notify_fd;
    uint64_t statfs_blocks, statfs_files;
    double timeout;
    struct fuse_session *se;     /* for notifications (pushing a file's pages) */
    uint64_t push_max;           /* files up to this size are pushed at their first isatty() */
};

extern struct server srv;

/* layer.c */
/* remote: NULL for a local DB; else index_path and data_path are the remote object's
 * sparse local copy, read through its block cache. */
int layer_open(struct layer *ly, const char *index_path, int index_subdir, const char *vals_path,
               int vals_subdir, const char *data_path, const struct remote_spec *remote, char *why, size_t why_len);
void layer_close(struct layer *ly);
void md5_of(const void *a, size_t alen, const void *b, size_t blen, unsigned char out[16]);
/* 0 ok, MDB_NOTFOUND, -EFBIG, -ENOMEM or -EIO (logged). *raw is the record read into a
 * buffer of this thread's (valid until its next call): *len bytes of its *total (a
 * version-4 record's head only, without the inline bytes after it), *off where it lies
 * in env_src. hint: the *len of an earlier fetch of the same record (0: none), read at
 * once. */
int layer_fetch_record(struct layer *ly, const char *rel, size_t rel_len, size_t hint, const unsigned char **raw,
                       size_t *len, size_t *total, uint64_t *off);
/* The record of the last fetch is parsed: a buffer kept only for a large one is freed. */
void layer_record_done(void);
/* Where a file's bytes live in vals_src: 0 ok, -errno otherwise. */
int layer_value_pos(struct layer *ly, const char *rel, size_t rel_len, uint64_t size, uint64_t *pos);
void log_line(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* tree.c */
int tree_init(void);
void tree_free(void);
struct node *node_get(uint64_t id);
struct record *node_record(struct node *n, int layer, int *err);
void record_put(struct record *rec);
/* Find name under dir: fills kind/ino and a row (files, symlinks) or the child node. */
struct hit {
    int kind;
    int layer;
    uint32_t row_i;
    struct row row;
    struct record *rec;          /* holds a reference while kind != dir; caller puts it */
    struct node *child;
};
int tree_resolve(struct node *dir, const char *name, size_t len, struct hit *out);
struct node *tree_child_single(struct node *dir, int layer, const struct record *rec, uint32_t i,
                               const struct row *r, int *err);
int node_sources(struct node *n);  /* number of layers contributing to n */
uint64_t file_ino(uint64_t node, int layer, uint32_t row);
void layer_rel(const struct node *n, int layer, const char **rel, size_t *len);
void stat_dir(const struct node *n, struct stat *st);
void stat_row(const struct row *r, uint64_t ino, struct stat *st);

void synth_name(const struct node *dir, int layer, const char **name, size_t *len);

/* listing.c: a directory several layers contribute to, names merged in order */
int list_merged(fuse_req_t req, struct node *dir, char *buf, size_t size, size_t *pos, off_t off, int plus);

/* fsops.c */
/* A file or symlink inode's directory node (NULL if none), layer and row. */
struct node *file_ino_split(fuse_ino_t ino, int *layer, uint32_t *row_i);
int file_of(fuse_ino_t ino, struct node **n, int *layer, uint32_t *row_i, struct row *r, struct record **rec);
size_t add_entry(fuse_req_t req, char *buf, size_t room, int plus, const char *name, size_t len,
                 struct fuse_entry_param *e, off_t cookie);
extern const struct fuse_lowlevel_ops lmdbfs_ops;

/* uring.c: FUSE over io_uring where the kernel offers it */
int uring_start(struct fuse_session *se, int threads);
void uring_stop(void);
void *uring_payload(size_t *cap);  /* the calling ring thread's reply buffer, or NULL */

/* read.c */
void lmdbfs_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi);
/* Put a small file's checked bytes into the kernel's page cache (once per daemon), so
 * the READ that would follow is answered there. */
void lmdbfs_push(fuse_ino_t ino);
/* A file was looked up (or opened: at_open): start reading its value from the disk, once
 * per daemon, so the round trips before its first READ overlap the disk's latency. */
void lmdbfs_prefetch(struct node *n, int layer, struct record *rec, uint32_t row_i, const struct row *r,
                     int at_open);

#endif
