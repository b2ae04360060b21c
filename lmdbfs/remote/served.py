"""What a mount reads of a remote DB: the byte spans the whole-DB stream brings
(lmdbfs/remote/fetcher.py; docs/remote.md, "When the whole DB is streamed").

A mount reads the directory records (their heads for lookups and listings, their tails
for the inline files) and, for every other file, the value its row's ``data_off`` (or
a split file's piece table) points at. It never reads the `md5(path)` copies that a
keyed DB also holds of its inline files — in a tree of tiny files, half of the DB. So
the stream brings the records, then those values, and stops: the rest is read only by
code that looks files up by key (`lmdbfs.open`, py-lmdb), which fetches what it reads.

A row whose value's place the record does not give (``data_off`` 0: an older DB, or a
value LMDB keeps in a leaf page) is served by a lookup in the main database, whose pages
are not listed here: then the whole DB is what the mount may read (None).

The records' heads are pinned in the cache at open (lmdbfs/remote/prefetch.py), so
this reads no byte over the network. Their rows are untrusted: a span outside the DB is
left out, and the list only orders the stream; every read is checked as always.
"""

from __future__ import annotations

import bisect
import os

import numpy as np

from ..format.records import (
    DIR_HEADER,
    DIR_MAGIC,
    DIR_MAGIC_V3,
    ENTRY_DTYPE,
    FLAG_INLINE,
    FLAG_SPLIT,
    KIND_FILE,
    RECORD_MAX,
    split_pieces,
)


def value_runs(fd: int, size: int, records: np.ndarray, block_size: int) -> list[tuple[int, int]] | None:
    """The cache blocks [first, end) of the values the rows of ``records`` (the records'
    byte spans, an (n, 2) array, in the cache file ``fd`` of a ``size``-byte DB) point
    at, as sorted runs; None when a file's value must be looked up by key (the whole DB
    may then be read). Each record's rows become runs at once (a sequence's frames lie
    together: a run or two), so the list holds about a run per directory, not a span
    per file (GOT-10k: 1.4 million frames)."""
    runs: list[tuple[int, int]] = []
    for start, end in records.tolist():
        rows, blob = _rows(fd, start, end)
        if rows is None:
            continue  # not a directory record (the meta record), or a damaged one: C refuses it
        files = rows[(rows["kind"] == KIND_FILE) & (rows["flags"] & FLAG_INLINE == 0) & (rows["size"] > 0)]
        split = files["flags"] & FLAG_SPLIT != 0
        whole = files[~split]
        if (whole["data_off"] == 0).any():
            return None
        lo, hi = whole["data_off"], np.minimum(whole["data_off"] + whole["size"], size)
        keep = (lo > 0) & (lo < hi)
        spans = [np.stack([lo[keep], hi[keep]], axis=1)]
        for row in files[split]:
            got = _pieces(row, blob, size)
            if got is None:
                return None
            spans.append(np.array(got, dtype=np.uint64).reshape(-1, 2))
        runs.extend(_merged(np.concatenate(spans), block_size))
    return union(runs)


def union(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Runs [lo, hi) sorted, the overlapping or touching ones merged, the empty left out."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(runs):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        elif hi > lo:
            out.append((lo, hi))
    return out


def _merged(spans: np.ndarray, block_size: int) -> list[tuple[int, int]]:
    """Byte spans as runs of the blocks that hold them, touching runs merged."""
    if not len(spans):
        return []
    first = spans[:, 0] // block_size
    end = (spans[:, 1] - 1) // block_size + 1
    order = np.argsort(first, kind="stable")
    first, end = first[order], np.maximum.accumulate(end[order])
    cut = np.flatnonzero(first[1:] > end[:-1]) + 1  # a run ends where the next starts past it
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut - 1, [len(first) - 1]])
    return list(zip(first[starts].tolist(), end[ends].tolist()))


def _rows(fd: int, start: int, end: int) -> tuple[np.ndarray | None, bytes]:
    """A record's rows and name blob, read from its pinned head."""
    first = os.pread(fd, DIR_HEADER.size, start)
    if len(first) < DIR_HEADER.size:
        return None, b""
    magic, count, own_len, blob_len = DIR_HEADER.unpack_from(first)
    rows_at = DIR_HEADER.size + own_len
    head = rows_at + count * ENTRY_DTYPE.itemsize + blob_len
    if magic not in (DIR_MAGIC, DIR_MAGIC_V3) or start + head > end or head > RECORD_MAX:
        return None, b""
    raw = os.pread(fd, head, start)
    if len(raw) < head:
        return None, b""
    blob_at = rows_at + count * ENTRY_DTYPE.itemsize
    return np.frombuffer(raw, dtype=ENTRY_DTYPE, count=count, offset=rows_at), raw[blob_at:]


def _pieces(row: np.void, blob: bytes, size: int) -> list[tuple[int, int]] | None:
    """A split file's pieces, as spans; None when one must be looked up by key."""
    at = int(row["name_off"]) + int(row["name_len"])
    table = blob[at : at + int(row["target_len"])]
    if len(table) < 16 or len(table) % 8:
        return []  # a damaged table: C refuses the file
    piece, *offsets = split_pieces(table)
    length = int(row["size"])
    if piece <= 0:
        return []
    out = []
    for k, off in enumerate(offsets):
        if off == 0:
            return None
        end = min(size, off + max(0, min(piece, length - k * piece)))
        if 0 < off < end:
            out.append((off, end))
    return out


class Spread:
    """Where an epoch's reads lie: ``regions`` equal slices of the blocks of ``runs``
    (what the mount reads), so that "spread over half of them" means the same in a DB
    whose records are a third of it as in one that is all values."""

    def __init__(self, runs: list[tuple[int, int]], regions: int, share: int) -> None:
        merged = union(runs)
        self._starts = [lo for lo, _hi in merged]
        self._runs = merged
        self._before: list[int] = []  # blocks of the runs before each run
        total = 0
        for lo, hi in merged:
            self._before.append(total)
            total += hi - lo
        self.total = max(1, total)
        self.regions = max(1, min(regions, self.total))
        self.need = max(self.regions // 2, self.total // share)  # distinct blocks asked for

    def slice(self, block: int) -> int | None:
        """The slice ``block`` lies in; None when it is in no run."""
        k = bisect.bisect_right(self._starts, block) - 1
        if k < 0 or block >= self._runs[k][1]:
            return None
        return (self._before[k] + block - self._runs[k][0]) * self.regions // self.total
