/* Listing a directory that several layers contribute to: each layer's sorted rows (and
 * the folders of prefixes below it) are merged by name; a name in several layers is
 * listed once, with what `lookup` would answer for it (first layer wins, directories
 * merge). Entry k of the merged order has cookie k + 3, so listing resumes by counting
 * again from the start: merged directories are few (the root, prefix folders). */
#include "serve.h"

#include <errno.h>
#include <string.h>

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

int list_merged(fuse_req_t req, struct node *dir, char *buf, size_t size, size_t *pos, off_t off, int plus)
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
        memset(&e, 0, sizeof(e));
        e.attr_timeout = e.entry_timeout = srv.timeout;
        if (h.kind == KIND_DIR) {
            e.ino = h.child->id + 1;
            stat_dir(h.child, &e.attr);
        } else {
            e.ino = file_ino(dir->id, h.layer, h.row_i);
            stat_row(&h.row, e.ino, &e.attr);
        }
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
