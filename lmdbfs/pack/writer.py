"""The packer's side of LMDB: batched puts into the partial DB, map growth, resume,
value offsets, and the final commit that writes the index and the meta record."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable

import lmdb
import numpy as np

from ..db.store import MAX_DBS, map_base, map_offset, start_writeback, unmap_pages
from ..errors import SourceError
from ..format.meta import Meta
from ..format.records import (
    COMPACT_INLINE_MAX,
    INDEX_DB,
    INLINE_MAX,
    KEYS_MD5,
    KIND_FILE,
    META_DB,
    META_KEY,
    RECORD_MAX,
    checksum,
    content_key,
    decode_path,
    dir_key,
    encode_dir,
    pack_inline,
)
from .largevalues import LargeValues
from .scan import Scan, ScannedDir

log = logging.getLogger(__name__)

BATCH_BYTES = 32 << 20  # dirty pages held per write transaction
# Large values (in overflow pages of their own) are committed every few MB instead: LMDB
# copies each into pages it allocates and writes them out at commit, and a small batch is
# still in the CPU's cache then. Medium frames (~166 KB) packed 5.8-6.3 s a time against
# 7.3-8.5 s with 32 MB batches; tiny files still want the large batches, which amortise
# the B-tree pages every commit rewrites.
LARGE_BATCH_BYTES = 4 << 20
DATA_FILE = "data.mdb"  # the data file of an LMDB directory
_PAGE = 4096
_PAGE_HEADER = 16  # LMDB's PAGEHDRSZ
# _put_spooled's fences: one every 4 puts packed ~2 KB values 2.00 a leaf page (2.05 at
# best; 1.78 without fences, 1.03 with no other keys in the DB) on a GOT-10k-shaped tree
FENCE_EVERY = 4


class Keys:
    """Main-database keys of the scan's files: md5 digests made once and kept (16 bytes
    a file), plain path keys made on demand from the paths."""

    def __init__(self, scan: Scan, prefix: str, sep: str, scheme: str) -> None:
        self.scan, self.prefix, self.sep, self.scheme = scan, prefix, sep, scheme
        self.digests: bytes | None = None
        if scheme == KEYS_MD5:
            self.digests = b"".join(self.key_of(scan.file_relpath(i)) for i in range(scan.files))

    def __call__(self, i: int) -> bytes:
        if self.digests is not None:
            return self.digests[16 * i : 16 * i + 16]
        return self.key_of(self.scan.file_relpath(i))

    def key_of(self, rel: str) -> bytes:
        return content_key(rel, self.prefix, self.sep, self.scheme)


class Writer(LargeValues):
    """Owns the partial LMDB: batched puts, map growth, resume, the final commit."""

    def __init__(self, path: str, subdir: bool, map_size: int, scan: Scan, keys: Keys, compact: bool = False) -> None:
        self.path = path
        self.data_file = os.path.join(path, DATA_FILE) if subdir else path
        self.scan = scan
        self.keys = keys
        self.offsets_ok = True  # every overflow value's offset has been recorded
        self.subdir = subdir
        self.wrote_mapped = False  # put_large opened the environment with writemap
        self.env = self._open(map_size, writemap=False)
        self.main = self.env.open_db()
        self.wb_fd = os.open(self.data_file, os.O_RDONLY)  # to start each commit's writeback
        self.txn: lmdb.Transaction | None = None
        self.pending: list[tuple[int, bytes, bytes]] = []  # (file, key, value) of the open batch
        self.pending_bytes = 0
        self.pending_large = 0  # bytes of values over INLINE_MAX in the open batch
        # Small files wait in a spool file (unlinked: written to the disk only if memory is
        # short) until the final commits; a row's data_off holds its offset there + 1.
        # Compact: they go into their records only. Keyed: into their records, and into
        # the main database in key order behind fences (_put_spooled), which fills its
        # leaf pages (in source order, random md5 keys split pages half-empty: ~70 % full).
        self.compact = compact
        self.inline_max = COMPACT_INLINE_MAX if compact else INLINE_MAX
        self.spool = tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(self.data_file)))
        self.spooled = 0

    def _open(self, map_size: int, writemap: bool) -> lmdb.Environment:
        try:
            return lmdb.open(
                self.path,
                subdir=self.subdir,
                map_size=map_size,
                max_dbs=MAX_DBS,
                sync=False,
                metasync=False,
                readahead=True,  # _record_offsets maps cached pages 16 at a time
                writemap=writemap,
                meminit=False,
                lock=True,
            )
        except lmdb.Error as exc:
            raise SourceError(f"cannot create {self.path}: {exc}", "check the destination is writable") from None

    def resume_todo(self, order: np.ndarray) -> np.ndarray:
        """The files of ``order`` a previous run has not committed yet, in order.

        Committed values are checked against the scan (size) and checksummed; their
        offsets are recorded again. A fresh DB has nothing committed: everything is to do.
        """
        scan = self.scan
        with self.env.begin(buffers=True) as txn:
            if txn.stat(self.main)["entries"] == 0:
                return order
            base = map_base(self.data_file)
            done = np.zeros(len(order), dtype=bool)
            for n, i in enumerate(order.tolist()):
                value = txn.get(self.keys(i), db=self.main)
                if value is None:
                    continue
                row = scan.row(i)
                if len(value) != int(row["size"]):
                    raise SourceError(
                        f"{scan.file_relpath(i)} changed since the interrupted pack",
                        "start over with --force",
                    )
                row["checksum"] = checksum(value)
                self._note_offset(row, value, base)
                done[n] = True
                if n % 1024 == 1023:
                    self._unmap(base)
            self._unmap(base)
        log.info("resuming: %d of %d files already packed", int(done.sum()), len(order))
        return order[~done]

    def put(self, i: int, key: bytes, value: bytes) -> None:
        """Add one value; commit every BATCH_BYTES. The open batch stays in memory so a
        full map can grow and the batch be written again (a stream cannot be re-read)."""
        if self.spool is not None and len(value) <= self.inline_max:
            self.spool.write(value)
            self.scan.row(i)["data_off"] = self.spooled + 1
            self.spooled += len(value)
            return
        if self.txn is None:
            self.txn = self.env.begin(write=True, db=self.main)
        try:
            self.txn.put(key, value)
        except lmdb.MapFullError:
            self.pending.append((i, key, value))
            self._grow_and_replay()
        else:
            self.pending.append((i, key, value))
        # A put dirties at least the leaf page its key lands in (keys arrive in source
        # order, so each small value touches another leaf): count that page, so a
        # transaction's dirty pages, held in memory until commit, stay near BATCH_BYTES.
        self.pending_bytes += max(len(value), _PAGE)
        if len(value) > INLINE_MAX:
            self.pending_large += len(value)
        if self.pending_bytes >= BATCH_BYTES or self.pending_large >= LARGE_BATCH_BYTES:
            self.commit()

    def truncate(self) -> None:
        """After the final commit of a pack that used writemap: cut the file to its last
        page (writemap left it as long as the map)."""
        if self.wrote_mapped:
            info, stat = self.env.info(), self.env.stat()
            os.truncate(self.data_file, (info["last_pgno"] + 1) * stat["psize"])

    def commit(self) -> None:
        while self.txn is not None:
            try:
                self.txn.commit()
                self.txn = None
            except lmdb.MapFullError:
                self._grow_and_replay()
        start_writeback(self.wb_fd)
        self._record_offsets([(i, key) for i, key, _ in self.pending])
        self.pending.clear()
        self.pending_bytes = self.pending_large = 0

    def _record_offsets(self, files: list[tuple[int, bytes]]) -> None:
        """Note in each just-committed file's row where its value landed in the file.

        Readers then pread values directly, with no LMDB call: LMDB touches every page
        of a value it returns, which on a cold cache means 4 KiB faults. Done right
        after each commit, while the batch is still in the page cache; the pages are
        unmapped again so the packer's memory stays flat.
        """
        if not files:
            return
        base = map_base(self.data_file)
        with self.env.begin(buffers=True, db=self.main) as txn:
            for i, key in files:
                view = txn.get(key)
                if view is None:
                    raise SourceError(f"{self.scan.file_relpath(i)}: value missing after commit", "pack again")
                self._note_offset(self.scan.row(i), view, base)
        self._unmap(base)

    def _note_offset(self, row: np.void, view: memoryview, base: int | None) -> None:
        offset = self._offset(view, base)
        if offset:
            row["data_off"] = offset

    def _offset(self, view: memoryview, base: int | None) -> int:
        """The value's offset in the data file, 0 when it may move or is not known."""
        if base is None:
            self.offsets_ok = False
        elif len(view):
            offset = map_offset(view, base)
            # Only values in overflow pages (they start right after a 16-byte page
            # header) stay put; small values live in leaf pages, which later commits
            # may copy elsewhere. Those are looked up by key (or carried inline).
            if offset % _PAGE == _PAGE_HEADER:
                return offset
        return 0

    def _unmap(self, base: int | None) -> None:
        if base is not None:
            unmap_pages(base, self.env.info()["map_size"])

    def _grow_and_replay(self) -> None:
        """Abort the open batch, grow the map, and write the batch again."""
        while True:
            if self.txn is not None:
                self.txn.abort()
            new = int(self.env.info()["map_size"] * 1.5) + 2 * BATCH_BYTES
            log.info("growing the map to %.1f GB", new / 1e9)
            self.env.set_mapsize(new)
            self.txn = self.env.begin(write=True, db=self.main)
            try:
                for _i, key, value in self.pending:
                    self.txn.put(key, value)
                return
            except lmdb.MapFullError:
                continue

    def finish(self, scan: Scan, meta: Meta) -> None:
        """The index, then the meta record in the final commit, so 'complete' is atomic.

        Small files' bytes go into their directory's record here, read back from the
        spool (bounded memory: one directory at a time); in the keyed layout they go into
        the main database first, in key order."""
        self.commit()
        index_bytes = sum(len(d.blob) + d.rows.nbytes + 256 for d in scan.dirs)
        index_bytes += 2 * int(scan.file_size[scan.file_size <= self.inline_max].sum())
        info = self.env.info()
        need = (info["last_pgno"] + 1) * _PAGE + 3 * index_bytes + (16 << 20)
        if need > info["map_size"]:
            self.env.set_mapsize(need)
        self.spool.flush()
        if not self.compact:
            self._put_spooled(scan)
        index = self.env.open_db(INDEX_DB, create=True)
        meta_db = self.env.open_db(META_DB, create=True)
        # Records go in BATCH_BYTES commits: LMDB keeps a transaction's dirty pages in
        # memory, and 1.4M inline tiny frames make ~1 GB of records. Only the meta record,
        # which marks the DB complete, waits for the final commit.
        txn, batch = self.env.begin(write=True), 0
        base = map_base(self.data_file)
        files_of = _files_by_dir(scan)
        try:
            for k, d in enumerate(scan.dirs):
                record = encode_dir(d.path, d.rows, d.blob, self._inline_tail(txn, d, files_of(k)))
                txn.put(dir_key(d.path), record, db=index)
                batch += len(record)
                if batch >= BATCH_BYTES:
                    txn.commit()
                    start_writeback(self.wb_fd)
                    txn, batch = self.env.begin(write=True), 0
                    self._unmap(base)  # the pages the inline bytes were read from
            meta.offsets_txnid = txn.id() if self.offsets_ok else 0
            txn.put(META_KEY, meta.encode(), db=meta_db)
            txn.commit()
        except BaseException:
            txn.abort()
            raise
        self.truncate()
        self.env.sync(True)

    def _put_spooled(self, scan: Scan) -> None:
        """The keyed layout's small files into the main database, in key order, behind a
        fence. A put on the last spot of a full leaf page makes LMDB split it with the
        page's last value moving on with the new one: with ~2 KB values, one value a page.
        So every FENCE_EVERY puts an empty value is put under a key that sorts after the
        next FENCE_EVERY keys (theirs plus a NUL byte: never a file's key); the puts before
        it then land amid a page, and LMDB splits such pages as full as they go. The
        fences are deleted before each commit (still in the transaction's own pages, so
        nothing is copied), so no committed DB ever holds one. Commits every BATCH_BYTES
        (dirty pages stay in memory)."""
        found: list[tuple[bytes, int, int]] = []
        files_of = _files_by_dir(scan)
        for k, d in enumerate(scan.dirs):
            small = np.flatnonzero((d.rows["kind"] == KIND_FILE) & (d.rows["data_off"] > 0))
            small = small[d.rows["size"][small] <= INLINE_MAX]
            numbers = files_of(k)
            for r in small.tolist():
                key = self.keys(int(numbers[r])) if numbers is not None else self.keys.key_of(_relpath(d, r))
                found.append((key, int(d.rows[r]["data_off"]) - 1, int(d.rows[r]["size"])))
        found.sort()
        fd, batch, fences = self.spool.fileno(), 0, []
        key_max = self.env.max_key_size()
        txn = self.env.begin(write=True, db=self.main)
        try:
            for n, (key, at, size) in enumerate(found):
                if n % FENCE_EVERY == 0:
                    fence = found[min(n + FENCE_EVERY, len(found) - 1)][0] + b"\0"
                    if len(fence) <= key_max:
                        txn.put(fence, b"")
                        fences.append(fence)
                txn.put(key, os.pread(fd, size, at))
                batch += _PAGE // 2 + size
                if batch >= BATCH_BYTES:
                    _remove(txn, fences)
                    txn.commit()
                    start_writeback(self.wb_fd)
                    txn, batch = self.env.begin(write=True, db=self.main), 0
            _remove(txn, fences)
            txn.commit()
        except BaseException:
            txn.abort()
            raise

    def _inline_tail(self, txn: lmdb.Transaction, d: ScannedDir, files: np.ndarray | None) -> bytes:
        """The bytes of the directory's small files, for its record's tail; sets
        FLAG_INLINE and data_off on their rows (records.pack_inline). ``files``: each
        row's file number, whose key `Keys` holds (None: keys are made from the paths)."""
        small = np.flatnonzero((d.rows["kind"] == KIND_FILE) & (d.rows["size"] <= self.inline_max))
        if not len(small):
            return b""
        inline: list[bytes | None] = [None] * len(d.rows)
        # The record, tail included, must stay within RECORD_MAX (the C server refuses a
        # larger one): past that, files are read by key only (compact: stored by key).
        room = RECORD_MAX - (16 + len(d.path.encode("utf-8", "surrogateescape")) + d.rows.nbytes + len(d.blob))
        for r in small.tolist():
            size = int(d.rows[r]["size"])
            spooled = int(d.rows[r]["data_off"]) if self.spool is not None else 0
            room -= size
            if room < 0 and not spooled:
                continue  # found by its key
            key = self.keys(int(files[r])) if files is not None else self.keys.key_of(_relpath(d, r))
            if spooled:
                value = os.pread(self.spool.fileno(), size, spooled - 1)
                d.rows[r]["data_off"] = 0
                if room < 0:
                    if self.compact:  # stored once all the same: by key
                        txn.put(key, value, db=self.main)
                    continue
            else:
                value = txn.get(key, db=self.main)
            if value is None or len(value) != size:
                raise SourceError(f"{_relpath(d, r)}: value missing before the final commit", "pack again with --force")
            inline[r] = bytes(value)
        return pack_inline(d.rows, inline)

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        if self.txn is not None:
            self.txn.abort()
            self.txn = None
        self.env.close()
        if self.wb_fd >= 0:
            os.close(self.wb_fd)
            self.wb_fd = -1


def _remove(txn: lmdb.Transaction, fences: list[bytes]) -> None:
    """Delete _put_spooled's fences (empty values under keys no file has)."""
    for fence in fences:
        txn.delete(fence)
    fences.clear()


def _relpath(d: ScannedDir, r: int) -> str:
    name = decode_path(d.name_and_target(r)[0])
    return f"{d.path}/{name}" if d.path else name


def _files_by_dir(scan: Scan) -> Callable[[int], np.ndarray | None]:
    """For directory k, each row's file number (-1: not a file), so a small file's key
    is the one `Keys` already holds. Once files were left out (`Scan.drop_files`, after
    --skip-errors) rows no longer match the numbers: then None, and keys are made again
    from the paths."""
    if scan.files != len(scan.file_dir):
        return lambda _k: None
    order = np.argsort(scan.file_dir, kind="stable")
    ends = np.cumsum(np.bincount(scan.file_dir, minlength=len(scan.dirs)))

    def files_of(k: int) -> np.ndarray:
        mine = order[ends[k - 1] if k else 0 : ends[k]]
        numbers = np.full(len(scan.dirs[k].rows), -1, np.int64)
        numbers[scan.file_row[mine]] = mine
        return numbers

    return files_of
