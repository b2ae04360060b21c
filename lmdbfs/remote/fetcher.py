"""The mount daemon's fetcher: fills the blocks the C server claimed (docs/remote.md).

For each remote layer, C writes the 8-byte little-endian number of every block it CAS'd
to FILLING into a pipe and futex-waits on the block's word. The process's event loop
reads those numbers as they come (the pipe is one of its file descriptors: no thread
stands between C and the GETs), claims the blocks after them that a reader moving
forward will want next (readahead along the file order: a sequence's frames lie
together), and starts their ranged GETs, many in flight at once without a thread each.
Every block it took is published, or marked FAILED after the client's bounded retries
(C's waiters then answer EIO; the failure is logged once).

The stream: its directory records first, a few large GETs beside the readers' own,
skipping blocks present or in flight. "on" (`--fetch-all`) starts it at mount and brings
the whole object, the rest in order after the records. "auto" (the default) starts it
once the readers' requests show an epoch under way — at least `blocks / AUTO_SHARE`
distinct blocks asked for by C (and AUTO_REGIONS / 2 at least), spread over half of the
AUTO_REGIONS equal slices of what the mount reads (of the whole object until that is
known, a moment after the first read): a random-order epoch gets there within its
first few hundred files, while `ls`, a `cat` of a few files or the frames of one
sequence (contiguous) never do — and brings what the epoch reads: the records, then the
values their rows point at (lmdbfs/remote/served.py), not a keyed DB's `md5(path)`
copies of its inline files. Either way only when the cache can hold what it brings
(docs/remote.md, "When the whole DB is streamed").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator

from .client import release_free_memory
from .served import Spread, value_runs
from .source import SETTINGS, RemoteSource, loop

log = logging.getLogger(__name__)

_STREAMS = 256  # readers followed for readahead (next expected block -> window)
_WINDOW_FIRST = 2  # blocks claimed ahead on a reader's second sequential request
_READ = 8 * 4096  # bytes of block numbers read from the pipe at once
STREAM_INFLIGHT = 12  # the stream's GETs in flight (the readers' own go beside them)
# The stream's GET into an unbounded cache (written piece by piece: no buffer of it is
# held). Side by side on the medium tree, 12 in flight at +20 ms: 16 MiB 1,488-1,751
# files/s, 4 MiB 1,353-1,404 (42 % fewer GETs); a bounded cache keeps its smaller GETs.
STREAM_GET = 16 << 20
AUTO_SHARE = 256  # auto: an epoch is under way once C asked for 1/256 of the blocks ...
AUTO_REGIONS = 64  # ... spread over half of 64 equal slices of the object
RESERVE = 1 << 30  # without --cache-size: free disk kept beside a streamed object (and 5 %)
# Every TRIM_S seconds the heap's free pages go back to the system (release_free_memory):
# glibc gives back only the top of its heap by itself, and a GET's freed buffers lie in
# the middle of it as often as not. A trim walks the heap's free chunks: a few ms at
# most, every few seconds.
TRIM_S = 5.0


class Fetcher:
    """One remote layer's request pipe, drained by the event loop."""

    def __init__(self, src: RemoteSource) -> None:
        self.src = src
        self.read_fd, self.request_fd = os.pipe2(os.O_CLOEXEC)
        self.window_max = src.max_blocks
        self._streams: OrderedDict[int, int] = OrderedDict()
        self._reading = False
        self._pending = b""
        self._tasks: set[asyncio.Future] = set()
        self.requests = 0  # block numbers received from C
        self.streaming = False
        # auto: the distinct blocks C asked for and the slices they lie in (None: decided),
        # slices of the whole object until the runs the mount reads are known (_plan)
        self._asked: set[int] | None = set() if SETTINGS.fetch_all == "auto" else None
        self._slices: set[int] = set()
        self._spread = Spread([(0, src.cache.blocks)], AUTO_REGIONS, AUTO_SHARE)
        self._planned: asyncio.Future | None = None  # -> mount_runs()

    def describe(self) -> dict:
        """The layer's "remote" entry for the C server."""
        return {
            "state_path": self.src.cache.state_path,
            "block_size": self.src.block_size,
            "request_fd": self.request_fd,
            "url": self.src.url.shown,
        }

    def start(self) -> None:
        os.set_blocking(self.read_fd, False)
        started = threading.Event()

        def watch() -> None:
            loop().add_reader(self.read_fd, self._drain)
            self._reading = True
            started.set()

        loop().call_soon_threadsafe(watch)
        started.wait(10)  # the pipe is watched before the first request can arrive
        loop().call_soon_threadsafe(self._trim)
        if SETTINGS.fetch_all == "on":
            loop().call_soon_threadsafe(self._begin, True)

    def room(self, need: int) -> str | None:
        """Why the cache cannot take the stream's ``need`` bytes (None: it can). With
        --cache-size: at least twice the object. Without: the free disk must take what
        is missing of them and still keep RESERVE and 5 % of the file system free."""
        src = self.src
        limit = SETTINGS.cache_size
        if limit is not None:
            return None if limit >= 2 * src.size else "--cache-size is below twice the DB"
        try:
            fs = os.statvfs(os.path.dirname(src.data_path))
            held = os.fstat(src.fd).st_blocks * 512
        except OSError as exc:
            return f"the cache folder cannot be measured ({exc.strerror})"
        missing = max(0, need - held)
        keep = max(RESERVE, fs.f_blocks * fs.f_frsize // 20)
        if fs.f_bavail * fs.f_frsize < missing + keep:
            return "the cache folder's disk lacks room for it"
        return None

    def _begin(self, asked: bool) -> None:
        """On the loop: start the stream (it first sees what it will bring, and whether
        the cache can hold that)."""
        self._asked = None
        self.streaming = True
        task = asyncio.ensure_future(self._stream(asked))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _plan(self) -> None:
        """On the loop, auto, at the first block C asks for: find the runs the mount reads
        (in a thread: it reads every record's rows, 2.3 s at full size), then count the
        epoch's spread over them."""

        async def plan() -> list[tuple[int, int]] | None:
            try:
                runs = await asyncio.to_thread(self.mount_runs)
            except Exception:  # noqa: BLE001 - then the stream brings the whole object
                log.exception("%s: cannot list what the mount reads", self.src.url)
                return None
            if runs is not None and self._asked is not None:
                self._spread = Spread(runs, AUTO_REGIONS, AUTO_SHARE)
                asked, self._asked, self._slices = self._asked, set(), set()
                for block in asked:
                    self._note(block)
            return runs

        self._planned = asyncio.ensure_future(plan())

    def _note(self, block: int) -> None:
        """auto: one block C asked for; start the stream once they show an epoch."""
        spread = self._spread
        where = spread.slice(block)
        if where is None or self._asked is None:
            return
        self._asked.add(block)
        self._slices.add(where)
        if len(self._asked) >= spread.need and 2 * len(self._slices) >= spread.regions:
            self._begin(False)

    async def _stream(self, asked: bool) -> None:
        """The object, a few large GETs at a time beside the readers' (a cold epoch in
        random order then reads at the link's speed, not at one round trip per file):
        the directory records' blocks first, where a tiny-file tree's bytes lie, then
        the values their rows point at; for `--fetch-all`, then the rest in order (the
        `md5(path)` copies of the inline files, which the mount never reads). Blocks
        present or claimed by a reader are skipped."""
        src, cache = self.src, self.src.cache
        runs = None if asked or self._planned is None else await self._planned
        need = src.size if runs is None else min(src.size, sum(hi - lo for lo, hi in runs) * src.block_size)
        why = self.room(need)
        if why:
            (log.warning if asked else log.info)(
                "%s: not streaming the DB into the cache: %s; fetching on demand", src.url, why
            )
            self.streaming = False
            return
        what = "the whole DB" if runs is None else f"what the mount reads of the DB ({need / 1e6:,.0f} MB)"
        log.info("%s: streaming %s into the cache (%s)", src.url, what, "--fetch-all" if asked else "an epoch")
        per = src.max_blocks if cache.bounded else STREAM_GET // src.block_size
        gate = asyncio.Semaphore(STREAM_INFLIGHT)
        tasks = []
        for first, end in self.order(per, runs):
            await gate.acquire()  # claimed only when its GET can go out: a reader meanwhile claims its own
            claimed = cache.claim(first, end - first)
            if not claimed:
                gate.release()
                continue
            task = asyncio.ensure_future(src.fetch_claimed(claimed, per=per))
            task.add_done_callback(lambda _t: gate.release())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            tasks.append(task)
        await asyncio.gather(*tasks, return_exceptions=True)
        log.info("%s: the stream is over: %d of %d blocks in the cache", src.url, cache.tally()[0], cache.blocks)

    def mount_runs(self) -> list[tuple[int, int]] | None:
        """The block runs of what the mount reads (records, then the values their rows
        point at), in the stream's order; None: the whole object (a value is found by key)."""
        src = self.src
        values = value_runs(src.fd, src.size, src.record_spans, src.block_size)
        return None if values is None else [*src.record_runs, *values]

    def order(self, per: int, runs: list[tuple[int, int]] | None = None) -> Iterator[tuple[int, int]]:
        """The stream's GETs, as block ranges [first, end) of at most ``per``: ``runs``
        (None: the records' runs, then every block in order; what an earlier run took is
        present or in flight by then, and skipped)."""
        for lo, hi in runs if runs is not None else [*self.src.record_runs, (0, self.src.cache.blocks)]:
            for first in range(lo, hi, per):
                yield first, min(hi, first + per)

    def stop(self) -> None:
        """Close the write end (C has stopped) and stop watching the read end."""
        with contextlib.suppress(OSError):
            os.close(self.request_fd)
        if self._reading:
            done = threading.Event()

            def unwatch() -> None:
                self._unwatch()
                done.set()

            loop().call_soon_threadsafe(unwatch)
            done.wait(5)
        with contextlib.suppress(OSError):
            os.close(self.read_fd)

    def _trim(self, seen: int = -1) -> None:
        """On the loop, every TRIM_S while the pipe is watched; the heap is trimmed only
        when GETs went out since the last time (an idle mount's heap has not changed)."""
        if not self._reading:
            return
        if self.src.gets != seen:
            release_free_memory()
        loop().call_later(TRIM_S, self._trim, self.src.gets)

    def _unwatch(self) -> None:
        if self._reading:
            self._reading = False
            loop().remove_reader(self.read_fd)

    def _drain(self) -> None:
        """On the loop: every block number C has written so far, then their GETs."""
        numbers: list[int] = []
        while True:
            try:
                data = os.read(self.read_fd, _READ)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:  # C closed its end: the mount is over
                self._unwatch()
                break
            data = self._pending + data
            cut = len(data) - len(data) % 8
            self._pending = data[cut:]
            numbers.extend(n for (n,) in struct.iter_unpack("<Q", data[:cut]))
        if not numbers:
            return
        self.requests += len(numbers)
        try:
            self._take(numbers)
        except Exception:  # noqa: BLE001 - the loop must keep serving the mount
            log.exception("%s: the fetcher failed on a request", self.src.url)

    def _take(self, numbers: list[int]) -> None:
        src = self.src
        cache = src.cache
        claimed: list[tuple[int, int]] = []
        for i in sorted(set(numbers)):
            if not 0 <= i < cache.blocks:
                continue
            w = cache.word(i)
            if w & 3 != 1:  # C claimed it: FILLING; anything else is not ours to fill
                continue
            claimed.append((i, w))
            if self._asked is not None:
                if self._planned is None:  # the first read: list what the mount reads (not at mount: `ls` needs none)
                    self._plan()
                self._note(i)
            prev = self._streams.pop(i, None)
            if prev is None:
                prev = self._streams.pop(i - 1, None)
            window = 0 if prev is None else min(self.window_max, max(_WINDOW_FIRST, prev * 2))
            if window:
                claimed.extend(cache.claim(i + 1, window))
            self._streams[i + window + 1] = window
            while len(self._streams) > _STREAMS:
                self._streams.popitem(last=False)
        if claimed:
            task = asyncio.ensure_future(src.fetch_claimed(claimed))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
