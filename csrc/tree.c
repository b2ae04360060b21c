/* The merged tree (tree.h): directory nodes (ids handed out on first sight, never freed:
 * bounded by the number of directories), the byte-bounded LRU cache of directory records,
 * name resolution across layers, attributes and FUSE entries. */
#include "tree.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define CHUNK_BITS 17
#define CHUNKS (1u << (NODE_BITS - CHUNK_BITS))

static struct node **chunks[CHUNKS];
static uint64_t node_count;            /* atomic: ids below it are readable without a lock */
static pthread_mutex_t tree_lock = PTHREAD_MUTEX_INITIALIZER;
static struct node **buckets;
static size_t nbuckets;

static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;
static struct record *lru_head, *lru_tail;
static size_t cache_used;

struct node *node_get(uint64_t id)
{
    if (id >= __atomic_load_n(&node_count, __ATOMIC_ACQUIRE))
        return NULL;
    return chunks[id >> CHUNK_BITS][id & ((1u << CHUNK_BITS) - 1)];
}

static size_t hash_of(uint64_t parent, const char *name, size_t len)
{
    uint64_t h = 1469598103934665603ull ^ parent;
    for (size_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)name[i]) * 1099511628211ull;
    return (size_t)h;
}

static struct node *find_locked(uint64_t parent, const char *name, size_t len)
{
    for (struct node *n = buckets[hash_of(parent, name, len) & (nbuckets - 1)]; n; n = n->hnext)
        if (n->parent == parent && n->path_len - n->name_off == len && !memcmp(n->path + n->name_off, name, len))
            return n;
    return NULL;
}

static int grow_locked(void)
{
    size_t size = nbuckets ? nbuckets * 2 : 1024;
    struct node **nb = calloc(size, sizeof(*nb));
    if (!nb)
        return -ENOMEM;
    for (size_t i = 0; i < nbuckets; i++) {
        for (struct node *n = buckets[i], *next; n; n = next) {
            next = n->hnext;
            size_t h = hash_of(n->parent, n->path + n->name_off, n->path_len - n->name_off) & (size - 1);
            n->hnext = nb[h];
            nb[h] = n;
        }
    }
    free(buckets);
    buckets = nb;
    nbuckets = size;
    return 0;
}

/* A new node under parent (NULL: the root) with its layers' states; attributes set by caller. */
static struct node *node_new_locked(struct node *parent, const char *name, size_t len, const uint8_t *states)
{
    uint64_t id = node_count;
    if (id >= NODE_MAX || ((id + 1) * 2 > nbuckets * 3 && grow_locked()))
        return NULL;
    size_t plen = parent ? parent->path_len + (parent->path_len ? 1 : 0) + len : 0;
    struct node *n = calloc(1, sizeof(*n) + (size_t)srv.nlayers * sizeof(struct lnode));
    char *path = malloc(plen + 1);
    struct node **chunk = chunks[id >> CHUNK_BITS];
    if (!chunk)
        chunk = chunks[id >> CHUNK_BITS] = calloc(1u << CHUNK_BITS, sizeof(*chunk));
    if (!n || !path || !chunk) {
        free(n);
        free(path);
        return NULL;
    }
    if (parent) {
        memcpy(path, parent->path, parent->path_len);
        if (parent->path_len)
            path[parent->path_len] = '/';
        memcpy(path + plen - len, name, len);
    }
    path[plen] = 0;
    n->id = id;
    n->parent = parent ? parent->id : 0;
    n->path = path;
    n->path_len = (uint32_t)plen;
    n->name_off = (uint32_t)(plen - len);
    n->nlayers = srv.nlayers;
    for (int i = 0; i < srv.nlayers; i++)
        n->l[i].state = states[i];
    chunk[id & ((1u << CHUNK_BITS) - 1)] = n;
    if (parent) {
        size_t h = hash_of(n->parent, name, len) & (nbuckets - 1);
        n->hnext = buckets[h];
        buckets[h] = n;
    }
    __atomic_store_n(&node_count, id + 1, __ATOMIC_RELEASE);
    return n;
}

int node_sources(struct node *n)
{
    int k = 0;
    for (int i = 0; i < n->nlayers; i++)
        k += n->l[i].state != L_NONE;
    return k;
}

void layer_rel(const struct node *n, int layer, const char **rel, size_t *len)
{
    size_t skip = srv.layers[layer].prefix_len;
    if (skip && n->path_len > skip)
        skip++;
    *rel = n->path + skip;
    *len = n->path_len - skip;
}

/* ---- record cache --------------------------------------------------------------------- */
static void lru_unlink(struct record *r)
{
    if (r->prev) r->prev->next = r->next; else lru_head = r->next;
    if (r->next) r->next->prev = r->prev; else lru_tail = r->prev;
    r->prev = r->next = NULL;
}

static void lru_front(struct record *r)
{
    r->next = lru_head;
    r->prev = NULL;
    if (lru_head) lru_head->prev = r; else lru_tail = r;
    lru_head = r;
}

void record_put(struct record *rec)
{
    if (rec && __atomic_sub_fetch(&rec->refs, 1, __ATOMIC_ACQ_REL) == 0)
        record_free(rec);
}

static void mark_bad(struct node *n, int layer, const char *why)
{
    pthread_mutex_lock(&cache_lock);
    int first = n->l[layer].state != L_BAD;
    n->l[layer].state = L_BAD;
    pthread_mutex_unlock(&cache_lock);
    if (first)
        log_line("ERROR", "EIO for directory '%s' (layer %d): %s — re-pack the DB", n->path, layer, why);
}

struct record *node_record(struct node *n, int layer, int *err)
{
    struct lnode *ln = &n->l[layer];
    pthread_mutex_lock(&cache_lock);
    struct record *rec = ln->rec;
    if (rec) {
        __atomic_add_fetch(&rec->refs, 1, __ATOMIC_RELAXED);
        lru_unlink(rec);
        lru_front(rec);
    }
    int state = ln->state;
    pthread_mutex_unlock(&cache_lock);
    if (rec)
        return rec;
    if (state != L_PRESENT) {
        *err = state == L_BAD ? -EIO : -ENOENT;
        return NULL;
    }
    const char *rel;
    size_t len;
    const unsigned char *raw;
    size_t raw_len, raw_total;
    uint64_t raw_off;
    char why[200];
    layer_rel(n, layer, &rel, &len);
    int rc = layer_fetch_record(&srv.layers[layer], rel, len, __atomic_load_n(&ln->head_len, __ATOMIC_RELAXED), &raw,
                                &raw_len, &raw_total, &raw_off);
    if (rc == -ENOENT || rc == -EFBIG) {
        mark_bad(n, layer, rc == -EFBIG ? "its record is larger than 256 MiB" : "listed, but its record is missing");
        *err = -EIO;
        return NULL;
    }
    if (rc) {
        *err = rc == -ENOMEM ? -ENOMEM : -EIO;
        return NULL;
    }
    rec = record_parse(raw, raw_len, raw_total, raw_off, rel, len, &srv.layers[layer], why, sizeof(why));
    layer_record_done();
    if (!rec) {
        mark_bad(n, layer, why);
        *err = -EIO;
        return NULL;
    }
    /* The first fetch of a version-4 record read its head only: the inline bytes after it
     * go to the page cache's readahead, as one request, instead of one small read per
     * file when each is opened. Not on a remote layer: a walk must fetch nothing (its
     * files' LOOKUPs prefetch them). */
    if (!__atomic_exchange_n(&ln->head_len, (uint32_t)raw_len, __ATOMIC_RELAXED) && raw_total > raw_len &&
        !srv.layers[layer].remote)
        src_prefetch(&srv.layers[layer].env_src, raw_off + raw_len, raw_total - raw_len);
    rec->owner = n;
    rec->layer = layer;
    pthread_mutex_lock(&cache_lock);
    if (ln->rec) {  /* another thread was quicker */
        record_free(rec);
        rec = ln->rec;
    } else {
        ln->rec = rec;  /* the cache's reference */
        cache_used += rec->nbytes;
        lru_front(rec);
        /* evict the least recent; the newest stays even when larger than the whole cache */
        while (cache_used > srv.cache_max && lru_tail && lru_tail != rec) {
            struct record *old = lru_tail;
            lru_unlink(old);
            old->owner->l[old->layer].rec = NULL;
            cache_used -= old->nbytes;
            record_put(old);
        }
    }
    __atomic_add_fetch(&rec->refs, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&cache_lock);
    return rec;
}

/* ---- attributes ----------------------------------------------------------------------- */
static void fill_times(struct stat *st, int64_t ns)
{
    int64_t sec = ns / 1000000000, rem = ns % 1000000000;
    if (rem < 0) {
        rem += 1000000000;
        sec--;
    }
    st->st_atim.tv_sec = st->st_mtim.tv_sec = st->st_ctim.tv_sec = sec;
    st->st_atim.tv_nsec = st->st_mtim.tv_nsec = st->st_ctim.tv_nsec = rem;
}

void stat_dir(const struct node *n, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = ino_of_dir(n->id);
    st->st_mode = S_IFDIR | (n->mode & 07555);
    st->st_nlink = n->nlink;
    st->st_uid = srv.uid;
    st->st_gid = srv.gid;
    st->st_blksize = 1 << 20;
    fill_times(st, n->mtime_ns);
}

void stat_row(const struct row *r, uint64_t ino, struct stat *st)
{
    static const mode_t types[4] = {0, S_IFREG, S_IFDIR, S_IFLNK};
    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    st->st_mode = types[r->kind & 3] | (r->mode & 07555);
    st->st_nlink = r->kind == KIND_DIR ? 2 + (r->checksum > 0xffffffffu ? 0xffffffffu : r->checksum) : 1;
    st->st_size = (off_t)(r->size > INT64_MAX ? INT64_MAX : r->size);
    st->st_blocks = (blkcnt_t)((r->size > INT64_MAX - 511 ? INT64_MAX : r->size + 511) / 512);
    st->st_uid = srv.uid;
    st->st_gid = srv.gid;
    st->st_blksize = 1 << 20;
    fill_times(st, r->mtime_ns);
}

void synth_name(const struct node *dir, int layer, const char **name, size_t *len)
{
    const struct layer *ly = &srv.layers[layer];
    const char *p = ly->prefix + dir->path_len + (dir->path_len ? 1 : 0);
    const char *slash = memchr(p, '/', ly->prefix_len - (size_t)(p - ly->prefix));
    *name = p;
    *len = slash ? (size_t)(slash - p) : ly->prefix_len - (size_t)(p - ly->prefix);
}

/* Attributes of a new directory node from its first layer; several layers: nlink 1 ("unknown"). */
static int dir_attrs(struct node *n, const uint8_t *states, const struct row *first_row, int first)
{
    int sources = 0, err = 0;
    for (int i = 0; i < srv.nlayers; i++)
        sources += states[i] != L_NONE;
    const struct layer *ly = &srv.layers[first];
    if (first_row) {
        n->mode = first_row->mode;
        n->mtime_ns = first_row->mtime_ns;
        n->nlink = 2 + (first_row->checksum > 0xffffffffu ? 0xffffffffu : first_row->checksum);
    } else if (states[first] == L_SYNTH) {
        n->mode = 0555;
        n->mtime_ns = ly->root_mtime_ns;
        n->nlink = 3;
    } else {  /* a layer's own root */
        n->mode = ly->root_mode;
        n->mtime_ns = ly->root_mtime_ns;
        struct record *rec = node_record(n, first, &err);
        n->nlink = 2 + (rec ? rec->subdirs : 0);
        record_put(rec);
    }
    n->mode = S_IFDIR | (n->mode & 07777);
    if (sources > 1)
        n->nlink = 1;
    return 0;
}

int tree_init(void)
{
    uint8_t states[LAYER_MAX];
    int first = -1;
    for (int i = 0; i < srv.nlayers; i++) {
        states[i] = srv.layers[i].prefix_len ? L_SYNTH : L_PRESENT;
        if (first < 0)
            first = i;
    }
    pthread_mutex_lock(&tree_lock);
    struct node *root = grow_locked() ? NULL : node_new_locked(NULL, "", 0, states);
    pthread_mutex_unlock(&tree_lock);
    if (!root)
        return -ENOMEM;
    return dir_attrs(root, states, NULL, first);
}

static struct node *child_get(struct node *dir, const char *name, size_t len, const uint8_t *states,
                              const struct row *first_row, int first, int *err)
{
    pthread_mutex_lock(&tree_lock);
    struct node *n = find_locked(dir->id, name, len);
    int fresh = 0;
    if (!n) {
        n = node_new_locked(dir, name, len, states);
        fresh = 1;
    }
    if (fresh && n) {
        /* attributes before anyone can see the node: other threads find it only by id */
        dir_attrs(n, states, first_row, first);
    }
    pthread_mutex_unlock(&tree_lock);
    if (!n)
        *err = -ENOMEM;
    return n;
}

struct node *tree_child_single(struct node *dir, int layer, const struct record *rec, const struct row *r, int *err)
{
    uint8_t states[LAYER_MAX] = {0};
    states[layer] = L_PRESENT;
    return child_get(dir, row_name(rec, r), r->name_len, states, r, layer, err);
}

int tree_resolve(struct node *dir, const char *name, size_t len, struct hit *out)
{
    uint8_t states[LAYER_MAX] = {0};
    struct row first_row;
    int first = -1, have_row = 0, err = 0;
    for (int L = 0; L < dir->nlayers; L++) {
        int state = dir->l[L].state;
        if (state == L_SYNTH) {
            const char *s;
            size_t slen;
            synth_name(dir, L, &s, &slen);
            if (slen != len || memcmp(s, name, len))
                continue;
            size_t child_len = dir->path_len + (dir->path_len ? 1 : 0) + len;
            states[L] = srv.layers[L].prefix_len == child_len ? L_PRESENT : L_SYNTH;
            if (first < 0)
                first = L;
            continue;
        }
        if (state == L_NONE)
            continue;
        struct record *rec = node_record(dir, L, &err);
        if (!rec)
            return err;
        long i = record_find(rec, name, len);
        if (i < 0) {
            record_put(rec);
            continue;
        }
        struct row r;
        row_get(rec, (uint32_t)i, &r);
        if (first < 0 && rec->bad[i]) {
            record_put(rec);
            return -EIO;
        }
        if (r.kind != KIND_DIR || rec->bad[i]) {
            if (first < 0) {  /* a file or symlink: the first layer holding the name wins */
                out->kind = r.kind;
                out->layer = L;
                out->row_i = (uint32_t)i;
                out->row = r;
                out->rec = rec;
                out->child = NULL;
                return 0;
            }
            record_put(rec);
            continue;
        }
        states[L] = L_PRESENT;
        if (first < 0) {
            first = L;
            first_row = r;
            have_row = 1;
        }
        record_put(rec);
    }
    if (first < 0)
        return -ENOENT;
    out->kind = KIND_DIR;
    out->rec = NULL;
    out->child = child_get(dir, name, len, states, have_row ? &first_row : NULL, first, &err);
    return out->child ? 0 : err;
}

/* ---- inodes ----------------------------------------------------------------------------- */
struct node *tree_dir(fuse_ino_t ino)
{
    return ino_is_file(ino) ? NULL : node_get(ino_dir_node(ino));
}

struct node *tree_file_node(fuse_ino_t ino, int *layer, uint32_t *row_i)
{
    return node_get(ino_file_split(ino, layer, row_i));
}

int tree_file(fuse_ino_t ino, struct node **n, int *layer, uint32_t *row_i, struct row *r, struct record **rec)
{
    int err = 0;
    *n = tree_file_node(ino, layer, row_i);
    if (!*n || *layer >= srv.nlayers)
        return -ENOENT;
    *rec = node_record(*n, *layer, &err);
    if (!*rec)
        return err;
    if (*row_i >= (*rec)->count || (*rec)->bad[*row_i]) {
        record_put(*rec);
        return -EIO;
    }
    row_get(*rec, *row_i, r);
    return 0;
}

void tree_entry(const struct node *dir, const struct hit *h, struct fuse_entry_param *e)
{
    memset(e, 0, sizeof(*e));
    e->attr_timeout = e->entry_timeout = srv.timeout;
    if (h->kind == KIND_DIR) {
        e->ino = ino_of_dir(h->child->id);
        stat_dir(h->child, &e->attr);
    } else {
        e->ino = ino_of_file(dir->id, h->layer, h->row_i);
        stat_row(&h->row, e->ino, &e->attr);
    }
}

void tree_free(void)
{
    struct node *n;
    for (uint64_t id = 0; (n = node_get(id)); id++) {
        for (int i = 0; i < n->nlayers; i++) {
            record_free(n->l[i].rec);
            free(n->l[i].bits);
        }
        free(n->path);
        free(n);
    }
    for (size_t c = 0; c < CHUNKS; c++) {
        free(chunks[c]);
        chunks[c] = NULL;
    }
    free(buckets);
    buckets = NULL;
    nbuckets = 0;
    node_count = 0;
    lru_head = lru_tail = NULL;
    cache_used = 0;
}
