/* FUSE over io_uring where the kernel offers it (docs/serving.md). */
#ifndef LMDBFS_URING_H
#define LMDBFS_URING_H

#include "serve.h"

int uring_start(struct fuse_session *se, int threads);
void uring_stop(void);

#endif
