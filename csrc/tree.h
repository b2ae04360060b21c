/* The merged tree: directory nodes (ids handed out on first sight, never freed: bounded by
 * the number of directories), the byte-bounded LRU cache of directory records, name
 * resolution across layers, and the attributes and FUSE entries of what it finds. */
#ifndef LMDBFS_TREE_H
#define LMDBFS_TREE_H

#include <sys/stat.h>

#include "serve.h"

/* How a layer takes part in a directory node. */
enum { L_NONE = 0, L_PRESENT, L_SYNTH, L_BAD };

/* Per row of a directory, what this daemon has done with the file (lnode.bits). */
enum row_state {
    ROW_CHECKED = 1,     /* its bytes passed the checksum */
    ROW_MISMATCH = 2,    /* they failed it (logged) */
    ROW_CHECKING = 4,    /* one thread is checking a large file; READs of it wait */
    ROW_PUSHED = 8,      /* its pages were pushed at isatty() */
    ROW_PREFETCHED = 16, /* its first bytes were prefetched */
    ROW_READ = 32,       /* it had its first READ (gave a prefetch credit back) */
};

struct lnode {
    uint8_t state;
    uint8_t logged;
    uint32_t head_len;           /* bytes the last fetch of its record needed (0: never fetched) */
    struct record *rec;          /* cached record (guarded by the cache lock) */
    uint8_t *bits;               /* per row: enum row_state bits, allocated on first need */
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

/* What a name resolves to: a file or symlink row, or a directory node. */
struct hit {
    int kind;
    int layer;
    uint32_t row_i;
    struct row row;
    struct record *rec;          /* holds a reference while kind != dir; caller puts it */
    struct node *child;
};

int tree_init(void);
void tree_free(void);
struct node *node_get(uint64_t id);
/* The directory node of a directory inode, or NULL. */
struct node *tree_dir(fuse_ino_t ino);
/* A file or symlink inode's directory node (NULL if none), layer and row: no record. */
struct node *tree_file_node(fuse_ino_t ino, int *layer, uint32_t *row_i);
/* A file or symlink inode: its directory node, layer and row, with a reference to the
 * record (put it). 0, -ENOENT or -EIO. */
int tree_file(fuse_ino_t ino, struct node **n, int *layer, uint32_t *row_i, struct row *r, struct record **rec);
/* n's record in layer, with a reference (put it), or NULL with *err a negative errno. */
struct record *node_record(struct node *n, int layer, int *err);
void record_put(struct record *rec);
/* Find name under dir: fills a row (files, symlinks) or the child node. 0 or -errno. */
int tree_resolve(struct node *dir, const char *name, size_t len, struct hit *out);
/* The directory node of row i, a directory, in a directory of one layer; NULL with *err. */
struct node *tree_child_single(struct node *dir, int layer, const struct record *rec, const struct row *r, int *err);
int node_sources(struct node *n);  /* number of layers contributing to n */
/* n's path inside layer's DB. */
void layer_rel(const struct node *n, int layer, const char **rel, size_t *len);
/* The name of the next folder of layer's prefix below dir (for L_SYNTH layers). */
void synth_name(const struct node *dir, int layer, const char **name, size_t *len);
void stat_dir(const struct node *n, struct stat *st);
void stat_row(const struct row *r, uint64_t ino, struct stat *st);
/* The FUSE entry (inode, attributes, timeouts) of what h found in dir. */
void tree_entry(const struct node *dir, const struct hit *h, struct fuse_entry_param *e);

#endif
