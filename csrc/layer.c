/* One layer's LMDB side (layer.h): environments, a read transaction per thread, keys, and
 * copies of stored bytes made through the layer's byte sources rather than through the
 * map (the map is opened without readahead, so touching a value page by page would fault
 * 4 KiB at a time). */
#include "layer.h"

#include "record.h"
#include "serve.h"
#include "util.h"

#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <nettle/md5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#define UNMAP_EVERY 256  /* LMDB lookups between handing the mapped pages back */
#define PIECE_SUFFIX 5   /* a split file's piece key: the file's key, NUL, u32 big-endian */

static void md5_of(const void *p, size_t len, unsigned char out[16])
{
    struct md5_ctx ctx;
    md5_init(&ctx);
    md5_update(&ctx, len, p);
    md5_digest(&ctx, 16, out);
}

/* An LMDB return code as a negative errno: its own errno where LMDB passed one through
 * (those are below MDB_KEYEXIST), ENOENT for a missing key, EIO for anything else. */
static int lmdb_errno(int rc)
{
    if (rc == 0)
        return 0;
    if (rc == MDB_NOTFOUND)
        return -ENOENT;
    return rc > 0 && rc < MDB_KEYEXIST ? -rc : -EIO;
}

/* ---- read transactions: one per thread and environment, kept open -------------------- */
static pthread_key_t txn_key;
static pthread_once_t txn_once = PTHREAD_ONCE_INIT;

struct txns {
    MDB_txn *t[LAYER_MAX][2];
};

static void txns_free(void *p)
{
    struct txns *ts = p;
    for (int i = 0; i < LAYER_MAX; i++)
        for (int j = 0; j < 2; j++)
            if (ts->t[i][j])
                mdb_txn_abort(ts->t[i][j]);
    free(ts);
}

static int txn_key_ok;

static void txn_key_make(void) { txn_key_ok = pthread_key_create(&txn_key, txns_free) == 0; }

/* This thread's read transaction of ly's index (vals 0) or values env, or NULL with *rc an
 * LMDB code (ENOMEM among them, as LMDB passes errno values through): lmdb_get maps it. */
static MDB_txn *txn_get(struct layer *ly, int vals, int *rc)
{
    pthread_once(&txn_once, txn_key_make);
    if (!txn_key_ok) {
        *rc = ENOMEM;
        return NULL;
    }
    struct txns *ts = pthread_getspecific(txn_key);
    if (!ts) {
        ts = calloc(1, sizeof(*ts));
        if (!ts) {
            *rc = ENOMEM;
            return NULL;
        }
        pthread_setspecific(txn_key, ts);
    }
    MDB_txn **slot = &ts->t[ly->index][vals];
    if (!*slot) {
        *rc = mdb_txn_begin(vals ? ly->vals_env : ly->env, NULL, MDB_RDONLY, slot);
        if (*rc) {
            *slot = NULL;
            return NULL;
        }
    }
    return *slot;
}

/* After an LMDB error, start this thread afresh so one bad page poisons nothing later. */
static void txn_drop(struct layer *ly, int vals)
{
    struct txns *ts = pthread_getspecific(txn_key);
    if (ts && ts->t[ly->index][vals]) {
        mdb_txn_abort(ts->t[ly->index][vals]);
        ts->t[ly->index][vals] = NULL;
    }
}

/* Map pages LMDB touched stay mapped and count in the daemon's RSS; hand them back now
 * and then (they stay in the page cache, so the next touch is a minor fault). */
static void touched(struct layer *ly)
{
    if (__atomic_add_fetch(&ly->lookups, 1, __ATOMIC_RELAXED) % UNMAP_EVERY == 0) {
        madvise(ly->env_base, ly->env_map, MADV_DONTNEED);
        if (ly->vals_env != ly->env)
            madvise(ly->vals_base, ly->vals_map, MADV_DONTNEED);
    }
}

static int env_open(MDB_env **env, const char *path, int subdir, char *why, size_t why_len)
{
    struct stat st;
    char file[4096];
    snprintf(file, sizeof(file), subdir ? "%s/data.mdb" : "%s", path);
    int rc = stat(file, &st) ? errno : mdb_env_create(env);
    if (!rc)
        rc = mdb_env_set_maxdbs(*env, 4);
    if (!rc)
        rc = mdb_env_set_mapsize(*env, st.st_size > (1 << 20) ? (size_t)st.st_size : (1 << 20));
    if (!rc)
        rc = mdb_env_open(*env, path,
                          MDB_RDONLY | MDB_NOLOCK | MDB_NORDAHEAD | MDB_NOTLS | (subdir ? 0 : MDB_NOSUBDIR), 0);
    if (rc)
        snprintf(why, why_len, "%s: cannot open as LMDB (%s)", path, mdb_strerror(rc));
    return rc;
}

/* LMDB does not say where it mapped the file (me_mapaddr is only the FIXEDMAP hint), and
 * the same file may be mapped more than once in this process (Python opened it to check
 * it). So take the address of any value LMDB returns, which lies in its map, and find
 * the mapping of this file around it in /proc/self/maps. */
static void *map_hint(MDB_env *env, MDB_dbi dbi)
{
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val k, v;
    void *hint = NULL;
    if (mdb_txn_begin(env, NULL, MDB_RDONLY, &txn))
        return NULL;
    if (!mdb_cursor_open(txn, dbi, &cur)) {
        if (!mdb_cursor_get(cur, &k, &v, MDB_FIRST))
            hint = v.mv_data;
        mdb_cursor_close(cur);
    }
    mdb_txn_abort(txn);
    return hint;
}

static int map_find(int fd, const void *hint, char **base, size_t *len)
{
    struct stat st;
    char line[512];
    int found = 0;
    if (fstat(fd, &st))
        return errno;
    FILE *maps = fopen("/proc/self/maps", "re");
    if (!maps)
        return errno;
    while (!found && fgets(line, sizeof(line), maps)) {
        unsigned long start, end, ino;
        unsigned long long off;
        unsigned maj, min;
        char perms[8];
        if (sscanf(line, "%lx-%lx %7s %llx %x:%x %lu", &start, &end, perms, &off, &maj, &min, &ino) != 7)
            continue;
        if (off || ino != st.st_ino || maj != major(st.st_dev) || min != minor(st.st_dev))
            continue;
        if (hint && ((unsigned long)hint < start || (unsigned long)hint >= end))
            continue;
        found = 1;
        for (int i = 0; !hint && i < srv.nlayers; i++)
            if (srv.layers[i].env_base == (char *)start || srv.layers[i].vals_base == (char *)start)
                found = 0;
        if (found) {
            *base = (char *)start;
            *len = end - start;
        }
    }
    fclose(maps);
    return found ? 0 : ENOENT;
}

static int env_view(MDB_env *env, MDB_dbi dbi, int *fd, char **base, size_t *map, uint64_t *size)
{
    struct stat st;
    int rc = mdb_env_get_fd(env, fd);
    if (!rc && fstat(*fd, &st))
        rc = errno;
    if (!rc)
        rc = map_find(*fd, map_hint(env, dbi), base, map);
    *size = rc ? 0 : (uint64_t)st.st_size;
    return rc;
}

/* A remote layer: its index and values are the one sparse copy of the remote object,
 * every read of which goes through the block cache. Key lookups walk LMDB's map, whose
 * pages the mount daemon fetched and pinned before serving; values are found by their
 * offsets. */
static int layer_remote(struct layer *ly, const struct stat *data, int own_values, const struct remote_spec *spec,
                        char *why, size_t why_len)
{
    struct stat index;
    if (own_values || !ly->offsets_ok || fstat(ly->env_src.fd, &index) || index.st_dev != data->st_dev ||
        index.st_ino != data->st_ino) {
        snprintf(why, why_len, "%s: a remote layer is one packed DB with value offsets, read from one local copy",
                 spec->url);
        return -EINVAL;
    }
    int rc = remote_open(&ly->remote, spec, ly->data_src.fd, why, why_len);
    if (rc)
        return rc;
    ly->env_src.remote = ly->vals_src.remote = ly->data_src.remote = ly->remote;
    return 0;
}

int layer_open(struct layer *ly, const char *index_path, int index_subdir, const char *vals_path,
               int vals_subdir, const char *data_path, const struct remote_spec *remote, char *why, size_t why_len)
{
    MDB_txn *txn;
    struct stat st;
    int rc = env_open(&ly->env, index_path, index_subdir, why, why_len);
    if (rc)
        return lmdb_errno(rc);
    ly->vals_env = ly->env;
    if (vals_path && (rc = env_open(&ly->vals_env, vals_path, vals_subdir, why, why_len)))
        return lmdb_errno(rc);
    rc = mdb_txn_begin(ly->env, NULL, MDB_RDONLY, &txn);
    if (!rc) {
        rc = mdb_dbi_open(txn, "lmdbfs.index", 0, &ly->index_dbi);
        rc = rc ? (mdb_txn_abort(txn), rc) : mdb_txn_commit(txn);  /* commit keeps the handle */
    }
    if (!rc && !(rc = mdb_txn_begin(ly->vals_env, NULL, MDB_RDONLY, &txn))) {
        rc = mdb_dbi_open(txn, NULL, 0, &ly->main_dbi);
        rc = rc ? (mdb_txn_abort(txn), rc) : mdb_txn_commit(txn);
    }
    if (rc) {
        snprintf(why, why_len, "%s: cannot open its databases (%s)", index_path, mdb_strerror(rc));
        return lmdb_errno(rc);
    }
    if (env_view(ly->env, ly->index_dbi, &ly->env_src.fd, &ly->env_base, &ly->env_map, &ly->env_size) ||
        (ly->vals_env == ly->env ? (ly->vals_src = ly->env_src, ly->vals_base = ly->env_base, ly->vals_map = ly->env_map,
                                    ly->vals_size = ly->env_size, 0)
                                 : env_view(ly->vals_env, ly->main_dbi, &ly->vals_src.fd, &ly->vals_base, &ly->vals_map, &ly->vals_size))) {
        snprintf(why, why_len, "%s: cannot inspect the LMDB map", index_path);
        return -EIO;
    }
    ly->data_src.fd = open(data_path, O_RDONLY | O_CLOEXEC);
    if (ly->data_src.fd < 0 || fstat(ly->data_src.fd, &st)) {
        int err = errno;
        snprintf(why, why_len, "%s: %s", data_path, strerror(err));
        return -err;
    }
    ly->data_size = (uint64_t)st.st_size;
    return remote ? layer_remote(ly, &st, vals_path != NULL, remote, why, why_len) : 0;
}

void layer_close(struct layer *ly)
{
    struct txns *ts = txn_key_ok ? pthread_getspecific(txn_key) : NULL;
    if (ts) {  /* this thread's own transactions (single-threaded serving) */
        txns_free(ts);
        pthread_setspecific(txn_key, NULL);
    }
    remote_close(ly->remote);
    ly->remote = ly->env_src.remote = ly->vals_src.remote = ly->data_src.remote = NULL;
    if (ly->data_src.fd > 0)
        close(ly->data_src.fd);
    if (ly->vals_env && ly->vals_env != ly->env)
        mdb_env_close(ly->vals_env);
    if (ly->env)
        mdb_env_close(ly->env);
    ly->env = ly->vals_env = NULL;
    ly->data_src.fd = -1;
}

/* 0, -ENOENT, or -EIO (logged; this thread's transaction starts afresh). */
static int lmdb_get(struct layer *ly, int vals, MDB_val *key, MDB_val *val, const char *what)
{
    int rc;
    MDB_txn *txn = txn_get(ly, vals, &rc);
    if (txn)
        rc = mdb_get(txn, vals ? ly->main_dbi : ly->index_dbi, key, val);
    if (rc == 0 || rc == MDB_NOTFOUND)
        return lmdb_errno(rc);
    txn_drop(ly, vals);
    log_line("ERROR", "layer %d: LMDB error looking up %s: %s", ly->index, what, mdb_strerror(rc));
    return -EIO;
}

/* Records are read into a buffer per thread, kept between calls up to KEEP_BUF bytes, so
 * a cache miss costs one pread and no fresh pages. */
#define KEEP_BUF (1u << 20)
static pthread_key_t rbuf_key;
static pthread_once_t rbuf_once = PTHREAD_ONCE_INIT;
struct rbuf {
    unsigned char *p;
    size_t cap;
    unsigned char *big;  /* a record larger than KEEP_BUF: freed once it is parsed */
};
static void rbuf_free(void *v)
{
    struct rbuf *b = v;
    free(b->p);
    free(b->big);
    free(b);
}
static void rbuf_key_make(void) { pthread_key_create(&rbuf_key, rbuf_free); }

static unsigned char *record_buf(size_t len)
{
    pthread_once(&rbuf_once, rbuf_key_make);
    struct rbuf *b = pthread_getspecific(rbuf_key);
    if (!b) {
        if (!(b = calloc(1, sizeof(*b))))
            return NULL;
        pthread_setspecific(rbuf_key, b);
    }
    free(b->big);
    b->big = NULL;
    if (len > KEEP_BUF)
        return b->big = malloc(len);
    if (len > b->cap) {
        size_t cap = b->cap ? b->cap : 64 << 10;
        while (cap < len)
            cap *= 2;
        unsigned char *p = realloc(b->p, cap);
        if (!p)
            return NULL;
        b->p = p;
        b->cap = cap;
    }
    return b->p;
}

void layer_record_done(void)
{
    pthread_once(&rbuf_once, rbuf_key_make);
    struct rbuf *b = pthread_getspecific(rbuf_key);
    if (b) {
        free(b->big);
        b->big = NULL;
    }
}

int layer_fetch_record(struct layer *ly, const char *rel, size_t rel_len, size_t hint, const unsigned char **raw,
                       size_t *len, size_t *total, uint64_t *pos)
{
    unsigned char digest[16];
    MDB_val key = {16, digest}, val;
    md5_of(rel, rel_len, digest);
    int rc = lmdb_get(ly, 0, &key, &val, "a directory record");
    if (rc)
        return rc;
    touched(ly);
    if (val.mv_size > RECORD_MAX)
        return -EFBIG;
    uint64_t off = (uint64_t)((char *)val.mv_data - ly->env_base);
    if (off > ly->env_size || val.mv_size > ly->env_size - off) {  /* a damaged B-tree: never touch it */
        log_line("ERROR", "layer %d: directory record of '%.*s' lies outside the file", ly->index, (int)rel_len, rel);
        return -EIO;
    }
    unsigned char *buf = record_buf(val.mv_size ? val.mv_size : 1);
    if (!buf)
        return -ENOMEM;
    /* A version-4 record ("LDR2") keeps its inline file bytes after the names: only the
     * head (header, path, rows, names) is read. The first read is the head's length
     * from an earlier fetch, or a guess that covers a directory of a few hundred entries. */
    size_t guess = hint >= 16 ? hint : RECORD_HEAD_GUESS;
    size_t want = val.mv_size < guess ? val.mv_size : guess, need = val.mv_size;
    if (src_is_remote(&ly->env_src) && src_pinned(&ly->env_src, off, want) >= 16)
        want = src_pinned(&ly->env_src, off, want);  /* a remote head: its pinned pages, not the tail */
    rc = src_pread(&ly->env_src, buf, want, off);
    if (!rc && want >= 16 && memcmp(buf, "LDR2", 4) == 0) {
        uint64_t head = record_head_len(buf);
        if (head <= val.mv_size)  /* else the parser refuses it whole */
            need = head;
    }
    if (!rc && need > want)
        rc = src_pread(&ly->env_src, buf + want, need - want, off + want);
    if (rc) {
        char why[300];
        log_line("ERROR", "layer %d: EIO for the directory record of '%.*s': %s", ly->index, (int)rel_len, rel,
                 src_why(&ly->env_src, rc, why, sizeof(why)));
        return -EIO;
    }
    *raw = buf;
    *len = need;
    *total = val.mv_size;
    *pos = off;
    return 0;
}

int layer_value_pos(struct layer *ly, const char *rel, size_t rel_len, long piece, uint64_t size, uint64_t *pos)
{
    size_t klen = ly->key_prefix_len + rel_len * (ly->key_sep_len ? ly->key_sep_len : 1);
    unsigned char digest[16 + PIECE_SUFFIX];
    char *buf = malloc(klen + 1 + PIECE_SUFFIX), *p = buf;
    if (!buf)
        return -ENOMEM;
    memcpy(p, ly->key_prefix, ly->key_prefix_len);
    p += ly->key_prefix_len;
    for (size_t i = 0; i < rel_len; i++) {
        if (rel[i] == '/') {
            memcpy(p, ly->key_sep, ly->key_sep_len);
            p += ly->key_sep_len;
        } else {
            *p++ = rel[i];
        }
    }
    MDB_val key, val;
    if (ly->keys_path) {
        key.mv_data = buf;
        key.mv_size = (size_t)(p - buf);
    } else {
        md5_of(buf, (size_t)(p - buf), digest);
        key.mv_data = digest;
        key.mv_size = 16;
    }
    if (piece >= 0) {  /* format.piece_key */
        unsigned char *s = (unsigned char *)key.mv_data + key.mv_size;
        s[0] = 0;
        for (int i = 0; i < 4; i++)
            s[1 + i] = (unsigned char)((unsigned long)piece >> (24 - 8 * i));
        key.mv_size += PIECE_SUFFIX;
    }
    if (key.mv_size == 0 || key.mv_size > (size_t)mdb_env_get_maxkeysize(ly->vals_env)) {
        free(buf);
        return -EIO;
    }
    int rc = lmdb_get(ly, 1, &key, &val, "a value");
    free(buf);
    if (rc == -ENOENT) {
        if (piece >= 0)
            log_line("ERROR", "EIO for %.*s: piece %ld of its contents is missing", (int)rel_len, rel, piece);
        else
            log_line("ERROR", "EIO for %.*s: listed in the index but its contents are missing", (int)rel_len, rel);
        return -EIO;
    }
    if (rc)
        return rc;
    touched(ly);
    uint64_t off = (uint64_t)((char *)val.mv_data - ly->vals_base);
    if (val.mv_size != size || off > ly->vals_size || size > ly->vals_size - off) {
        log_line("ERROR", "EIO for %.*s: stored size %zu != indexed size %llu", (int)rel_len, rel,
                 val.mv_size, (unsigned long long)size);
        return -EIO;
    }
    *pos = off;
    return 0;
}
