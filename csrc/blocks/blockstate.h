/* The shared state of a remote DB's local block cache: one 32-bit word per block, in a
 * file that every process using the cache maps MAP_SHARED (the mount daemon's C threads,
 * its Python fetcher, and any `lmdbfs` command reading the same URL). The protocol is
 * described in docs/remote.md ("The block cache"); this header is its only
 * implementation of the atomic steps, included by the FUSE server (csrc/) and by the
 * dependency-free extension lmdbfs._blocks that Python uses.
 *
 *   bits 0-1  state: BS_ABSENT, BS_FILLING (one process fetches or evicts it),
 *             BS_PRESENT (the block's bytes are in the data file), BS_FAILED (the last
 *             fetch failed for good: a waiter answers EIO, a new reader fetches again)
 *   bit  2    BS_PINNED: never evicted (LMDB's index pages and the directory records)
 *   bits 3-31 generation: raised whenever a block stops being present, so a reader that
 *             copied a block while it was evicted sees the word change and retries
 */
#ifndef LMDBFS_BLOCKSTATE_H
#define LMDBFS_BLOCKSTATE_H

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define BS_ABSENT 0u
#define BS_FILLING 1u
#define BS_PRESENT 2u
#define BS_FAILED 3u
#define BS_STATE_MASK 3u
#define BS_PINNED 4u
#define BS_GEN_ONE 8u

#define BS_MAGIC "LMDBFSB1"      /* the state file's first 8 bytes */
#define BS_HEADER 4096u          /* words start here; header: magic, u32 version, u32 block size, u64 object size, u64 blocks */
#define BS_VERSION 1u

static inline uint32_t bs_state(uint32_t w) { return w & BS_STATE_MASK; }

static inline uint32_t bs_load(const uint32_t *word) { return __atomic_load_n(word, __ATOMIC_ACQUIRE); }

static inline void bs_store(uint32_t *word, uint32_t v) { __atomic_store_n(word, v, __ATOMIC_RELEASE); }

/* 1 if *word was expect and is now desired. */
static inline int bs_cas(uint32_t *word, uint32_t expect, uint32_t desired)
{
    return __atomic_compare_exchange_n(word, &expect, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* Sleep while *word == seen, at most timeout_ms (shared futex: works across processes
 * that map the same file). 0 woken or changed, -ETIMEDOUT, -EINTR. */
static inline int bs_wait(uint32_t *word, uint32_t seen, long timeout_ms)
{
    struct timespec ts = {timeout_ms / 1000, (timeout_ms % 1000) * 1000000L};
    long rc = syscall(SYS_futex, word, FUTEX_WAIT, seen, &ts, NULL, 0);
    if (rc == 0 || errno == EAGAIN)
        return 0;
    return -errno;
}

static inline void bs_wake(uint32_t *word) { syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0); }

/* A filled block becomes present: keeps the pin, the generation it had. */
static inline void bs_publish(uint32_t *word, uint32_t claimed)
{
    bs_store(word, (claimed & ~BS_STATE_MASK) | BS_PRESENT);
    bs_wake(word);
}

#endif
