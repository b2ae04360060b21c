/* Inode numbers, the only place that knows their layout. There is no table per file:
 * directories get node ids on first sight (tree.c), kept for the daemon's life; every
 * other inode is computed from where its row lies.
 *
 *   directory  ino = node id + 1                                  (root = 1)
 *   other      ino = 1<<63 | node id << 30 | layer << 24 | row
 *
 * so a directory record holds at most ROW_MAX - 1 rows, a mount LAYER_MAX layers and
 * NODE_MAX directories; past these limits requests get EIO (ENOMEM for nodes). */
#ifndef LMDBFS_INODE_H
#define LMDBFS_INODE_H

#include <stdint.h>

#define ROW_BITS 24
#define LAYER_BITS 6
#define NODE_BITS 33
#define ROW_MAX (1u << ROW_BITS)
#define LAYER_MAX (1 << LAYER_BITS)
#define NODE_MAX (1ull << NODE_BITS)
#define FILE_INO_BIT (1ull << 63)
#define NODE_SHIFT (ROW_BITS + LAYER_BITS)

_Static_assert(NODE_SHIFT + NODE_BITS == 63, "a file inode's fields fill the 63 bits below FILE_INO_BIT");

static inline int ino_is_file(uint64_t ino) { return (ino & FILE_INO_BIT) != 0; }

static inline uint64_t ino_of_dir(uint64_t node) { return node + 1; }

/* The node id of a directory inode (UINT64_MAX for 0, which names no node). */
static inline uint64_t ino_dir_node(uint64_t ino) { return ino - 1; }

static inline uint64_t ino_of_file(uint64_t node, int layer, uint32_t row)
{
    return FILE_INO_BIT | node << NODE_SHIFT | (uint64_t)layer << ROW_BITS | row;
}

/* A file or symlink inode's directory node id, layer and row. */
static inline uint64_t ino_file_split(uint64_t ino, int *layer, uint32_t *row)
{
    *layer = (int)((ino >> ROW_BITS) & (LAYER_MAX - 1));
    *row = (uint32_t)(ino & (ROW_MAX - 1));
    return (ino & ~FILE_INO_BIT) >> NODE_SHIFT;
}

#endif
