/* READ: find a file's bytes, check them against the row's xxh3 the first time this
 * daemon reads the file, then answer from memory or hand libfuse (descriptor, offset)
 * so it splices the bytes to the kernel. */
#include "serve.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xxhash.h>

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

/* Where the file's bytes lie: (fd, pos) in the index file (inline), a data file, or at
 * its key. */
static int locate(struct node *n, int layer, struct record *rec, const struct row *r, int *fd, uint64_t *pos)
{
    struct layer *ly = &srv.layers[layer];
    if (r->flags & FLAG_INLINE) {  /* in the directory's record: data_off is in the index file */
        *fd = ly->env_fd;
        *pos = r->data_off;
        return 0;
    }
    if (ly->offsets_ok && r->data_off) {
        *fd = ly->data_fd;
        *pos = r->data_off;
        return 0;
    }
    const char *dir;
    size_t dlen;
    layer_rel(n, layer, &dir, &dlen);
    char *rel = malloc(dlen + 1 + r->name_len);
    if (!rel)
        return ENOMEM;
    memcpy(rel, dir, dlen);
    size_t len = dlen;
    if (dlen)
        rel[len++] = '/';
    memcpy(rel + len, row_name(rec, r), r->name_len);
    len += r->name_len;
    *fd = ly->vals_fd;
    int rc = layer_value_pos(ly, rel, len, r->size, pos);
    free(rel);
    return rc ? -rc : 0;
}

/* The directory's per-row state bits (1 checked, 2 mismatch, 4 being checked, 8 pushed,
 * 16 prefetched, 32 read), allocated on first need. */
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

static int check(struct node *n, struct record *rec, uint32_t row_i, const struct row *r, int fd, uint64_t pos,
                 const unsigned char **whole, uint8_t *bits, unsigned char *into);

/* Check the stored bytes against the row's xxh3 once per file. Returns 0 or an errno; a
 * file of at most HASH_CHUNK bytes is left in *whole for the reply (read into `into`
 * when given: a ring entry's reply buffer, so the reply needs no copy). */
static int verify(struct node *n, int layer, struct record *rec, uint32_t row_i, const struct row *r, int fd,
                  uint64_t pos, const unsigned char **whole, unsigned char *into)
{
    uint8_t *bits = row_bits(n, layer, rec);
    if (!bits)
        return ENOMEM;
    if (__atomic_load_n(&bits[row_i], __ATOMIC_ACQUIRE) & 1)
        return 0;
    /* A large file is checked by one thread; READs of its other parts wait for the verdict
     * instead of each hashing the whole file again. */
    if (r->size > HASH_CHUNK) {
        pthread_mutex_lock(&verify_lock);
        uint8_t b;
        while (((b = __atomic_load_n(&bits[row_i], __ATOMIC_ACQUIRE)) & 7) == 4)
            pthread_cond_wait(&verify_done, &verify_lock);
        if (!(b & 3))
            __atomic_fetch_or(&bits[row_i], 4, __ATOMIC_ACQ_REL);
        pthread_mutex_unlock(&verify_lock);
        if (b & 1)
            return 0;
        if (b & 2)
            return EIO;
        int err = check(n, rec, row_i, r, fd, pos, whole, bits, into);
        pthread_mutex_lock(&verify_lock);
        __atomic_fetch_and(&bits[row_i], (uint8_t)~4, __ATOMIC_ACQ_REL);
        pthread_cond_broadcast(&verify_done);
        pthread_mutex_unlock(&verify_lock);
        return err;
    }
    return check(n, rec, row_i, r, fd, pos, whole, bits, into);
}

static int check(struct node *n, struct record *rec, uint32_t row_i, const struct row *r, int fd, uint64_t pos,
                 const unsigned char **whole, uint8_t *bits, unsigned char *into)
{
    XXH64_hash_t sum = 0;
    unsigned char *buf = into && r->size <= HASH_CHUNK ? into : thread_buf();
    if (!buf)
        return ENOMEM;
    XXH3_state_t *state = r->size > HASH_CHUNK ? XXH3_createState() : NULL;
    if (state)
        XXH3_64bits_reset(state);
    uint64_t done = 0;
    do {
        size_t want = r->size - done > HASH_CHUNK ? HASH_CHUNK : (size_t)(r->size - done);
        ssize_t got = want ? pread(fd, buf, want, (off_t)(pos + done)) : 0;
        if (got != (ssize_t)want) {
            XXH3_freeState(state);
            log_line("ERROR", "EIO for %s/%.*s: short read from the DB file", n->path, r->name_len,
                     row_name(rec, r));
            return EIO;
        }
        if (state)
            XXH3_64bits_update(state, buf, want);
        else
            sum = XXH3_64bits(buf, want);
        done += want;
    } while (done < r->size);
    if (state) {
        sum = XXH3_64bits_digest(state);
        XXH3_freeState(state);
    } else {
        *whole = buf;
    }
    if (sum != r->checksum) {
        *whole = NULL;
        if (!(__atomic_fetch_or(&bits[row_i], 2, __ATOMIC_ACQ_REL) & 2))
            log_line("ERROR", "EIO for %s%s%.*s: checksum mismatch (the DB file is damaged)", n->path,
                     n->path_len ? "/" : "", r->name_len, row_name(rec, r));
        return EIO;
    }
    __atomic_fetch_or(&bits[row_i], 1, __ATOMIC_RELEASE);
    return 0;
}

/* Prefetch.  A file is looked up, then (Python) an IOCTL comes, then its first READ; with
 * many readers on few CPUs each of those round trips waits its turn, so a value fetched
 * from the disk only at READ leaves the disk idle meanwhile.  The value (up to the first
 * READ's size) is therefore handed to the page cache's readahead when the file is looked
 * up.  A LOOKUP does not say whether the file will be read (stat, os.path.exists), so
 * lookups spend credit that first READs give back: a sweep of stats stops prefetching
 * after PREFETCH_CREDIT files, and reads turn it back on.  An open is a promise to read:
 * at the IOCTL that Python's open() sends, a file not yet prefetched is, without credit. */
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

void lmdbfs_prefetch(struct node *n, int layer, struct record *rec, uint32_t row_i, const struct row *r,
                     int at_open)
{
    int fd;
    uint64_t pos;
    /* small files come with the IOCTL's push, inline ones with their record */
    if (r->kind != KIND_FILE || r->size <= srv.push_max || (r->flags & FLAG_INLINE) ||
        !srv.layers[layer].offsets_ok || !r->data_off)
        return;
    uint8_t *bits = row_bits(n, layer, rec);
    if (!bits || (__atomic_load_n(&bits[row_i], __ATOMIC_ACQUIRE) & (16 | 32)))
        return;
    if (!at_open && __atomic_sub_fetch(&prefetch_credit, 1, __ATOMIC_RELAXED) < 0) {
        __atomic_add_fetch(&prefetch_credit, 1, __ATOMIC_RELAXED);
        return;
    }
    if ((__atomic_fetch_or(&bits[row_i], 16, __ATOMIC_ACQ_REL) & 16) || locate(n, layer, rec, r, &fd, &pos)) {
        if (!at_open)
            prefetch_refund();
        return;
    }
    posix_fadvise(fd, (off_t)pos, (off_t)(r->size < PREFETCH_MAX ? r->size : PREFETCH_MAX), POSIX_FADV_WILLNEED);
}

/* The first READ of a file gives a prefetch credit back. */
static void mark_read(struct node *n, int layer, struct record *rec, uint32_t row_i)
{
    uint8_t *bits = row_bits(n, layer, rec);
    if (bits && !(__atomic_load_n(&bits[row_i], __ATOMIC_RELAXED) & 32) &&
        !(__atomic_fetch_or(&bits[row_i], 32, __ATOMIC_ACQ_REL) & 32))
        prefetch_refund();
}

void lmdbfs_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    (void)fi;
    struct node *n;
    struct record *rec;
    struct row r;
    int layer, fd = -1, err;
    uint32_t row_i;
    uint64_t pos = 0;
    const unsigned char *whole = NULL;
    unsigned char *ring;
    size_t cap;
    if (!(ino & FILE_INO_BIT)) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    if ((err = file_of(ino, &n, &layer, &row_i, &r, &rec))) {
        fuse_reply_err(req, err);
        return;
    }
    if (r.kind != KIND_FILE) {
        record_put(rec);
        fuse_reply_err(req, EINVAL);
        return;
    }
    err = locate(n, layer, rec, &r, &fd, &pos);
    mark_read(n, layer, rec, row_i);
    ring = uring_payload(&cap);
    if (!err && srv.verify && srv.layers[layer].verify)
        err = verify(n, layer, rec, row_i, &r, fd, pos, &whole, ring && r.size <= cap ? ring : NULL);
    if (err) {
        fuse_reply_err(req, err);
    } else if (off < 0 || (uint64_t)off >= r.size || size == 0) {
        fuse_reply_buf(req, NULL, 0);
    } else {
        size_t n_bytes = r.size - (uint64_t)off < size ? (size_t)(r.size - (uint64_t)off) : size;
        if (whole) {
            fuse_reply_buf(req, (const char *)whole + off, n_bytes);
        } else if (ring && n_bytes <= cap) {
            /* a ring thread: the bytes go straight into the entry's reply buffer */
            size_t got = 0;
            while (got < n_bytes) {
                ssize_t k = pread(fd, ring + got, n_bytes - got, (off_t)(pos + (uint64_t)off + got));
                if (k < 0 && errno == EINTR)
                    continue;
                if (k <= 0)
                    break;
                got += (size_t)k;
            }
            if (got < n_bytes)
                fuse_reply_err(req, EIO);
            else
                fuse_reply_buf(req, (const char *)ring, n_bytes);
        } else {
            struct fuse_bufvec bv = FUSE_BUFVEC_INIT(n_bytes);
            bv.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK | FUSE_BUF_FD_RETRY;
            bv.buf[0].fd = fd;
            bv.buf[0].pos = (off_t)(pos + (uint64_t)off);
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
void lmdbfs_push(fuse_ino_t ino)
{
    struct node *n;
    struct record *rec;
    struct row r;
    int layer, fd = -1;
    uint32_t row_i;
    uint64_t pos = 0;
    if (!(ino & FILE_INO_BIT) || !srv.se)
        return;
    /* Pushed or read already (every later epoch): answered from the bits, without the
     * record: there is nothing left to push or prefetch. */
    n = file_ino_split(ino, &layer, &row_i);
    if (n && layer < srv.nlayers) {
        uint8_t *seen = __atomic_load_n(&n->l[layer].bits, __ATOMIC_ACQUIRE);
        if (seen && row_i < __atomic_load_n(&n->l[layer].nbits, __ATOMIC_ACQUIRE) &&
            (__atomic_load_n(&seen[row_i], __ATOMIC_ACQUIRE) & (8 | 32)))
            return;
    }
    if (file_of(ino, &n, &layer, &row_i, &r, &rec))
        return;
    lmdbfs_prefetch(n, layer, rec, row_i, &r, 1);
    uint8_t *bits = row_bits(n, layer, rec);
    if (!bits || r.kind != KIND_FILE || r.size == 0 || r.size > srv.push_max || r.size > HASH_CHUNK ||
        (__atomic_load_n(&bits[row_i], __ATOMIC_ACQUIRE) & 8) || locate(n, layer, rec, &r, &fd, &pos)) {
        record_put(rec);
        return;
    }
    const unsigned char *whole = NULL;
    int err = 0;
    if (srv.verify && srv.layers[layer].verify)
        err = verify(n, layer, rec, row_i, &r, fd, pos, &whole, NULL);
    if (!err && !whole) {  /* checked earlier, or not checked at all: read it now */
        unsigned char *buf = thread_buf();
        if (!buf || pread(fd, buf, (size_t)r.size, (off_t)pos) != (ssize_t)r.size)
            err = EIO;
        whole = buf;
    }
    if (!err && !(__atomic_fetch_or(&bits[row_i], 8, __ATOMIC_ACQ_REL) & 8)) {
        struct fuse_bufvec bv = FUSE_BUFVEC_INIT((size_t)r.size);
        bv.buf[0].mem = (void *)whole;
        fuse_lowlevel_notify_store(srv.se, ino, 0, &bv, 0);
    }
    record_put(rec);
}
