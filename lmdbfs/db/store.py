"""Opening LMDB environments safely: every DB a reader serves is opened here.

The other calls of lmdb.open create files (pack/writer.py: the partial DB of a
pack; adopt/adopt.py: an index, written whole) or probe whether a path already holds an
adopted index (adopt/adopt.py), and are not served from.

A damaged file must become a clear `BadDatabase`, never a crash: a truncated LMDB
file would otherwise fault (SIGBUS) on the first read past its end.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import lmdb
import numpy as np

from ..errors import BadDatabase, IncompleteDatabase
from ..format.meta import Meta
from ..format.records import INDEX_DB, META_DB, META_KEY, META_MAX_BYTES, PARTIAL_SUFFIX
from . import foreign

MAX_DBS = 4


@dataclass(frozen=True)
class Location:
    """Where the data of a DB lives: a single file, or an LMDB directory's data.mdb."""

    path: str
    subdir: bool

    @property
    def data_file(self) -> str:
        return os.path.join(self.path, "data.mdb") if self.subdir else self.path


def locate(path: str) -> Location:
    """Accept both the default single file and an LMDB directory."""
    if not os.path.exists(path):
        partial = path + PARTIAL_SUFFIX
        if os.path.exists(partial):
            raise IncompleteDatabase(
                f"{path}: no such DB, but {partial} is an unfinished pack",
                "run `lmdbfs pack --resume` to finish it, or `--force` to start over",
            )
        raise BadDatabase(f"{path}: no such DB", "check the path, or create it with `lmdbfs pack SRC DB`")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "data.mdb")):
            raise BadDatabase(f"{path}: a directory without data.mdb is not an LMDB DB", "pass the DB file")
        return Location(path, True)
    if not os.path.isfile(path):
        raise BadDatabase(f"{path}: not a regular file", "pass the DB file written by `lmdbfs pack`")
    return Location(path, False)


class _Shared:
    """Read-only environments of this process, shared and reference-counted.

    py-lmdb refuses to open one file twice per process, and an environment inherited
    through fork must not be used; so every Archive of a file shares one env, and a
    forked child closes what it inherited before opening its own.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.envs: dict[tuple[int, int], list] = {}  # (dev, ino) -> [env, loc, refs]

    def acquire(self, path: str) -> tuple[lmdb.Environment, Location]:
        loc = locate(path)
        info = os.stat(loc.data_file)
        key = (info.st_dev, info.st_ino)
        with self.lock:
            if self.pid != os.getpid():
                self._drop_inherited()
            slot = self.envs.get(key)
            if slot is None:
                slot = self.envs[key] = [_open_readonly(loc, path), loc, 0]
            slot[2] += 1
            return slot[0], slot[1]

    def release(self, env: lmdb.Environment) -> None:
        with self.lock:
            if self.pid != os.getpid():
                self._drop_inherited()
                return
            for key, slot in list(self.envs.items()):
                if slot[0] is env:
                    slot[2] -= 1
                    if slot[2] <= 0:
                        del self.envs[key]
                        env.close()
                    return

    def _drop_inherited(self) -> None:
        for env, _loc, _refs in self.envs.values():
            try:
                env.close()  # only unmaps this child's copy
            except lmdb.Error:
                pass
        self.envs.clear()
        self.pid = os.getpid()


_SHARED = _Shared()
acquire_readonly = _SHARED.acquire
release_readonly = _SHARED.release


def acquire_adopted(index_path: str, data: dict) -> tuple[lmdb.Environment, Location]:
    """The foreign DB an adopted index was made from (its meta ``data``), refused unless
    it is exactly as adopted: same data file size and last transaction id, since the
    index's value offsets hold only for that file."""
    where = str(data.get("path") or "")
    db = os.path.join(os.path.dirname(os.path.abspath(index_path)), where)
    if not where or not os.path.exists(db):
        raise BadDatabase(
            f"{index_path}: the adopted DB {db} is missing", "put it back, or adopt it again where it is now"
        )
    env, loc = acquire_readonly(db)
    size, txnid = os.path.getsize(loc.data_file), env.info()["last_txnid"]
    if size != data.get("size") or txnid != data.get("last_txnid"):
        release_readonly(env)
        default = os.path.abspath(foreign.sidecar_of(db)) == os.path.abspath(index_path)
        again = f"lmdbfs adopt {db}" + ("" if default else f" {index_path}")
        if data.get("kind") == foreign.KIND_MD5:
            again += " --paths … (as before)"
        raise BadDatabase(
            f"{db}: the adopted DB changed since `lmdbfs adopt`; run it again", f"`{again}` rebuilds the index"
        )
    return env, loc


def _open_readonly(loc: Location, path: str) -> lmdb.Environment:
    """Open for reading without a lock file: the DB is immutable once packed, and this
    also works on read-only media and shared filesystems."""
    try:
        env = lmdb.open(
            loc.path,
            subdir=loc.subdir,
            readonly=True,
            lock=False,
            max_dbs=MAX_DBS,
            readahead=False,
            map_size=max(os.path.getsize(loc.data_file), 1 << 20),
        )
    except lmdb.InvalidError as exc:
        raise lmdb_error(exc, path) from None
    except lmdb.Error as exc:
        raise BadDatabase(f"{path}: cannot open as LMDB ({_lmdb_reason(exc)})", "re-pack the DB") from None
    try:
        with lmdb_errors(path):
            _check_not_truncated(env, loc, path)
    except BaseException:
        env.close()
        raise
    return env


def map_base(data_file: str) -> int | None:
    """Start address of this process's LMDB mapping of ``data_file`` (/proc/self/maps).

    Knowing it turns a value's memoryview into a file offset, so values can be read
    with pread instead of through the map.
    """
    try:
        ino = os.stat(data_file).st_ino
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(None, 5)
                if len(parts) >= 5 and parts[4] == str(ino) and int(parts[2], 16) == 0:
                    return int(parts[0].split("-", 1)[0], 16)
    except (OSError, ValueError):
        pass
    return None


def map_offset(view: memoryview, base: int) -> int:
    """File offset of a memoryview into the map that starts at ``base``."""
    return np.frombuffer(view, np.uint8).ctypes.data - base


_MADV_DONTNEED = 4
# The process's own symbols include libc's; ctypes.util.find_library would run
# `ldconfig -p` in a subprocess at import, in every command (the mount's daemon too).
_LIBC = ctypes.CDLL(None, use_errno=True)


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to the disk, without waiting for them.

    The kernel's flusher waits until a tenth of RAM is dirty; a pack would then write most
    of its DB in the final fsync, after it has read the source, instead of while reading it.
    """
    try:
        _LIBC.sync_file_range(
            ctypes.c_int(fd), ctypes.c_int64(0), ctypes.c_int64(0), ctypes.c_uint(_SYNC_FILE_RANGE_WRITE)
        )
    except AttributeError:
        pass  # no sync_file_range here: the final fsync writes everything


_FALLOC_PUNCH_HOLE = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def punch(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset + length) of the file a hole: it reads as zeros and takes no
    disk (OSError where the filesystem cannot)."""
    try:
        fallocate = _LIBC.fallocate
    except AttributeError:
        raise OSError(errno.ENOSYS, "no fallocate here") from None
    fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if fallocate(fd, _FALLOC_PUNCH_HOLE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def unmap_pages(base: int, length: int) -> None:
    """Drop this process's mappings of cached file pages (they stay in the page cache).

    LMDB maps every page a lookup touches and never lets go; for a read-only map this
    keeps the process's resident size to what it is actually using.
    """
    try:
        _LIBC.madvise(ctypes.c_void_p(base), ctypes.c_size_t(length), _MADV_DONTNEED)
    except AttributeError:
        pass  # no madvise here: the kernel still reclaims the pages under pressure


# LMDB's on-disk structures, read only to vet a value before LMDB hands it over.
_NODE = struct.Struct("<HHHH")  # leaf node header: size lo, size hi, flags, key size
_F_BIGDATA = 0x01  # the node's data is a page number: the value lives in overflow pages
_PAGE = struct.Struct("<QHHI")  # page header: pgno, pad, flags, overflow page count
_P_OVERFLOW = 0x04


def checked_get(txn: lmdb.Transaction, key: bytes, db, base: int | None, file_size: int, psize: int, shown: str):
    """``txn.get(key)``, but a value whose node claims more bytes than the file holds is
    refused before it is touched: py-lmdb reads every page of a value it returns, so a
    damaged size would otherwise fault (SIGBUS/SIGSEGV) instead of raising.

    The node header sits right before the key LMDB points at; for a value in overflow
    pages, the first page's header says how many pages the run has. Without the map's
    address (``base`` None) this is a plain get."""
    if base is None:
        return txn.get(key, db=db)
    return checked_at(txn.cursor(db=db), key, base, file_size, psize, shown)


def checked_at(cursor: lmdb.Cursor, key: bytes, base: int, file_size: int, psize: int, shown: str):
    """`checked_get` on a cursor the caller keeps: many lookups, one cursor."""
    if not cursor.set_key(key):
        return None
    at = base + map_offset(cursor.key(), base)
    lo, hi, flags, key_size = _NODE.unpack(ctypes.string_at(at - _NODE.size, _NODE.size))
    if flags & _F_BIGDATA:
        size = lo | hi << 16
        (pgno,) = struct.unpack("<Q", ctypes.string_at(at + key_size, 8))
        start = pgno * psize
        if start + _PAGE.size > file_size:
            raise _past_end(shown)
        _pgno, _pad, page_flags, pages = _PAGE.unpack(ctypes.string_at(base + start, _PAGE.size))
        if not page_flags & _P_OVERFLOW or start + pages * psize > file_size or size > pages * psize - _PAGE.size:
            raise _past_end(shown)
    return cursor.value()


def _past_end(shown: str) -> BadDatabase:
    return BadDatabase(f"{shown}: a stored value's size reaches past its pages", "restore the DB file or re-pack it")


def _lmdb_reason(exc: lmdb.Error) -> str:
    return str(exc).split(":", 1)[-1].strip() or type(exc).__name__


def lmdb_error(exc: lmdb.Error, shown: str) -> BadDatabase:
    """The typed error for any failure inside LMDB: the one place they are classified.

    On an opened DB every such failure (MDB_CORRUPTED, MDB_PAGE_NOTFOUND, a bad value
    size, ...) means damaged pages; the caller decides whether to retry elsewhere."""
    if isinstance(exc, lmdb.InvalidError):
        return BadDatabase(f"{shown}: not an LMDB file", "pass a DB written by `lmdbfs pack`")
    if isinstance(exc, lmdb.MapFullError | lmdb.ReadersFullError | lmdb.MemoryError):
        return BadDatabase(f"{shown}: cannot read ({_lmdb_reason(exc)})", "free resources and retry")
    return BadDatabase(f"{shown}: damaged LMDB pages ({_lmdb_reason(exc)})", "restore the DB file or re-pack it")


@contextlib.contextmanager
def lmdb_errors(shown: str) -> Iterator[None]:
    """Run LMDB calls with their failures turned into `lmdb_error`."""
    try:
        yield
    except lmdb.Error as exc:
        raise lmdb_error(exc, shown) from None


def _check_not_truncated(env: lmdb.Environment, loc: Location, shown: str) -> None:
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    have = os.path.getsize(loc.data_file)
    if have < need:
        raise BadDatabase(f"{shown}: truncated ({have} of {need} bytes)", "copy the DB again or re-pack it")


def read_meta(env: lmdb.Environment, shown: str, base: int | None = None) -> Meta:
    """The meta record, or a clear reason why this is not a finished lmdbfs DB.
    With the map's address ``base``, the record is vetted before it is read (see
    `checked_get`)."""
    with lmdb_errors(shown):
        return _read_meta(env, shown, base)


def _read_meta(env: lmdb.Environment, shown: str, base: int | None) -> Meta:
    try:
        meta_db = env.open_db(META_DB, create=False)
    except lmdb.NotFoundError:
        if shown.endswith(PARTIAL_SUFFIX):
            raise IncompleteDatabase(
                f"{shown}: an unfinished pack (interrupted or still running)",
                "finish it with `lmdbfs pack --resume SRC DB`, or start over with --force",
            ) from None
        found = foreign.inspect(env)
        if found.keys == 0:
            raise BadDatabase(
                f"{shown}: an empty LMDB, not an lmdbfs DB", "pack one with `lmdbfs pack SRC DB`"
            ) from None
        # Made by another tool (or an unfinished pack renamed by hand): say what it holds
        # and how to serve it.
        raise foreign.ForeignDatabase(shown, found) from None
    with env.begin(db=meta_db, buffers=True) as txn:
        psize = env.stat()["psize"]
        used = (env.info()["last_pgno"] + 1) * psize  # the file holds this much (checked at open)
        raw = checked_get(txn, META_KEY, meta_db, base, used, psize, shown)
        raw = None if raw is None else bytes(raw[: META_MAX_BYTES + 1])
    if raw is None:
        raise IncompleteDatabase(f"{shown}: meta record missing", "re-run `lmdbfs pack`")
    return Meta.decode(raw, shown)


def open_index(env: lmdb.Environment, shown: str):
    try:
        return env.open_db(INDEX_DB, create=False)
    except lmdb.NotFoundError:
        raise BadDatabase(f"{shown}: the path index is missing", "re-pack the DB") from None
    except lmdb.Error as exc:
        raise lmdb_error(exc, shown) from None


PAGE_BYTES = 4096  # holes are punched in whole pages


class ZeroHoles:
    """Page-aligned runs of zeros in a value just put through writemap, punched out of the
    data file (fallocate PUNCH_HOLE: they read as zeros, take no disk and are not
    written back). Offsets are the value's own; ``at`` is where it starts in the file
    (None: not known, nothing is punched)."""

    def __init__(self, path: str, at: int | None) -> None:
        self.path, self.at, self.since, self.fd = path, at, None, -1

    def zeros(self, offset: int) -> None:
        if self.since is None and self.at is not None:
            self.since = offset

    def data(self, offset: int) -> None:
        """Zeros end at ``offset``: punch the whole pages between."""
        if self.since is None:
            return
        lo = -(-(self.at + self.since) // PAGE_BYTES) * PAGE_BYTES
        hi = (self.at + offset) // PAGE_BYTES * PAGE_BYTES
        self.since = None
        if hi - lo < PAGE_BYTES:
            return
        try:
            if self.fd < 0:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
            punch(self.fd, lo, hi - lo)
        except OSError:
            pass  # a filesystem without holes keeps the zeros

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
