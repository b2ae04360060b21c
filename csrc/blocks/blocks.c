/* lmdbfs._blocks: the block cache's atomic steps (csrc/blocks/blockstate.h) for Python.
 *
 * Every function takes the state file's shared mapping (a writable buffer: an mmap of
 * the whole file) and a block number; words start at BS_HEADER. No library beyond libc.
 *
 *   load(buf, i) -> word
 *   cas(buf, i, expect, desired) -> bool
 *   store(buf, i, word)             (then wakes the waiters)
 *   wait(buf, i, seen, timeout_ms)  -> 0 or -errno; the GIL is released meanwhile
 *   publish(buf, i, claimed)        FILLING -> PRESENT, keeping pin and generation, wake
 *   claim(buf, first, count) -> list of (i, claimed word): every ABSENT or FAILED block of
 *                                the range CAS'd to FILLING by this caller
 *   tally(buf, count) -> (present, pinned, filling, failed)
 *   punch(fd, offset, length)       fallocate(PUNCH_HOLE | KEEP_SIZE)
 *   fill(buf, fd, first, block_size, words, data, pin)
 *                                pwrite data (a buffer: a fetched GET's bytes, not copied)
 *                                at block first's offset with the GIL released, then
 *                                publish each claimed word of words (| BS_PINNED if pin)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <fcntl.h>
#include <linux/falloc.h>

#include "blockstate.h"

#define CONSTANTS(X) X(BS_ABSENT) X(BS_FILLING) X(BS_PRESENT) X(BS_FAILED) X(BS_STATE_MASK) X(BS_PINNED) X(BS_GEN_ONE) X(BS_HEADER) X(BS_VERSION)

/* The word of block i in buf, or NULL with an exception set. */
static uint32_t *word_at(Py_buffer *view, long long i)
{
    if (i < 0 || (Py_ssize_t)(BS_HEADER + 4 * (i + 1)) > view->len || ((uintptr_t)view->buf & 3)) {
        PyErr_Format(PyExc_IndexError, "block %lld outside the state file", i);
        return NULL;
    }
    return (uint32_t *)((char *)view->buf + BS_HEADER) + i;
}

static PyObject *b_load(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer view;
    long long i;
    if (!PyArg_ParseTuple(args, "w*L", &view, &i))
        return NULL;
    uint32_t *w = word_at(&view, i);
    PyObject *out = w ? PyLong_FromUnsignedLong(bs_load(w)) : NULL;
    PyBuffer_Release(&view);
    return out;
}

static PyObject *b_cas(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer view;
    long long i;
    unsigned int expect, desired;
    if (!PyArg_ParseTuple(args, "w*LII", &view, &i, &expect, &desired))
        return NULL;
    uint32_t *w = word_at(&view, i);
    PyObject *out = w ? PyBool_FromLong(bs_cas(w, expect, desired)) : NULL;
    PyBuffer_Release(&view);
    return out;
}

static PyObject *b_store(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer view;
    long long i;
    unsigned int v;
    if (!PyArg_ParseTuple(args, "w*LI", &view, &i, &v))
        return NULL;
    uint32_t *w = word_at(&view, i);
    if (w) {
        bs_store(w, v);
        bs_wake(w);
    }
    PyBuffer_Release(&view);
    if (!w)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *b_publish(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer view;
    long long i;
    unsigned int claimed;
    if (!PyArg_ParseTuple(args, "w*LI", &view, &i, &claimed))
        return NULL;
    uint32_t *w = word_at(&view, i);
    if (w)
        bs_publish(w, claimed);
    PyBuffer_Release(&view);
    if (!w)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *b_wait(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer view;
    long long i;
    unsigned int seen;
    long timeout_ms;
    if (!PyArg_ParseTuple(args, "w*LIl", &view, &i, &seen, &timeout_ms))
        return NULL;
    uint32_t *w = word_at(&view, i);
    int rc = 0;
    if (w) {
        Py_BEGIN_ALLOW_THREADS
        rc = bs_wait(w, seen, timeout_ms);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&view);
    return w ? PyLong_FromLong(rc) : NULL;
}

static PyObject *b_claim(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer view;
    long long first, count;
    if (!PyArg_ParseTuple(args, "w*LL", &view, &first, &count))
        return NULL;
    PyObject *out = PyList_New(0);
    for (long long i = first; out && i < first + count; i++) {
        uint32_t *w = word_at(&view, i);
        if (!w) {
            Py_CLEAR(out);
            break;
        }
        uint32_t seen = bs_load(w);
        uint32_t st = bs_state(seen);
        if (st != BS_ABSENT && st != BS_FAILED)
            continue;
        uint32_t want = (seen & ~BS_STATE_MASK) | BS_FILLING;
        if (!bs_cas(w, seen, want))
            continue;
        PyObject *item = Py_BuildValue("(LI)", i, want);
        if (!item || PyList_Append(out, item)) {
            Py_XDECREF(item);
            Py_CLEAR(out);
            break;
        }
        Py_DECREF(item);
    }
    PyBuffer_Release(&view);
    return out;
}

static PyObject *b_tally(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer view;
    long long count;
    if (!PyArg_ParseTuple(args, "w*L", &view, &count))
        return NULL;
    long long present = 0, pinned = 0, filling = 0, failed = 0;
    if (count > 0 && !word_at(&view, count - 1)) {
        PyBuffer_Release(&view);
        return NULL;
    }
    const uint32_t *words = (const uint32_t *)((char *)view.buf + BS_HEADER);
    for (long long i = 0; i < count; i++) {
        uint32_t w = bs_load(&words[i]);
        switch (bs_state(w)) {
        case BS_PRESENT:
            present++;
            pinned += (w & BS_PINNED) != 0;
            break;
        case BS_FILLING:
            filling++;
            break;
        case BS_FAILED:
            failed++;
            break;
        }
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(LLLL)", present, pinned, filling, failed);
}

static PyObject *b_punch(PyObject *self, PyObject *args)
{
    (void)self;
    int fd;
    long long offset, length;
    if (!PyArg_ParseTuple(args, "iLL", &fd, &offset, &length))
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
    Py_END_ALLOW_THREADS
    if (rc)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* pwrite all of data at offset at (the GIL released by the caller): 0 or an errno. */
static int write_all(int fd, const char *data, size_t len, off_t at)
{
    for (size_t done = 0; done < len;) {
        ssize_t k = pwrite(fd, data + done, len - done, at + (off_t)done);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return k < 0 ? errno : EIO;
        done += (size_t)k;
    }
    return 0;
}

/* The claimed words of words (a sequence of n ints) in out, or -1 with an exception set. */
static int words_of(PyObject *words, uint32_t *out, Py_ssize_t n)
{
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *item = PySequence_GetItem(words, k);
        unsigned long w = item ? PyLong_AsUnsignedLong(item) : 0;
        Py_XDECREF(item);
        if (PyErr_Occurred())
            return -1;
        out[k] = (uint32_t)w;
    }
    return 0;
}

static PyObject *b_fill(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer view, data;
    int fd, pin;
    long long first;
    unsigned int block_size;
    PyObject *words;
    if (!PyArg_ParseTuple(args, "w*iLIOy*p", &view, &fd, &first, &block_size, &words, &data, &pin))
        return NULL;
    uint32_t *claimed = NULL;
    Py_ssize_t n = PySequence_Check(words) ? PySequence_Size(words) : -1;
    int err = -1;
    if (n <= 0 || block_size == 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "fill: no claimed words, or a block size of 0");
    } else if (!word_at(&view, first) || !word_at(&view, first + n - 1)) {
        /* IndexError set */
    } else if (data.len > n * (Py_ssize_t)block_size || data.len <= (n - 1) * (Py_ssize_t)block_size) {
        PyErr_Format(PyExc_ValueError, "fill: %zd bytes are not %zd blocks of %u", data.len, n, block_size);
    } else if (!(claimed = PyMem_Malloc((size_t)n * sizeof(*claimed)))) {
        PyErr_NoMemory();
    } else if (!words_of(words, claimed, n)) {
        uint32_t *base = (uint32_t *)((char *)view.buf + BS_HEADER) + first;
        Py_BEGIN_ALLOW_THREADS
        err = write_all(fd, data.buf, (size_t)data.len, (off_t)first * block_size);
        for (Py_ssize_t k = 0; !err && k < n; k++)
            bs_publish(base + k, claimed[k] | (pin ? BS_PINNED : 0));
        Py_END_ALLOW_THREADS
        if (err) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    PyMem_Free(claimed);
    PyBuffer_Release(&data);
    PyBuffer_Release(&view);
    if (err)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"load", b_load, METH_VARARGS, "load(buf, i) -> word"},
    {"cas", b_cas, METH_VARARGS, "cas(buf, i, expect, desired) -> bool"},
    {"store", b_store, METH_VARARGS, "store(buf, i, word): store and wake"},
    {"publish", b_publish, METH_VARARGS, "publish(buf, i, claimed): FILLING -> PRESENT, wake"},
    {"wait", b_wait, METH_VARARGS, "wait(buf, i, seen, timeout_ms) -> 0 or -errno"},
    {"claim", b_claim, METH_VARARGS, "claim(buf, first, count) -> [(i, claimed word)]"},
    {"tally", b_tally, METH_VARARGS, "tally(buf, count) -> (present, pinned, filling, failed)"},
    {"punch", b_punch, METH_VARARGS, "punch(fd, offset, length): punch a hole, keep the size"},
    {"fill", b_fill, METH_VARARGS, "fill(buf, fd, first, block_size, words, data, pin): pwrite the blocks, publish them"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "lmdbfs._blocks",
                                    "The block cache's atomic steps (csrc/blocks/blockstate.h).", -1, methods};

PyMODINIT_FUNC PyInit__blocks(void)
{
    PyObject *m = PyModule_Create(&module);
#define ADD(name) \
    if (m && PyModule_AddIntConstant(m, #name + 3, (long)(name))) \
        Py_CLEAR(m);
    CONSTANTS(ADD)
#undef ADD
    return m;
}
