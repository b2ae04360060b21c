"""The reader API: an archive object that needs no FUSE.

`lmdbfs.open(DB)` gives an `Archive` with the calls a data loader needs (read_bytes,
stat, listdir, walk, readlink: `tree.Tree`'s, which this module answers from one DB's
handle). It is safe to create before forking: the LMDB environment is opened lazily,
once per process, so PyTorch DataLoader workers each get their own (LMDB must not be
used across fork). It also pickles as just its path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import xxhash

from ..db import foreign, store
from ..errors import CorruptValue, LmdbfsError
from ..format.meta import Meta
from ..format.recordcheck import decode_dir
from ..format.records import (
    DIR_HEADER,
    KIND_DIR,
    DirRecord,
    Entry,
    checksum,
    content_key,
    decode_path,
    dir_head_len,
    dir_key,
    piece_key,
)
from .handle import DirCache, Handle
from .tree import MAX_DEPTH, PIECE, Tree, normpath
from .valuefile import piece_spans, split_range

__all__ = ["DEFAULT_DIR_CACHE_BYTES", "MAX_DEPTH", "Archive", "Locations", "normpath", "open"]

log = logging.getLogger(__name__)

DEFAULT_DIR_CACHE_BYTES = 32 << 20  # decoded records weigh what they do on disk
_REPORTED_MAX = 1000  # directories whose damaged rows were logged
_THREAD = threading.local()


@dataclass(frozen=True, slots=True)
class Locations:
    """Where an archive's bytes live: the LMDB environment holding its index and meta
    record, and the one holding its values (the same one unless the DB was adopted)."""

    index: store.Location
    values: store.Location
    adopted: bool  # values in a foreign DB: key lookups go to ``values``, not ``index``
    offsets_ok: bool  # the rows' data_off offsets hold for ``values.data_file``
    remote: Any = None  # a remote DB's byte source (lmdbfs.remote.source.RemoteSource), else None


class Archive(Tree):
    """A packed tree, read through its path index. Paths are archive-relative, '/'-separated."""

    def __init__(self, path: str, *, verify: bool = True, dir_cache_bytes: int = DEFAULT_DIR_CACHE_BYTES) -> None:
        self.path = os.fspath(path)
        self.verify = verify
        self._dir_cache_bytes = dir_cache_bytes
        self._handle: Handle | None = None
        self._pid = -1
        self._lock = threading.Lock()
        self._dirs = DirCache(dir_cache_bytes)
        self._reported: set[str] = set()
        self._h()  # fail early on a bad DB, in the process that asked

    # -- process-local state -------------------------------------------------------------
    def _h(self) -> Handle:
        handle = self._handle
        if handle is not None and self._pid == os.getpid():
            return handle
        with self._lock:
            if self._handle is None or self._pid != os.getpid():
                # After fork the inherited env must not be used: the store closes this
                # child's copy, and we open our own.
                if self._handle is not None:
                    for fd in {self._handle.index_fd, self._handle.fd} - {-1}:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                self._handle = Handle(self.path)
                self._pid = os.getpid()
                self._dirs = DirCache(self._dir_cache_bytes)
            return self._handle

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "verify": self.verify, "dir_cache_bytes": self._dir_cache_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], verify=state["verify"], dir_cache_bytes=state["dir_cache_bytes"])

    def close(self) -> None:
        with self._lock:
            if self._handle is not None and self._pid == os.getpid():
                self._handle.close()
            self._handle = None
            self._dirs.clear()

    @property
    def data_fd(self) -> int:
        """A descriptor of the DB's data file, for reads at `value_offset` offsets."""
        return self._h().fd

    @property
    def data_bytes(self) -> int:
        """Size of the DB's data file."""
        return os.path.getsize(self._h().loc.data_file)

    @property
    def meta(self) -> Meta:
        return self._h().meta

    def locations(self) -> Locations:
        h = self._h()
        return Locations(h.index_loc, h.loc, h.venv is not h.env, bool(h.offsets_ok), h.remote)

    def layers(self) -> list[tuple[str, Archive]]:
        return [("", self)]

    def index_stat(self) -> dict[str, int]:
        """LMDB's statistics of the index environment's main B-tree (psize, depth, …)."""
        return dict(self._h().env.stat())

    # -- index --------------------------------------------------------------------------
    def record(self, rel: str) -> DirRecord | None:
        """The decoded record of directory ``rel`` (archive-relative, normalised), or None
        when ``rel`` is not a directory. Cached; a union asks its layers this."""
        rec = self._dirs.get(rel)
        if rec is None:
            h = self._h()
            view = h.get(dir_key(rel), h.index_db)
            if view is None:
                return None
            rec = self._remote_head(h, view, rel) if h.remote is not None else None
            if rec is None:
                rec = decode_dir(self._copy_out(h, view), rel, h.data_size, h.offsets_ok)
            if rec.bad:
                self._report_bad(rec)
            self._dirs.put(rec)
        return rec

    @staticmethod
    def _remote_head(h: Handle, view: memoryview, rel: str) -> DirRecord | None:
        """A remote DB's record from its head only (its pinned pages: no GET), its inline
        files read where they lie in the tail, as the C server does; None when the record
        is read whole (an older record layout, no tail, or every block already in the
        cache, as `verify` fetches it)."""
        if h.index_base is None or h.remote.fetched_all:
            return None
        at = store.map_offset(view, h.index_base)
        head = dir_head_len(h.remote.read(at, min(len(view), DIR_HEADER.size)), len(view))
        if head >= len(view):
            return None
        return decode_dir(h.remote.read(at, head), rel, h.data_size, h.offsets_ok, at + head, len(view) - head)

    def _report_bad(self, rec: DirRecord) -> None:
        """Log a record's damaged rows once per process (records can be decoded again)."""
        with self._lock:
            if rec.path in self._reported or len(self._reported) >= _REPORTED_MAX:
                return
            self._reported.add(rec.path)
        first, why = next(iter(rec.bad.items()))
        log.warning(
            "%s: %d damaged entries left out of %s (first: %r, %s)",
            self.path,
            len(rec.bad),
            rec.path or "/",
            decode_path(first),
            why,
        )

    @staticmethod
    def _copy_out(h: Handle, view: memoryview) -> bytes:
        """Bytes of a stored value: one pread rather than a page fault per 4 KiB of map
        (the map is opened without readahead, which suits B-tree pages, not values).
        A remote DB's value is read through its block cache (the map may hold holes)."""
        if h.remote is not None and h.index_base is not None:
            return h.remote.read(store.map_offset(view, h.index_base), len(view))
        if h.index_base is None or len(view) <= 4096:
            return bytes(view)
        data = os.pread(h.index_fd, len(view), store.map_offset(view, h.index_base))
        return data if len(data) == len(view) else bytes(view)

    def root_entry(self) -> Entry:
        meta = self.meta
        root = self.record("")
        subdirs = root.subdir_count if root is not None else 0
        return Entry("", KIND_DIR, meta.root_mode, 0, meta.root_mtime_ns, checksum=subdirs)

    def key_of(self, path: str) -> bytes:
        """The main-database key of ``path`` (md5 of the prefixed path)."""
        meta = self.meta
        return content_key(normpath(path), meta.key_prefix, meta.key_sep, meta.keys)

    def value_view(self, rel: str, entry: Entry) -> memoryview:
        """The file's value: its inline bytes when the index record carries them, else
        looked up by key, as a memoryview into LMDB's map.

        LMDB touches every page of a value it returns, so on a cold cache this faults
        4 KiB at a time; the read paths use `value_offset` and pread instead.
        """
        if entry.inline is not None:
            return memoryview(entry.inline)
        if entry.pieces is not None:
            raise LmdbfsError(
                f"{rel}: {entry.size} bytes, stored in pieces (over one LMDB value)",
                "read it with read_range, read_pieces or open",
            )
        return self.keyed_value(rel, entry)

    def keyed_value(self, rel: str, entry: Entry) -> memoryview:
        """The value found by its key in the main database, even for an inline file (a
        packed DB keeps a second copy there, which `verify` checks too)."""
        h = self._h()
        if h.remote is not None:
            h.remote.fetch_all()  # key lookups touch main-database pages all over the file
        view = self._keyed_checked(rel, entry, h.vget(self.key_of(rel), h.main_db))
        h.touched()
        return view

    @contextlib.contextmanager
    def keyed_values(self) -> Iterator[Callable[[str, Entry], memoryview]]:
        """`keyed_value` for many files in a row (verify): one cursor serves them all."""
        h = self._h()
        if h.remote is not None:
            h.remote.fetch_all()  # key lookups touch main-database pages all over the file
        lookups = h.bulk_lookups()
        try:
            yield lambda rel, entry: self._keyed_checked(rel, entry, lookups(self.key_of(rel)))
        finally:
            lookups.close()

    def _keyed_checked(self, rel: str, entry: Entry, view: memoryview | None) -> memoryview:
        if view is None:
            raise CorruptValue(f"{rel}: listed in the index but its contents are missing", "re-pack the DB")
        if len(view) != entry.size:
            raise CorruptValue(f"{rel}: stored size {len(view)} != indexed size {entry.size}", "re-pack the DB")
        return view

    def value_offset(self, rel: str, entry: Entry) -> int | None:
        """Where the value starts in the data file: from the index when it recorded one
        (values in overflow pages, i.e. all but the smallest files, and every value of an
        adopted DB: no LMDB call at all), else from the map address of a key lookup; None
        if neither is known or the bytes are inline (then read through `value_view`)."""
        if entry.inline is not None or entry.pieces is not None:
            return None
        h = self._h()
        if h.offsets_ok and entry.data_off:
            return entry.data_off
        if h.map_base is None:
            return None
        view = self.value_view(rel, entry)
        return store.map_offset(view, h.map_base) if len(view) else 0

    @property
    def checksummed(self) -> bool:
        """False for a DB adopted without `--checksum`: its values have no checksums."""
        return self.meta.checksum != foreign.CHECKSUM_NONE

    def value_location(self, rel: str, entry: Entry) -> tuple[int, int | None]:
        """(descriptor, offset) to pread a file's value from; offset None: use `value_view`."""
        return self.data_fd, self.value_offset(rel, entry)

    def refetch(self, rel: str, entry: Entry) -> bool:
        """A remote DB's file failed its checksum: drop its cached blocks (True), so the
        next read fetches them again. False for a local DB or an inline file."""
        h = self._h()
        if h.remote is not None and entry.pieces is not None:
            for at, length in piece_spans(entry, lambda k: self._piece_at(rel, entry, k)):
                h.remote.drop(at, length)
            return True
        file_off = None if h.remote is None else self.value_offset(rel, entry)
        if file_off is None:
            return False
        h.remote.drop(file_off, entry.size)
        return True

    def read_range(self, rel: str, entry: Entry, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset`` (fewer at the end) of file ``rel``, already looked up."""
        if offset >= entry.size or size <= 0:
            return b""
        size = min(size, entry.size - offset)
        if entry.inline is not None:
            return entry.inline[offset : offset + size]
        if entry.pieces is not None:
            return self._read_split(rel, entry, offset, size)
        file_off = self.value_offset(rel, entry)
        if file_off is None:
            return bytes(self.value_view(rel, entry)[offset : offset + size])
        return self._pread(rel, file_off + offset, size)

    def _pread(self, rel: str, file_off: int, size: int) -> bytes:
        h = self._h()
        if h.remote is not None:
            return h.remote.read(file_off, size)
        data = os.pread(h.fd, size, file_off)
        if len(data) != size:
            raise CorruptValue(f"{rel}: short read from the DB file", "the DB file is truncated; copy it again")
        return data

    def _read_split(self, rel: str, entry: Entry, offset: int, size: int) -> bytes:
        return split_range(entry, offset, size, lambda k: self._piece_at(rel, entry, k), partial(self._pread, rel))

    def _piece_at(self, rel: str, entry: Entry, k: int) -> int | memoryview:
        """Where piece k of a split file lies: its offset in the data file from the piece
        table, else from a lookup of its key (or, without a map address, its bytes)."""
        h = self._h()
        if h.offsets_ok and entry.pieces[k + 1]:
            return entry.pieces[k + 1]
        piece = entry.pieces[0]
        length = min(piece, entry.size - k * piece)
        if h.remote is not None:
            h.remote.fetch_all()  # key lookups touch main-database pages all over the file
        view = h.vget(piece_key(self.key_of(rel), k), h.main_db)
        if view is None or len(view) != length:
            got = "missing" if view is None else f"{len(view)} bytes, not {length}"
            raise CorruptValue(f"{rel}: piece {k} of its contents is {got}", "re-pack the DB")
        h.touched()
        return view if h.map_base is None else store.map_offset(view, h.map_base)

    def check_entry(self, rel: str, entry: Entry, keyed: Callable[[str, Entry], memoryview] | None = None) -> bool:
        """True when the stored bytes of a file already looked up match the indexed
        checksum. Without checksums (adopted without `--checksum`): when the value is
        still found by its key, with the indexed size, at the indexed offset.
        ``keyed``: a lookup from `keyed_values`."""
        if self.checksummed:
            return self.stored_checksum(rel, entry) == entry.checksum
        if entry.inline is not None:
            return True
        h = self._h()
        view = (keyed or self.value_view)(rel, entry)  # raises when missing or resized
        return h.map_base is None or not len(view) or store.map_offset(view, h.map_base) == entry.data_off

    def stored_checksum(self, rel: str, entry: Entry) -> int:
        """xxh3 of the stored value, read with pread in 1 MiB steps into a reused
        per-thread buffer: no allocation, no page faults, large reads when cold."""
        if entry.size == 0:
            return checksum(b"")
        if entry.inline is not None:
            return checksum(entry.inline)
        if entry.pieces is not None:
            got = _hash_range(lambda at, n: self._read_split(rel, entry, at, n), 0, entry.size)
            if got != entry.checksum and self.checksummed and self.refetch(rel, entry):
                got = _hash_range(lambda at, n: self._read_split(rel, entry, at, n), 0, entry.size)
            return got
        file_off = self.value_offset(rel, entry)
        if file_off is None:
            return checksum(self.value_view(rel, entry))
        h = self._h()
        if h.remote is not None:
            got = _hash_range(h.remote.read, file_off, entry.size)
            if got != entry.checksum and self.checksummed and self.refetch(rel, entry):
                got = _hash_range(h.remote.read, file_off, entry.size)  # a damaged cache block: fetched again, once
            return got
        buf = getattr(_THREAD, "buf", None)
        if buf is None:  # one per thread, whatever the number of archives open
            buf = _THREAD.buf = memoryview(bytearray(PIECE))
        hasher = None if entry.size <= PIECE else xxhash.xxh3_64()
        done = 0
        while done < entry.size:
            want = min(PIECE, entry.size - done)
            got = os.preadv(h.fd, [buf[:want]], file_off + done)
            if got != want:
                raise CorruptValue(f"{rel}: short read from the DB file", "the DB file is truncated; copy it again")
            if hasher is None:
                return checksum(buf[:want])
            hasher.update(buf[:want])
            done += want
        return hasher.intdigest()


def _hash_range(read: Callable[[int, int], bytes], offset: int, size: int) -> int:
    """xxh3 of ``size`` bytes from ``offset``, read with ``read(offset, size)`` 1 MiB at a time."""
    if size <= PIECE:
        return checksum(read(offset, size))
    hasher = xxhash.xxh3_64()
    for done in range(0, size, PIECE):
        hasher.update(read(offset + done, min(PIECE, size - done)))
    return hasher.intdigest()


def open(path: str | os.PathLike[str], **kwargs: Any) -> Archive:  # noqa: A001 - the API name
    """Open a packed DB for reading (see `Archive`)."""
    return Archive(os.fspath(path), **kwargs)
