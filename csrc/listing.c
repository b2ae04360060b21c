/* Directory listings (listing.h). Cookies: 1 and 2 are "." and "..", row or merged entry
 * k is k + 3.
 *
 * A directory of one layer lists its record's rows in order. A directory that several
 * layers contribute to merges each layer's sorted rows (and the folders of prefixes
 * below it) by name; a name in several layers is listed once, with what LOOKUP would
 * answer for it (first layer wins, directories merge). Listing it resumes by counting
 * again from the start: merged directories are few (the root, prefix folders). */
#include "listing.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* One listing entry; returns its size in buf, or 0 when it did not fit. */
static size_t add_entry(fuse_req_t req, char *buf, size_t room, int plus, const char *name, size_t len,
                        struct fuse_entry_param *e, off_t cookie)
{
    char tmp[NAME_MAX_LEN + 1];
    memcpy(tmp, name, len);
    tmp[len] = 0;
    size_t need = plus ? fuse_add_direntry_plus(req, buf, room, tmp, e, cookie)
                       : fuse_add_direntry(req, buf, room, tmp, &e->attr, cookie);
    return need > room ? 0 : need;
}

static int list_single(fuse_req_t req, struct node *dir, int layer, char *buf, size_t size, size_t *pos, off_t off,
                       int plus)
{
    int err = 0;
    struct record *rec = node_record(dir, layer, &err);
    if (!rec)
        return err;
    for (uint64_t i = off > 2 ? (uint64_t)off - 2 : 0; i < rec->count; i++) {
        if (rec->bad[i])
            continue;
        struct hit h = {.layer = layer, .row_i = (uint32_t)i};
        struct fuse_entry_param e;
        row_get(rec, (uint32_t)i, &h.row);
        h.kind = h.row.kind;
        /* a directory's number is its node's, listed or looked up */
        if (h.kind == KIND_DIR && !(h.child = tree_child_single(dir, layer, rec, &h.row, &err)))
            break;
        tree_entry(dir, &h, &e);
        size_t used = add_entry(req, buf + *pos, size - *pos, plus, row_name(rec, &h.row), h.row.name_len, &e,
                                (off_t)i + 3);
        if (!used)
            break;
        *pos += used;
    }
    record_put(rec);
    return *pos ? 0 : err;
}

struct cursor {
    struct record *rec;     /* NULL: a synthetic folder name */
    uint32_t i;
    const char *name;
    size_t len;
    int done;
};

static void cursor_load(struct cursor *c)
{
    if (!c->rec)
        return;
    while (c->i < c->rec->count && c->rec->bad[c->i])
        c->i++;
    if (c->i >= c->rec->count) {
        c->done = 1;
        return;
    }
    struct row r;
    row_get(c->rec, c->i, &r);
    c->name = row_name(c->rec, &r);
    c->len = r.name_len;
}

static void cursor_next(struct cursor *c)
{
    if (!c->rec) {
        c->done = 1;
        return;
    }
    c->i++;
    cursor_load(c);
}

static int cmp(const char *a, size_t alen, const char *b, size_t blen)
{
    int c = memcmp(a, b, alen < blen ? alen : blen);
    return c ? c : (alen > blen) - (alen < blen);
}

static int list_merged(fuse_req_t req, struct node *dir, char *buf, size_t size, size_t *pos, off_t off, int plus)
{
    struct cursor cur[LAYER_MAX];
    int k = 0, err = 0;
    for (int L = 0; L < dir->nlayers; L++) {
        struct cursor *c = &cur[k];
        memset(c, 0, sizeof(*c));
        if (dir->l[L].state == L_SYNTH) {
            synth_name(dir, L, &c->name, &c->len);
            k++;
        } else if (dir->l[L].state == L_PRESENT || dir->l[L].state == L_BAD) {
            c->rec = node_record(dir, L, &err);  /* a damaged layer leaves only its entries out */
            if (c->rec) {
                cursor_load(c);
                k++;
            }
        }
    }
    for (off_t cookie = 3;; cookie++) {
        const char *name = NULL;
        size_t len = 0;
        for (int j = 0; j < k; j++)
            if (!cur[j].done && (!name || cmp(cur[j].name, cur[j].len, name, len) < 0)) {
                name = cur[j].name;
                len = cur[j].len;
            }
        if (!name)
            break;
        char copy[NAME_MAX_LEN + 1];
        memcpy(copy, name, len > NAME_MAX_LEN ? NAME_MAX_LEN : len);
        for (int j = 0; j < k; j++)
            if (!cur[j].done && cmp(cur[j].name, cur[j].len, copy, len) == 0)
                cursor_next(&cur[j]);
        if (cookie <= off)
            continue;
        struct hit h;
        struct fuse_entry_param e;
        if (tree_resolve(dir, copy, len, &h))
            continue;  /* a damaged row: left out */
        tree_entry(dir, &h, &e);
        record_put(h.rec);
        size_t used = add_entry(req, buf + *pos, size - *pos, plus, copy, len, &e, cookie);
        if (!used)
            break;
        *pos += used;
    }
    for (int j = 0; j < k; j++)
        record_put(cur[j].rec);
    return *pos || !err ? 0 : err;
}

int listing_fill(fuse_req_t req, struct node *dir, fuse_ino_t ino, char *buf, size_t size, off_t off, int plus,
                 size_t *used)
{
    size_t pos = 0;
    int single = -1;
    struct fuse_entry_param e;
    memset(&e, 0, sizeof(e));
    e.attr.st_mode = S_IFDIR;
    e.attr.st_ino = ino;
    for (off_t dot = 0; dot < 2; dot++) {
        size_t n;
        if (off <= dot && (n = add_entry(req, buf + pos, size - pos, plus, "..", (size_t)dot + 1, &e, dot + 1)))
            pos += n;
    }
    if (node_sources(dir) == 1)
        for (int i = 0; i < dir->nlayers; i++)
            if (dir->l[i].state == L_PRESENT || dir->l[i].state == L_BAD)
                single = i;
    int err = single >= 0 ? list_single(req, dir, single, buf, size, &pos, off, plus)
                          : list_merged(req, dir, buf, size, &pos, off, plus);
    *used = pos;
    return err && !pos ? err : 0;
}
