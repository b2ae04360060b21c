/* Byte sources (source.h): plain preads of a local file, or a remote object's sparse
 * local copy read through its block states (docs/remote.md, "The block cache"). */
#include "source.h"

#include "blocks/blockstate.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define WAIT_SLICE_MS 1000L   /* a futex wait never sleeps longer; then the clock is checked */
#define CLAIM_BATCH 512       /* block numbers per pipe write: 4 KiB, one atomic write */
#define BLOCK_SIZE_MAX (1ull << 30)
/* The pinned index (lmdbfs/remote/cache.py): "pins" beside "state", a header then one
 * byte per 4 KiB page, 1 when the page's bytes are in the data file for good. */
#define PIN_MAGIC "LMDBFSP1"
#define PIN_HEADER 4096u
#define PIN_SHIFT 12

struct remote {
    uint32_t *words;          /* the state file's words, mapped MAP_SHARED */
    void *map;
    size_t map_len;
    uint64_t block_size, size, blocks;
    int request_fd;
    long stuck_ms;
    char *url;
    const uint8_t *pins;      /* the pins file's page bytes, mapped read-only; NULL: none */
    void *pin_map;
    size_t pin_map_len;
    uint64_t pages;
};

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint32_t get32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t get64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* Map the pins file beside the state file when it describes this data file; anything
 * else (missing, another size, a damaged header) leaves the layer without pins: every
 * read then goes through the block states, slower but as exact. */
static void pins_open(struct remote *r, const char *state_path)
{
    const char *slash = strrchr(state_path, '/');
    size_t dir = slash ? (size_t)(slash - state_path + 1) : 0;
    char *path = malloc(dir + 5);
    if (!path)
        return;
    memcpy(path, state_path, dir);
    memcpy(path + dir, "pins", 5);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    free(path);
    struct stat st;
    uint64_t pages = (r->size + (1u << PIN_SHIFT) - 1) >> PIN_SHIFT;
    if (fd < 0)
        return;
    if (fstat(fd, &st) || (uint64_t)st.st_size != PIN_HEADER + pages) {
        close(fd);
        return;
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED)
        return;
    const unsigned char *h = map;
    if (memcmp(h, PIN_MAGIC, 8) || get32(h + 8) != 1 || get32(h + 12) != (1u << PIN_SHIFT) ||
        get64(h + 16) != r->size || get64(h + 24) != pages) {
        munmap(map, (size_t)st.st_size);
        return;
    }
    r->pin_map = map;
    r->pin_map_len = (size_t)st.st_size;
    r->pins = h + PIN_HEADER;
    r->pages = pages;
}

/* How many bytes from off (at most len) lie on pinned pages, read without a claim. */
static uint64_t pinned_len(const struct remote *r, uint64_t off, uint64_t len)
{
    if (!r->pins || off >= r->size)
        return 0;
    uint64_t end = len > r->size - off ? r->size : off + len, p = off >> PIN_SHIFT;
    for (; (p << PIN_SHIFT) < end; p++)
        if (__atomic_load_n(&r->pins[p], __ATOMIC_ACQUIRE) != 1)
            break;
    uint64_t upto = p << PIN_SHIFT;
    if (upto <= off)  /* off's own page is not pinned */
        return 0;
    return (upto > end ? end : upto) - off;
}

int remote_open(struct remote **out, const struct remote_spec *spec, int data_fd, char *why, size_t why_len)
{
    struct stat st, data;
    const char *problem = NULL;
    char detail[160];
    *out = NULL;
    if (spec->block_size == 0 || spec->block_size > BLOCK_SIZE_MAX) {
        snprintf(why, why_len, "%s: block size %llu is not between 1 byte and 1 GiB", spec->url,
                 (unsigned long long)spec->block_size);
        return -EINVAL;
    }
    if (spec->request_fd < 0 || fcntl(spec->request_fd, F_GETFL) < 0) {
        snprintf(why, why_len, "%s: the fetcher's request pipe (fd %d) is not open", spec->url, spec->request_fd);
        return -EBADF;
    }
    int fd = open(spec->state_path, O_RDWR | O_CLOEXEC);
    if (fd < 0 || fstat(fd, &st) || fstat(data_fd, &data)) {
        int err = errno;
        snprintf(why, why_len, "%s: block cache state %s: %s", spec->url, spec->state_path, strerror(err));
        if (fd >= 0)
            close(fd);
        return -err;
    }
    void *map = st.st_size >= (off_t)BS_HEADER
                    ? mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
                    : MAP_FAILED;
    close(fd);
    const unsigned char *h = map;
    uint64_t size = (uint64_t)data.st_size, blocks = (size + spec->block_size - 1) / spec->block_size;
    if (map == MAP_FAILED) {
        problem = st.st_size < (off_t)BS_HEADER ? "shorter than its header" : "cannot be mapped";
        map = NULL;
    } else if (memcmp(h, BS_MAGIC, 8) || get32(h + 8) != BS_VERSION) {
        problem = "not a version-1 block state file";
    } else if (get32(h + 12) != spec->block_size) {
        snprintf(detail, sizeof(detail), "block size %u, not %llu", get32(h + 12),
                 (unsigned long long)spec->block_size);
        problem = detail;
    } else if (get64(h + 16) != size || get64(h + 24) != blocks) {
        snprintf(detail, sizeof(detail), "describes %llu bytes in %llu blocks, the cached copy holds %llu bytes",
                 (unsigned long long)get64(h + 16), (unsigned long long)get64(h + 24), (unsigned long long)size);
        problem = detail;
    } else if ((uint64_t)st.st_size - BS_HEADER < blocks * 4) {
        problem = "shorter than its block count";
    }
    struct remote *r = problem ? NULL : calloc(1, sizeof(*r));
    char *url = r ? strdup(spec->url) : NULL;
    if (!url) {
        if (map)
            munmap(map, (size_t)st.st_size);
        free(r);
        if (!problem)
            problem = "out of memory";
        snprintf(why, why_len, "%s: block cache state %s: %s (remove the cache folder and mount again)", spec->url,
                 spec->state_path, problem);
        return -EINVAL;
    }
    r->map = map;
    r->map_len = (size_t)st.st_size;
    r->words = (uint32_t *)((unsigned char *)map + BS_HEADER);
    r->block_size = spec->block_size;
    r->size = size;
    r->blocks = blocks;
    r->request_fd = spec->request_fd;
    r->stuck_ms = spec->stuck_ms > 0 ? spec->stuck_ms : SOURCE_STUCK_MS;
    r->url = url;
    pins_open(r, spec->state_path);
    /* A full pipe must not stall a FUSE thread: writes poll, with a deadline. */
    fcntl(r->request_fd, F_SETFL, fcntl(r->request_fd, F_GETFL) | O_NONBLOCK);
    *out = r;
    return 0;
}

void remote_close(struct remote *r)
{
    if (!r)
        return;
    munmap(r->map, r->map_len);
    if (r->pin_map)
        munmap(r->pin_map, r->pin_map_len);
    free(r->url);
    free(r);
}

const char *remote_url(const struct remote *r) { return r->url; }

static int read_full(int fd, void *buf, size_t len, uint64_t off)
{
    size_t got = 0;
    while (got < len) {
        ssize_t k = pread(fd, (char *)buf + got, len - got, (off_t)(off + got));
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -EIO;
        got += (size_t)k;
    }
    return 0;
}

/* ---- claims and the request pipe ------------------------------------------------------- */
static uint32_t as_filling(uint32_t w) { return (w & ~BS_STATE_MASK) | BS_FILLING; }

/* Give back a claim that was never sent: waiters see ABSENT and claim it again. */
static void unclaim(uint32_t *word, uint32_t mine)
{
    if (bs_cas(word, mine, (mine & ~BS_STATE_MASK) | BS_ABSENT))
        bs_wake(word);
}

/* Hand n (<= CLAIM_BATCH) claimed block numbers to the fetcher in one write (atomic:
 * at most PIPE_BUF bytes). A full pipe is waited on, at most stuck_ms, if patient. */
static int request(struct remote *r, const uint64_t *blocks, size_t n, int patient)
{
    unsigned char msg[8 * CLAIM_BATCH];
    for (size_t i = 0; i < n; i++)
        for (int j = 0; j < 8; j++)
            msg[i * 8 + j] = (unsigned char)(blocks[i] >> (8 * j));
    size_t done = 0, total = n * 8;
    int64_t start = now_ms();
    while (done < total) {
        ssize_t k = write(r->request_fd, msg + done, total - done);
        if (k > 0) {
            done += (size_t)k;
            continue;
        }
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0 && errno == EAGAIN) {
            int64_t left = r->stuck_ms - (now_ms() - start);
            struct pollfd p = {.fd = r->request_fd, .events = POLLOUT};
            if (!patient)
                return -EAGAIN;
            if (left <= 0)
                return -ETIMEDOUT;
            poll(&p, 1, (int)(left < WAIT_SLICE_MS ? left : WAIT_SLICE_MS));
            continue;
        }
        return -EPIPE;
    }
    return 0;
}

/* Claim the ABSENT or FAILED blocks among [first, first + n) (n <= CLAIM_BATCH) and send
 * them; mine[i] notes the blocks this call claimed (NULL: a prefetch, which never waits
 * for room in the pipe). */
static int claim(struct remote *r, uint64_t first, size_t n, uint8_t *mine)
{
    uint64_t won[CLAIM_BATCH];
    uint32_t was[CLAIM_BATCH];
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t *word = &r->words[first + i];
        uint32_t w = bs_load(word);
        int ok = (bs_state(w) == BS_ABSENT || bs_state(w) == BS_FAILED) && bs_cas(word, w, as_filling(w));
        if (mine)
            mine[i] = (uint8_t)ok;
        if (ok) {
            was[k] = as_filling(w);
            won[k++] = first + i;
        }
    }
    int rc = k ? request(r, won, k, mine != NULL) : 0;
    for (size_t i = 0; rc && i < k; i++)
        unclaim(&r->words[won[i]], was[i]);
    return rc;
}

/* Wait until block b is present, then copy n bytes at file offset at into dst. waited:
 * this reader already waits for a fetch of it (claimed it): FAILED then answers EIO.
 * However the word changes, this gives up after 2 x stuck_ms. */
static int read_block(struct remote *r, int fd, uint64_t b, char *dst, size_t n, uint64_t at, int waited)
{
    uint32_t *word = &r->words[b], last = 0;
    int64_t start = now_ms(), since = start;
    int seen_filling = 0;
    for (int round = 0;; round++) {
        if (round && now_ms() - start >= 2 * r->stuck_ms)
            return -ETIMEDOUT;
        uint32_t w = bs_load(word);
        switch (bs_state(w)) {
        case BS_PRESENT: {
            int rc = read_full(fd, dst, n, at);
            if (rc)
                return rc;
            if (bs_load(word) == w)
                return 0;
            continue;  /* evicted while copied: start over */
        }
        case BS_FAILED:
            if (waited)
                return -EIO;
            __attribute__((fallthrough));  /* a new reader fetches it again */
        case BS_ABSENT:
            if (bs_cas(word, w, as_filling(w))) {
                int rc = request(r, &b, 1, 1);
                if (rc) {
                    unclaim(word, as_filling(w));
                    return rc;
                }
            }
            waited = 1;
            continue;
        default: {  /* FILLING: a fetch (or an eviction) is under way */
            int64_t t = now_ms();
            waited = 1;
            if (!seen_filling || w != last) {
                seen_filling = 1;
                last = w;
                since = t;
            }
            if (t - since >= r->stuck_ms) {  /* its filler died: let the next reader fetch it */
                if (bs_cas(word, w, (w & ~BS_STATE_MASK) | BS_ABSENT))
                    bs_wake(word);
                return -ETIMEDOUT;
            }
            long left = r->stuck_ms - (long)(t - since);
            bs_wait(word, w, left < WAIT_SLICE_MS ? left : WAIT_SLICE_MS);
        }
        }
    }
}

#define FAST_BLOCKS 64  /* a read over at most this many blocks, all present, is one pread */

/* Blocks first..last all PRESENT (at most FAST_BLOCKS of them); their words into seen. */
static int all_present(struct remote *r, uint64_t first, uint64_t last, uint32_t *seen)
{
    if (last - first >= FAST_BLOCKS)
        return 0;
    for (uint64_t b = first; b <= last; b++) {
        uint32_t w = bs_load(&r->words[b]);
        if (bs_state(w) != BS_PRESENT)
            return 0;
        if (seen)
            seen[b - first] = w;
    }
    return 1;
}

static int same_words(struct remote *r, uint64_t first, uint64_t last, const uint32_t *seen)
{
    for (uint64_t b = first; b <= last; b++)
        if (bs_load(&r->words[b]) != seen[b - first])
            return 0;
    return 1;
}

static int remote_pread(struct remote *r, int fd, char *buf, size_t len, uint64_t off)
{
    if (off > r->size || len > r->size - off)
        return -EIO;
    if (pinned_len(r, off, len) == len)  /* the index: in the cache for good, no claim */
        return read_full(fd, buf, len, off);
    uint64_t bs = r->block_size, end = off + len;
    uint32_t before[FAST_BLOCKS];
    /* A warm read: one pread for the whole range, as a local DB's (one disk request, not
     * one per block), then the words checked unchanged (no block evicted meanwhile). */
    if (all_present(r, off / bs, (end - 1) / bs, before) && read_full(fd, buf, len, off) == 0 &&
        same_words(r, off / bs, (end - 1) / bs, before))
        return 0;
    uint8_t mine[CLAIM_BATCH];
    uint32_t seen[CLAIM_BATCH];
    /* a window of blocks at a time: all its missing blocks go to the fetcher in one
     * write (one ranged GET for a run), then each is waited for and copied */
    for (uint64_t first = off / bs; first * bs < end; first += CLAIM_BATCH) {
        uint64_t last = (end - 1) / bs;
        size_t n = last - first + 1 > CLAIM_BATCH ? CLAIM_BATCH : (size_t)(last - first + 1), i;
        int rc = claim(r, first, n, mine);
        int64_t claimed_at = now_ms();
        for (i = 0; i < n; i++)
            seen[i] = bs_load(&r->words[first + i]);
        for (i = 0; !rc && i < n; i++) {
            uint64_t lo = (first + i) * bs, hi = lo + bs;
            lo = lo < off ? off : lo;
            hi = hi > end ? end : hi;
            rc = read_block(r, fd, first + i, buf + (lo - off), (size_t)(hi - lo), lo, mine[i]);
        }
        /* A block was stuck: the later ones still FILLING as when this window began have
         * waited as long, for the same lost filler: give them back too. */
        for (; rc == -ETIMEDOUT && i < n && now_ms() - claimed_at >= r->stuck_ms; i++)
            if (bs_state(seen[i]) == BS_FILLING && bs_cas(&r->words[first + i], seen[i],
                                                          (seen[i] & ~BS_STATE_MASK) | BS_ABSENT))
                bs_wake(&r->words[first + i]);
        if (rc)
            return rc;
    }
    return 0;
}

/* ---- the interface --------------------------------------------------------------------- */
int src_pread(const struct source *s, void *buf, size_t len, uint64_t off)
{
    if (len == 0)
        return 0;
    if (s->remote)
        return remote_pread(s->remote, s->fd, buf, len, off);
    return read_full(s->fd, buf, len, off);
}

void src_prefetch(const struct source *s, uint64_t off, uint64_t len)
{
    struct remote *r = s->remote;
    if (!r) {
        posix_fadvise(s->fd, (off_t)off, (off_t)len, POSIX_FADV_WILLNEED);
        return;
    }
    if (len == 0 || off >= r->size)
        return;
    uint64_t end = len > r->size - off ? r->size : off + len;
    /* The runs of blocks already present are read ahead from the cache's disk, as a local
     * DB's file is (no hole of the sparse file is asked for) */
    uint64_t bs = r->block_size, run = UINT64_MAX, last = (end - 1) / bs;
    for (uint64_t b = off / bs; b <= last + 1; b++) {
        int here = b <= last && bs_state(bs_load(&r->words[b])) == BS_PRESENT;
        if (here && run == UINT64_MAX)
            run = b;
        if (!here && run != UINT64_MAX) {
            uint64_t lo = run * bs < off ? off : run * bs, hi = b * bs > end ? end : b * bs;
            posix_fadvise(s->fd, (off_t)lo, (off_t)(hi - lo), POSIX_FADV_WILLNEED);
            run = UINT64_MAX;
        }
    }
    for (uint64_t first = off / bs; first <= last; first += CLAIM_BATCH)
        if (claim(r, first, last - first + 1 > CLAIM_BATCH ? CLAIM_BATCH : (size_t)(last - first + 1), NULL))
            return;  /* the read that follows reports it */
}

size_t src_pinned(const struct source *s, uint64_t off, size_t len)
{
    return s->remote ? (size_t)pinned_len(s->remote, off, len) : len;
}

int src_refetch(const struct source *s, uint64_t off, uint64_t len)
{
    struct remote *r = s->remote;
    if (!r || len == 0 || off >= r->size)
        return 0;
    uint64_t end = len > r->size - off ? r->size : off + len;
    for (uint64_t b = off / r->block_size; b * r->block_size < end; b++) {
        uint32_t *word = &r->words[b], w;
        /* PRESENT -> ABSENT, generation + 1 (the pin kept): the next read fetches it anew,
         * and a reader copying it meanwhile sees the word change */
        while (bs_state(w = bs_load(word)) == BS_PRESENT &&
               !bs_cas(word, w, ((w & ~BS_STATE_MASK) + BS_GEN_ONE) | BS_ABSENT))
            ;
    }
    return 1;
}

const char *src_why(const struct source *s, int rc, char *buf, size_t len)
{
    if (!s->remote)
        return "short read from the DB file";
    const struct remote *r = s->remote;
    if (rc == -ETIMEDOUT)
        snprintf(buf, len, r->stuck_ms % 1000 ? "no block arrived from %s within %ld ms" : "no block arrived from %s within %ld s",
                 r->url, r->stuck_ms % 1000 ? r->stuck_ms : r->stuck_ms / 1000);
    else if (rc == -EPIPE)
        snprintf(buf, len, "the fetcher of %s is gone", r->url);
    else
        snprintf(buf, len, "fetching its bytes from %s failed", r->url);
    return buf;
}
