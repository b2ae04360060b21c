"""A file object over one packed file's bytes, read as asked: `Archive.open` hands it out
for a file too large to hold whole (PIL, numpy and pandas read such files in pieces)."""

from __future__ import annotations

import io
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
