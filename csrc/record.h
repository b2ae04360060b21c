/* Directory records (docs/format.md): parsed and checked before use, kept as a compact
 * copy (rows and names, no inline file bytes) in the record cache (tree.c). */
#ifndef LMDBFS_RECORD_H
#define LMDBFS_RECORD_H

#include <stddef.h>
#include <stdint.h>

#define RECORD_MAX (256u << 20)        /* larger directory records are refused (EIO) */
#define RECORD_HEAD_GUESS (16u << 10)  /* first read of a record: the head of ~300 entries */
#define NAME_MAX_LEN 255

#define KIND_FILE 1
#define KIND_DIR 2
#define KIND_SYMLINK 3
#define FLAG_INLINE 1
#define FLAG_SPLIT 2  /* stored as pieces; the row's "target" is its piece table (docs/format.md) */
#define VALUE_MAX 0xFFFFFFFFull  /* bytes of one LMDB value: of one piece */

struct layer;
struct node;

/* One row of a record, decoded. */
struct row {
    uint32_t name_off;
    uint16_t name_len, target_len;
    uint8_t kind, flags;
    uint16_t mode;
    uint64_t size;
    int64_t mtime_ns;
    uint64_t checksum, data_off;
};

/* One decoded, validated directory record. */
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
    struct record *prev, *next;   /* the record cache's LRU, most recent first (tree.c) */
    struct node *owner;
    int layer;
};

void row_get(const struct record *rec, uint32_t i, struct row *out);
const char *row_name(const struct record *rec, const struct row *r);
/* A split file's piece size, and the data-file offset of piece k (0: look it up by key),
 * from its checked piece table. */
uint64_t row_piece_bytes(const struct record *rec, const struct row *r);
uint64_t row_piece_off(const struct record *rec, const struct row *r, uint64_t k);
/* A record's head length (header, path, rows, blob) as its 16-byte header gives it. */
uint64_t record_head_len(const unsigned char *raw);
/* Parse and check raw (the record as stored, at file_off in the index env's file: len
 * bytes of its total, see layer_fetch_record) into a compact copy; raw is not kept. On
 * failure returns NULL and fills why. An inline file's row then has FLAG_INLINE and
 * data_off = where its bytes lie in that file. */
struct record *record_parse(const unsigned char *raw, size_t len, size_t total, uint64_t file_off, const char *own,
                            size_t own_len, const struct layer *ly, char *why, size_t why_len);
void record_free(struct record *rec);
/* Row index of name, or -1. */
long record_find(const struct record *rec, const char *name, size_t len);

#endif
