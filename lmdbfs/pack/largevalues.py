"""Values too large to hold in memory, written into the partial DB straight through
LMDB's map: one value of up to LMDB's largest (`put_large`), or a file over that as
pieces under their own keys (`put_split`). A part of `writer.Writer`, kept apart because
it is the one place the environment is reopened with writemap."""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterator
from typing import TYPE_CHECKING

import lmdb
import numpy as np
import xxhash

from ..db.store import ZeroHoles, map_base
from ..errors import SourceError
from ..format.records import piece_key, split_pieces, split_table
from .feed import Cut, is_zeros

if TYPE_CHECKING:
    from .scan import Scan


class LargeValues:
    """`writer.Writer`'s large-value puts. They use its environment (``env``, ``main``,
    ``data_file``), its scan, and its `commit`, `_open`, `_offset`, `_unmap` and
    `_record_offsets`."""

    env: lmdb.Environment
    main: object
    data_file: str
    scan: Scan
    wrote_mapped: bool

    def put_large(self, i: int, key: bytes, size: int, pieces: Iterator[bytes]) -> tuple[int, int]:
        """Store a value too large to hold in memory, in a transaction of its own; returns
        (bytes read, xxh3 of them). Raises SourceError when the pieces add up to other
        than ``size`` bytes."""
        hasher = xxhash.xxh3_64()
        done = self._put_mapped(key, size, Cut(pieces), hasher, last=True)
        if done != size:
            return done, 0
        self._record_offsets([(i, key)])
        return done, hasher.intdigest()

    def put_split(self, i: int, key: bytes, size: int, pieces: Iterator[bytes]) -> tuple[int, int]:
        """`put_large` of a file over SPLIT_ABOVE bytes, in the pieces the scan's placeholder
        table in its row gives (format.split_table): piece k under `piece_key` (key, k),
        each in a transaction of its own; their offsets then fill the table."""
        d = self.scan.dirs[int(self.scan.file_dir[i])]
        row = d.rows[int(self.scan.file_row[i])]
        at = int(row["name_off"]) + int(row["name_len"])
        piece = split_pieces(d.blob[at : at + 8])[0]  # the scan's placeholder table says
        hasher = xxhash.xxh3_64()
        stream = Cut(pieces)
        offsets, done = [], 0
        for k in range(-(-size // piece)):
            want = min(piece, size - k * piece)
            got = self._put_mapped(piece_key(key, k), want, stream, hasher, last=(k + 1) * piece >= size)
            done += got
            if got != want:
                return done, 0
            offsets.append(self._offset_of(piece_key(key, k)))
        table = split_table(size, offsets, piece)
        if len(table) != int(row["target_len"]):
            raise SourceError(f"{self.scan.file_relpath(i)}: its piece table does not fit its row", "pack again")
        d.blob = d.blob[:at] + table + d.blob[at + len(table) :]
        return done, hasher.intdigest()

    def _put_mapped(self, key: bytes, size: int, stream: Cut, hasher: xxhash.xxh3_64, last: bool) -> int:
        """Put the next ``size`` bytes of ``stream`` under ``key`` in a transaction of its
        own; returns how many bytes it held (``last``: counting any past the end), and
        commits only when that is ``size``.

        Without writemap LMDB copies a value into pages it mallocs until the commit, so a
        12 GB file would take 12 GB of memory. For this value alone the environment is
        opened with writemap (its pages are the file's, in the page cache), the value is
        put as ``size`` zero bytes from an untouched private mapping (the kernel's zero
        page: no memory), and the pieces are copied over it in the map as they are read.
        Runs of zero pieces are punched out of the file again (`store.ZeroHoles`): a sparse file
        stays sparse in the DB, and its zeros are never written to the disk.
        """
        self.commit()
        self._reopen(writemap=True)
        zero = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE)
        txn = holes = None
        try:
            while True:
                txn = self.env.begin(write=True, buffers=True, db=self.main)
                try:
                    txn.put(key, memoryview(zero)[:size])
                    break
                except lmdb.MapFullError:
                    txn.abort()
                    self.env.set_mapsize(int(self.env.info()["map_size"] * 1.5) + size)
            view = txn.get(key)
            at = np.frombuffer(view, np.uint8).ctypes.data
            base = map_base(self.data_file)
            holes = ZeroHoles(self.data_file, None if base is None else at - base)
            done = 0
            for piece in stream.take(size):
                if not is_zeros(piece):
                    ctypes.memmove(at + done, piece, len(piece))
                    holes.data(done)
                else:  # zeros are there already
                    holes.zeros(done)
                hasher.update(piece)
                done += len(piece)
            holes.data(done)
            if last and done == size:
                done += stream.rest()
            if done != size:
                return done
            del view
            txn.commit()
            txn = None
        finally:
            if txn is not None:
                txn.abort()
            if holes is not None:
                holes.close()
            zero.close()
            self._reopen(writemap=False)
        return done

    def _offset_of(self, key: bytes) -> int:
        """Where the just-committed value of ``key`` lies in the data file (0: not known)."""
        base = map_base(self.data_file)
        with self.env.begin(buffers=True, db=self.main) as txn:
            view = txn.get(key)
            if view is None:
                raise SourceError(f"{key!r}: value missing after commit", "pack again")
            offset = self._offset(view, base)
        self._unmap(base)
        return offset

    def _reopen(self, writemap: bool) -> None:
        """The environment again, with or without writemap (no transaction is open).
        Writemap grows the file to the map size: `truncate` gives the rest back."""
        map_size = self.env.info()["map_size"]
        self.env.close()
        self.env = self._open(map_size, writemap)
        self.main = self.env.open_db()
        self.wrote_mapped = self.wrote_mapped or writemap
