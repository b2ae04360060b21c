/* READ: find a file's bytes, check them against the row's xxh3 the first time this
 * daemon reads the file, then answer from memory or hand libfuse (descriptor, offset)
 * so it splices the bytes to the kernel. A remote layer's bytes are always copied
 * through its byte source (source.h) and answered from memory: a block of its cache may
 * be evicted between a check and a splice. */
#include "read.h"

#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xxhash.h>

static __thread unsigned char *reply_buf;  /* a ring entry's reply buffer, while it serves */
static __thread size_t reply_cap;

void read_reply_into(void *buf, size_t cap)
{
    reply_buf = buf;
    reply_cap = buf ? cap : 0;
}

static pthread_key_t buf_key;
static pthread_once_t buf_once = PTHREAD_ONCE_INIT;

static void buf_key_make(void) { pthread_key_create(&buf_key, free); }

/* A per-thread buffer of HASH_CHUNK bytes for verification reads. */
static unsigned char *thread_buf(void)
{
    pthread_once(&buf_once, buf_key_make);
    unsigned char *p = pthread_getspecific(buf_key);
    if (!p && (p = malloc(HASH_CHUNK)))
        pthread_setspecific(buf_key, p);
    return p;
}

/* Where the value at the file's key lies (piece >= 0: piece `piece` of a split file, of
 * size bytes) in the layer's vals_src. */
static int locate_key(struct node *n, int layer, struct record *rec, const struct row *r, long piece, uint64_t size,
                      uint64_t *pos)
{
    struct layer *ly = &srv.layers[layer];
    const char *dir;
    size_t dlen;
    layer_rel(n, layer, &dir, &dlen);
    char *rel = malloc(dlen + 1 + r->name_len);
    if (!rel)
        return -ENOMEM;
    memcpy(rel, dir, dlen);
    size_t len = dlen;
    if (dlen)
        rel[len++] = '/';
    memcpy(rel + len, row_name(rec, r), r->name_len);
    len += r->name_len;
    int rc = layer_value_pos(ly, rel, len, piece, size, pos);
    free(rel);
    return rc;
}

/* Where the file's bytes lie: (source, pos) in the index file (inline), a data file, or
 * at its key. A split file's: where its first piece lies. */
static int locate(struct node *n, int layer, struct record *rec, const struct row *r, const struct source **src,
                  uint64_t *pos)
{
    struct layer *ly = &srv.layers[layer];
    if (r->flags & FLAG_INLINE) {  /* in the directory's record: data_off is in the index file */
        *src = &ly->env_src;
        *pos = r->data_off;
        return 0;
    }
    if (r->flags & FLAG_SPLIT) {
        uint64_t piece = row_piece_bytes(rec, r), first = piece < r->size ? piece : r->size;
        if (r->size == 0) {  /* no pieces: its table holds the piece size only */
            *src = &ly->data_src;
            *pos = 0;
            return 0;
        }
        if (ly->offsets_ok && row_piece_off(rec, r, 0)) {
            *src = &ly->data_src;
            *pos = row_piece_off(rec, r, 0);
            return 0;
        }
        *src = &ly->vals_src;
        return locate_key(n, layer, rec, r, 0, first, pos);
    }
    if (ly->offsets_ok && r->data_off) {
        *src = &ly->data_src;
        *pos = r->data_off;
        return 0;
    }
    *src = &ly->vals_src;
    return locate_key(n, layer, rec, r, -1, r->size, pos);
}

/* A split file (FLAG_SPLIT): where piece k lies (its table's offset, else its key), and
 * its length. */
static int locate_piece(struct node *n, int layer, struct record *rec, const struct row *r, uint64_t k,
                        const struct source **src, uint64_t *pos, uint64_t *len)
{
    struct layer *ly = &srv.layers[layer];
    uint64_t piece = row_piece_bytes(rec, r);
    *len = r->size - k * piece < piece ? r->size - k * piece : piece;
    if (ly->offsets_ok && row_piece_off(rec, r, k)) {
        *src = &ly->data_src;
        *pos = row_piece_off(rec, r, k);
        return 0;
    }
    *src = &ly->vals_src;
    return locate_key(n, layer, rec, r, (long)k, *len, pos);
}

/* len bytes at off of a split file, piece by piece (a range may cross pieces). 0, or a
 * negative errno; *bad_src: the source of a failed read (for its log line). */
static int split_pread(struct node *n, int layer, struct record *rec, const struct row *r, unsigned char *buf,
                       size_t len, uint64_t off, const struct source **bad_src)
{
    uint64_t piece = row_piece_bytes(rec, r);
    while (len) {
        const struct source *src;
        uint64_t k = off / piece, at = off % piece, pos, plen;
        int rc = locate_piece(n, layer, rec, r, k, &src, &pos, &plen);
        if (rc)
            return rc;
        size_t want = plen - at < len ? (size_t)(plen - at) : len;
        if ((rc = src_pread(src, buf, want, pos + at))) {
            *bad_src = src;
            return rc;
        }
        buf += want;
        off += want;
        len -= want;
    }
    return 0;
}

/* The directory's per-row state bits (enum row_state), allocated on first need. */
static uint8_t *row_bits(struct node *n, int layer, const struct record *rec)
{
    struct lnode *ln = &n->l[layer];
    uint8_t *bits = __atomic_load_n(&ln->bits, __ATOMIC_ACQUIRE);
    if (!bits) {
        uint8_t *fresh = calloc(rec->count ? rec->count : 1, 1), *none = NULL;
        if (!fresh)
            return NULL;
        __atomic_store_n(&ln->nbits, rec->count, __ATOMIC_RELEASE);  /* fixed per directory */
        if (!__atomic_compare_exchange_n(&ln->bits, &none, fresh, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            free(fresh);
        bits = __atomic_load_n(&ln->bits, __ATOMIC_ACQUIRE);
    }
    return bits;
}

static pthread_mutex_t verify_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t verify_done = PTHREAD_COND_INITIALIZER;

static int check(struct node *n, int layer, struct record *rec, uint32_t row_i, const struct row *r,
                 const struct source *src, uint64_t pos, const unsigned char **whole, uint8_t *bits,
                 unsigned char *into, int quiet);

/* Check the stored bytes against the row's xxh3 once per file. Returns 0 or -errno; a
 * file of at most HASH_CHUNK bytes is left in *whole for the reply (read into `into`
 * when given: a ring entry's reply buffer, so the reply needs no copy). quiet: bytes
 * that cannot be read are not logged (the READ that follows will be). */
static int verify(struct node *n, int layer, struct record *rec, uint32_t row_i, const struct row *r,
                  const struct source *src, uint64_t pos, const unsigned char **whole, unsigned char *into, int quiet)
{
    uint8_t *bits = row_bits(n, layer, rec);
    if (!bits)
        return -ENOMEM;
    if (__atomic_load_n(&bits[row_i], __ATOMIC_ACQUIRE) & ROW_CHECKED)
        return 0;
    /* A large file is checked by one thread; READs of its other parts wait for the verdict
     * instead of each hashing the whole file again. */
    if (r->size > HASH_CHUNK) {
        pthread_mutex_lock(&verify_lock);
        uint8_t b;
        const uint8_t verdict = ROW_CHECKED | ROW_MISMATCH;
        while (((b = __atomic_load_n(&bits[row_i], __ATOMIC_ACQUIRE)) & (verdict | ROW_CHECKING)) == ROW_CHECKING)
            pthread_cond_wait(&verify_done, &verify_lock);
        if (!(b & verdict))
            __atomic_fetch_or(&bits[row_i], ROW_CHECKING, __ATOMIC_ACQ_REL);
        pthread_mutex_unlock(&verify_lock);
        if (b & ROW_CHECKED)
            return 0;
        if (b & ROW_MISMATCH)
            return -EIO;
        int err = check(n, layer, rec, row_i, r, src, pos, whole, bits, into, quiet);
        pthread_mutex_lock(&verify_lock);
        __atomic_fetch_and(&bits[row_i], (uint8_t)~ROW_CHECKING, __ATOMIC_ACQ_REL);
        pthread_cond_broadcast(&verify_done);
        pthread_mutex_unlock(&verify_lock);
        return err;
    }
    return check(n, layer, rec, row_i, r, src, pos, whole, bits, into, quiet);
}

/* The file's xxh3 over its stored bytes, read HASH_CHUNK at a time into buf; a file of
 * at most HASH_CHUNK bytes is left whole in buf. 0 or a negative errno. */
static int hash_bytes(const struct source *src, uint64_t pos, uint64_t size, unsigned char *buf, XXH64_hash_t *sum)
{
    XXH3_state_t *state = size > HASH_CHUNK ? XXH3_createState() : NULL;
    if (size > HASH_CHUNK && !state)
        return -ENOMEM;
    if (state)
        XXH3_64bits_reset(state);
    uint64_t done = 0;
    do {
        size_t want = size - done > HASH_CHUNK ? HASH_CHUNK : (size_t)(size - done);
        int rc = src_pread(src, buf, want, pos + done);
        if (rc) {
            XXH3_freeState(state);
            return rc;
        }
        if (state)
            XXH3_64bits_update(state, buf, want);
        else
            *sum = XXH3_64bits(buf, want);
        done += want;
    } while (done < size);
    if (state) {
        *sum = XXH3_64bits_digest(state);
        XXH3_freeState(state);
    }
    return 0;
}

/* hash_bytes of a split file, read piece by piece; *bad_src: the source of a failed read. */
static int split_hash(struct node *n, int layer, struct record *rec, const struct row *r, unsigned char *buf,
                      XXH64_hash_t *sum, const struct source **bad_src)
{
    XXH3_state_t *state = XXH3_createState();
    if (!state)
        return -ENOMEM;
    XXH3_64bits_reset(state);
    int rc = 0;
    for (uint64_t done = 0; !rc && done < r->size;) {
        size_t want = r->size - done > HASH_CHUNK ? HASH_CHUNK : (size_t)(r->size - done);
        if (!(rc = split_pread(n, layer, rec, r, buf, want, done, bad_src)))
            XXH3_64bits_update(state, buf, want);
        done += want;
    }
    *sum = XXH3_64bits_digest(state);
    XXH3_freeState(state);
    return rc;
}

/* A remote layer's split file failed its checksum: its pieces' blocks are dropped, to be
 * fetched again (1), or nothing is to be done (0). */
static int split_refetch(struct node *n, int layer, struct record *rec, const struct row *r)
{
    uint64_t piece = row_piece_bytes(rec, r), count = r->size / piece + (r->size % piece != 0), pos, len;
    const struct source *src;
    int again = 0;
    for (uint64_t k = 0; k < count; k++)
        if (!locate_piece(n, layer, rec, r, k, &src, &pos, &len))
            again |= src_refetch(src, pos, len);
    return again;
}

static int check(struct node *n, int layer, struct record *rec, uint32_t row_i, const struct row *r,
                 const struct source *src, uint64_t pos, const unsigned char **whole, uint8_t *bits,
                 unsigned char *into, int quiet)
{
    XXH64_hash_t sum = 0;
    unsigned char *buf = into && r->size <= HASH_CHUNK ? into : thread_buf();
    char why[300];
    int rc;
    if (!buf)
        return -ENOMEM;
    if (r->flags & FLAG_SPLIT) {
        rc = split_hash(n, layer, rec, r, buf, &sum, &src);
        if (!rc && sum != r->checksum && split_refetch(n, layer, rec, r))
            rc = split_hash(n, layer, rec, r, buf, &sum, &src);
    } else {
        rc = hash_bytes(src, pos, r->size, buf, &sum);
        /* A remote layer's damaged cache block: the file's blocks are fetched again, once. */
        if (!rc && sum != r->checksum && src_refetch(src, pos, r->size))
            rc = hash_bytes(src, pos, r->size, buf, &sum);
    }
    if (rc) {
        if (!quiet)
            log_line("ERROR", "EIO for %s%s%.*s: %s", n->path, n->path_len ? "/" : "", r->name_len,
                     row_name(rec, r), src_why(src, rc, why, sizeof(why)));
        return rc == -ENOMEM ? -ENOMEM : -EIO;
    }
    if (sum != r->checksum) {
        if (!(__atomic_fetch_or(&bits[row_i], ROW_MISMATCH, __ATOMIC_ACQ_REL) & ROW_MISMATCH)) {
            if (src_is_remote(src))
                log_line("ERROR", "EIO for %s%s%.*s: checksum mismatch after fetching it again from %s", n->path,
                         n->path_len ? "/" : "", r->name_len, row_name(rec, r), remote_url(src->remote));
            else
                log_line("ERROR", "EIO for %s%s%.*s: checksum mismatch (the DB file is damaged)", n->path,
                         n->path_len ? "/" : "", r->name_len, row_name(rec, r));
        }
        return -EIO;
    }
    if (r->size <= HASH_CHUNK)
        *whole = buf;
    __atomic_fetch_or(&bits[row_i], ROW_CHECKED, __ATOMIC_RELEASE);
    return 0;
}

/* Prefetch.  A file is looked up, then (Python) an IOCTL comes, then its first READ; with
 * many readers on few CPUs each of those round trips waits its turn, so a value fetched
 * from the disk only at READ leaves the disk idle meanwhile.  The value (up to the first
 * READ's size) is therefore handed to the page cache's readahead when the file is looked
 * up.  A LOOKUP does not say whether the file will be read (stat, os.path.exists), so
 * lookups spend credit that first READs give back: a sweep of stats stops prefetching
 * after PREFETCH_CREDIT files, and reads turn it back on.  An open is a promise to read:
 * at the IOCTL that Python's open() sends, a file not yet prefetched is, without credit.
 * On a remote layer prefetching claims the file's first blocks and sends them to the
 * fetcher without waiting; small and inline files too, since a fetch costs a round trip
 * to the server where a local read costs none. Only at open there: a LOOKUP alone (a
 * walk, a stat) must fetch nothing. */
#define PREFETCH_MAX (1u << 20)   /* the mount's readahead: what the first READ asks for */
#define PREFETCH_CREDIT 128

static int prefetch_credit = PREFETCH_CREDIT;

static void prefetch_refund(void)
{
    int c = __atomic_load_n(&prefetch_credit, __ATOMIC_RELAXED);
    while (c < PREFETCH_CREDIT &&
           !__atomic_compare_exchange_n(&prefetch_credit, &c, c + 1, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
}

void read_prefetch(struct node *n, int layer, struct record *rec, uint32_t row_i, const struct row *r, int at_open)
{
    const struct source *src;
    uint64_t pos;
    const struct layer *ly = &srv.layers[layer];
    /* small local files come with the IOCTL's push, inline ones with their record */
    if (r->kind != KIND_FILE || r->size == 0 ||
        (ly->remote ? !at_open || (!(r->flags & FLAG_INLINE) && !r->data_off)
                    : r->size <= srv.push_max || (r->flags & FLAG_INLINE) || !ly->offsets_ok || !r->data_off))
        return;
    uint8_t *bits = row_bits(n, layer, rec);
    if (!bits || (__atomic_load_n(&bits[row_i], __ATOMIC_ACQUIRE) & (ROW_PREFETCHED | ROW_READ)))
        return;
    if (!at_open && __atomic_sub_fetch(&prefetch_credit, 1, __ATOMIC_RELAXED) < 0) {
        __atomic_add_fetch(&prefetch_credit, 1, __ATOMIC_RELAXED);
        return;
    }
    if ((__atomic_fetch_or(&bits[row_i], ROW_PREFETCHED, __ATOMIC_ACQ_REL) & ROW_PREFETCHED) || locate(n, layer, rec, r, &src, &pos)) {
        if (!at_open)
            prefetch_refund();
        return;
    }
    uint64_t len = r->size < PREFETCH_MAX ? r->size : PREFETCH_MAX;
    if ((r->flags & FLAG_SPLIT) && row_piece_bytes(rec, r) < len)
        len = row_piece_bytes(rec, r);  /* within the first piece */
    src_prefetch(src, pos, len);
}

/* The first READ of a file gives a prefetch credit back. */
static void mark_read(struct node *n, int layer, struct record *rec, uint32_t row_i)
{
    uint8_t *bits = row_bits(n, layer, rec);
    if (bits && !(__atomic_load_n(&bits[row_i], __ATOMIC_RELAXED) & ROW_READ) &&
        !(__atomic_fetch_or(&bits[row_i], ROW_READ, __ATOMIC_ACQ_REL) & ROW_READ))
        prefetch_refund();
}

void read_reply(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off)
{
    struct node *n;
    struct record *rec;
    struct row r;
    int layer, err;
    uint32_t row_i;
    uint64_t pos = 0;
    const struct source *src = NULL;
    const unsigned char *whole = NULL;
    unsigned char *ring = reply_buf;
    size_t cap = reply_cap;
    if (!ino_is_file(ino)) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    if ((err = tree_file(ino, &n, &layer, &row_i, &r, &rec))) {
        fuse_reply_err(req, -err);
        return;
    }
    if (r.kind != KIND_FILE) {
        record_put(rec);
        fuse_reply_err(req, EINVAL);
        return;
    }
    err = locate(n, layer, rec, &r, &src, &pos);
    mark_read(n, layer, rec, row_i);
    if (!err && srv.verify && srv.layers[layer].verify)
        err = verify(n, layer, rec, row_i, &r, src, pos, &whole, ring && r.size <= cap ? ring : NULL, 0);
    if (err) {
        fuse_reply_err(req, -err);
    } else if (off < 0 || (uint64_t)off >= r.size || size == 0) {
        fuse_reply_buf(req, NULL, 0);
    } else {
        size_t n_bytes = r.size - (uint64_t)off < size ? (size_t)(r.size - (uint64_t)off) : size;
        uint64_t at = pos + (uint64_t)off;
        int gather = 0;  /* a split file's read that crosses from one piece into the next */
        if ((r.flags & FLAG_SPLIT) && !whole) {
            uint64_t piece = row_piece_bytes(rec, &r), plen;
            err = locate_piece(n, layer, rec, &r, (uint64_t)off / piece, &src, &at, &plen);
            at += (uint64_t)off % piece;
            gather = (uint64_t)off % piece + n_bytes > plen;
        }
        if (err) {
            fuse_reply_err(req, -err);
        } else if (whole) {
            fuse_reply_buf(req, (const char *)whole + off, n_bytes);
        } else if ((ring && n_bytes <= cap) || src_is_remote(src) || gather) {
            /* a ring thread: the bytes go straight into the entry's reply buffer; a remote
             * layer: through a buffer of this thread's */
            unsigned char *buf = ring && n_bytes <= cap ? ring : n_bytes <= HASH_CHUNK ? thread_buf() : NULL;
            unsigned char *own = buf ? NULL : malloc(n_bytes);
            char why[300];
            int rc = !buf && !own ? -ENOMEM
                     : gather     ? split_pread(n, layer, rec, &r, buf ? buf : own, n_bytes, (uint64_t)off, &src)
                                  : src_pread(src, buf ? buf : own, n_bytes, at);
            if (rc) {
                log_line("ERROR", "EIO for %s%s%.*s: %s", n->path, n->path_len ? "/" : "", r.name_len,
                         row_name(rec, &r), src_why(src, rc, why, sizeof(why)));
                fuse_reply_err(req, rc == -ENOMEM ? ENOMEM : EIO);
            } else {
                fuse_reply_buf(req, (const char *)(buf ? buf : own), n_bytes);
            }
            free(own);
        } else {
            struct fuse_bufvec bv = FUSE_BUFVEC_INIT(n_bytes);
            bv.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK | FUSE_BUF_FD_RETRY;
            bv.buf[0].fd = src->fd;
            bv.buf[0].pos = (off_t)at;
            fuse_reply_data(req, &bv, FUSE_BUF_SPLICE_MOVE);
        }
    }
    record_put(rec);
}

/* Python's open() asks isatty() of every file before reading it: that IOCTL round trip
 * cannot be avoided, so it carries the file's bytes along. The bytes are checked as a
 * first READ would check them, then stored into the kernel's page cache for the inode
 * (FUSE_NOTIFY_STORE, whole file from offset 0, which marks the pages up to date); the
 * read() that follows finds them there and sends no READ. Once per file per daemon:
 * pages the kernel later drops come back through READ as usual. */
void read_push(fuse_ino_t ino)
{
    struct node *n;
    struct record *rec;
    struct row r;
    int layer;
    uint32_t row_i;
    uint64_t pos = 0;
    const struct source *src;
    if (!ino_is_file(ino) || !srv.se)
        return;
    /* Pushed or read already (every later epoch): answered from the bits, without the
     * record: there is nothing left to push or prefetch. */
    n = tree_file_node(ino, &layer, &row_i);
    if (n && layer < srv.nlayers) {
        uint8_t *seen = __atomic_load_n(&n->l[layer].bits, __ATOMIC_ACQUIRE);
        if (seen && row_i < __atomic_load_n(&n->l[layer].nbits, __ATOMIC_ACQUIRE) &&
            (__atomic_load_n(&seen[row_i], __ATOMIC_ACQUIRE) & (ROW_PUSHED | ROW_READ)))
            return;
    }
    if (tree_file(ino, &n, &layer, &row_i, &r, &rec))
        return;
    read_prefetch(n, layer, rec, row_i, &r, 1);
    uint8_t *bits = row_bits(n, layer, rec);
    if (!bits || r.kind != KIND_FILE || r.size == 0 || r.size > srv.push_max || r.size > HASH_CHUNK ||
        (r.flags & FLAG_SPLIT) ||
        (__atomic_load_n(&bits[row_i], __ATOMIC_ACQUIRE) & ROW_PUSHED) || locate(n, layer, rec, &r, &src, &pos)) {
        record_put(rec);
        return;
    }
    const unsigned char *whole = NULL;
    int err = 0;
    if (srv.verify && srv.layers[layer].verify)
        err = verify(n, layer, rec, row_i, &r, src, pos, &whole, NULL, 1);
    if (!err && !whole) {  /* checked earlier, or not checked at all: read it now */
        unsigned char *buf = thread_buf();
        if (!buf || src_pread(src, buf, (size_t)r.size, pos))
            err = -EIO;
        whole = buf;
    }
    if (!err && !(__atomic_fetch_or(&bits[row_i], ROW_PUSHED, __ATOMIC_ACQ_REL) & ROW_PUSHED)) {
        struct fuse_bufvec bv = FUSE_BUFVEC_INIT((size_t)r.size);
        bv.buf[0].mem = (void *)whole;
        fuse_lowlevel_notify_store(srv.se, ino, 0, &bv, 0);
    }
    record_put(rec);
}
