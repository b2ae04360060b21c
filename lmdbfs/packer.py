"""`lmdbfs pack`: copy a tree's exact bytes into one LMDB file, with a path index.

How it avoids the original converter's failures:
* bytes are stored as read, never re-encoded; every value gets an xxh3 checksum;
* it writes ``DB.partial`` and renames it to ``DB`` only after the final commit, which
  also writes the meta record: an interrupted pack is never mistaken for a whole one,
  and an existing DB is replaced only by a complete new one;
* commits are batched (bounded memory) and ``--resume`` continues an interrupted pack;
* the map grows as needed instead of a hard-coded size, and without writemap the file
  is only as big as its data;
* md5 keys are sorted first and appended in order, so B-tree pages stay full.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as _dt
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import lmdb
import numpy as np
from tqdm import tqdm

from . import __version__
from .errors import DestinationExists, SourceError
from .format import INDEX_DB, META_DB, META_KEY, PARTIAL_SUFFIX, Meta, checksum, content_key, dir_key, encode_dir
from .scan import Scan, scan_tree
from .store import MAX_DBS, map_base, map_offset, unmap_pages

log = logging.getLogger(__name__)

BATCH_BYTES = 32 << 20  # dirty pages held per write transaction
WINDOW_BYTES = 32 << 20  # file contents read ahead of the writer
CHUNK_BYTES = 1 << 20  # one read task: up to this many bytes ...
CHUNK_FILES = 256  # ... or this many files
_PAGE = 4096
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_PAGE_HEADER = 16  # LMDB's PAGEHDRSZ


@dataclass
class PackOptions:
    workers: int = 8
    excludes: list[str] = field(default_factory=list)
    force: bool = False
    resume: bool = False
    skip_errors: bool = False
    key_prefix: str = ""
    key_sep: str = "/"
    progress: bool = True
    include: Callable[[str], bool] | None = None  # keep only relative paths it accepts (shards)
    extra: dict = field(default_factory=dict)  # added to the meta's `extra` (shard info)


@dataclass
class PackResult:
    db: str
    files: int
    dirs: int
    symlinks: int
    bytes: int
    db_bytes: int
    seconds: float
    resumed_files: int = 0
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def pack(src: str, db: str, opts: PackOptions | None = None) -> PackResult:
    """Pack the tree at ``src`` into the single-file DB ``db``."""
    opts = opts or PackOptions()
    started = time.monotonic()
    _fixed_mmap_threshold()
    partial = db + PARTIAL_SUFFIX
    _check_destination(db, partial, opts)
    log.info("scanning %s", src)
    scan = scan_tree(
        src, opts.excludes, output_files(db), opts.skip_errors, progress=opts.progress, include=opts.include
    )
    log.info(
        "found %d files, %d dirs, %d symlinks, %.1f MB", scan.files, len(scan.dirs), scan.symlinks, scan.bytes / 1e6
    )
    keys, order = _sorted_keys(scan, opts)
    if opts.force or not opts.resume:
        _remove_db_files(partial)
    writer = _Writer(partial, _map_size_for(scan), scan, keys)
    try:
        resumed = writer.resume_point(order)
        unreadable = _copy_contents(scan, keys, order[resumed:], writer, opts)
        scan.drop_files(unreadable)
        writer.finish(scan, _meta_for(src, scan, opts))
    finally:
        writer.close()
    _publish(partial, db)
    return PackResult(
        db=db,
        files=scan.files,
        dirs=len(scan.dirs),
        symlinks=scan.symlinks,
        bytes=scan.bytes,
        db_bytes=os.path.getsize(db),
        seconds=time.monotonic() - started,
        resumed_files=resumed,
        skipped=scan.skipped,
        errors=scan.errors,
    )


def output_files(db: str) -> list[bytes]:
    """The files a pack into ``db`` writes: never packed, should they sit inside SRC."""
    out_abs = os.fsencode(os.path.abspath(db))
    return [out_abs + s for s in (b"", b"-lock", PARTIAL_SUFFIX.encode(), PARTIAL_SUFFIX.encode() + b"-lock")]


def _check_destination(db: str, partial: str, opts: PackOptions) -> None:
    if os.path.exists(db) and not opts.force and not (opts.resume and os.path.exists(partial)):
        raise DestinationExists(
            f"{db} already exists", "pass --force to replace it (it is kept until the new one is complete)"
        )
    if os.path.exists(partial) and not (opts.force or opts.resume):
        raise DestinationExists(
            f"{partial} holds an unfinished pack", "pass --resume to finish it, or --force to start over"
        )
    parent = os.path.dirname(os.path.abspath(db))
    if not os.path.isdir(parent):
        raise DestinationExists(f"{parent}: no such directory for the DB", "create it first")


def _sorted_keys(scan: Scan, opts: PackOptions) -> tuple[bytes, np.ndarray]:
    """md5 keys of all files (16 bytes each, scan order) and the order that visits them
    ascending, as LMDB sorts them.

    numpy's 'S16' ordering agrees with memcmp for equal-length keys (trailing NULs are
    stripped from both sides alike), so it sorts and searches them correctly.
    """
    raw = b"".join(content_key(scan.file_relpath(i), opts.key_prefix, opts.key_sep) for i in range(scan.files))
    keys = np.frombuffer(raw, dtype="S16")
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    same = np.flatnonzero(ordered[1:] == ordered[:-1])
    if len(same):
        a, b = scan.file_relpath(int(order[same[0]])), scan.file_relpath(int(order[same[0] + 1]))
        raise SourceError(f"{a} and {b} have the same md5 key", "change --key-prefix/--key-sep")
    return raw, order


def _key_bytes(keys: bytes, i: int) -> bytes:
    return keys[16 * i : 16 * i + 16]


def _map_size_for(scan: Scan) -> int:
    """A first map size from the scan: every value rounded up to pages, plus the index.

    Only address space is reserved (no writemap), so generous is free; it still grows
    on demand if files grow while being packed.
    """
    value_pages = int(np.sum((scan.file_size.astype(np.int64) + 16 + _PAGE - 1) // _PAGE)) + scan.files
    index_bytes = sum(len(d.blob) + d.rows.nbytes + 64 for d in scan.dirs)
    return max(64 << 20, int((value_pages * _PAGE + 2 * index_bytes) * 1.25) + (64 << 20))


class _Writer:
    """Owns the partial LMDB: batched appends, map growth, resume, the final commit."""

    def __init__(self, path: str, map_size: int, scan: Scan, keys: bytes) -> None:
        self.path = path
        self.scan = scan
        self.keys = keys
        self.offsets_ok = True  # every overflow value's offset has been recorded
        try:
            self.env = lmdb.open(
                path,
                subdir=False,
                map_size=map_size,
                max_dbs=MAX_DBS,
                sync=False,
                metasync=False,
                readahead=True,  # _record_offsets maps cached pages 16 at a time
                writemap=False,
                meminit=False,
                lock=True,
            )
        except lmdb.Error as exc:
            raise SourceError(f"cannot create {path}: {exc}", "check the destination is writable") from None
        self.main = self.env.open_db()
        self.txn: lmdb.Transaction | None = None
        self.pending: list[int] = []  # files in the open batch, in order
        self.pending_bytes = 0

    def resume_point(self, order: np.ndarray) -> int:
        """How many files (in key order) a previous run already committed; checksums them."""
        scan, keys = self.scan, self.keys
        with self.env.begin(buffers=True) as txn:
            cur = txn.cursor(self.main)
            if not cur.last():
                return 0
            last = bytes(cur.key())
            ordered = np.frombuffer(keys, dtype="S16")[order]
            done = int(np.searchsorted(ordered, np.frombuffer(last, dtype="S16"), side="right")[0])
            log.info("resuming: %d of %d files already packed", done, scan.files)
            base = map_base(self.path)
            for n in range(done):
                i = int(order[n])
                value = txn.get(_key_bytes(keys, i), db=self.main)
                row = _row_of(scan, i)
                if value is None or len(value) != int(row["size"]):
                    raise SourceError(
                        f"{scan.file_relpath(i)} changed since the interrupted pack",
                        "start over with --force",
                    )
                row["checksum"] = checksum(value)
                self._note_offset(row, value, base)
                if n % 1024 == 1023:
                    self._unmap(base)
            self._unmap(base)
        return done

    def put(self, i: int, key: bytes, value: bytes, reread: Callable[[int], tuple[bytes, bytes]]) -> None:
        """Append one value; commit every BATCH_BYTES. The batch is not kept in memory:
        if the map is ever full, the batch is re-read from the source (``reread``)."""
        while True:
            if self.txn is None:
                self.txn = self.env.begin(write=True, db=self.main)
            try:
                self.txn.put(key, value, append=True)
                break
            except lmdb.MapFullError:
                self._grow_and_replay(reread)
        self.pending.append(i)
        self.pending_bytes += len(value)
        if self.pending_bytes >= BATCH_BYTES:
            self.commit(reread)

    def commit(self, reread: Callable[[int], tuple[bytes, bytes]] | None = None) -> None:
        while self.txn is not None:
            try:
                self.txn.commit()
                self.txn = None
            except lmdb.MapFullError:
                if reread is None:
                    raise
                self._grow_and_replay(reread)
        self._record_offsets(self.pending)
        self.pending.clear()
        self.pending_bytes = 0

    def _record_offsets(self, files: list[int]) -> None:
        """Note in each just-committed file's row where its value landed in the file.

        Readers then pread values directly, with no LMDB call: LMDB touches every page
        of a value it returns, which on a cold cache means 4 KiB faults. Done right
        after each commit, while the batch is still in the page cache; the pages are
        unmapped again so the packer's memory stays flat.
        """
        if not files:
            return
        base = map_base(self.path)
        with self.env.begin(buffers=True, db=self.main) as txn:
            for i in files:
                view = txn.get(_key_bytes(self.keys, i))
                if view is None:
                    raise SourceError(f"{self.scan.file_relpath(i)}: value missing after commit", "pack again")
                self._note_offset(_row_of(self.scan, i), view, base)
        self._unmap(base)

    def _note_offset(self, row: np.void, view: memoryview, base: int | None) -> None:
        if base is None:
            self.offsets_ok = False
        elif len(view):
            offset = map_offset(view, base)
            # Only values in overflow pages (they start right after a 16-byte page
            # header) stay put; small values live in leaf pages, which later commits
            # may copy elsewhere. Those are looked up by key.
            if offset % _PAGE == _PAGE_HEADER:
                row["data_off"] = offset

    def _unmap(self, base: int | None) -> None:
        if base is not None:
            unmap_pages(base, self.env.info()["map_size"])

    def _grow_and_replay(self, reread: Callable[[int], tuple[bytes, bytes]]) -> None:
        """Abort the open batch, grow the map, and write the batch again."""
        if self.txn is not None:
            self.txn.abort()
        new = int(self.env.info()["map_size"] * 1.5) + 2 * BATCH_BYTES
        log.info("growing the map to %.1f GB", new / 1e9)
        self.env.set_mapsize(new)
        self.txn = self.env.begin(write=True, db=self.main)
        for j in self.pending:
            key, value = reread(j)
            self.txn.put(key, value, append=True)

    def finish(self, scan: Scan, meta: Meta) -> None:
        """The final commit: index and meta together, so 'complete' is atomic."""
        self.commit()
        index_bytes = sum(len(d.blob) + d.rows.nbytes + 256 for d in scan.dirs)
        info = self.env.info()
        need = (info["last_pgno"] + 1) * _PAGE + 3 * index_bytes + (16 << 20)
        if need > info["map_size"]:
            self.env.set_mapsize(need)
        index = self.env.open_db(INDEX_DB, create=True)
        meta_db = self.env.open_db(META_DB, create=True)
        with self.env.begin(write=True) as txn:
            for d in scan.dirs:
                txn.put(dir_key(d.path), encode_dir(d.path, d.rows, d.blob), db=index)
            meta.offsets_txnid = txn.id() if self.offsets_ok else 0
            txn.put(META_KEY, meta.encode(), db=meta_db)
        self.env.sync(True)

    def close(self) -> None:
        if self.txn is not None:
            self.txn.abort()
            self.txn = None
        self.env.close()


def _row_of(scan: Scan, i: int) -> np.void:
    return scan.dirs[int(scan.file_dir[i])].rows[int(scan.file_row[i])]


def _chunks(order: np.ndarray, sizes: np.ndarray) -> Iterator[np.ndarray]:
    """Consecutive slices of ``order`` of at most CHUNK_FILES files or ~CHUNK_BYTES:
    one task per chunk keeps thread-pool overhead off the per-file path."""
    ends = np.cumsum(sizes[order], dtype=np.int64)
    start = 0
    while start < len(order):
        base = int(ends[start - 1]) if start else 0
        stop = int(np.searchsorted(ends, base + CHUNK_BYTES, side="right"))
        stop = min(max(stop, start + 1), start + CHUNK_FILES)
        yield order[start:stop]
        start = stop


def _copy_contents(scan: Scan, keys: bytes, order: np.ndarray, writer: _Writer, opts: PackOptions) -> list[int]:
    """Read files in key order on worker threads; append them in that order.
    Returns the files that could not be read (with --skip-errors)."""
    root = scan.root
    sizes = scan.file_size
    todo = int(sizes[order].sum()) if len(order) else 0
    bar = tqdm(
        total=scan.bytes,
        initial=scan.bytes - todo,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="pack",
        disable=not opts.progress,
        smoothing=0.1,
    )
    unreadable: list[int] = []
    files_done = 0

    def read_one(i: int) -> bytes | None:
        rel = scan.file_relpath(i)
        try:
            with open(os.path.join(root, os.fsencode(rel)), "rb", buffering=0) as fh:
                data = fh.read()
                info = os.fstat(fh.fileno())
        except OSError as exc:
            if not opts.skip_errors:
                raise SourceError(
                    f"cannot read {rel}: {exc.strerror}",
                    "fix its permissions, or pass --skip-errors to leave it out and list it",
                ) from None
            log.warning("skipping %s: %s", rel, exc.strerror)
            scan.errors.append(f"{rel}: {exc.strerror}")
            return None
        row = _row_of(scan, i)
        if len(data) != int(row["size"]):
            log.warning("%s changed while being packed; storing what was read", rel)
            row["size"] = len(data)
            row["mtime_ns"] = info.st_mtime_ns
        row["checksum"] = checksum(data)
        return data

    def read_chunk(chunk: np.ndarray) -> list[tuple[int, bytes | None]]:
        return [(i, read_one(i)) for i in chunk.tolist()]

    def reread(i: int) -> tuple[bytes, bytes]:
        return _key_bytes(keys, i), read_one(i) or b""

    window: deque[tuple[int, Future[list[tuple[int, bytes | None]]]]] = deque()
    in_flight = 0
    chunks = _chunks(order, sizes)
    with ThreadPoolExecutor(max_workers=max(1, opts.workers), thread_name_prefix="pack-read") as pool:
        while True:
            while in_flight < WINDOW_BYTES or not window:
                chunk = next(chunks, None)
                if chunk is None:
                    break
                nbytes = int(sizes[chunk].sum())
                in_flight += nbytes
                window.append((nbytes, pool.submit(read_chunk, chunk)))
            if not window:
                break
            nbytes, future = window.popleft()
            in_flight -= nbytes
            results = future.result()
            for i, data in results:
                if data is None:
                    unreadable.append(i)
                    continue
                writer.put(i, _key_bytes(keys, i), data, reread)
            files_done += len(results)
            bar.set_postfix(files=f"{files_done}/{len(order)}", refresh=False)
            bar.update(nbytes)
    writer.commit(reread)
    bar.close()
    return unreadable


def _meta_for(src: str, scan: Scan, opts: PackOptions) -> Meta:
    return Meta(
        key_prefix=opts.key_prefix,
        key_sep=opts.key_sep,
        files=scan.files,
        dirs=len(scan.dirs),
        symlinks=scan.symlinks,
        bytes=int(sum(int(d.rows["size"][d.rows["kind"] == 1].sum()) for d in scan.dirs)),
        tool_version=__version__,
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        source=os.path.basename(os.path.abspath(src)),
        root_mode=scan.root_mode,
        root_mtime_ns=scan.root_mtime_ns,
        complete=True,
        extra={
            "excludes": list(opts.excludes),
            "skipped": len(scan.skipped),
            "unreadable": len(scan.errors),
            **opts.extra,
        },
    )


def _fixed_mmap_threshold() -> None:
    """Give file buffers back to the OS as soon as they are freed.

    glibc raises its mmap threshold after large frees, so the reader threads' buffers
    of a few hundred KB would pile up in per-thread arenas (~300 MB on a GOT-10k-like
    tree). Fixing the threshold at 128 KiB keeps peak memory near the bounded window.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _remove_db_files(path: str) -> None:
    for p in (path, path + "-lock"):
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.unlink(p)


def _publish(partial: str, db: str) -> None:
    """Atomically put the finished DB in place, then make the rename durable."""
    if os.path.isdir(db):
        shutil.rmtree(db)
    os.replace(partial, db)
    if os.path.lexists(partial + "-lock"):
        os.unlink(partial + "-lock")
    if os.path.lexists(db + "-lock"):
        os.unlink(db + "-lock")
    dfd = os.open(os.path.dirname(os.path.abspath(db)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
