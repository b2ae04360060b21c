/* READ, the push of small files at isatty(), and prefetch: a file's bytes located,
 * checked on their first read, and answered. */
#ifndef LMDBFS_READ_H
#define LMDBFS_READ_H

#include "tree.h"

/* Answer a READ of size bytes at off. */
void read_reply(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off);
/* Put a small file's checked bytes into the kernel's page cache (once per daemon), so
 * the READ that would follow is answered there. */
void read_push(fuse_ino_t ino);
/* A file was looked up (or opened: at_open): start reading its value, once per daemon,
 * so the round trips before its first READ overlap the disk's (or the network's) latency. */
void read_prefetch(struct node *n, int layer, struct record *rec, uint32_t row_i, const struct row *r, int at_open);
/* The calling thread's requests are answered in buf (cap bytes: a ring entry's reply
 * buffer), so a READ copies its bytes there once; NULL: none. */
void read_reply_into(void *buf, size_t cap);

#endif
