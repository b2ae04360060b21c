/* Small utilities (util.h). */
#include "util.h"

#include <stdarg.h>
#include <stdio.h>
#include <time.h>

void log_line(const char *level, const char *fmt, ...)
{
    char when[64], msg[1024];
    struct timespec ts;
    struct tm tm;
    va_list ap;
    clock_gettime(CLOCK_REALTIME, &ts);
    localtime_r(&ts.tv_sec, &tm);
    strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S", &tm);
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s,%03ld %s lmdbfs.fuse.serve: %s\n", when, ts.tv_nsec / 1000000, level, msg);
    fflush(stderr);
}
