/* The Python binding: lmdbfs._serve.serve(...) mounts, serves without the GIL until the
 * filesystem is unmounted or a signal arrives, and returns libfuse's status. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "fsops.h"
#include "serve.h"
#include "tree.h"
#include "uring.h"

#include <errno.h>
#include <limits.h>
#include <malloc.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static PyObject *LayerError, *FuseError;
static int serving;

/* A layer is a lmdbfs.serve.ServedLayer: its fields are read here by their Python names,
 * as attributes, with nothing renamed on the way (the one declaration is the dataclass).
 * Its "remote" field is a dict (lmdbfs.remote.fetcher.Fetcher.describe), read by key.
 * Returns a new reference, or NULL (no error set) when the field is absent. */
static PyObject *field(PyObject *obj, const char *key)
{
    if (PyDict_Check(obj))
        return Py_XNewRef(PyDict_GetItemString(obj, key));
    PyObject *v = PyObject_GetAttrString(obj, key);
    if (!v && PyErr_ExceptionMatches(PyExc_AttributeError))
        PyErr_Clear();
    return v;
}

static int get_str(PyObject *d, const char *key, char **out, size_t *len, int optional)
{
    PyObject *v = field(d, key);
    PyObject *bytes = NULL;
    *out = NULL;
    if (PyErr_Occurred()) {
        Py_XDECREF(v);
        return -1;
    }
    if (!v || v == Py_None) {
        Py_XDECREF(v);
        if (optional)
            return 0;
        PyErr_Format(PyExc_KeyError, "layer lacks %s", key);
        return -1;
    }
    if (PyBytes_Check(v)) {
        bytes = Py_NewRef(v);
    } else if (!PyUnicode_FSConverter(v, &bytes)) {
        Py_DECREF(v);
        return -1;
    }
    Py_DECREF(v);
    Py_ssize_t n = PyBytes_GET_SIZE(bytes);
    *out = malloc((size_t)n + 1);
    if (*out) {
        memcpy(*out, PyBytes_AS_STRING(bytes), (size_t)n);
        (*out)[n] = 0;
    }
    Py_DECREF(bytes);
    if (len)
        *len = (size_t)n;
    if (!*out) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* An int field (a bool is one); with optional, an absent field leaves *out as it is. */
static int get_int(PyObject *d, const char *key, long long *out, int optional)
{
    PyObject *v = field(d, key);
    if (!v) {
        if (PyErr_Occurred())
            return -1;
        if (optional)
            return 0;
        PyErr_Format(PyExc_KeyError, "layer lacks %s", key);
        return -1;
    }
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

static int prefix_ok(const char *p, size_t len)
{
    if (len == 0)
        return 1;
    if (p[0] == '/' || p[len - 1] == '/' || memchr(p, 0, len))
        return 0;
    for (const char *s = p, *end = p + len; s < end;) {
        const char *slash = memchr(s, '/', (size_t)(end - s));
        size_t n = slash ? (size_t)(slash - s) : (size_t)(end - s);
        if (n == 0 || n > NAME_MAX_LEN || (n == 1 && s[0] == '.') || (n == 2 && s[0] == '.' && s[1] == '.'))
            return 0;
        s += n + 1;
    }
    return 1;
}

/* A remote layer's optional "remote": {state_path, block_size, request_fd, url, and for
 * tests stuck_ms} (csrc/source.h). 1 found, 0 absent, -1 error. */
static int get_remote(PyObject *d, struct remote_spec *rs, char **state, char **url)
{
    PyObject *r = field(d, "remote");
    long long block_size, fd, stuck_ms = 0;
    int rc = -1;
    if (!r || r == Py_None) {
        Py_XDECREF(r);
        return PyErr_Occurred() ? -1 : 0;
    }
    if (!PyDict_Check(r)) {
        PyErr_SetString(PyExc_TypeError, "a layer's remote is a dict");
        goto out;
    }
    if (get_str(r, "state_path", state, NULL, 0) || get_str(r, "url", url, NULL, 0) ||
        get_int(r, "block_size", &block_size, 0) || get_int(r, "request_fd", &fd, 0) ||
        get_int(r, "stuck_ms", &stuck_ms, 1))
        goto out;
    if (block_size <= 0 || fd < 0 || fd > INT_MAX || stuck_ms < 0 || stuck_ms > LONG_MAX) {
        PyErr_SetString(PyExc_ValueError, "a layer's remote needs block_size > 0, request_fd >= 0, stuck_ms >= 0");
        goto out;
    }
    *rs = (struct remote_spec){*state, *url, (uint64_t)block_size, (int)fd, (long)stuck_ms};
    rc = 1;
out:
    Py_DECREF(r);
    return rc;
}

static void free_layers(void)
{
    for (int i = 0; i < srv.nlayers; i++) {
        struct layer *ly = &srv.layers[i];
        layer_close(ly);
        free(ly->prefix);
        free(ly->key_prefix);
        free(ly->key_sep);
    }
    free(srv.layers);
    srv.layers = NULL;
    srv.nlayers = 0;
}

static int load_layer(PyObject *d, struct layer *ly, int index)
{
    char *index_path = NULL, *vals_path = NULL, *data_path = NULL, *state = NULL, *url = NULL, why[512];
    struct remote_spec rs;
    int remote = 0;
    long long index_subdir, vals_subdir = 0, offsets_ok, keys_path, root_mode, root_mtime, checksummed;
    int rc = -1;
    ly->index = index;
    ly->data_src.fd = -1;
    if (PyDict_Check(d)) {
        PyErr_SetString(PyExc_TypeError, "each layer is a lmdbfs.serve.ServedLayer");
        return -1;
    }
    if (get_str(d, "prefix", &ly->prefix, &ly->prefix_len, 0) || get_str(d, "index_path", &index_path, NULL, 0) ||
        get_str(d, "values_path", &vals_path, NULL, 1) || get_str(d, "data_path", &data_path, NULL, 0) ||
        get_str(d, "key_prefix", &ly->key_prefix, &ly->key_prefix_len, 0) ||
        get_str(d, "key_sep", &ly->key_sep, &ly->key_sep_len, 0) || get_int(d, "index_subdir", &index_subdir, 0) ||
        get_int(d, "offsets_ok", &offsets_ok, 0) || get_int(d, "keys_path", &keys_path, 0) ||
        get_int(d, "root_mode", &root_mode, 0) || get_int(d, "root_mtime_ns", &root_mtime, 0) ||
        get_int(d, "checksummed", &checksummed, 0) || get_int(d, "values_subdir", &vals_subdir, 0))
        goto out;
    if ((remote = get_remote(d, &rs, &state, &url)) < 0)
        goto out;
    if (!prefix_ok(ly->prefix, ly->prefix_len)) {
        PyErr_Format(PyExc_ValueError, "layer %d: bad prefix %s", index, ly->prefix);
        goto out;
    }
    ly->verify = checksummed != 0;
    ly->offsets_ok = offsets_ok != 0;
    ly->keys_path = keys_path != 0;
    ly->root_mode = (uint32_t)root_mode & 07777;
    ly->root_mtime_ns = root_mtime;
    Py_BEGIN_ALLOW_THREADS
    rc = layer_open(ly, index_path, index_subdir != 0, vals_path, vals_subdir != 0, data_path, remote ? &rs : NULL, why,
                    sizeof(why));
    Py_END_ALLOW_THREADS
    if (rc) {
        PyErr_SetString(LayerError, why);
        rc = -1;
    }
out:
    free(index_path);
    free(vals_path);
    free(data_path);
    free(state);
    free(url);
    return rc;
}

static int session_run(struct fuse_session *se, int threads, int clone_fd)
{
    if (!threads)
        return fuse_session_loop(se);
    struct fuse_loop_config *cfg = fuse_loop_cfg_create();
    if (!cfg)
        return -ENOMEM;
    fuse_loop_cfg_set_max_threads(cfg, (unsigned)threads);
    fuse_loop_cfg_set_idle_threads(cfg, (unsigned)threads);  /* no thread churn */
    fuse_loop_cfg_set_clone_fd(cfg, (unsigned)clone_fd);
    int rc = fuse_session_loop_mt(se, cfg);
    fuse_loop_cfg_destroy(cfg);
    return rc;
}

/* The daemon's malloc policy. Records come and go from the cache on every worker thread:
 * one malloc arena, and anything over 64 KiB mapped on its own, so freed memory goes back
 * to the system instead of fragmenting per-thread heaps (the daemon's RSS stays near the
 * cache size). The arena limit binds only threads that have not allocated yet: a remote
 * DB's client threads start while the DBs are opened, so the daemon sets this first of
 * all (fuse/serve.py), and a remote DB's client then raises the thresholds for its GETs'
 * buffers (lmdbfs/remote/client.py), which serve() leaves as they are. */
static void set_malloc_policy(void)
{
    mallopt(M_ARENA_MAX, 1);
    mallopt(M_MMAP_THRESHOLD, 64 << 10);
    mallopt(M_TRIM_THRESHOLD, 1 << 20);
}

static PyObject *malloc_policy(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    set_malloc_policy();
    Py_RETURN_NONE;
}

static PyObject *serve(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *names[] = {"mountpoint", "layers", "fuse_args", "notify_fd", "verify", "threads", "clone_fd",
                            "max_background", "cache_bytes", "statfs_blocks", "statfs_files", "uring", "push_bytes", NULL};
    PyObject *mnt_obj, *layers, *fuse_list, *mnt_bytes = NULL;
    int notify_fd = -1, verify = 1, threads = 16, clone_fd = 0, uring = 1;
    unsigned long long push_bytes = 64 << 10;
    unsigned max_background = 0;
    unsigned long long cache_bytes = 32ull << 20, blocks = 0, files = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO!O!|ipiiIKKKpK", names, &mnt_obj, &PyList_Type, &layers,
                                     &PyList_Type, &fuse_list, &notify_fd, &verify, &threads, &clone_fd,
                                     &max_background, &cache_bytes, &blocks, &files, &uring, &push_bytes))
        return NULL;
    if (serving) {
        PyErr_SetString(PyExc_RuntimeError, "already serving in this process");
        return NULL;
    }
    Py_ssize_t nl = PyList_GET_SIZE(layers);
    if (nl < 1 || nl > LAYER_MAX) {
        PyErr_Format(PyExc_ValueError, "between 1 and %d layers, not %zd", LAYER_MAX, nl);
        return NULL;
    }
    if (!PyUnicode_FSConverter(mnt_obj, &mnt_bytes))
        return NULL;
    memset(&srv, 0, sizeof(srv));
    srv.layers = calloc((size_t)nl, sizeof(struct layer));
    srv.verify = verify;
    srv.uid = getuid();
    srv.gid = getgid();
    srv.cache_max = (size_t)cache_bytes;
    srv.max_background = max_background;
    srv.congestion = max_background * 3 / 4;
    srv.notify_fd = notify_fd;
    srv.statfs_blocks = blocks;
    srv.statfs_files = files;
    srv.timeout = 365.0 * 24 * 3600;
    srv.push_max = push_bytes;
    int argc = (int)PyList_GET_SIZE(fuse_list) + 1, status = 0;
    char **argv = calloc((size_t)argc + 1, sizeof(char *));
    struct fuse_session *se = NULL;
    if (!srv.layers || !argv) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < nl; i++) {
        srv.nlayers = (int)i + 1;
        if (load_layer(PyList_GET_ITEM(layers, i), &srv.layers[i], (int)i))
            goto out;
    }
    argv[0] = "lmdbfs";
    for (int i = 1; i < argc; i++) {
        argv[i] = (char *)PyUnicode_AsUTF8(PyList_GET_ITEM(fuse_list, i - 1));
        if (!argv[i])
            goto out;
    }
    if (tree_init()) {
        PyErr_SetString(LayerError, "cannot read the root directory");
        goto out;
    }
    struct fuse_args fargs = FUSE_ARGS_INIT(argc, argv);
    se = fuse_session_new(&fargs, &lo_ops, sizeof(lo_ops), NULL);
    fuse_opt_free_args(&fargs);
    srv.se = se;
    if (!se) {
        PyErr_SetString(FuseError, "options");
        goto out;
    }
    /* libfuse installs its handlers only where none is set: Python's own SIGINT handler
     * would never run while C serves, so SIGINT/SIGTERM/SIGHUP go to libfuse meanwhile. */
    struct sigaction dfl = {.sa_handler = SIG_DFL}, old[3];
    int sigs[3] = {SIGINT, SIGTERM, SIGHUP};
    for (int i = 0; i < 3; i++)
        sigaction(sigs[i], &dfl, &old[i]);
    if (fuse_set_signal_handlers(se) || fuse_session_mount(se, PyBytes_AS_STRING(mnt_bytes))) {
        fuse_remove_signal_handlers(se);
        for (int i = 0; i < 3; i++)
            sigaction(sigs[i], &old[i], NULL);
        PyErr_SetString(FuseError, "mount");
        goto out;
    }
    serving = 1;
    Py_BEGIN_ALLOW_THREADS
    /* With rings, libfuse's own threads see only FORGET, INTERRUPT and whatever comes
     * before the rings are registered (libfuse starts its threads as work arrives), and
     * they serve everything if the kernel turns a ring down. */
    if (uring && threads)
        uring_start(se, threads);
    status = session_run(se, threads, clone_fd);
    fuse_session_unmount(se);
    uring_stop();
    Py_END_ALLOW_THREADS
    serving = 0;
    fuse_remove_signal_handlers(se);
    for (int i = 0; i < 3; i++)
        sigaction(sigs[i], &old[i], NULL);
out:
    if (se)
        fuse_session_destroy(se);
    srv.se = NULL;
    if (srv.notify_fd >= 0)
        close(srv.notify_fd);
    srv.notify_fd = -1;
    tree_free();
    free_layers();
    free(argv);
    Py_XDECREF(mnt_bytes);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromLong(status);
}

/* _parse_record(raw, own, data_size=0, offsets_ok=False) -> (rows, bad_names): the record
 * parser of a mount (record.c), reachable without one, so tests can hold it to the Python
 * reader's (lmdbfs/format/recordcheck.py) verdicts. Each good row, in order: (name, kind, flags,
 * mode, size, mtime_ns, checksum, target, inline bytes or None, data_off); bad_names: the
 * names a lookup answers EIO for. A record refused whole raises ValueError(why). Like a
 * mount's fetch, it hands the parser a version-4 record's head and its total length. */
static PyObject *parse_record(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *kwlist[] = {"raw", "own", "data_size", "offsets_ok", NULL};
    Py_buffer raw, own;
    unsigned long long data_size = 0;
    int offsets_ok = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*y*|Kp", kwlist, &raw, &own, &data_size, &offsets_ok))
        return NULL;
    const unsigned char *p = raw.buf;
    size_t total = (size_t)raw.len, len = total;
    if (total >= 16 && memcmp(p, "LDR2", 4) == 0 && record_head_len(p) <= total)
        len = record_head_len(p);
    struct layer ly = {.data_size = data_size, .offsets_ok = offsets_ok};
    char why[200] = "";
    struct record *rec = record_parse(p, len, total, 0, own.buf, (size_t)own.len, &ly, why, sizeof(why));
    PyObject *rows = NULL, *bad = NULL, *out = NULL;
    if (!rec) {
        PyErr_SetString(PyExc_ValueError, why);
        goto done;
    }
    if (!(rows = PyList_New(0)) || !(bad = PyList_New(0)))
        goto done;
    for (uint32_t i = 0; i < rec->count; i++) {
        struct row r;
        row_get(rec, i, &r);
        const char *name = row_name(rec, &r);
        PyObject *item;
        if (rec->bad[i]) {
            item = PyBytes_FromStringAndSize(name, r.name_len);
        } else {
            int inl = r.kind == KIND_FILE && (r.flags & FLAG_INLINE);
            item = Py_BuildValue(
                "(y#BBHKLKy#NK)", name, (Py_ssize_t)r.name_len, r.kind, r.flags, r.mode, (unsigned long long)r.size,
                (long long)r.mtime_ns, (unsigned long long)r.checksum, name + r.name_len, (Py_ssize_t)r.target_len,
                inl ? PyBytes_FromStringAndSize((const char *)p + r.data_off, (Py_ssize_t)r.size) : Py_NewRef(Py_None),
                (unsigned long long)(inl ? 0 : r.data_off));
        }
        if (!item || PyList_Append(rec->bad[i] ? bad : rows, item)) {
            Py_XDECREF(item);
            goto done;
        }
        Py_DECREF(item);
    }
    out = PyTuple_Pack(2, rows, bad);
done:
    record_free(rec);
    Py_XDECREF(rows);
    Py_XDECREF(bad);
    PyBuffer_Release(&raw);
    PyBuffer_Release(&own);
    return out;
}

static PyMethodDef methods[] = {
    {"serve", (PyCFunction)(void (*)(void))serve, METH_VARARGS | METH_KEYWORDS,
     "serve(mountpoint, layers, fuse_args, notify_fd=-1, verify=True, threads=16, clone_fd=False, "
     "max_background=0, cache_bytes=32 MiB, statfs_blocks=0, statfs_files=0, uring=True, push_bytes=64 KiB) -> libfuse status"},
    {"malloc_policy", malloc_policy, METH_NOARGS,
     "malloc_policy(): the daemon's malloc settings (one arena, 64 KiB mmap threshold); call it before any thread starts"},
    {"_parse_record", (PyCFunction)(void (*)(void))parse_record, METH_VARARGS | METH_KEYWORDS,
     "_parse_record(raw, own, data_size=0, offsets_ok=False) -> (rows, bad_names); for tests"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "lmdbfs._serve",
                                    "The lmdbfs FUSE server (libfuse3 low-level API, in C).", -1, methods};

PyMODINIT_FUNC PyInit__serve(void)
{
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    LayerError = PyErr_NewException("lmdbfs._serve.LayerError", NULL, NULL);
    FuseError = PyErr_NewException("lmdbfs._serve.FuseError", NULL, NULL);
    PyModule_AddObject(m, "LayerError", LayerError);
    PyModule_AddObject(m, "FuseError", FuseError);
    PyModule_AddIntConstant(m, "LAYER_MAX", LAYER_MAX);
    PyModule_AddIntConstant(m, "ROW_MAX", ROW_MAX - 1);
    PyModule_AddIntConstant(m, "NODE_BITS", NODE_BITS);
    return m;
}
