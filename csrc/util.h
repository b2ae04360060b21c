/* Small utilities every part of the server uses. */
#ifndef LMDBFS_UTIL_H
#define LMDBFS_UTIL_H

/* One line on stderr in the format of Python's logging ("... ERROR lmdbfs.fuse.serve: ..."). */
void log_line(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
