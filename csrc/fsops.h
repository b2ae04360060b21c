/* The FUSE requests: libfuse's low-level handlers, all named lo_*. */
#ifndef LMDBFS_FSOPS_H
#define LMDBFS_FSOPS_H

#include "serve.h"

extern const struct fuse_lowlevel_ops lo_ops;

#endif
