"""The mount daemon's fetcher: fills the blocks the C server claimed (docs/remote.md).

For each remote layer, C writes the 8-byte little-endian number of every block it CAS'd
to FILLING into a pipe and futex-waits on the block's word. The process's event loop
reads those numbers as they come (the pipe is one of its file descriptors: no thread
stands between C and the GETs), claims the blocks after them that a reader moving
forward will want next (readahead along the file order: a sequence's frames lie
together), and starts their ranged GETs, many in flight at once without a thread each. Every block it took is published, or marked FAILED after the client's
bounded retries (C's waiters then answer EIO; the failure is logged once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import threading
from collections import OrderedDict

from .source import SETTINGS, RemoteSource, loop

log = logging.getLogger(__name__)

_STREAMS = 256  # readers followed for readahead (next expected block -> window)
_WINDOW_FIRST = 2  # blocks claimed ahead on a reader's second sequential request
_READ = 8 * 4096  # bytes of block numbers read from the pipe at once
STREAM_INFLIGHT = 12  # --fetch-all: its GETs in flight (the readers' own go beside them)


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
        src = self.src
        room = SETTINGS.cache_size is None or SETTINGS.cache_size >= 2 * src.size
        if SETTINGS.fetch_all and room:
            asyncio.run_coroutine_threadsafe(self._stream(), loop())
        elif SETTINGS.fetch_all:
            log.warning("%s: --fetch-all needs --cache-size of twice the DB at least; fetching on demand", src.url)

    async def _stream(self) -> None:
        """--fetch-all: the whole object, in order, a few large GETs at a time beside the
        readers' (a cold epoch in random order then reads at the link's speed, not at
        one round trip per file)."""
        src, cache = self.src, self.src.cache
        gate = asyncio.Semaphore(STREAM_INFLIGHT)
        for first in range(0, cache.blocks, src.max_blocks):
            claimed = cache.claim(first, src.max_blocks)
            if not claimed:
                continue
            await gate.acquire()
            task = asyncio.ensure_future(src.fetch_claimed(claimed))
            task.add_done_callback(lambda _t: gate.release())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

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
