"""The persistent block cache of remote DBs (docs/remote.md, "The block cache").

One folder per object version, ``<cache-dir>/<key>/`` with ``data`` (sparse, the
object's size), ``state`` (header + one u32 word per block, mapped shared by every
process that reads the object), ``pins`` (header + one byte per 4 KiB page: the
index's pages, present and never punched, whatever their block's state) and
``info.json``. The atomic steps on the words are those of csrc/blocks/blockstate.h,
reached through `lmdbfs._blocks`.

Every file here is untrusted: a state file or info.json that does not match what the
server says is rebuilt (all blocks absent), never believed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import struct
import threading
import time
from collections.abc import Iterator

from .. import _blocks as bs
from ..errors import CacheError, LmdbfsError
from .url import RemoteURL

BLOCK_SIZE = 256 << 10  # docs/remote.md: 64 KiB, 256 KiB and 1 MiB measured side by side
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, block size, object size, blocks
_MAGIC = b"LMDBFSB1"
STUCK_SECONDS = 60.0  # a block FILLING this long lost its filler: CAS'd back to ABSENT
_WORD_MASK = 0xFFFFFFFF
PIN_PAGE = 4096  # the pinned index's grain (csrc/source.c reads the same file)
_PIN_HEADER = struct.Struct("<8sIIQQ")  # magic, version, page size, object size, pages
_PIN_MAGIC = b"LMDBFSP1"
PIN_HEADER = 4096  # one byte per page starts here: 1 = the page's bytes are in data, pinned
PIN_GAP = 16 << 10  # a record's inline tail this short is pinned with its head (`lmdbfs ls` reads records whole)
# Pieces of index closer than this share one GET, the bytes between them dropped: a GET
# costs a round trip and 1-3 ms of client and server time, 128 KiB about as much to move.
# (The index prefetch's GETs, source.ensure_pinned, and the heads sidecar's identity check.)
BRIDGE = 128 << 10
_FILES = ("data", "state", "pins", "info.json")


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lmdbfs")


def parse_size(text: str) -> int:
    """``--cache-size``: bytes, or with a K/M/G/T suffix (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = raw[-1:] if raw[-1:] in units else ""
    try:
        value = float(raw[: len(raw) - len(unit)])
    except ValueError:
        raise LmdbfsError(f"--cache-size {text}: not a size", "write it like 20G or 500M") from None
    if value <= 0:
        raise LmdbfsError(f"--cache-size {text}: must be positive", "write it like 20G or 500M")
    return int(value * units[unit])


def cache_key(url: RemoteURL, etag: str, size: int) -> str:
    return hashlib.sha256(f"{url.shown}\0{etag}\0{size}".encode()).hexdigest()[:32]


def gen_bump(word: int) -> int:
    """The word with its generation raised by one (pin kept, state bits cleared)."""
    return ((word & ~bs.STATE_MASK) + bs.GEN_ONE) & _WORD_MASK


class Budget:
    """``--cache-size`` over the whole cache folder, shared by every process using it:
    the room check and the write it allows happen under one lock on the folder."""

    def __init__(self, root: str, limit: int | None) -> None:
        self.root = root
        self.limit = limit
        self._lock = threading.Lock()
        self._fd = os.open(os.path.join(root, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def used(self) -> int:
        """Bytes the cache folder holds on disk (blocks actually allocated)."""
        total = 0
        with contextlib.suppress(OSError), os.scandir(self.root) as it:
            for entry in it:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                for name in _FILES:
                    with contextlib.suppress(OSError):
                        total += os.stat(os.path.join(entry.path, name)).st_blocks * 512
        return total

    @contextlib.contextmanager
    def room(self, nbytes: int, cache: BlockCache) -> Iterator[None]:
        """Make room for ``nbytes`` more (removing objects no process uses, then
        evicting ``cache``'s blocks), then let the caller write them."""
        if self.limit is None:
            yield
            return
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                over = self.used() + nbytes - self.limit
                if over > 0:  # objects no process uses go first (older versions, say)
                    over -= self._drop_unused(cache.folder, over)
                if over > 0:
                    over -= cache.evict(over)
                if over > 0:
                    raise CacheError(
                        f"{self.root}: --cache-size {self.limit} bytes cannot hold the pinned index and one read",
                        "raise --cache-size",
                    )
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _drop_unused(self, keep: str, need: int) -> int:
        """Remove whole objects no process has open (oldest first): the bytes freed."""
        freed = 0
        with os.scandir(self.root) as it:
            folders = [e.path for e in it if e.is_dir(follow_symlinks=False) and e.path != keep]
        folders.sort(key=lambda p: _mtime(os.path.join(p, "use")))
        for folder in folders:
            if freed >= need:
                break
            try:
                fd = os.open(os.path.join(folder, "use"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # in use
            size = sum(_allocated(os.path.join(folder, n)) for n in _FILES)
            shutil.rmtree(folder, ignore_errors=True)
            os.close(fd)
            freed += size
        return freed

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def _file_starts(path: str, header: bytes, length: int) -> bool:
    """``path`` is ``length`` bytes long, starts with ``header`` and holds only 0 and 1
    bytes after its 4 KiB header (a pins file; anything else is not believed)."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != length or f.read(len(header)) != header:
                return False
            f.seek(PIN_HEADER)
            while chunk := f.read(1 << 20):
                if chunk.translate(None, b"\0\1"):
                    return False
            return True
    except OSError:
        return False


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


class BlockCache:
    """The blocks of one object version: open (or rebuild) its folder, map its states."""

    def __init__(self, root: str, url: RemoteURL, etag: str, size: int, limit: int | None = None) -> None:
        self.url = url
        self.etag = etag
        self.size = size
        self.block_size = BLOCK_SIZE
        self.blocks = (size + BLOCK_SIZE - 1) // BLOCK_SIZE
        try:
            os.makedirs(root, exist_ok=True)
            self.root = root
            self.folder = os.path.join(root, cache_key(url, etag, size))
            os.makedirs(self.folder, exist_ok=True)
            self.budget = Budget(root, limit)
            # "use" is held shared while open (an unused object may be removed to make
            # room); "lock" exclusively while the files are checked or rebuilt.
            self._lock_fd = os.open(os.path.join(self.folder, "use"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
            os.utime(self._lock_fd)
            setup = os.open(os.path.join(self.folder, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(setup, fcntl.LOCK_EX)
                self._open_files()
            finally:
                os.close(setup)
        except OSError as exc:
            raise CacheError(
                f"{root}: cannot use the cache folder ({os.strerror(exc.errno or errno.EIO)})",
                "pass a writable --cache-dir",
            ) from None

    @property
    def data_path(self) -> str:
        return os.path.join(self.folder, "data")

    @property
    def state_path(self) -> str:
        return os.path.join(self.folder, "state")

    @property
    def pins_path(self) -> str:
        return os.path.join(self.folder, "pins")

    def _info(self) -> dict:
        return {"url": self.url.shown, "etag": self.etag, "size": self.size, "block_size": self.block_size}

    def _open_files(self) -> None:
        """Under the folder's exclusive lock: keep the files if they match, else rebuild."""
        header = _HEADER.pack(_MAGIC, bs.VERSION, self.block_size, self.size, self.blocks)
        state_len = bs.HEADER + 4 * max(self.blocks, 1)
        info_path = os.path.join(self.folder, "info.json")
        good = False
        try:
            with open(info_path, encoding="utf-8") as f:
                good = json.load(f) == self._info()
            st = os.stat(self.state_path)
            with open(self.state_path, "rb") as f:
                good = good and st.st_size == state_len and f.read(_HEADER.size) == header
            good = good and os.stat(self.data_path).st_size == self.size
        except (OSError, ValueError):
            good = False
        pages = (self.size + PIN_PAGE - 1) // PIN_PAGE
        pin_header = _PIN_HEADER.pack(_PIN_MAGIC, 1, PIN_PAGE, self.size, pages)
        pins_good = good and _file_starts(self.pins_path, pin_header, PIN_HEADER + pages)
        if not good:
            for name in _FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.folder, name))
            with open(self.data_path, "wb") as f:
                f.truncate(self.size)
            tmp = self.state_path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(header)
                f.truncate(state_len)
            os.replace(tmp, self.state_path)
            tmp = info_path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self._info(), f)
            os.replace(tmp, info_path)
        if not pins_good:  # the pins describe this data file or nothing: rebuilt empty
            tmp = self.pins_path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(pin_header)
                f.truncate(PIN_HEADER + pages)
            os.replace(tmp, self.pins_path)
        self.fd = os.open(self.data_path, os.O_RDWR | os.O_CLOEXEC)
        with open(self.state_path, "r+b") as f:
            self.map = mmap.mmap(f.fileno(), state_len)
        with open(self.pins_path, "r+b") as f:
            self.pins = mmap.mmap(f.fileno(), PIN_HEADER + pages)
        self.pages = pages
        self._clock = 0  # where eviction looks next

    def close(self) -> None:
        for m in (getattr(self, "map", None), getattr(self, "pins", None)):
            with contextlib.suppress(OSError, ValueError, BufferError, AttributeError):
                m.close()
        for fd in (getattr(self, "fd", -1), getattr(self, "_lock_fd", -1)):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fd = self._lock_fd = -1
        self.budget.close()

    # -- words ------------------------------------------------------------------------
    def word(self, i: int) -> int:
        return bs.load(self.map, i)

    def state(self, i: int) -> int:
        return bs.load(self.map, i) & bs.STATE_MASK

    def claim(self, first: int, count: int) -> list[tuple[int, int]]:
        """CAS every ABSENT or FAILED block of the range to FILLING: [(block, claimed word)]."""
        count = max(0, min(count, self.blocks - first))
        return bs.claim(self.map, first, count) if count else []

    def span(self, block: int) -> tuple[int, int]:
        """[start, end) of a block's bytes in the object."""
        start = block * self.block_size
        return start, min(start + self.block_size, self.size)

    def fill(self, first: int, claimed: list[int], data: bytes | memoryview, pin: bool = False) -> None:
        """Write consecutive claimed blocks starting at ``first`` (``data`` exactly their
        bytes) and publish them: one call into C, which writes the GET's own buffer with
        the GIL released. A bounded cache first makes room under its folder's lock."""
        if self.budget.limit is None:
            bs.fill(self.map, self.fd, first, self.block_size, claimed, data, pin)
            return
        with self.budget.room(len(data), self):
            bs.fill(self.map, self.fd, first, self.block_size, claimed, data, pin)

    def write_at(self, offset: int, data: memoryview) -> None:
        """pwrite ``data`` into the data file at ``offset`` (the GIL released); its
        blocks stay FILLING until `publish`."""
        while data:
            n = os.pwrite(self.fd, data, offset)
            data, offset = data[n:], offset + n

    def publish(self, block: int, claimed: int) -> None:
        """A claimed block's bytes are all written: FILLING -> PRESENT, waiters woken."""
        bs.publish(self.map, block, claimed)

    @property
    def bounded(self) -> bool:
        """A --cache-size applies: a fill may first evict (not quick enough for the loop)."""
        return self.budget.limit is not None

    def fail(self, claimed: list[tuple[int, int]]) -> None:
        for i, word in claimed:
            bs.store(self.map, i, (word & ~bs.STATE_MASK) | bs.FAILED)

    def release(self, claimed: list[tuple[int, int]]) -> None:
        """Give claimed blocks back unfilled (ABSENT, same generation)."""
        for i, word in claimed:
            bs.store(self.map, i, word & ~bs.STATE_MASK)

    def pin(self, i: int) -> None:
        """Set the pin bit of a present block (the index's pages: never evicted)."""
        while True:
            w = bs.load(self.map, i)
            if w & bs.PINNED or bs.cas(self.map, i, w, w | bs.PINNED):
                return

    def drop(self, first: int, last: int) -> None:
        """Mark present blocks ABSENT with a new generation (a damaged range: the next
        read fetches it again). Pinned blocks keep their pin."""
        for i in range(first, last + 1):
            w = bs.load(self.map, i)
            if w & bs.STATE_MASK == bs.PRESENT and bs.cas(self.map, i, w, (w & ~bs.STATE_MASK) | bs.FILLING):
                with contextlib.suppress(OSError):
                    self._punch(i)
                bs.store(self.map, i, gen_bump(w))

    def _punch(self, i: int) -> int:
        """Punch block i's bytes out of ``data``, but not its pinned pages: bytes freed."""
        start, end = self.span(i)
        freed = 0
        for lo, hi in self.unpinned(start, end):
            bs.punch(self.fd, lo, hi - lo)
            freed += hi - lo
        return freed

    def evict(self, need: int) -> int:
        """Free about ``need`` bytes of unpinned present blocks (clock order): bytes freed."""
        freed = 0
        looked = 0
        while freed < need and looked < self.blocks:
            i = self._clock
            self._clock = (self._clock + 1) % max(self.blocks, 1)
            looked += 1
            w = bs.load(self.map, i)
            if w & bs.STATE_MASK != bs.PRESENT or w & bs.PINNED:
                continue
            if not bs.cas(self.map, i, w, (w & ~bs.STATE_MASK) | bs.FILLING):
                continue
            try:
                length = self._punch(i)
            except OSError:
                bs.store(self.map, i, w)  # still present
                continue
            bs.store(self.map, i, gen_bump(w))
            freed += length
        return freed

    def tally(self) -> tuple[int, int, int, int]:
        """(present, pinned, filling, failed) block counts."""
        return bs.tally(self.map, self.blocks)

    def wait(self, i: int, seen: int, timeout_ms: int) -> None:
        bs.wait(self.map, i, seen, timeout_ms)

    def unstick(self, i: int, seen: int, since: float) -> bool:
        """A block FILLING for STUCK_SECONDS lost its filler: back to ABSENT."""
        if time.monotonic() - since < STUCK_SECONDS:
            return False
        if bs.cas(self.map, i, seen, seen & ~bs.STATE_MASK):
            bs.store(self.map, i, seen & ~bs.STATE_MASK)
        return True

    # -- pinned pages (the index, at a page's grain) ----------------------------------
    def pinned(self, start: int, end: int) -> bool:
        """Every page of bytes [start, end) is pinned (its bytes are in ``data``)."""
        if end <= start:
            return True
        lo, hi = PIN_HEADER + start // PIN_PAGE, PIN_HEADER + (min(end, self.size) - 1) // PIN_PAGE + 1
        return self.pins.find(b"\0", lo, hi) < 0

    def unpinned(self, start: int, end: int) -> list[tuple[int, int]]:
        """The byte runs of [start, end) (page-aligned outward) whose pages are not pinned."""
        runs: list[tuple[int, int]] = []
        page, last = start // PIN_PAGE, (min(end, self.size) - 1) // PIN_PAGE
        while page <= last:
            zero = self.pins.find(b"\0", PIN_HEADER + page, PIN_HEADER + last + 1)
            if zero < 0:
                break
            lo = zero - PIN_HEADER
            one = self.pins.find(b"\1", zero, PIN_HEADER + last + 1)
            hi = (one - PIN_HEADER) if one >= 0 else last + 1
            runs.append((max(start, lo * PIN_PAGE), min(end, self.size, hi * PIN_PAGE)))
            page = hi
        return runs

    def write_pinned(self, start: int, data: bytes | memoryview) -> None:
        """Write the page-aligned bytes ``data`` at ``start`` and pin their pages. Under
        the cache's size lock (eviction runs under it too, so a page is never punched
        between its write and its pin)."""
        view = memoryview(data)
        with self.budget.room(len(view), self):
            done = 0
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], start + done)
            first = start // PIN_PAGE
            count = (len(view) + PIN_PAGE - 1) // PIN_PAGE
            self.pins[PIN_HEADER + first : PIN_HEADER + first + count] = b"\1" * count

    def unpin_all(self) -> None:
        """Forget every pin (their pages failed a check: fetched again)."""
        self.pins[PIN_HEADER : PIN_HEADER + self.pages] = bytes(self.pages)

    def pinned_bytes(self) -> int:
        return self.pins[PIN_HEADER : PIN_HEADER + self.pages].count(1) * PIN_PAGE
