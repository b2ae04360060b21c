/* FUSE over io_uring (Linux 6.14+, where an administrator has set the fuse module's
 * enable_uring=Y): requests arrive in buffers this daemon registered with the kernel, one
 * queue per CPU, and a reply is committed together with the fetch of the next request,
 * so there is no read(2) or write(2) on /dev/fuse per request.
 *
 * libfuse 3.14 does not know the protocol, so it is spoken here around it: libfuse still
 * mounts, answers INIT, and serves /dev/fuse (FORGET and INTERRUPT always come that
 * way); its custom-io hooks let this file offer io_uring in the INIT reply (only when
 * the kernel offered it) and route a reply to the ring entry whose request the calling
 * thread is working on. Each ring thread owns one io_uring and one entry of its queue.
 * A request is rebuilt in /dev/fuse's layout and handed to fuse_session_process_buf, so
 * every handler is the same code on both paths.
 *
 * Anything that fails before the kernel uses the rings leaves the mount on /dev/fuse: a
 * failed REGISTER makes the kernel drop io_uring for the connection. */
#define _GNU_SOURCE
#include "uring.h"

#include "read.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* The kernel's ABI (include/uapi/linux/fuse.h, protocol 7.42); Debian 12's headers
 * predate it. */
#define U_FUSE_INIT 26
#define U_FUSE_INIT_EXT (1u << 30)
#define U_FUSE_OVER_IO_URING_HI (1u << 9) /* bit 41, in flags2 */
#define U_CMD_REGISTER 1
#define U_CMD_COMMIT_AND_FETCH 2

struct u_in_header {
    uint32_t len, opcode;
    uint64_t unique, nodeid;
    uint32_t uid, gid, pid;
    uint16_t total_extlen, padding;
};

struct u_out_header {
    uint32_t len;
    int32_t error;
    uint64_t unique;
};

struct u_ent_in_out {
    uint64_t flags, commit_id;
    uint32_t payload_sz, padding;
    uint64_t reserved;
};

struct u_req_header {
    char in_out[128];
    char op_in[128];
    struct u_ent_in_out ent;
};

struct u_cmd_req {
    uint64_t flags, commit_id;
    uint16_t qid;
    uint8_t padding[6];
};

#define PAYLOAD_MAX (1u << 20) /* max_pages (256) pages: the largest reply libfuse allows */

struct rthread {
    pthread_t tid;
    int qid, created;
    uint64_t unique;  /* of the request being served */
    struct io_uring ring;
    struct u_req_header *hdr;
    unsigned char *payload, *req;
    struct iovec iov[2];
    int replied;
};

static struct {
    struct fuse_session *se;
    int fd;
    int nq, n;
    struct rthread *t;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int ready_count, failed, go, stopping;
    uint64_t init_unique;
    int offered;
} u = {.lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER, .fd = -1};

static __thread struct rthread *cur;

/* ---- libfuse's custom io: plain /dev/fuse, plus the INIT offer and ring replies ---- */

static ssize_t io_read(int fd, void *buf, size_t len, void *userdata)
{
    (void)userdata;
    ssize_t res = read(fd, buf, len);
    if (res >= (ssize_t)(sizeof(struct u_in_header) + 20)) {
        const struct u_in_header *ih = buf;
        if (ih->opcode == U_FUSE_INIT) {
            uint32_t f[5];
            memcpy(f, (const char *)buf + sizeof(*ih), sizeof(f)); /* major minor readahead flags flags2 */
            u.offered = (f[3] & U_FUSE_INIT_EXT) && (f[4] & U_FUSE_OVER_IO_URING_HI);
            u.init_unique = ih->unique;
        }
    }
    return res;
}

static ssize_t ring_reply(struct rthread *t, const struct iovec *iov, int count)
{
    struct u_out_header oh;
    if (count < 1 || iov[0].iov_len != sizeof(oh)) {
        errno = EINVAL;
        return -1;
    }
    memcpy(&oh, iov[0].iov_base, sizeof(oh));
    size_t off = 0;
    for (int i = 1; i < count; i++) {
        if (iov[i].iov_len > PAYLOAD_MAX - off) { /* cannot happen: replies fit max_pages */
            oh.error = -EIO;
            off = 0;
            break;
        }
        if (iov[i].iov_base != t->payload + off) /* may overlap: bytes checked in place */
            memmove(t->payload + off, iov[i].iov_base, iov[i].iov_len);
        off += iov[i].iov_len;
    }
    oh.len = (uint32_t)(sizeof(oh) + off);
    memcpy(t->hdr->in_out, &oh, sizeof(oh));
    t->hdr->ent.payload_sz = (uint32_t)off;
    t->replied = 1;
    return (ssize_t)oh.len;
}

static ssize_t io_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    (void)userdata;
    if (cur && count >= 1 && iov[0].iov_len == sizeof(struct u_out_header)) {
        /* the reply to the ring's request goes to the ring; another (libfuse answering
         * an INTERRUPT that arrived first, say) to /dev/fuse, where its request came from */
        struct u_out_header oh;
        memcpy(&oh, iov[0].iov_base, sizeof(oh));
        if (oh.unique == cur->unique)
            return ring_reply(cur, iov, count);
    }
    int init = 0;
    if (u.offered && count >= 2 && iov[0].iov_len == sizeof(struct u_out_header) && iov[1].iov_len >= 36) {
        struct u_out_header oh;
        memcpy(&oh, iov[0].iov_base, sizeof(oh));
        if (oh.unique == u.init_unique && oh.error == 0) {
            uint32_t *out = iov[1].iov_base; /* fuse_init_out: flags at 12, flags2 at 32 */
            out[3] |= U_FUSE_INIT_EXT;
            out[8] |= U_FUSE_OVER_IO_URING_HI;
            init = 1;
        }
    }
    ssize_t res = writev(fd, iov, count);
    if (init && res >= 0) { /* the kernel has taken INIT: the rings may register now */
        log_line("INFO", "serving through FUSE over io_uring: %d rings on %d per-CPU queues", u.n, u.nq);
        pthread_mutex_lock(&u.lock);
        u.go = 1;
        pthread_cond_broadcast(&u.cond);
        pthread_mutex_unlock(&u.lock);
    }
    return res;
}

static ssize_t io_splice_send(int fdin, off_t *offin, int fdout, off_t *offout, size_t len, unsigned int flags,
                              void *userdata)
{
    (void)userdata;
    return splice(fdin, offin, fdout, offout, len, flags);
}

static const struct fuse_custom_io custom_io = {
    .writev = io_writev,
    .read = io_read,
    .splice_send = io_splice_send,
};

/* ---- the ring threads -------------------------------------------------------------- */

static void prep_cmd(struct rthread *t, struct io_uring_sqe *sqe, uint32_t op, uint64_t commit_id)
{
    memset(sqe, 0, 128);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = u.fd;
    sqe->cmd_op = op;
    sqe->addr = (uint64_t)(uintptr_t)t->iov;
    sqe->len = 2;
    sqe->user_data = (uint64_t)(uintptr_t)t;
    struct u_cmd_req cmd = {.commit_id = commit_id, .qid = (uint16_t)t->qid};
    memcpy(sqe->cmd, &cmd, sizeof(cmd));
}

/* A ring thread runs on its queue's CPU, where the kernel queues the requests of the
 * readers running there: a reader's wake-up of the thread, and the thread's of the
 * reader, then stay on one CPU instead of crossing to another. Left unpinned when that
 * CPU is outside the process's allowed set (taskset, a cgroup's cpuset). */
static void pin_to_queue(int cpu)
{
    cpu_set_t allowed, one;
    if (sched_getaffinity(0, sizeof(allowed), &allowed) || cpu >= CPU_SETSIZE || !CPU_ISSET(cpu, &allowed))
        return;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    pthread_setaffinity_np(pthread_self(), sizeof(one), &one);
}

/* One request from the ring, in /dev/fuse's layout, through libfuse to the handlers. */
static void serve_one(struct rthread *t)
{
    struct u_in_header ih;
    memcpy(&ih, t->hdr->in_out, sizeof(ih));
    size_t payload = t->hdr->ent.payload_sz;
    size_t op = ih.len - sizeof(ih) - payload; /* the kernel counts its op header in len */
    t->replied = 0;
    if (ih.len < sizeof(ih) + payload || op > sizeof(t->hdr->op_in) || payload > PAYLOAD_MAX) {
        struct u_out_header oh = {.len = sizeof(oh), .error = -EIO, .unique = ih.unique};
        memcpy(t->hdr->in_out, &oh, sizeof(oh));
        t->hdr->ent.payload_sz = 0;
        return;
    }
    t->unique = ih.unique;
    memcpy(t->req, &ih, sizeof(ih));
    memcpy(t->req + sizeof(ih), t->hdr->op_in, op);
    memcpy(t->req + sizeof(ih) + op, t->payload, payload);
    struct fuse_buf fb = {.size = ih.len, .mem = t->req};
    cur = t;
    read_reply_into(t->payload, PAYLOAD_MAX);  /* READ copies its bytes straight into the entry */
    fuse_session_process_buf(u.se, &fb);
    read_reply_into(NULL, 0);
    cur = NULL;
    if (!t->replied) { /* every request on a ring wants an answer */
        struct u_out_header oh = {.len = sizeof(oh), .error = -EIO, .unique = ih.unique};
        memcpy(t->hdr->in_out, &oh, sizeof(oh));
        t->hdr->ent.payload_sz = 0;
    }
}

static void report(int ok)
{
    pthread_mutex_lock(&u.lock);
    if (ok)
        u.ready_count++;
    else
        u.failed = 1;
    pthread_cond_broadcast(&u.cond);
    pthread_mutex_unlock(&u.lock);
}

static void *ring_main(void *arg)
{
    struct rthread *t = arg;
    pthread_setname_np(pthread_self(), "lmdbfs-ring");
    pin_to_queue(t->qid);
    /* SCHED_IDLE: a CPU running only such threads counts as idle when the scheduler
     * places a woken task, so the reader a reply wakes resumes on its own CPU (its data
     * in that CPU's cache) and preempts this thread, which has only its next wait left,
     * instead of being moved to the other CPU and sending its next request to the other
     * ring. One reader of a warm tree: 2-3x the files/s (docs/benchmarks.md, finding 20). */
    struct sched_param sp = {0};
    pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp);
    struct io_uring_params p = {.flags = IORING_SETUP_SQE128 | IORING_SETUP_SINGLE_ISSUER |
                                         IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_COOP_TASKRUN};
    if (io_uring_queue_init_params(4, &t->ring, &p) < 0) {
        p.flags = IORING_SETUP_SQE128;
        if (io_uring_queue_init_params(4, &t->ring, &p) < 0) {
            report(0);
            return NULL;
        }
    }
    report(1);
    pthread_mutex_lock(&u.lock);
    while (!u.go && !u.stopping)
        pthread_cond_wait(&u.cond, &u.lock);
    pthread_mutex_unlock(&u.lock);
    uint32_t op = U_CMD_REGISTER;
    uint64_t commit = 0;
    struct __kernel_timespec wait = {.tv_sec = 1};
    int submit = 1;
    while (!__atomic_load_n(&u.stopping, __ATOMIC_RELAXED)) {
        if (submit) {
            struct io_uring_sqe *sqe = io_uring_get_sqe(&t->ring);
            if (!sqe)
                break;
            prep_cmd(t, sqe, op, commit);
            submit = 0;
        }
        struct io_uring_cqe *cqe = NULL;
        int rc = io_uring_submit_and_wait_timeout(&t->ring, &cqe, 1, &wait, NULL);
        if (rc == -ETIME || rc == -EINTR || (rc >= 0 && !cqe))
            continue;
        if (rc < 0)
            break;
        int res = cqe->res;
        io_uring_cqe_seen(&t->ring, cqe);
        if (res == -EAGAIN && op == U_CMD_REGISTER) { /* INIT not processed yet */
            usleep(1000);
            submit = 1;
            continue;
        }
        if (res < 0) { /* ENOTCONN: unmounted; a failed REGISTER: the kernel keeps /dev/fuse */
            if (op == U_CMD_REGISTER && res != -ENOTCONN && res != -ECONNABORTED)
                log_line("WARNING", "io_uring: the kernel refused a ring (%s); serving through /dev/fuse",
                         strerror(-res));
            break;
        }
        serve_one(t);
        op = U_CMD_COMMIT_AND_FETCH;
        commit = t->hdr->ent.commit_id;
        submit = 1;
    }
    io_uring_queue_exit(&t->ring);
    return NULL;
}

static int possible_cpus(void)
{
    FILE *f = fopen("/sys/devices/system/cpu/possible", "r");
    int count = 0;
    if (!f)
        return 0;
    char line[4096];
    if (fgets(line, sizeof(line), f)) {
        for (char *s = line; *s && *s != '\n';) {
            char *end;
            long a = strtol(s, &end, 10), b = a;
            if (end == s)
                break;
            if (*end == '-')
                b = strtol(end + 1, &end, 10);
            count += (int)(b - a + 1);
            s = *end == ',' ? end + 1 : end;
        }
    }
    fclose(f);
    return count;
}

/* The kernel offers io_uring only where the fuse module's enable_uring is on. */
static int uring_enabled(void)
{
    char c = 0;
    int fd = open("/sys/module/fuse/parameters/enable_uring", O_RDONLY);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, &c, 1);
    close(fd);
    return n == 1 && (c == 'Y' || c == 'y' || c == '1');
}

static void free_threads(void)
{
    for (int i = 0; i < u.n; i++) {
        free(u.t[i].hdr);
        free(u.t[i].payload);
        free(u.t[i].req);
    }
    free(u.t);
    u.t = NULL;
    u.n = 0;
}

void uring_stop(void)
{
    if (!u.t)
        return;
    pthread_mutex_lock(&u.lock);
    u.stopping = 1;
    pthread_cond_broadcast(&u.cond);
    pthread_mutex_unlock(&u.lock);
    for (int i = 0; i < u.n; i++)
        if (u.t[i].created)
            pthread_join(u.t[i].tid, NULL);
    free_threads();
    u.se = NULL;
}

/* After the mount, before the loop: start about `threads` ring threads (spread over the
 * kernel's per-CPU queues, at least one each) and hook libfuse's io. Returns 1 when armed, 0 when the
 * mount stays on /dev/fuse alone. */
int uring_start(struct fuse_session *se, int threads)
{
    int nq = possible_cpus();
    if (!uring_enabled() || nq < 1 || nq > 4096 || threads < 1)
        return 0;
    u.se = se;
    u.fd = fuse_session_fd(se);
    u.nq = nq;
    u.ready_count = u.failed = u.go = u.stopping = u.offered = 0;
    u.n = u.nq * (threads / nq > 0 ? threads / nq : 1);
    u.t = calloc((size_t)u.n, sizeof(*u.t));
    if (!u.t)
        return 0;
    for (int i = 0; i < u.n; i++) {
        struct rthread *t = &u.t[i];
        t->qid = i % u.nq;
        t->hdr = calloc(1, sizeof(*t->hdr));
        t->payload = malloc(PAYLOAD_MAX);
        t->req = malloc(sizeof(struct u_in_header) + sizeof(t->hdr->op_in) + PAYLOAD_MAX);
        if (!t->hdr || !t->payload || !t->req) {
            free_threads();
            return 0;
        }
        t->iov[0] = (struct iovec){t->hdr, sizeof(*t->hdr)};
        t->iov[1] = (struct iovec){t->payload, PAYLOAD_MAX};
    }
    for (int i = 0; i < u.n; i++) {
        if (pthread_create(&u.t[i].tid, NULL, ring_main, &u.t[i])) {
            pthread_mutex_lock(&u.lock);
            u.failed = 1;
            pthread_mutex_unlock(&u.lock);
            break;
        }
        u.t[i].created = 1;
    }
    pthread_mutex_lock(&u.lock);
    int want = 0;
    for (int i = 0; i < u.n; i++)
        want += u.t[i].created;
    while (!u.failed && u.ready_count < want)
        pthread_cond_wait(&u.cond, &u.lock);
    int ok = !u.failed;
    pthread_mutex_unlock(&u.lock);
    if (!ok || fuse_session_custom_io(se, &custom_io, u.fd)) {
        uring_stop();
        return 0;
    }
    return 1;
}
