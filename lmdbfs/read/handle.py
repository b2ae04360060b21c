"""Per-process LMDB state of an archive: environments, descriptors, read transactions
that survive a damaged page, and the byte-bounded cache of decoded directory records.

`reader.Archive` holds one `Handle` per process (never across fork)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from typing import Any

import lmdb

from ..db import foreign, store
from ..errors import BadDatabase
from ..format.records import DirRecord
from ..remote.url import is_url

UNMAP_EVERY = 64  # key lookups between handing mapped pages back (~50 MB mapped at most)
BULK_UNMAP_EVERY = 1 << 16  # the same for `Lookups`: 27 s to verify 1.44M files, against 40 s at 1 << 14, 52 s at 4096


class DirCache:
    """Decoded directory records, bounded by their encoded size so the daemon's memory
    does not grow with the dataset."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._used = 0
        self._items: OrderedDict[str, DirRecord] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str) -> DirRecord | None:
        with self._lock:
            rec = self._items.get(path)
            if rec is not None:
                self._items.move_to_end(path)
            return rec

    def put(self, rec: DirRecord) -> None:
        with self._lock:
            if rec.path in self._items:
                return
            self._items[rec.path] = rec
            self._used += rec.nbytes
            while self._used > self._max and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._used -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._used = 0


class Handle:
    """Per-process LMDB state of an archive: where its index lives and where its values do.

    A packed DB holds both in one environment. An adopted DB (`lmdbfs adopt`) takes its
    index from the sidecar file and its values from the foreign DB beside it: then the
    ``index_*`` fields and the value fields (``venv``, ``loc``, ``fd``, ``map_base``)
    name different files.
    """

    def __init__(self, path: str) -> None:
        self.remote = None  # a remote DB: its byte source (lmdbfs.remote), under the layer
        if is_url(path):
            from ..remote.source import open_source

            self.remote = open_source(path)
            index_path = self.remote.data_path  # the cache's sparse copy, its index pinned
        else:
            index_path = foreign.index_for(path)
        shown = self.remote.url.shown if self.remote else index_path
        self.path = shown
        self.env, self.index_loc = store.acquire_readonly(index_path)
        self.venv, self.loc = self.env, self.index_loc
        self.index_fd = self.fd = -1
        try:
            self.index_fd = open_fd(self.index_loc.data_file)
            self.index_base = store.map_base(self.index_loc.data_file)
            self.index_size = os.fstat(self.index_fd).st_size  # bounds every record a lookup returns
            self.psize = self.env.stat()["psize"]
            self.meta = store.read_meta(self.env, shown, self.index_base)
            self.index_db = store.open_index(self.env, shown)
            if self.meta.data is None:
                self.fd = self.index_fd
                # Value offsets in the index hold only for the file exactly as packed.
                self.offsets_ok = (
                    self.meta.offsets_txnid != 0 and self.env.info()["last_txnid"] == self.meta.offsets_txnid
                )
            else:
                # Values from the foreign DB it was made from, while it is as adopted.
                self.venv, self.loc = store.acquire_adopted(index_path, self.meta.data)
                self.fd = open_fd(self.loc.data_file)
                self.offsets_ok = True
            if self.remote is not None and (self.meta.data is not None or not self.offsets_ok):
                raise BadDatabase(
                    f"{shown}: a remote DB must be served as packed (its value offsets do not hold)",
                    "upload the file `lmdbfs pack` wrote, unchanged",
                )
            self.vpsize = self.venv.stat()["psize"]
            self.data_size = os.fstat(self.fd).st_size  # bounds every size and offset the index gives
            with store.lmdb_errors(index_path):
                self.main_db = self.venv.open_db()
        except BaseException:
            self._release()
            raise
        self.map_base = self.index_base if self.venv is self.env else store.map_base(self.loc.data_file)
        self.local = threading.local()
        self.lookups = 0  # key lookups since the map was last unmapped

    def touched(self) -> None:
        """Count a key lookup; every UNMAP_EVERY, hand the mapped pages back.

        A lookup maps far more than its value (the kernel maps up to 16 neighbouring
        cached pages per fault, B-tree pages included): 1,287 lookups of 500-byte
        values mapped 939 MB of a 1 GB DB. The pages stay in the page cache."""
        self.lookups += 1
        if self.lookups >= UNMAP_EVERY and self.map_base is not None:
            self.lookups = 0
            store.unmap_pages(self.map_base, self.venv.info()["map_size"])

    def _txn(self, slot: str, env: lmdb.Environment) -> lmdb.Transaction:
        """A read transaction per thread and environment, kept open: the DB never changes."""
        txn = getattr(self.local, slot, None)
        if txn is None:
            with store.lmdb_errors(self.path):
                txn = env.begin(buffers=True)
            setattr(self.local, slot, txn)
        return txn

    def _get(self, slot: str, env: lmdb.Environment, key: bytes, db: Any, base: int | None, size: int, psize: int):
        """One lookup in this thread's transaction. A failure (damaged pages) discards
        the transaction, so the next lookup starts afresh instead of failing too."""
        txn = self._txn(slot, env)
        try:
            return store.checked_get(txn, key, db, base, size, psize, self.path)
        except lmdb.Error as exc:
            setattr(self.local, slot, None)
            with contextlib.suppress(lmdb.Error):
                txn.abort()
            raise store.lmdb_error(exc, self.path) from None

    def get(self, key: bytes, db: Any) -> memoryview | None:
        """A lookup in the index's environment (directory records)."""
        return self._get("txn", self.env, key, db, self.index_base, self.index_size, self.psize)

    def vget(self, key: bytes, db: Any) -> memoryview | None:
        """A lookup in the environment holding the values (the index's own, unless adopted)."""
        if self.venv is self.env:
            return self.get(key, db)
        return self._get("vtxn", self.venv, key, db, self.map_base, self.data_size, self.vpsize)

    def bulk_lookups(self) -> Lookups:
        """Key lookups in bulk in the values' environment (see `Lookups`)."""
        return Lookups(self)

    def close(self) -> None:
        self._release()

    def _release(self) -> None:
        for fd in {self.index_fd, self.fd} - {-1}:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.index_fd = self.fd = -1
        if self.venv is not self.env:
            store.release_readonly(self.venv)
        store.release_readonly(self.env)


class Lookups:
    """Many key lookups on one cursor of one read transaction, each vetted like `get`.

    `Handle.vget` opens a cursor per lookup and hands the map back every UNMAP_EVERY
    lookups, which suits a daemon's scattered reads; a pass over every key (verify) then
    spends most of its time faulting the B-tree's upper pages in again: 20 us a lookup
    against 3 us here. A damaged page ends the transaction; the next lookup starts a new one."""

    def __init__(self, h: Handle) -> None:
        self.h = h
        self._txn: lmdb.Transaction | None = None
        self._cursor: lmdb.Cursor | None = None
        self._count = 0

    def __call__(self, key: bytes) -> memoryview | None:
        h = self.h
        if h.map_base is None:
            return h.vget(key, h.main_db)
        try:
            if self._cursor is None:
                self._txn = h.venv.begin(buffers=True)
                self._cursor = self._txn.cursor(db=h.main_db)
            view = store.checked_at(self._cursor, key, h.map_base, h.data_size, h.vpsize, h.path)
        except lmdb.Error as exc:
            self.close()
            raise store.lmdb_error(exc, h.path) from None
        self._count += 1
        if self._count >= BULK_UNMAP_EVERY:
            self._count = 0
            store.unmap_pages(h.map_base, h.venv.info()["map_size"])
        return view

    def close(self) -> None:
        txn, self._txn, self._cursor = self._txn, None, None
        if txn is not None:
            with contextlib.suppress(lmdb.Error):
                txn.abort()


def open_fd(path: str) -> int:
    return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
