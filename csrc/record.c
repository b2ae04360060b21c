/* Directory records (docs/format.md): parse, check every byte before it is used, and
 * keep a compact copy (rows and names, no inline file bytes) for the record cache.
 *
 * A DB is untrusted input. A record whose header or own path is wrong is refused as a
 * whole (its directory answers EIO); a row that is wrong in any way (a name out of bounds
 * or out of order included) is marked bad: left out of listings, EIO when named.
 */
#include "record.h"

#include "inode.h"
#include "layer.h"
#include "util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HEADER_SIZE 16
#define ROW_SIZE 44
/* The limits of lmdbfs/format/records.py, so both readers leave out the same rows
 * (tests/test_record_parsers.py holds them to that). */
#define TARGET_MAX 4095           /* bytes in a symlink target */
#define SUBDIRS_MAX (1ull << 32)  /* a directory's subdirectory count (its checksum field) */
#define INLINE_LIMIT (1u << 24)   /* bytes of one inline file */

static uint16_t get16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t get32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t get64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

void row_get(const struct record *rec, uint32_t i, struct row *r)
{
    const unsigned char *p = rec->rows + (size_t)i * ROW_SIZE;
    r->name_off = get32(p);
    r->name_len = get16(p + 4);
    r->target_len = get16(p + 6);
    r->kind = p[8];
    r->flags = p[9];
    r->mode = get16(p + 10);
    r->size = get64(p + 12);
    r->mtime_ns = (int64_t)get64(p + 20);
    r->checksum = get64(p + 28);
    r->data_off = get64(p + 36);
}

const char *row_name(const struct record *rec, const struct row *r)
{
    return (const char *)rec->blob + r->name_off;
}

uint64_t row_piece_bytes(const struct record *rec, const struct row *r)
{
    return get64(rec->blob + r->name_off + r->name_len);
}

uint64_t row_piece_off(const struct record *rec, const struct row *r, uint64_t k)
{
    return get64(rec->blob + r->name_off + r->name_len + 8 * (k + 1));
}

/* A split file's piece table (its row's "target"): a piece size of 1 to VALUE_MAX bytes,
 * one offset per piece, and while the offsets are trusted each known piece inside the
 * data file (as lmdbfs/recordcheck.py judges it). */
static const char *pieces_problem(const struct record *rec, const struct row *r, const struct layer *ly)
{
    const unsigned char *t = rec->blob + r->name_off + r->name_len;
    uint64_t piece = r->target_len >= 8 ? get64(t) : 0;
    if (piece == 0 || piece > VALUE_MAX)
        return "bad piece table";
    uint64_t count = r->size / piece + (r->size % piece != 0);
    if (count >= 0xFFFF / 8 || r->target_len != 8 * (count + 1))
        return "bad piece table";
    for (uint64_t k = 0; ly->offsets_ok && k < count; k++) {
        uint64_t at = get64(t + 8 * (k + 1)), len = r->size - k * piece < piece ? r->size - k * piece : piece;
        if (at && (at > ly->data_size || len > ly->data_size - at))
            return "piece outside the data file";
    }
    return NULL;
}

static int name_cmp(const char *a, size_t alen, const char *b, size_t blen)
{
    int c = memcmp(a, b, alen < blen ? alen : blen);
    if (c)
        return c;
    return alen < blen ? -1 : alen > blen;
}

/* Whatever is wrong with one row that does not stop names being compared. */
static const char *row_problem(const struct record *rec, const struct row *r, const struct layer *ly)
{
    const char *name = row_name(rec, r);
    uint64_t end = (uint64_t)r->name_off + r->name_len + r->target_len;
    if (r->name_len == 0 || r->name_len > NAME_MAX_LEN)
        return "name length";
    if (memchr(name, '/', r->name_len) || memchr(name, 0, r->name_len))
        return "name holds '/' or NUL";
    if ((r->name_len == 1 && name[0] == '.') || (r->name_len == 2 && name[0] == '.' && name[1] == '.'))
        return "name is '.' or '..'";
    if (r->kind < KIND_FILE || r->kind > KIND_SYMLINK)
        return "unknown kind";
    if (r->flags & ~(FLAG_INLINE | FLAG_SPLIT))
        return "unknown flag bits";
    if ((r->flags & FLAG_SPLIT) && (r->kind != KIND_FILE || (r->flags & FLAG_INLINE)))
        return "pieces of a non-file or an inline file";
    if (end > rec->blob_len)
        return "link target outside the record";
    if (r->kind == KIND_SYMLINK) {
        if (r->target_len == 0 || r->target_len > TARGET_MAX || r->size != r->target_len ||
            memchr(name + r->name_len, 0, r->target_len))
            return "bad link target";
    } else if (r->target_len && !(r->flags & FLAG_SPLIT)) {
        return "link target on a non-link";
    }
    if (r->mode > 07777 || (r->kind == KIND_DIR && r->checksum > SUBDIRS_MAX))
        return "attributes out of range";
    if ((r->flags & FLAG_INLINE) && r->kind != KIND_FILE)
        return "inline bytes on a non-file";
    if (r->kind == KIND_FILE && (r->flags & FLAG_INLINE)) {
        if (r->size > INLINE_LIMIT)
            return "inline file too large";
        if (rec->has_tail ? r->size > rec->tail_len || r->data_off > rec->tail_len - r->size
                          : r->size > rec->blob_len || end + r->size > rec->blob_len)
            return "inline bytes outside the record";
    } else if (r->kind == KIND_FILE) {
        if (r->size > ly->data_size || (ly->offsets_ok && r->data_off && r->data_off > ly->data_size - r->size))
            return "value outside the data file";
        if (r->flags & FLAG_SPLIT)
            return pieces_problem(rec, r, ly);
    }
    return NULL;
}

static void put32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }
static void put16(unsigned char *p, uint16_t v) { p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8); }
static void put64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }

/* The cached form keeps the rows and the names (and link targets) only: inline file
 * bytes, most of a record of small files, stay in the DB file. An inline row's data_off
 * becomes the file offset of its bytes, so READ takes them from the file like any value.
 * Rows that share their name bytes (only a crafted record does) could make the names
 * longer than the blob: then the blob is kept whole, so the copy never outgrows the record. */
static unsigned char *compact(struct record *rec, const unsigned char *rows, const unsigned char *blob,
                              uint64_t blob_pos)
{
    uint64_t tail_pos = blob_pos + rec->blob_len;  /* a version-4 record's inline bytes */
    uint64_t names = 0;
    for (uint32_t i = 0; i < rec->count; i++) {
        const unsigned char *p = rows + (size_t)i * ROW_SIZE;
        uint16_t nlen = get16(p + 4);
        if (!rec->bad[i])
            names += (uint64_t)nlen + get16(p + 6);
        else if (nlen <= NAME_MAX_LEN && (uint64_t)get32(p) + nlen <= rec->blob_len)
            names += nlen;
    }
    int whole = names > rec->blob_len;
    size_t blob_size = whole ? rec->blob_len : (size_t)names;
    unsigned char *out = malloc((size_t)rec->count * ROW_SIZE + blob_size + 1);
    if (!out)
        return NULL;
    unsigned char *orows = out, *oblob = out + (size_t)rec->count * ROW_SIZE, *w = oblob;
    memcpy(orows, rows, (size_t)rec->count * ROW_SIZE);
    if (whole)
        memcpy(oblob, blob, rec->blob_len);
    for (uint32_t i = 0; i < rec->count; i++) {
        unsigned char *p = orows + (size_t)i * ROW_SIZE;
        uint32_t off = get32(p);
        uint16_t nlen = get16(p + 4), tlen = get16(p + 6);
        if (rec->bad[i]) {  /* kept only so that its exact name answers EIO */
            tlen = 0;
            if (nlen > NAME_MAX_LEN || (uint64_t)off + nlen > rec->blob_len)
                nlen = 0;
            put16(p + 4, nlen);
            put16(p + 6, 0);
        } else if ((p[9] & FLAG_INLINE) && rec->has_tail) {
            put64(p + 36, tail_pos + get64(p + 36));
        } else if (p[9] & FLAG_INLINE) {
            put64(p + 36, blob_pos + off + nlen + tlen);
        }
        if (whole)
            continue;
        memcpy(w, blob + off, (size_t)nlen + tlen);
        put32(p, (uint32_t)(w - oblob));
        w += nlen + tlen;
    }
    rec->blob_len = (uint32_t)blob_size;
    rec->rows = orows;
    rec->blob = oblob;
    rec->nbytes += (size_t)rec->count * ROW_SIZE + blob_size;
    return out;
}

uint64_t record_head_len(const unsigned char *raw)
{
    return (uint64_t)HEADER_SIZE + get32(raw + 8) + (uint64_t)get32(raw + 4) * ROW_SIZE + get32(raw + 12);
}

/* "LDR1" (format 2-3): a file's inline bytes follow its name in the blob, which ends the
 * record. "LDR2" (format 4): the blob holds names only; inline bytes follow it, each at
 * its row's data_off, so a reader fetches the head alone. */
struct record *record_parse(const unsigned char *raw, size_t len, size_t total, uint64_t file_off, const char *own,
                            size_t own_len, const struct layer *ly, char *why, size_t why_len)
{
    struct record *rec = NULL;
    uint32_t count, plen, blen;
    uint64_t need;
    int v4 = len >= HEADER_SIZE && memcmp(raw, "LDR2", 4) == 0;

    if (len < HEADER_SIZE || (!v4 && memcmp(raw, "LDR1", 4) != 0)) {
        snprintf(why, why_len, "not a directory record");
        goto fail;
    }
    count = get32(raw + 4);
    plen = get32(raw + 8);
    blen = get32(raw + 12);
    need = record_head_len(raw);
    if (need != len || len > total || (!v4 && len != total)) {
        snprintf(why, why_len, "record length %zu does not match its header (%llu)", total,
                 (unsigned long long)need);
        goto fail;
    }
    if (plen != own_len || memcmp(raw + HEADER_SIZE, own, own_len) != 0) {
        snprintf(why, why_len, "record belongs to another directory");
        goto fail;
    }
    if (count >= ROW_MAX) {
        snprintf(why, why_len, "%u entries, more than this server addresses (%u)", count, ROW_MAX - 1);
        goto fail;
    }
    rec = calloc(1, sizeof(*rec));
    if (!rec || !(rec->bad = calloc(count ? count : 1, 1))) {
        snprintf(why, why_len, "out of memory");
        goto fail;
    }
    rec->nbytes = count + sizeof(*rec);
    rec->count = count;
    rec->blob_len = blen;
    rec->has_tail = v4;
    rec->tail_len = total - len;
    rec->rows = raw + HEADER_SIZE + plen;
    rec->blob = rec->rows + (size_t)count * ROW_SIZE;
    rec->refs = 1;

    if (!(rec->good = malloc((count ? count : 1) * sizeof(uint32_t)))) {
        snprintf(why, why_len, "out of memory");
        goto fail;
    }
    rec->nbytes += (size_t)count * sizeof(uint32_t);
    /* A bad row is left out, and so is one out of order among the good ones, so the
     * binary search over `good` stays exact (the Python reader keeps the same rows). */
    const char *prev = NULL;
    size_t prev_len = 0;
    for (uint32_t i = 0; i < count; i++) {
        struct row r;
        row_get(rec, i, &r);
        const char *problem = NULL;
        if ((uint64_t)r.name_off + r.name_len > blen)
            problem = "name outside the record";
        else if (!(problem = row_problem(rec, &r, ly))) {
            const char *name = row_name(rec, &r);
            if (prev && name_cmp(prev, prev_len, name, r.name_len) >= 0)
                problem = "out of order";
            else {
                prev = name;
                prev_len = r.name_len;
            }
        }
        if (problem) {
            rec->bad[i] = 1;
            log_line("ERROR", "layer %d, directory '%.*s': entry %u left out: %s", ly->index, (int)own_len,
                     own, i, problem);
            continue;
        }
        rec->good[rec->ngood++] = i;
        if (r.kind == KIND_DIR)
            rec->subdirs++;
    }
    if (!(rec->mem = compact(rec, rec->rows, rec->blob, file_off + HEADER_SIZE + plen + (uint64_t)count * ROW_SIZE))) {
        snprintf(why, why_len, "out of memory");
        goto fail;
    }
    return rec;
fail:
    if (rec) {
        free(rec->bad);
        free(rec->good);
        free(rec);
    }
    return NULL;
}

void record_free(struct record *rec)
{
    if (!rec)
        return;
    free(rec->mem);
    free(rec->bad);
    free(rec->good);
    free(rec);
}

long record_find(const struct record *rec, const char *name, size_t len)
{
    uint32_t lo = 0, hi = rec->ngood;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        struct row r;
        row_get(rec, rec->good[mid], &r);
        int c = name_cmp(row_name(rec, &r), r.name_len, name, len);
        if (c == 0)
            return rec->good[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    /* A damaged row is still found by its exact name, so it answers EIO, not ENOENT. */
    for (uint32_t k = 0; rec->ngood < rec->count && k < rec->count; k++) {
        struct row r;
        if (!rec->bad[k])
            continue;
        row_get(rec, k, &r);
        if ((uint64_t)r.name_off + r.name_len <= rec->blob_len && r.name_len == len &&
            memcmp(row_name(rec, &r), name, len) == 0)
            return k;
    }
    return -1;
}
