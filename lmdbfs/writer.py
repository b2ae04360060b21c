"""The packer's side of LMDB: batched puts into the partial DB, map growth, resume,
value offsets, and the final commit that writes the index and the meta record."""

from __future__ import annotations

import logging
import os

import lmdb
import numpy as np

from .errors import SourceError
from .format import (
    INDEX_DB,
    INLINE_MAX,
    KEYS_MD5,
    KIND_FILE,
    META_DB,
    META_KEY,
    RECORD_MAX,
    Meta,
    checksum,
    content_key,
    decode_path,
    dir_key,
    encode_dir,
    pack_inline,
)
from .scan import Scan, ScannedDir
from .store import MAX_DBS, map_base, map_offset, start_writeback, unmap_pages

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


class Writer:
    """Owns the partial LMDB: batched puts, map growth, resume, the final commit."""

    def __init__(self, path: str, subdir: bool, map_size: int, scan: Scan, keys: Keys) -> None:
        self.path = path
        self.data_file = os.path.join(path, DATA_FILE) if subdir else path
        self.scan = scan
        self.keys = keys
        self.offsets_ok = True  # every overflow value's offset has been recorded
        try:
            self.env = lmdb.open(
                path,
                subdir=subdir,
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
        self.wb_fd = os.open(self.data_file, os.O_RDONLY)  # to start each commit's writeback
        self.txn: lmdb.Transaction | None = None
        self.pending: list[tuple[int, bytes, bytes]] = []  # (file, key, value) of the open batch
        self.pending_bytes = 0
        self.pending_large = 0  # bytes of values over INLINE_MAX in the open batch

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
        if base is None:
            self.offsets_ok = False
        elif len(view):
            offset = map_offset(view, base)
            # Only values in overflow pages (they start right after a 16-byte page
            # header) stay put; small values live in leaf pages, which later commits
            # may copy elsewhere. Those are looked up by key (or carried inline).
            if offset % _PAGE == _PAGE_HEADER:
                row["data_off"] = offset

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
        main database (bounded memory: one directory at a time)."""
        self.commit()
        index_bytes = sum(len(d.blob) + d.rows.nbytes + 256 for d in scan.dirs)
        index_bytes += int(scan.file_size[scan.file_size <= INLINE_MAX].sum())
        info = self.env.info()
        need = (info["last_pgno"] + 1) * _PAGE + 3 * index_bytes + (16 << 20)
        if need > info["map_size"]:
            self.env.set_mapsize(need)
        index = self.env.open_db(INDEX_DB, create=True)
        meta_db = self.env.open_db(META_DB, create=True)
        # Records go in BATCH_BYTES commits: LMDB keeps a transaction's dirty pages in
        # memory, and 1.4M inline tiny frames make ~1 GB of records. Only the meta record,
        # which marks the DB complete, waits for the final commit.
        txn, batch = self.env.begin(write=True), 0
        base = map_base(self.data_file)
        try:
            for d in scan.dirs:
                record = encode_dir(d.path, d.rows, d.blob, self._inline_tail(txn, d))
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
        self.env.sync(True)

    def _inline_tail(self, txn: lmdb.Transaction, d: ScannedDir) -> bytes:
        """The bytes of the directory's small files, for its record's tail; sets
        FLAG_INLINE and data_off on their rows (format.pack_inline)."""
        small = np.flatnonzero((d.rows["kind"] == KIND_FILE) & (d.rows["size"] <= INLINE_MAX))
        if not len(small):
            return b""
        inline: list[bytes | None] = [None] * len(d.rows)
        # The record, tail included, must stay within RECORD_MAX (the C server refuses a
        # larger one): past that, files are read by key only.
        room = RECORD_MAX - (16 + len(d.path.encode("utf-8", "surrogateescape")) + d.rows.nbytes + len(d.blob))
        for r in small.tolist():
            room -= int(d.rows[r]["size"])
            if room < 0:
                break
            rel = decode_path(d.name_and_target(r)[0])
            rel = f"{d.path}/{rel}" if d.path else rel
            value = txn.get(self.keys.key_of(rel), db=self.main)
            if value is None or len(value) != int(d.rows[r]["size"]):
                raise SourceError(f"{rel}: value missing before the final commit", "pack again with --force")
            inline[r] = bytes(value)
        return pack_inline(d.rows, inline)

    def close(self) -> None:
        if self.txn is not None:
            self.txn.abort()
            self.txn = None
        self.env.close()
        if self.wb_fd >= 0:
            os.close(self.wb_fd)
            self.wb_fd = -1
