/* One packed DB shown in the tree: its LMDB environments, a read transaction per thread,
 * key lookups, and record fetches through the layer's byte sources (source.h). LMDB's
 * codes are mapped to negative errno here, where they arise. */
#ifndef LMDBFS_LAYER_H
#define LMDBFS_LAYER_H

#include <lmdb.h>
#include <stddef.h>
#include <stdint.h>

#include "source.h"

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

/* Open ly's environments and files: 0, or a negative errno with why filled. remote: NULL
 * for a local DB; else index_path and data_path are the remote object's sparse local
 * copy, read through its block cache. */
int layer_open(struct layer *ly, const char *index_path, int index_subdir, const char *vals_path,
               int vals_subdir, const char *data_path, const struct remote_spec *remote, char *why, size_t why_len);
void layer_close(struct layer *ly);
/* 0, -ENOENT (no such record), -EFBIG, -ENOMEM or -EIO (logged). *raw is the record read
 * into a buffer of this thread's (valid until its next call): *len bytes of its *total (a
 * version-4 record's head only, without the inline bytes after it), *off where it lies
 * in env_src. hint: the *len of an earlier fetch of the same record (0: none), read at
 * once. */
int layer_fetch_record(struct layer *ly, const char *rel, size_t rel_len, size_t hint, const unsigned char **raw,
                       size_t *len, size_t *total, uint64_t *off);
/* The record of the last fetch is parsed: a buffer kept only for a large one is freed. */
void layer_record_done(void);
/* Where a file's bytes live in vals_src: 0, or a negative errno (logged). piece >= 0:
 * piece `piece` of a split file (its key, a NUL, the piece number as 4 big-endian bytes),
 * of size bytes. */
int layer_value_pos(struct layer *ly, const char *rel, size_t rel_len, long piece, uint64_t size, uint64_t *pos);

#endif
