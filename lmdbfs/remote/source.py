"""A remote DB as a byte source: the object's client, its block cache, and reads that
go through the cache first (docs/remote.md).

`open_source(URL)` (one per URL and process) asks the server for the object's size and
version, opens the cache folder of that version, and fetches and pins the LMDB index
(`prefetch`): after it, the cache's sparse ``data`` file can be opened by LMDB like the
DB itself, and every other byte is read with `RemoteSource.read`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import CorruptValue, RemoteChanged, RemoteError
from .cache import BRIDGE, PIN_PAGE, BlockCache, default_dir, parse_size
from .client import Client, ObjectInfo, loop, release_free_memory, run
from .url import RemoteURL, parse

if TYPE_CHECKING:
    from .heads import Found

log = logging.getLogger(__name__)

MAX_GET = 4 << 20  # adjacent claimed blocks become one ranged GET of at most this
WAIT_MS = 1000
INFLIGHT = 32  # ranged GETs in flight per process (the fetcher's and the readers' together)
PIN_INFLIGHT = 128  # the pinned index's GETs in flight at once (small ones: many per RTT)


@dataclass
class Settings:
    """Where caches live and how large they may grow (the CLI's --cache-dir/--cache-size)."""

    cache_dir: str | None = None
    cache_size: int | None = None
    # Whether the mount's fetcher streams the whole object into the cache: "on" at mount,
    # "off" never, "auto" once the readers' requests show an epoch under way and the
    # cache can hold the object (lmdbfs/remote/fetcher.py, docs/remote.md).
    fetch_all: str = "auto"


SETTINGS = Settings()
RUN_GAP = 4  # blocks between two records' blocks that `block_runs` takes in to join their runs
_SOURCES: dict[tuple[int, str], RemoteSource] = {}
_LOCK = threading.Lock()


FETCH_ALL = ("auto", "on", "off")


def configure(cache_dir: str | None = None, cache_size: int | None = None, fetch_all: str | bool | None = None) -> None:
    if fetch_all is not None:
        if isinstance(fetch_all, bool):
            fetch_all = "on" if fetch_all else "off"
        if fetch_all not in FETCH_ALL:
            raise ValueError(f"fetch_all must be one of {', '.join(FETCH_ALL)}, not {fetch_all!r}")
        SETTINGS.fetch_all = fetch_all
    if cache_dir is not None:
        SETTINGS.cache_dir = os.path.abspath(cache_dir)
    if cache_size is not None:
        SETTINGS.cache_size = cache_size


def configure_text(cache_dir: str | None, cache_size: str | None, fetch_all: str | bool | None = None) -> None:
    """`configure` from the command line's words (``--cache-size 20G``)."""
    configure(cache_dir, parse_size(cache_size) if cache_size else None, fetch_all)


def open_source(text: str) -> RemoteSource:
    """The process's source for URL ``text``, opened (and its index pinned) at first use."""
    url = parse(text)
    key = (os.getpid(), url.full)
    with _LOCK:
        src = _SOURCES.get(key)
        if src is None:
            src = _SOURCES[key] = RemoteSource(url)
        return src


def block_runs(spans: list[tuple[int, int]], block_size: int) -> list[tuple[int, int]]:
    """The cache blocks [first, end) that hold byte ``spans`` (in file order), as few
    runs: two runs closer than RUN_GAP blocks are one (the directory records of a DB lie
    together, index pages between them), so the list stays short whatever the tree."""
    runs: list[tuple[int, int]] = []
    for start, end in spans:
        if end <= start:
            continue
        lo, hi = start // block_size, (end - 1) // block_size + 1
        if runs and lo <= runs[-1][1] + RUN_GAP:
            runs[-1] = (runs[-1][0], max(runs[-1][1], hi))
        else:
            runs.append((lo, hi))
    return runs


class RemoteSource:
    def __init__(self, url: RemoteURL) -> None:
        from .heads import chosen, find
        from .prefetch import prefetch_index

        self.url = url
        self.client = Client(url)

        async def heads() -> tuple[ObjectInfo, Found | None]:  # the DB's HEAD and its sidecar's, together
            side = asyncio.ensure_future(find(self.client))
            try:
                info = await self.client.head_async()
            except BaseException:
                side.cancel()
                raise
            return info, chosen(await side)

        self.info, self.sidecar = run(heads())
        self.cache = BlockCache(
            SETTINGS.cache_dir or default_dir(), url, self.info.etag, self.info.size, SETTINGS.cache_size
        )
        self.size = self.info.size
        self.block_size = self.cache.block_size
        self.fd = self.cache.fd
        # A bounded cache makes room for a whole GET at once: keep GETs well below its size.
        limit = SETTINGS.cache_size
        self.max_blocks = max(1, min(MAX_GET, (limit or MAX_GET * 8) // 8) // self.block_size)
        self.gets = 0  # ranged GETs sent by this process
        self.fetched = 0  # bytes they brought
        self._logged: set[str] = set()
        self._next = -1  # block after the last sequential python read
        self._window = 0
        self._slots: asyncio.Semaphore | None = None  # made on the loop, at first use
        self._offline = False
        self.fetched_all = False  # every block is in the cache (`fetch_all`): records are read whole
        try:
            self.index_bytes, spans = prefetch_index(self, self.sidecar)
        except BaseException:
            self.cache.close()
            raise
        self.record_runs = block_runs(spans, self.block_size)
        # The records' byte spans, 16 bytes each (what the stream reads of their rows)
        self.record_spans = np.array(spans, dtype=np.uint64).reshape(-1, 2)
        release_free_memory()  # the index's GETs and parsing are over: their buffers go back

    @property
    def data_path(self) -> str:
        return self.cache.data_path

    @property
    def shown(self) -> str:
        return self.url.shown

    def is_pinned(self, start: int, end: int) -> bool:
        return self.cache.pinned(start, end)

    @contextlib.contextmanager
    def offline(self) -> Iterator[None]:
        """`ensure_pinned` raises `prefetch.Missing` instead of fetching, meanwhile."""
        self._offline = True
        try:
            yield
        finally:
            self._offline = False

    def log_once(self, exc: BaseException) -> None:
        """One log line per kind of failure (a replaced object: one line naming it)."""
        text = getattr(exc, "message", None) or str(exc)
        kind = type(exc).__name__ + (text if not isinstance(exc, RemoteChanged) else "")
        if kind not in self._logged and len(self._logged) < 100:
            self._logged.add(kind)
            log.error("%s", getattr(exc, "one_line", lambda: text)())

    # -- fetching claimed blocks ---------------------------------------------------------
    async def fetch_claimed(
        self, claimed: list[tuple[int, int]], pin: bool = False, per: int = 0
    ) -> BaseException | None:
        """Fetch and publish claimed blocks (coalesced into ranged GETs of at most ``per``
        blocks, default MAX_GET's, all in flight at once); a run that fails is marked
        FAILED. Returns the first failure (already logged once), None when all were filled."""
        runs = coalesce(claimed, per or self.max_blocks)
        results = await asyncio.gather(*(self._fetch_run(run_, pin) for run_ in runs))
        return next((r for r in results if r is not None), None)

    async def _fetch_run(self, run_: list[tuple[int, int]], pin: bool) -> BaseException | None:
        first = run_[0][0]
        start = self.cache.span(first)[0]
        end = self.cache.span(run_[-1][0])[1]
        if self._slots is None:
            self._slots = asyncio.Semaphore(INFLIGHT)
        try:
            if not self.cache.bounded and not pin:
                try:
                    async with self._slots:
                        await self._get_published(run_, start, end)
                except BaseException as exc:  # noqa: BLE001 - its blocks are FAILED already
                    self.log_once(exc)
                    return exc
                self.gets += 1
                self.fetched += end - start
                return None
            async with self._slots:
                data = await self.client.get_async(start, end, self.info)
            self.gets += 1
            self.fetched += len(data)
            words = [w for _i, w in run_]
            if self.cache.bounded:  # making room may scan and punch the cache: off the loop
                await asyncio.get_running_loop().run_in_executor(None, self.cache.fill, first, words, data, pin)
            else:  # a pwrite into the page cache, the GIL released: no thread hop
                self.cache.fill(first, words, data, pin)
        except BaseException as exc:  # noqa: BLE001 - every failure ends as FAILED blocks
            self.cache.fail(run_)
            self.log_once(exc)
            return exc
        return None

    async def _get_published(self, run_: list[tuple[int, int]], start: int, end: int) -> None:
        """An unbounded cache's GET: each piece written as it arrives (still in the
        processor's cache: no whole-GET buffer gathered by the client and read again
        by the write), each block published as soon as its bytes are all written (a
        reader waiting on a GET's first block need not wait for its last)."""
        cache, bsize = self.cache, self.block_size
        published = 0  # blocks of the run published so far

        def sink(pos: int, piece: memoryview) -> None:
            nonlocal published
            cache.write_at(pos, piece)
            done = len(run_) if pos + len(piece) >= end else (pos + len(piece) - start) // bsize
            while published < done:  # a run's blocks are consecutive (coalesce)
                cache.publish(*run_[published])
                published += 1

        try:
            await self.client.get_into(start, end, self.info, sink, bsize)
        except BaseException:
            cache.fail(run_[published:])  # what was published stays: its bytes are whole
            raise

    def fetch_sync(self, claimed: list[tuple[int, int]], pin: bool = False) -> None:
        if not claimed:
            return
        exc = run(self.fetch_claimed(claimed, pin))
        if exc is not None:
            raise _as_error(exc)

    # -- the pinned index ------------------------------------------------------------------
    def ensure_pinned(self, ranges: list[tuple[int, int]]) -> int:
        """Fetch the pages of byte ``ranges`` [start, end) not pinned yet and pin them
        (docs/remote.md, "pinned pages"). Pieces closer than BRIDGE share a GET (a round
        trip costs more than those bytes); the bytes between them are dropped, not kept:
        only the pieces asked for are written and pinned. Every GET is in flight at once.
        Blocks are not claimed: a block around a pinned page stays ABSENT until a read
        needs the rest of it. The bytes fetched."""
        runs: list[list] = []  # [start, end, [(piece start, piece end), ...]]
        for start, end in sorted(ranges):
            for lo, hi in self.cache.unpinned(start, min(end, self.size)) if end > start else ():
                lo = lo // PIN_PAGE * PIN_PAGE
                hi = min(self.size, -(-hi // PIN_PAGE) * PIN_PAGE)
                if runs and lo - runs[-1][1] <= BRIDGE and hi - runs[-1][0] <= MAX_GET:
                    last = runs[-1]
                    if lo <= last[2][-1][1]:
                        last[2][-1] = (last[2][-1][0], max(last[2][-1][1], hi))
                    else:
                        last[2].append((lo, hi))
                    last[1] = max(last[1], hi)
                else:
                    runs.append([lo, hi, [(lo, hi)]])
        if not runs:
            return 0
        if self._offline:
            from .prefetch import Missing

            raise Missing
        exc = run(self._fetch_pinned(runs))
        if exc is not None:
            self.log_once(exc)
            raise _as_error(exc)
        return sum(r[1] - r[0] for r in runs)

    async def _fetch_pinned(self, runs: list[list]) -> BaseException | None:
        slots = asyncio.Semaphore(PIN_INFLIGHT)

        async def one(lo: int, hi: int, pieces: list[tuple[int, int]]) -> None:
            async with slots:
                data = await self.client.get_async(lo, hi, self.info)
            self.gets += 1
            self.fetched += len(data)
            for a, b in pieces:  # small writes: on the loop, no hand-off
                self.cache.write_pinned(a, data[a - lo : b - lo])

        results = await asyncio.gather(*(one(*r) for r in runs), return_exceptions=True)
        return next((r for r in results if isinstance(r, BaseException)), None)

    # -- reading -------------------------------------------------------------------------
    def ensure(self, ranges: list[tuple[int, int]], pin: bool = False, ahead: int = 0) -> dict[int, int]:
        """Make every block of the byte ``ranges`` [start, end) present (fetching what
        this process claims, waiting for what others fill); their words. ``ahead``:
        blocks to claim past each range's end too (readahead). A block whose part of a
        range lies on pinned pages is not needed: those bytes are in the cache for good."""
        wanted: list[int] = []
        bsz = self.block_size
        for start, end in ranges:
            end = min(end, self.size)
            if end > start and not self.cache.pinned(start, end):
                for i in range(start // bsz, (end - 1) // bsz + 1):
                    if not self.cache.pinned(max(start, i * bsz), min(end, (i + 1) * bsz)):
                        wanted.append(i)
        wanted = sorted(set(wanted))
        words: dict[int, int] = {}
        filling_since: dict[int, float] = {}
        while True:
            claimed: list[tuple[int, int]] = []
            waiting: list[tuple[int, int]] = []
            for i in wanted:
                if i in words:
                    continue
                w = self.cache.word(i)
                st = w & 3
                if st == 2:
                    if pin and not w & 4:
                        self.cache.pin(i)
                        w = self.cache.word(i)
                    words[i] = w
                elif st == 1:
                    waiting.append((i, w))
                else:
                    claimed.extend(self.cache.claim(i, 1))
            if claimed and ahead:
                last = claimed[-1][0]
                claimed.extend(self.cache.claim(last + 1, ahead))
            if claimed:
                self.fetch_sync(claimed, pin)
                continue
            if not waiting:
                if len(words) == len(wanted):
                    return {i: words[i] for i in wanted}
                continue  # another thread claimed a block between our look and our claim
            i, seen = waiting[0]
            since = filling_since.setdefault(i, time.monotonic())
            self.cache.wait(i, seen, WAIT_MS)
            now = self.cache.word(i)
            if now & 3 == 3 and seen & 3 == 1:
                raise RemoteError(f"{self.url}: bytes of block {i} could not be fetched", "see the log; retry the read")
            if now == seen:
                self.cache.unstick(i, seen, since)

    def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the object, through the cache; a block evicted
        while it was copied is read again."""
        if size <= 0 or offset >= self.size:
            return b""
        size = min(size, self.size - offset)
        first = offset // self.block_size
        last = (offset + size - 1) // self.block_size
        ahead = 0
        if first in (self._next, self._next - 1):
            self._window = min(max(self._window * 2, 4), self.max_blocks)
            ahead = self._window
        else:
            self._window = 0
        self._next = last + 1
        for _ in range(64):
            words = self.ensure([(offset, offset + size)], ahead=ahead)
            data = os.pread(self.fd, size, offset)
            if len(data) == size and all(self.cache.word(i) == w for i, w in words.items()):
                return data
        raise RemoteError(f"{self.url}: blocks kept being evicted during a read", "raise --cache-size")

    def drop(self, offset: int, size: int) -> None:
        """A file's bytes failed their checksum: its blocks become absent, to be fetched again."""
        if size > 0:
            self.cache.drop(offset // self.block_size, (offset + size - 1) // self.block_size)

    def fetch_all(self) -> None:
        """Every block of the object (verify's key lookups touch pages all over it)."""
        step = self.max_blocks * 8
        for first in range(0, self.cache.blocks, step):
            self.fetch_sync(self.cache.claim(first, step))
        self.ensure([(0, self.size)])
        self.fetched_all = True


def coalesce(claimed: list[tuple[int, int]], per: int) -> list[list[tuple[int, int]]]:
    """Consecutive claimed blocks in runs of at most ``per`` blocks."""
    runs: list[list[tuple[int, int]]] = []
    for item in sorted(claimed):
        if runs and runs[-1][-1][0] + 1 == item[0] and len(runs[-1]) < per:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def _as_error(exc: BaseException) -> BaseException:
    if isinstance(exc, RemoteError | CorruptValue):
        return exc
    if isinstance(exc, OSError):
        return RemoteError(f"cache write failed ({os.strerror(exc.errno or 5)})", "check the --cache-dir disk")
    return exc


__all__ = ["RemoteSource", "open_source", "configure", "loop", "SETTINGS"]
