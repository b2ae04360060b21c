/* Directory listings (READDIR, READDIRPLUS). */
#ifndef LMDBFS_LISTING_H
#define LMDBFS_LISTING_H

#include "tree.h"

/* Up to size bytes of dir's listing from cookie off into buf (the "." and ".." entries
 * too): 0 with *used set, or a negative errno when nothing could be listed. */
int listing_fill(fuse_req_t req, struct node *dir, fuse_ino_t ino, char *buf, size_t size, off_t off, int plus,
                 size_t *used);

#endif
