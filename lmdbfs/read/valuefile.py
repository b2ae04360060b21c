"""A file object over one packed file's bytes, read as asked: `Archive.open` hands it out
for a file too large to hold whole (PIL, numpy and pandas read such files in pieces);
and the ranges of a file stored as pieces (format.FLAG_SPLIT)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from ..format.records import Entry

OPEN_WHOLE = 64 << 20  # Archive.open reads files up to this size whole, larger ones through ValueFile


class RangeReader(Protocol):
    def read_range(self, rel: str, entry: Entry, offset: int, size: int) -> bytes: ...


class ValueFile(io.RawIOBase):
    """A large file's bytes read on demand, never held whole."""

    def __init__(self, archive: RangeReader, rel: str, entry: Entry) -> None:
        self.archive, self.rel, self.entry, self.pos = archive, rel, entry, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self.archive.read_range(self.rel, self.entry, self.pos, len(buf))
        buf[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = max(0, (0, self.pos, self.entry.size)[whence] + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos


# Where piece k of a split file lies: its offset in the data file, or its bytes.
PieceAt = Callable[[int], "int | memoryview"]


def split_range(entry: Entry, offset: int, size: int, piece_at: PieceAt, pread: Callable[[int, int], bytes]) -> bytes:
    """``size`` bytes from ``offset`` of a split file, piece by piece (a range may cross
    from one piece into the next); ``pread(file_offset, n)`` reads the data file."""
    piece, parts, end = entry.pieces[0], [], offset + size
    while offset < end:
        k, at = divmod(offset, piece)
        n = min(end - offset, piece - at)
        where = piece_at(k)
        parts.append(bytes(where[at : at + n]) if isinstance(where, memoryview) else pread(where + at, n))
        offset += n
    return parts[0] if len(parts) == 1 else b"".join(parts)


def piece_spans(entry: Entry, piece_at: PieceAt) -> Iterator[tuple[int, int]]:
    """(offset in the data file, length) of each piece of a split file whose offset is known."""
    piece = entry.pieces[0]
    for k in range(len(entry.pieces) - 1):
        where = piece_at(k)
        if not isinstance(where, memoryview):
            yield where, min(piece, entry.size - k * piece)
