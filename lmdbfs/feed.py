"""Reading the files of a scan in their order: on worker threads where the source
allows random access (folders, zips: one handle per thread), in one streaming pass
on a background thread where it does not (tar). Memory stays bounded: at most
WINDOW_BYTES of file contents are read ahead of the consumer."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from .scan import Scan
from .sourcebase import Reader, Source

WINDOW_BYTES = 32 << 20  # file contents read ahead of the consumer
CHUNK_BYTES = 1 << 20  # one read task: up to this many bytes ...
CHUNK_FILES = 256  # ... or this many files

# Runs on the reading thread: (file, bytes, mtime_ns if the file may have changed) ->
# the bytes to hand on, or None to leave the file out.
Process = Callable[[int, bytes, int | None], bytes | None]
# (tree path, error) -> None to leave the file out, or raise.
OnError = Callable[[str, OSError], None]
Batch = tuple[list[tuple[int, bytes | None]], int]  # (file, bytes) pairs, bytes listed


def read_in_order(scan: Scan, order: np.ndarray, workers: int, process: Process, on_error: OnError) -> Iterator[Batch]:
    """Batches of files in ``order``, each with the number of bytes the scan listed."""
    if not len(order):
        return
    srcs = scan.file_src[order]
    cuts = (np.flatnonzero(srcs[1:] != srcs[:-1]) + 1).tolist()
    for a, b in zip([0, *cuts], [*cuts, len(order)]):
        source = scan.sources[int(srcs[a])]
        run = order[a:b]
        if source.sequential:
            yield from _streamed(scan, source, run, process)
        else:
            yield from _pooled(scan, source, run, workers, process, on_error)


def _chunks(order: np.ndarray, sizes: np.ndarray) -> Iterator[np.ndarray]:
    """Consecutive slices of ``order`` of at most CHUNK_FILES files or ~CHUNK_BYTES:
    one task per chunk keeps thread-pool overhead off the per-file path."""
    ends = np.cumsum(sizes[order], dtype=np.int64)
    start = 0
    while start < len(order):
        base = int(ends[start - 1]) if start else 0
        stop = int(np.searchsorted(ends, base + CHUNK_BYTES, side="right"))
        stop = min(max(stop, start + 1), start + CHUNK_FILES)
        yield order[start:stop]
        start = stop


def _pooled(
    scan: Scan, source: Source, run: np.ndarray, workers: int, process: Process, on_error: OnError
) -> Iterator[Batch]:
    local = threading.local()
    readers: list[Reader] = []
    lock = threading.Lock()

    def reader() -> Reader:
        r = getattr(local, "reader", None)
        if r is None:
            r = local.reader = source.reader()
            with lock:
                readers.append(r)
        return r

    def read_chunk(chunk: np.ndarray) -> list[tuple[int, bytes | None]]:
        read = reader()
        files = chunk.tolist()
        rels = [scan.file_relpath(i) for i in files]
        many = read.read_many(rels, scan.file_size[chunk].tolist())
        out: list[tuple[int, bytes | None]] = []
        for k, (i, rel) in enumerate(zip(files, rels)):
            got = many[k] if many is not None else None
            try:
                if isinstance(got, OSError):
                    raise got
                data, mtime = got if got is not None else read(rel, scan.file_ref[i])
            except OSError as exc:
                out.append((i, on_error(rel, exc)))
                continue
            out.append((i, process(i, data, mtime)))
        return out

    sizes = scan.file_size
    window: deque[tuple[int, Future[list[tuple[int, bytes | None]]]]] = deque()
    in_flight = 0
    chunks = _chunks(run, sizes)
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="pack-read")
    try:
        while True:
            while in_flight < WINDOW_BYTES or not window:
                chunk = next(chunks, None)
                if chunk is None:
                    break
                nbytes = int(sizes[chunk].sum())
                in_flight += nbytes
                window.append((nbytes, pool.submit(read_chunk, chunk)))
            if not window:
                break
            nbytes, future = window.popleft()
            in_flight -= nbytes
            yield future.result(), nbytes
    finally:
        for _, future in window:
            future.cancel()
        pool.shutdown(wait=True)
        for r in readers:
            r.close()


class _Done:
    pass


def _streamed(scan: Scan, source: Source, run: np.ndarray, process: Process) -> Iterator[Batch]:
    """One pass over the source on a background thread, handing over chunks through a
    queue bounded to WINDOW_BYTES, so reading overlaps with the consumer's writing."""
    q: queue.Queue[Any] = queue.Queue(maxsize=max(2, WINDOW_BYTES // CHUNK_BYTES))
    stop = threading.Event()
    sizes = scan.file_size

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            batch: list[tuple[int, bytes | None]] = []
            nbytes = 0
            wanted = ((i, scan.file_ref[i]) for i in run.tolist())
            for i, data in source.stream(wanted):
                batch.append((i, process(i, data, None)))
                nbytes += int(sizes[i])
                if len(batch) >= CHUNK_FILES or nbytes >= CHUNK_BYTES:
                    if not put((batch, nbytes)):
                        return
                    batch, nbytes = [], 0
            if batch and not put((batch, nbytes)):
                return
            put(_Done())
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put(exc)

    thread = threading.Thread(target=produce, name="pack-stream", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, _Done):
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
