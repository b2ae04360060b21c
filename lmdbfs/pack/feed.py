"""Reading the files of a scan in their order: on worker threads where the source
allows random access (folders, zips: one handle per thread), in one streaming pass
on a background thread where it does not (tar). Memory stays bounded: at most
WINDOW_BYTES of file contents are read ahead of the consumer, and a file of LARGE_BYTES
or more is handed over unread, as a `Large` the consumer reads in pieces."""

from __future__ import annotations

import errno
import io
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any

import numpy as np

from .scan import Scan
from .sourcebase import Reader, Source

WINDOW_BYTES = 32 << 20  # file contents read ahead of the consumer
# Files this large are never read whole: the consumer gets a `Large` and reads it in
# PIECE_BYTES pieces, so memory stays bounded whatever a file's size.
LARGE_BYTES = 64 << 20
PIECE_BYTES = 1 << 20
CHUNK_BYTES = 1 << 20  # one read task: up to this many bytes ...
CHUNK_FILES = 256  # ... or this many files

# Runs on the reading thread: (file, bytes, mtime_ns if the file may have changed) ->
# the bytes to hand on, or None to leave the file out.
Process = Callable[[int, bytes, int | None], bytes | None]
# (tree path, error) -> None to leave the file out, or raise.
OnError = Callable[[str, OSError], None]
Batch = tuple[list[tuple[int, Any]], int]  # (file, bytes | Large | None) pairs, bytes listed


class Large:
    """A file of LARGE_BYTES or more, handed over unread: `pieces` reads it in order,
    once, and `close` lets the source go on (a tar stream waits for it)."""

    def __init__(self, fh: IO[bytes], size: int, closer: Callable[[], None] | None = None) -> None:
        self.fh, self.size, self._closer = fh, size, closer

    def pieces(self) -> Iterator[bytes]:
        """The bytes in pieces of at most PIECE_BYTES; more or fewer than the listed
        size are the caller's to notice (a file that changed, a damaged archive). A
        sparse file's holes are not read: they come as pieces of zeros."""
        done, holes = 0, _Holes(self.fh)
        while True:
            if done + PIECE_BYTES <= self.size and holes.hole_at(done, PIECE_BYTES):
                done += PIECE_BYTES
                yield _ZEROS
                continue
            piece = self.fh.read(PIECE_BYTES if done < self.size else 1)
            if not piece:
                return
            done += len(piece)
            yield piece
            if done > self.size:
                return

    def close(self) -> None:
        self.fh.close()
        if self._closer is not None:
            self._closer()
            self._closer = None


_ZEROS = bytes(PIECE_BYTES)


def is_zeros(piece: bytes) -> bool:
    """Whether a piece holds only zero bytes (a memcmp for a whole PIECE_BYTES piece)."""
    return piece == _ZEROS if len(piece) == PIECE_BYTES else piece.count(0) == len(piece)


class _Holes:
    """Where a regular file's holes are (lseek SEEK_DATA), so they need not be read;
    nothing for other streams (an archive member)."""

    def __init__(self, fh: IO[bytes]) -> None:
        try:
            self.fd = fh.fileno() if isinstance(fh, io.FileIO) else -1
        except (OSError, ValueError):
            self.fd = -1
        self.start = self.end = 0  # the last hole found: [start, end)

    def hole_at(self, offset: int, length: int) -> bool:
        """Whether [offset, offset + length) is all hole; if so the file's position moves
        past it (reads go on from there)."""
        if self.fd < 0:
            return False
        if not self.start <= offset < self.end:
            try:
                data = os.lseek(self.fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no data after offset
                    self.fd = -1
                    return False
                data = os.fstat(self.fd).st_size
            self.start, self.end = offset, data
        if offset + length > self.end:
            os.lseek(self.fd, offset, os.SEEK_SET)
            return False
        os.lseek(self.fd, offset + length, os.SEEK_SET)
        return True


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

    def read_chunk(chunk: np.ndarray) -> list[tuple[int, Any]]:
        read = reader()
        files = chunk.tolist()
        rels = [scan.file_relpath(i) for i in files]
        sizes = scan.file_size[chunk].tolist()
        small = [k for k, size in enumerate(sizes) if size < LARGE_BYTES]
        many = read.read_many([rels[k] for k in small], [sizes[k] for k in small]) if small else []
        got_of = dict(zip(small, many)) if many is not None else {}
        out: list[tuple[int, Any]] = []
        for k, (i, rel) in enumerate(zip(files, rels)):
            got = got_of.get(k)
            try:
                if sizes[k] >= LARGE_BYTES:
                    mine = source.reader()  # the consumer reads it: a handle of its own
                    try:
                        out.append((i, Large(mine.open_stream(rel, scan.file_ref[i]), sizes[k], mine.close)))
                    except BaseException:
                        mine.close()
                        raise
                    continue
                if isinstance(got, OSError):
                    raise got
                data, mtime = got if got is not None else read(rel, scan.file_ref[i])
            except OSError as exc:
                out.append((i, on_error(rel, exc)))
                continue
            out.append((i, process(i, data, mtime)))
        return out

    sizes = scan.file_size
    window: deque[tuple[int, Future[list[tuple[int, Any]]]]] = deque()
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
            batch: list[tuple[int, Any]] = []
            nbytes = 0
            wanted = ((i, scan.file_ref[i]) for i in run.tolist())
            for i, data in source.stream(wanted, LARGE_BYTES):
                if not isinstance(data, bytes):  # read by the consumer before the stream goes on
                    done = threading.Event()
                    batch.append((i, Large(data, int(sizes[i]), done.set)))
                    if not put((batch, nbytes + int(sizes[i]))):
                        return
                    batch, nbytes = [], 0
                    while not done.wait(0.1):
                        if stop.is_set():
                            return
                    continue
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


class Cut:
    """Byte pieces taken a given number of bytes at a time (a split file's pieces)."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self.it, self.carry = iter(pieces), b""

    def take(self, n: int) -> Iterator[bytes]:
        """The next ``n`` bytes in pieces (fewer at the end)."""
        while n > 0:
            piece, self.carry = self.carry or next(self.it, b""), b""
            if not piece:
                return
            if len(piece) > n:  # at a piece's end only: the copies are rare
                piece, self.carry = piece[:n], piece[n:]
            n -= len(piece)
            yield piece

    def rest(self) -> int:
        """How many bytes are left (at most one piece is read: more than listed is enough)."""
        return len(self.carry or next(self.it, b""))
