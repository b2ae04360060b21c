/* lmdbfs._readfiles: read a chunk of a folder's files with the GIL released once.
 *
 * Packing a tree of small files from Python costs four GIL hand-overs per file (open,
 * read, fstat, close), and with several reading threads each hand-over is a context
 * switch: on 1.45M tiny files that, not the disk, was most of the pack's time. Here
 * a reading thread takes a whole chunk (up to 256 files) in one call.
 *
 * read_files(root, rels, sizes) -> (datas, mtimes, errs)
 *   root   bytes, the folder (absolute); rels: list of bytes, paths below it
 *   sizes  list of int, the sizes the scan listed
 *   datas  list: bytes of each file, or None when errs[i] != 0
 *   mtimes list of int (st_mtime in ns, 0 on error)
 *   errs   list of int: 0, an errno (EINVAL: no longer a regular file), or -1 when
 *          the file's size is no longer the listed one (the caller reads it again its
 *          own way and decides)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CHANGED (-1)

struct job {
    const char *rel;
    Py_ssize_t rel_len;
    Py_ssize_t size;
    char *buf;       /* the bytes object's storage, size bytes */
    int64_t mtime;
    int err;
};

static void read_one(int dirfd, struct job *j)
{
    char path[PATH_MAX];
    if (j->rel_len <= 0 || (size_t)j->rel_len >= sizeof(path)) {
        j->err = ENAMETOOLONG;
        return;
    }
    memcpy(path, j->rel, (size_t)j->rel_len);
    path[j->rel_len] = 0;
    /* O_NONBLOCK: a file swapped for a FIFO since the scan must not hang the pack. */
    int fd = openat(dirfd, path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        j->err = errno;
        return;
    }
    struct stat st;
    if (fstat(fd, &st)) {
        j->err = errno;
        close(fd);
        return;
    }
    if (!S_ISREG(st.st_mode)) {
        j->err = EINVAL;  /* listed as a file, no longer one */
        close(fd);
        return;
    }
    j->mtime = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
    if (st.st_size != j->size) {
        j->err = CHANGED;
        close(fd);
        return;
    }
    Py_ssize_t done = 0;
    while (done < j->size) {
        ssize_t got = read(fd, j->buf + done, (size_t)(j->size - done));
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0) {
            j->err = errno;
            close(fd);
            return;
        }
        if (got == 0)
            break;
        done += got;
    }
    char extra;
    ssize_t more;
    do
        more = read(fd, &extra, 1);
    while (more < 0 && errno == EINTR);
    if (done != j->size || more != 0)  /* shrank or grew while being read */
        j->err = more < 0 ? errno : CHANGED;
    close(fd);
}

static PyObject *read_files(PyObject *self, PyObject *args)
{
    (void)self;
    const char *root;
    PyObject *rels, *sizes;
    if (!PyArg_ParseTuple(args, "yO!O!", &root, &PyList_Type, &rels, &PyList_Type, &sizes))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(rels);
    if (PyList_GET_SIZE(sizes) != n) {
        PyErr_SetString(PyExc_ValueError, "rels and sizes differ in length");
        return NULL;
    }
    struct job *jobs = PyMem_Calloc(n ? (size_t)n : 1, sizeof(*jobs));
    PyObject *datas = PyList_New(n), *mtimes = NULL, *errs = NULL, *out = NULL;
    if (!jobs || !datas)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *rel = PyList_GET_ITEM(rels, i);
        char *p;
        if (PyBytes_AsStringAndSize(rel, &p, &jobs[i].rel_len) < 0)
            goto done;
        jobs[i].rel = p;
        jobs[i].size = PyLong_AsSsize_t(PyList_GET_ITEM(sizes, i));
        if (jobs[i].size < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "negative size");
            goto done;
        }
        PyObject *b = PyBytes_FromStringAndSize(NULL, jobs[i].size);
        if (!b)
            goto done;
        jobs[i].buf = PyBytes_AS_STRING(b);
        PyList_SET_ITEM(datas, i, b);
    }
    int dirfd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0) {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, root);
        goto done;
    }
    /* rels and the bytes objects stay alive: this call holds references to both lists. */
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        read_one(dirfd, &jobs[i]);
    close(dirfd);
    Py_END_ALLOW_THREADS
    if (!(mtimes = PyList_New(n)) || !(errs = PyList_New(n)))
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *m = PyLong_FromLongLong(jobs[i].mtime), *e = PyLong_FromLong(jobs[i].err);
        if (!m || !e) {
            Py_XDECREF(m);
            Py_XDECREF(e);
            goto done;
        }
        PyList_SET_ITEM(mtimes, i, m);
        PyList_SET_ITEM(errs, i, e);
        if (jobs[i].err) {
            Py_INCREF(Py_None);
            PyList_SetItem(datas, i, Py_None);  /* drops the unread bytes object */
        }
    }
    out = PyTuple_Pack(3, datas, mtimes, errs);
done:
    PyMem_Free(jobs);
    Py_XDECREF(datas);
    Py_XDECREF(mtimes);
    Py_XDECREF(errs);
    return out;
}

static PyMethodDef methods[] = {
    {"read_files", read_files, METH_VARARGS, "read_files(root, rels, sizes) -> (datas, mtimes, errs)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "lmdbfs._readfiles",
                                    "Reading a chunk of a folder's files without the GIL.", -1, methods};

PyMODINIT_FUNC PyInit__readfiles(void) { return PyModule_Create(&module); }
