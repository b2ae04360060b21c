"""What every source is: a `Source` lists `Member`s and hands back their bytes through a
per-thread `Reader` (or one `stream()` pass); a `Listing` says what to leave out and
where to report problems while listing.

Folders (sources.py) and archives (archives.py) implement these; the feed and the
scan use them without knowing which kind they hold.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any


@dataclass(slots=True)
class Member:
    """One entry of a source; ``path`` is '/'-separated and relative to the source."""

    path: str
    kind: int
    mode: int
    mtime_ns: int
    size: int = 0
    target: bytes = b""
    ref: Any = None  # what the source needs to find the bytes again


@dataclass(slots=True)
class Nested:
    """A zip inside a source, to be expanded into a folder named like it without '.zip'."""

    path: str
    mode: int
    mtime_ns: int
    source: Source


@dataclass
class Listing:
    """What a source needs while listing: which entries to leave out, and where to
    report the ones it cannot take."""

    prune: Callable[[str, str], bool]  # (name, path relative to the source) -> leave out
    skipped: list[str]
    errors: list[str]
    skip_errors: bool
    expand_zips: bool
    level: int = logging.WARNING  # how loudly to report what is left out (verify: quietly)
    under: str = ""  # where the source sits in the tree ('' = the root)
    # Each line added to skipped or errors -> (its tree path, the line a pack without
    # --skip-errors stops with, and that line's fix; None: only ever reported), so that
    # one scan can serve a shard: what lies outside its share is dropped (Scan.share).
    placed: dict[str, tuple[str, str | None, str]] = field(default_factory=dict)

    def in_tree(self, rel: str) -> str:
        """The tree path of ``rel``, a path relative to the source ('.': its root)."""
        rel = "" if rel == "." else rel
        return f"{self.under}/{rel}" if self.under and rel else self.under or rel


class Source:
    """A folder or an archive to pack (see the module docstring)."""

    label = "?"
    sequential = False  # True: bytes come from stream(), in member order only
    is_folder = False
    under = ""  # where build_scan placed it in the tree

    def members(self, listing: Listing) -> Iterator[Member | Nested]:
        raise NotImplementedError

    def root_attrs(self) -> tuple[int, int]:
        """Mode and mtime for the tree's root when this source is placed there."""
        raise NotImplementedError

    def reader(self) -> Reader:
        raise NotImplementedError

    def stream(self, wanted: Iterator[tuple[int, Any]], large: int) -> Iterator[tuple[int, bytes | IO[bytes]]]:
        """Bytes of the wanted (file, ref) pairs, given in member order (sequential
        sources only); members of ``large`` bytes or more as a file object instead, to
        be read before the next member is asked for."""
        raise NotImplementedError


class Reader:
    """One thread's handle on a source: ``read(relpath_in_tree, ref) -> (bytes, mtime_ns
    or None)``; the mtime is given when the file may have changed since it was listed."""

    def __call__(self, rel: str | None, ref: Any) -> tuple[bytes, int | None]:
        raise NotImplementedError

    def open_stream(self, rel: str, ref: Any) -> IO[bytes]:
        """A file object over one member's bytes, read in pieces (a file too large to
        hold whole: see feed.Large)."""
        raise NotImplementedError

    def read_many(self, rels: list[str], sizes: list[int]) -> list[tuple[bytes, int] | OSError | None] | None:
        """Several files at once, where a source can do that cheaper: each file's
        (bytes, mtime_ns), an OSError, or None when its size is no longer the listed
        one (then it is read again with ``__call__``). None: not supported here."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
