/* lmdbfs._serve: the FUSE server in C (libfuse3 low-level API, multithreaded).
 *
 * Python validates each DB (meta record, index present) and hands this module a list of
 * LAYERS; the server then answers every request without the GIL. One layer is one packed
 * DB shown under a folder (prefix) of the mounted tree; directories present in several
 * layers merge, and for any other name the first layer holding it wins.
 *
 * One concept per header (docs/serving.md has the table): inode.h inode numbers,
 * record.h directory records, source.h byte sources, layer.h one DB, tree.h directory
 * nodes and the record cache, listing.h directory listings, read.h READ and the push,
 * fsops.h the FUSE requests, uring.h FUSE over io_uring, util.h log lines; module.c is
 * the Python binding. Calls go down that list, never back up. Errors are negative errno
 * values everywhere; a FUSE reply negates them once.
 *
 * This header holds what every part shares: the server's settings (filled by module.c).
 */
#ifndef LMDBFS_SERVE_H
#define LMDBFS_SERVE_H

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "inode.h"
#include "layer.h"
#include "record.h"
#include "util.h"

#define HASH_CHUNK (1u << 20)    /* verification reads and hashes in steps this large */

struct server {
    struct layer *layers;
    int nlayers;
    int verify;
    uid_t uid;
    gid_t gid;
    size_t cache_max;
    unsigned max_background, congestion;
    int notify_fd;
    uint64_t statfs_blocks, statfs_files;
    double timeout;
    struct fuse_session *se;     /* for notifications (pushing a file's pages) */
    uint64_t push_max;           /* files up to this size are pushed at their first isatty() */
};

extern struct server srv;

#endif
