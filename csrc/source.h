/* Byte sources: where a layer's bytes come from.
 *
 * A local layer reads its DB file with pread. A remote layer (docs/remote.md) reads the
 * sparse local copy of the remote object through its block cache: one u32 word per
 * block in a state file shared with the mount daemon's fetcher (csrc/blocks/blockstate.h).
 * A block that is not there is claimed (FILLING), its number goes to the fetcher through
 * the request pipe, and the reader waits on the word until the fetcher publishes it.
 * Every wait is bounded; a read that cannot be served answers a negative errno.
 */
#ifndef LMDBFS_SOURCE_H
#define LMDBFS_SOURCE_H

#include <stddef.h>
#include <stdint.h>

struct remote;

/* One file a layer reads from; remote is NULL for a plain local file. Every file of a
 * remote layer is the same sparse copy, so they share one remote. */
struct source {
    int fd;
    struct remote *remote;
};

/* What the server is told about a remote layer (the layer dict's "remote"). */
struct remote_spec {
    const char *state_path;  /* the block states, BS_HEADER bytes then a u32 per block */
    const char *url;         /* for log lines only (it carries no secret) */
    uint64_t block_size;
    int request_fd;          /* the fetcher's pipe: 8-byte little-endian block numbers */
    long stuck_ms;           /* a block FILLING this long has lost its filler */
};

#define SOURCE_STUCK_MS 60000L

/* Map spec's state file and check it against the data file (data_fd). 0, or -errno with
 * why filled (the state file is untrusted input: a mismatch refuses the layer). */
int remote_open(struct remote **out, const struct remote_spec *spec, int data_fd, char *why, size_t why_len);
void remote_close(struct remote *r);
const char *remote_url(const struct remote *r);

static inline int src_is_remote(const struct source *s) { return s->remote != NULL; }

/* Exactly len bytes at off into buf: 0, or a negative errno: -EIO (a short read or a
 * failed fetch), -ETIMEDOUT (no block arrived in time), -EPIPE (the fetcher is gone). */
int src_pread(const struct source *s, void *buf, size_t len, uint64_t off);
/* Start bringing [off, off + len) in without waiting: the page cache's readahead for a
 * local file, blocks claimed and sent to the fetcher for a remote one. */
void src_prefetch(const struct source *s, uint64_t off, uint64_t len);
/* How many of the len bytes at off can be read without fetching: all of them for a local
 * file; for a remote one, those on the pinned pages of its index (records' heads). */
size_t src_pinned(const struct source *s, uint64_t off, size_t len);
/* The bytes at [off, off + len) failed their checksum: a remote source drops the blocks
 * there so they are fetched again and answers 1 (read once more); a local one answers 0. */
int src_refetch(const struct source *s, uint64_t off, uint64_t len);
/* A phrase for a failed read (rc from src_pread), for a log line: "short read from the
 * DB file", "no block arrived from URL in 60 s", ... */
const char *src_why(const struct source *s, int rc, char *buf, size_t len);

#endif
