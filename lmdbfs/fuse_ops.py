"""The FUSE adapter: translates kernel requests into reader-API calls, nothing more.

Data never changes, so the adapter lets the kernel cache everything (kernel_cache,
long entry/attr/negative timeouts) and refuses `open` with ENOSYS, which libfuse3 and
the kernel treat as "no open needed": OPEN/RELEASE round trips disappear.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat as st
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import mfusepy

from .errors import BadDatabase, CorruptValue, LmdbfsError, errno_of
from .format import KIND_DIR, Entry
from .reader import Archive

log = logging.getLogger(__name__)

CACHE_SECONDS = 365 * 24 * 3600.0  # immutable data: the kernel may keep every answer
_WRITE_BITS = 0o222
_VERIFIED_MAX = 200_000  # remembered checked files (~20 MB); bounded on purpose


class _Verified:
    """Keys whose stored bytes already matched their checksum in this daemon."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, rel: str) -> bool:
        with self._lock:
            return rel in self._keys

    def add(self, rel: str) -> None:
        with self._lock:
            self._keys[rel] = None
            if len(self._keys) > self._limit:
                self._keys.popitem(last=False)


def _errno_logged(exc: LmdbfsError, path: str) -> int:
    """The errno for ``exc``; damage (EIO) is logged with the path it hit."""
    if isinstance(exc, CorruptValue | BadDatabase):
        log.error("EIO for %s: %s", path, exc.message)
    return errno_of(exc)


def _fuse_errors(func):
    """Map lmdbfs errors to errno at the adapter's edge (one mapping: errors.errno_of)."""

    def wrapper(self: LmdbfsOperations, *args: Any) -> Any:
        try:
            return func(self, *args)
        except LmdbfsError as exc:
            raise mfusepy.FuseOSError(_errno_logged(exc, args[0] if args else "?")) from None

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper


class LmdbfsOperations(mfusepy.Operations):
    """Read-only filesystem over an `Archive` (or a `Union` of several), opened in the
    daemon after it forks."""

    use_ns = True

    def __init__(self, archive: Archive, on_ready: Any = None, verify: bool = True) -> None:
        self.archive = archive
        self.on_ready = on_ready
        self.verify = verify
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._verified = _Verified(_VERIFIED_MAX)
        self._db_bytes = 0

    # -- lifecycle ------------------------------------------------------------------------
    def init_with_config(self, conn_info: Any, config: Any) -> None:
        self._db_bytes = self.archive.data_bytes
        if config is not None:
            config.kernel_cache = 1
            config.entry_timeout = CACHE_SECONDS
            config.attr_timeout = CACHE_SECONDS
            config.negative_timeout = CACHE_SECONDS
        log.info("serving %s (%d files)", self.archive.path, self.archive.meta.files)
        if self.on_ready is not None:
            self.on_ready()

    def destroy(self, path: str) -> None:
        if self.archive is not None:
            self.archive.close()

    # -- metadata -------------------------------------------------------------------------
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        # Present so mfusepy registers the callback; LmdbfsFUSE answers it via stat_into.
        raise mfusepy.FuseOSError(errno.ENOSYS)

    def stat_into(self, path: str, buf: Any) -> int:
        """getattr written straight into libfuse's struct stat (no dict in between):
        after a mount, every file opened costs one of these."""
        try:
            entry = self.archive.lstat_rel(path.strip("/"))
        except LmdbfsError as exc:
            return -_errno_logged(exc, path)
        ctypes.memset(buf, 0, _STAT_SIZE)
        _fill_stat(buf.contents, entry.st_mode, entry.nlink, entry.size, entry.mtime_ns, self.uid, self.gid)
        return 0

    def fill_directory(self, path: str, buf: Any, filler: Any, offset: int, plus: bool) -> int:
        """readdir, answering READDIRPLUS with every entry's full attributes.

        The kernel then caches each child's entry and attributes from the listing, so
        `os.walk` + `stat` or `ls -l` needs a request per directory instead of one
        LOOKUP per file. Entries carry offsets (libfuse only passes attributes on in
        that mode); a large directory arrives over several calls, resuming at
        ``offset``: '.' is 1, '..' is 2, row i is i + 3.
        """
        try:
            rec = self.archive.dir_record(path)
        except LmdbfsError as exc:
            return -_errno_logged(exc, path)
        st_buf = mfusepy.c_stat()
        st_buf.st_mode = st.S_IFDIR | 0o555
        for off, dot in ((1, b"."), (2, b"..")):
            if offset < off and filler(buf, dot, st_buf, off, 0):
                return 0
        first = max(0, offset - 2)
        rows = rec.rows[first:]
        names = rec.raw_names()[first:]
        kinds = rows["kind"].tolist()
        modes = rows["mode"].tolist()
        flags = _FUSE_FILL_DIR_PLUS if plus else 0
        if plus:
            sizes = rows["size"].tolist()
            mtimes = rows["mtime_ns"].tolist()
            extra = rows["checksum"].tolist()
        for n, (name, kind, mode) in enumerate(zip(names, kinds, modes), start=first + 3):
            st_buf.st_mode = _DT_MODES[kind] | (mode & ~_WRITE_BITS)
            if plus:
                i = n - first - 3
                nlink = 2 + extra[i] if kind == KIND_DIR else 1
                _fill_stat(st_buf, st_buf.st_mode, nlink, sizes[i], mtimes[i], self.uid, self.gid)
            if filler(buf, name, st_buf, n, flags):
                break
        return 0

    @_fuse_errors
    def readdir(self, path: str, fh: int) -> Iterator[Any]:
        rec = self.archive.dir_record(path)
        yield ".", st.S_IFDIR, 0
        yield "..", st.S_IFDIR, 0
        modes = rec.rows["kind"].tolist()
        for name, kind in zip(rec.names, modes):
            yield name, _DT_MODES[kind], 0

    @_fuse_errors
    def readlink(self, path: str) -> str:
        return self.archive.readlink(path)

    def statfs(self, path: str) -> dict[str, int]:
        meta = self.archive.meta
        blocks = (self._db_bytes + 4095) // 4096
        return {
            "f_bsize": 4096,
            "f_frsize": 4096,
            "f_blocks": blocks,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": meta.files + meta.dirs + meta.symlinks,
            "f_ffree": 0,
            "f_favail": 0,
            "f_namemax": 255,
        }

    # -- contents -------------------------------------------------------------------------
    def open(self, path: str, flags: int) -> int:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT):
            raise mfusepy.FuseOSError(errno.EROFS)
        # ENOSYS tells libfuse3/the kernel that opens need no round trip at all.
        raise mfusepy.FuseOSError(errno.ENOSYS)

    def _checked(self, path: str) -> tuple[str, Entry, int, int | None]:
        """Look up a file and, the first time it is read, verify its stored bytes."""
        archive = self.archive
        rel = path.strip("/")
        entry = archive.lstat_rel(rel)
        if not entry.is_file:
            raise mfusepy.FuseOSError(errno.EISDIR if entry.is_dir else errno.EINVAL)
        if self.verify and rel not in self._verified:
            if archive.stored_checksum(rel, entry) != entry.checksum:
                raise CorruptValue(f"{rel}: checksum mismatch (the DB file is damaged)")
            self._verified.add(rel)
        return rel, entry, *archive.value_location(rel, entry)

    @_fuse_errors
    def read_buf(self, path: str, bufpp: Any, size: int, offset: int, fh: int) -> int:
        """Answer a read with (fd, position) instead of bytes: libfuse then copies the
        value from the DB file in C, without Python copying it or holding the GIL."""
        rel, entry, fd, file_off = self._checked(path)
        size = max(0, min(size, entry.size - offset))
        if file_off is not None:
            bufpp[0] = _fd_bufvec(fd, file_off + offset, size)
        else:
            bufpp[0] = _mem_bufvec(self.archive.value_view(rel, entry)[offset : offset + size])
        return 0

    @_fuse_errors
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        """Plain read, used where read_buf is not (kept for other FUSE libraries)."""
        rel, entry, _fd, _off = self._checked(path)
        return self.archive.read_entry(rel, entry, offset, size)

    # -- everything that would change the tree --------------------------------------------
    def _read_only(self, *args: Any) -> None:
        raise mfusepy.FuseOSError(errno.EROFS)

    chmod = chown = create = link = mkdir = mknod = rename = rmdir = _read_only
    symlink = truncate = unlink = utimens = write = setxattr = removexattr = _read_only


_DT_MODES = {1: st.S_IFREG, 2: st.S_IFDIR, 3: st.S_IFLNK}
_FUSE_READDIR_PLUS = 1 << 0
_FUSE_FILL_DIR_PLUS = 1 << 1


_STAT_SIZE = ctypes.sizeof(mfusepy.c_stat)


def _fill_stat(out: Any, mode: int, nlink: int, size: int, mtime_ns: int, uid: int, gid: int) -> None:
    """The attributes every entry reports: read-only mode, one mtime for all three times."""
    out.st_mode = mode & ~_WRITE_BITS
    out.st_nlink = nlink
    out.st_size = size
    out.st_blocks = (size + 511) // 512
    out.st_blksize = 1 << 20
    out.st_uid, out.st_gid = uid, gid
    sec, nsec = divmod(mtime_ns, 1_000_000_000)
    for ts in (out.st_mtimespec, out.st_ctimespec, out.st_atimespec):
        ts.tv_sec, ts.tv_nsec = sec, nsec


class LmdbfsFUSE(mfusepy.FUSE):
    """mfusepy's FUSE, but readdir passes READDIRPLUS through (mfusepy fills names and
    types only, which leaves the kernel to LOOKUP every file afterwards)."""

    def getattr_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        if path is None:  # only with nullpath_ok, which is never set
            return -errno.ENOENT
        return self.operations.stat_into(path.decode(self.encoding, self.errors), buf)

    def readdir_fuse_3(self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int) -> int:
        decoded = "/" if path is None else path.decode(self.encoding, self.errors)
        return self.operations.fill_directory(decoded, buf, filler, offset, bool(flags & _FUSE_READDIR_PLUS))


# -- libfuse buffers ----------------------------------------------------------------------
# mfusepy declares fuse_bufvec.buf as a pointer; libfuse has it inline (buf[1]), so the
# layout is declared here. libfuse frees the vector (and memory buffers) with free().
_FUSE_BUF_IS_FD, _FUSE_BUF_FD_SEEK, _FUSE_BUF_FD_RETRY = 1 << 1, 1 << 2, 1 << 3
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]


class _Buf(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("flags", ctypes.c_int),
        ("mem", ctypes.c_void_p),
        ("fd", ctypes.c_int),
        ("pos", ctypes.c_int64),
    ]


class _Bufvec(ctypes.Structure):
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t), ("buf", _Buf * 1)]


def _new_bufvec(size: int) -> tuple[Any, _Buf]:
    ptr = _libc.malloc(ctypes.sizeof(_Bufvec))
    if not ptr:
        raise mfusepy.FuseOSError(errno.ENOMEM)
    vec = _Bufvec.from_address(ptr)
    vec.count, vec.idx, vec.off = 1, 0, 0
    buf = vec.buf[0]
    buf.size, buf.flags, buf.mem, buf.fd, buf.pos = size, 0, None, -1, 0
    return ctypes.cast(ptr, mfusepy.fuse_bufvec_p), buf


def _fd_bufvec(fd: int, pos: int, size: int) -> Any:
    vec, buf = _new_bufvec(size)
    buf.flags, buf.fd, buf.pos = _FUSE_BUF_IS_FD | _FUSE_BUF_FD_SEEK | _FUSE_BUF_FD_RETRY, fd, pos
    return vec


def _mem_bufvec(data: memoryview) -> Any:
    vec, buf = _new_bufvec(len(data))
    mem = _libc.malloc(max(1, len(data)))
    if not mem:
        raise mfusepy.FuseOSError(errno.ENOMEM)
    ctypes.memmove(mem, bytes(data), len(data))
    buf.mem = mem
    return vec
