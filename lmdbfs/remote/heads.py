"""A remote DB's heads sidecar (docs/remote.md, "The heads sidecar").

One object beside the DB (``DB.heads``) holding exactly the 4 KiB pages the index
prefetch pins — LMDB's pages a lookup touches and the directory records' heads — laid
out one after another behind a table of where each run of them lies in the DB. A
mount fetches it in a few large ranged GETs in flight together instead of one GET per
record head, pins its pages, and the prefetch walk (`prefetch.walk`, the one
implementation of "which pages are the index") then finds them pinned and sends no GET.

Layout (integers little-endian; every run page-aligned)::

    header   8 bytes "LMDBFSH1", u32 version (1), u32 page size (4096), u64 DB size,
             u64 identity runs, u64 runs, u64 chunk size, u64 head length,
             16 bytes xxh3-128 of the head section (these 16 bytes zero while hashed)
    table    identity runs, then runs: (u64 DB offset, u64 length) each, sorted
    digests  xxh3-128 of each chunk of the payload (the last one shorter)
    identity the identity runs' bytes (`prefetch.identity_ranges`: meta pages, the path
             to lmdbfs.meta, its pages), zero-padded to a page: the head section ends
    payload  the runs' bytes, one after another

A sidecar is untrusted input. It is believed only when its header, tables and lengths
hold, its identity runs equal the DB's own bytes (fetched from the DB while the
payload comes: the meta pages name the DB's size, transaction and roots; the meta
record its counts, creation time and, for packs since the sidecar, a random pack id),
and each chunk matches its digest. Else nothing of it stays pinned, one line names the
sidecar and the fix, and the index is fetched as without one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from dataclasses import dataclass

import xxhash

from ..errors import BadDatabase, LmdbfsError, RemoteError
from .cache import BRIDGE, PIN_PAGE
from .client import Client, ObjectInfo, run
from .prefetch import LocalIndex, identity_ranges, walk

log = logging.getLogger(__name__)

SUFFIX = ".heads"
MAGIC = b"LMDBFSH1"
VERSION = 1
HEADER = struct.Struct("<8sIIQQQQQ16s")
_RUN = struct.Struct("<QQ")
_DIGEST = 16
CHUNK = 8 << 20  # the payload's GETs: 8 MiB each, INFLIGHT at once
INFLIGHT = 4  # full size, +20 ms: mount 0.93 s at 4 and at 8; peak VmRSS at mount 86 MB, 120-128 at 8
_FIRST = 1 << 20  # the first GET asks this much: the head section, mostly whole
_HEAD_MAX = 256 << 20
_CHUNK_MAX = 64 << 20  # a larger chunk in a header is refused: each one is held whole while checked
_IDENTITY_MAX = 4096


class Refused(Exception):
    """The sidecar is not to be believed; the message says why."""


# -- writing (`lmdbfs heads`, `lmdbfs pack --heads`) -----------------------------------------
@dataclass
class Written:
    path: str
    pages: int  # index pages it holds
    runs: int
    size: int  # bytes of the sidecar


def write(data_file: str, out: str | None = None) -> Written:
    """Write the heads sidecar of the DB file ``data_file`` (default: beside it, +SUFFIX)."""
    out = out or data_file + SUFFIX
    fd = os.open(data_file, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        local = LocalIndex(fd, size, data_file)
        walk(local)

        def read(a: int, b: int) -> bytes:
            return os.pread(fd, min(b, size) - a, a)

        ident = _pages(identity_ranges(read, data_file), size)
        runs = _subtract(_pages(local.ranges, size), ident)
        return _write_file(fd, out, size, ident, runs)
    finally:
        os.close(fd)


def _write_file(fd: int, out: str, size: int, ident: list, runs: list) -> Written:
    payload = sum(n for _a, n in runs)
    chunks = -(-payload // CHUNK)
    ident_bytes = b"".join(os.pread(fd, n, a) for a, n in ident)
    table = b"".join(_RUN.pack(a, n) for a, n in ident + runs)
    head_len = _round(HEADER.size + len(table) + chunks * _DIGEST + len(ident_bytes))
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.seek(head_len)
        digests, hasher, filled = [], xxhash.xxh3_128(), 0
        for a, n in runs:
            done = 0
            while done < n:  # a run may span chunks: cut it at their bounds
                take = min(n - done, CHUNK - filled, 8 << 20)
                piece = os.pread(fd, take, a + done)
                if len(piece) != take:
                    raise BadDatabase(f"{out}: the DB changed while its heads were written", "run it again")
                f.write(piece)
                hasher.update(piece)
                done, filled = done + take, filled + take
                if filled == CHUNK:
                    digests.append(hasher.digest())
                    hasher, filled = xxhash.xxh3_128(), 0
        if filled:
            digests.append(hasher.digest())
        head = bytearray(head_len)
        body = table + b"".join(digests) + ident_bytes
        head[HEADER.size : HEADER.size + len(body)] = body
        HEADER.pack_into(head, 0, MAGIC, VERSION, PIN_PAGE, size, len(ident), len(runs), CHUNK, head_len, bytes(16))
        head[HEADER.size - _DIGEST : HEADER.size] = xxhash.xxh3_128_digest(bytes(head))
        f.seek(0)
        f.write(head)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    pages = sum(n for _a, n in ident + runs) // PIN_PAGE
    return Written(out, pages, len(ident) + len(runs), head_len + payload)


def _round(n: int) -> int:
    return -(-n // PIN_PAGE) * PIN_PAGE


def _pages(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Byte ranges widened to whole pages (the last one clipped to the file), merged:
    (offset, length) runs in order."""
    merged: list[list[int]] = []
    for a, b in sorted((a // PIN_PAGE * PIN_PAGE, min(size, _round(b))) for a, b in ranges if b > a):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        elif b > a:
            merged.append([a, b])
    return [(a, b - a) for a, b in merged]


def _subtract(runs: list[tuple[int, int]], cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``runs`` less the bytes of ``cut`` (both sorted, page-aligned)."""
    out = []
    for a, n in runs:
        pieces = [(a, a + n)]
        for c, m in cut:
            nxt = []
            for lo, hi in pieces:
                if c + m <= lo or c >= hi:
                    nxt.append((lo, hi))
                    continue
                if lo < c:
                    nxt.append((lo, c))
                if c + m < hi:
                    nxt.append((c + m, hi))
            pieces = nxt
        out.extend((lo, hi - lo) for lo, hi in pieces if hi > lo)
    return out


# -- reading (a mount, `lmdbfs ls`, `lmdbfs.open` of a URL) -------------------------------------
@dataclass
class Found:
    """A sidecar the server has: its client and version."""

    client: Client
    info: ObjectInfo

    @property
    def shown(self) -> str:
        return self.client.url.shown

    def load(self, src) -> bool:
        """`load` this sidecar into ``src``'s cache (False: not believed, one line said why)."""
        return load(src, self)

    def refuse(self, why: str) -> None:
        """One line: the sidecar is not used, why, and the fix."""
        log.warning(
            "%s: heads sidecar not used (%s); the index is fetched without it — "
            "rerun `lmdbfs heads` on this DB and upload the new %s beside it",
            self.shown,
            why,
            SUFFIX,
        )


async def find(db: Client) -> Found | RemoteError | None:
    """HEAD of the DB's sidecar (run beside the DB's own HEAD). None when the server has
    none (404 or 403: one debug line); its error, not raised, when it could not say:
    `chosen` logs it once the DB's own HEAD has succeeded (a server that cannot be
    reached is one line, the DB's)."""
    side = db.sibling(SUFFIX)
    try:
        return Found(side, await side.head_async())
    except RemoteError as exc:
        if getattr(exc, "status", None) in (403, 404):
            log.debug("%s: no heads sidecar", side.url.shown)
            return None
        return exc


def chosen(found: Found | RemoteError | None) -> Found | None:
    """What `find` gave, once the DB is open: its failure logged (one line)."""
    if isinstance(found, RemoteError):
        log.warning("heads sidecar not used (%s)", found.message)
        return None
    return found


@dataclass
class Head:
    size: int
    ident: list[tuple[int, int]]
    runs: list[tuple[int, int]]
    chunk: int
    head_len: int
    digests: list[bytes]
    ident_bytes: bytes


def parse_head(first: bytes, side_size: int, db_size: int) -> Head | int:
    """The sidecar's head section, checked; or how many bytes of it are needed when
    ``first`` is shorter. `Refused` names what is wrong."""
    if len(first) < HEADER.size:
        raise Refused(f"{side_size} bytes: shorter than its header")
    magic, version, page, size, n_ident, n_runs, chunk, head_len, digest = HEADER.unpack_from(first)
    if magic != MAGIC:
        raise Refused("not a heads sidecar")
    if version != VERSION or page != PIN_PAGE:
        raise Refused(f"version {version}, page size {page}: not one this lmdbfs reads")
    if size != db_size:
        raise Refused(f"written for a DB of {size} bytes, this one has {db_size}")
    if not (0 < n_ident <= _IDENTITY_MAX and n_runs <= db_size // PIN_PAGE and 0 < chunk <= _CHUNK_MAX):
        raise Refused("its header is damaged")
    if head_len % PIN_PAGE or not HEADER.size <= head_len <= min(side_size, _HEAD_MAX):
        raise Refused("its header is damaged, or it is truncated")
    if HEADER.size + (n_ident + n_runs) * _RUN.size > head_len:
        raise Refused("its table runs past its head section")
    if len(first) < head_len:
        return head_len
    head = bytearray(first[:head_len])
    head[HEADER.size - _DIGEST : HEADER.size] = bytes(_DIGEST)
    if xxhash.xxh3_128_digest(bytes(head)) != digest:
        raise Refused("its head section fails its checksum")
    at = HEADER.size
    table = [_RUN.unpack_from(first, at + i * _RUN.size) for i in range(n_ident + n_runs)]
    at += len(table) * _RUN.size
    ident, runs = table[:n_ident], table[n_ident:]
    _check_runs(ident + runs, db_size)
    payload = sum(n for _a, n in runs)
    if head_len + payload != side_size:
        raise Refused(f"{side_size} bytes where its table says {head_len + payload}: truncated or damaged")
    chunks = -(-payload // chunk)
    if at + chunks * _DIGEST > head_len:
        raise Refused("its digests run past its head section")
    digests = [bytes(first[at + i * _DIGEST : at + (i + 1) * _DIGEST]) for i in range(chunks)]
    at += chunks * _DIGEST
    ident_len = sum(n for _a, n in ident)
    if at + ident_len > head_len:
        raise Refused("its table runs past its head section")
    return Head(size, ident, runs, chunk, head_len, digests, bytes(first[at : at + ident_len]))


def _check_runs(runs: list[tuple[int, int]], db_size: int) -> None:
    end = -1
    for a, n in sorted(runs):
        if a % PIN_PAGE or n <= 0 or a + n > db_size or (n % PIN_PAGE and a + n != db_size) or a < end:
            raise Refused("its run table is damaged")
        end = a + n


def load(src, found: Found) -> bool:
    """Fetch the sidecar, check it against the DB ``src`` (a `RemoteSource`) and pin its
    pages in src's cache. False (after one line naming it and the fix) when it is not
    believed: then nothing of it stays pinned."""
    try:
        run(_load(src, found))
        return True
    except (Refused, LmdbfsError, OSError, ValueError, struct.error) as exc:
        src.cache.unpin_all()
        why = exc.message if isinstance(exc, LmdbfsError) else str(exc) or type(exc).__name__
        found.refuse(why)
        return False


async def _load(src, found: Found) -> None:
    side, info = found.client, found.info
    got = bytes(await side.get_async(0, min(info.size, _FIRST), info))
    src.gets += 1
    src.fetched += len(got)
    head = parse_head(got, info.size, src.size)
    if isinstance(head, int):
        got += bytes(await side.get_async(len(got), head, info))
        head = parse_head(got, info.size, src.size)
    if not isinstance(head, Head):
        raise Refused("its head section is longer than its header says")
    verdict: asyncio.Future = asyncio.get_running_loop().create_future()
    tasks = [asyncio.ensure_future(_identity(src, head, verdict))]
    slots = asyncio.Semaphore(INFLIGHT)
    payload = sum(n for _a, n in head.runs)
    starts = _run_starts(head.runs)
    for k in range(len(head.digests)):
        lo = k * head.chunk
        tasks.append(
            asyncio.ensure_future(
                _chunk(src, found, head, k, lo, min(payload, lo + head.chunk), starts, slots, verdict, got)
            )
        )
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _identity(src, head: Head, verdict: asyncio.Future) -> None:
    """The identity runs' bytes from the DB itself must be the sidecar's, and must hold
    the path from the meta pages to the whole of lmdbfs.meta."""
    try:
        at, copies = 0, {}
        for a, n in head.ident:
            copies[a] = head.ident_bytes[at : at + n]
            at += n
        spans = _bridged(head.ident)
        got = await asyncio.gather(*(src.client.get_async(a, a + n, src.info) for a, n in spans))
        src.gets += len(got)
        src.fetched += sum(len(g) for g in got)
        db = {a: bytes(data) for (a, _n), data in zip(spans, got, strict=True)}
        for a, n in head.ident:
            base = max(b for b in db if b <= a)
            if db[base][a - base : a - base + n] != copies[a]:
                raise Refused("it belongs to another DB, or to an earlier pack of this one")

        def read(lo: int, hi: int) -> bytes:
            for a, n in head.ident:
                if a <= lo and min(hi, head.size) <= a + n:
                    return copies[a][lo - a : hi - a]
            raise Refused("its identity runs do not hold the DB's meta record")

        need = identity_ranges(read, src.shown)
        for lo, hi in need:
            read(lo, hi)
        for a, _n in head.ident:  # pinned only now: the DB's own bytes
            src.cache.write_pinned(a, copies[a])
        verdict.set_result(True)
    except BaseException as exc:
        if not verdict.done():
            verdict.set_exception(exc if isinstance(exc, Refused | LmdbfsError) else Refused(str(exc)))
            verdict.exception()  # retrieved: the chunks re-raise it, not the loop's logger
        if isinstance(exc, BadDatabase):
            raise Refused(f"its identity pages are not the DB's ({exc.message})") from None
        raise


def _bridged(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Runs closer than a GET's worth of bytes, fetched as one."""
    out: list[list[int]] = []
    for a, n in runs:
        if out and a - (out[-1][0] + out[-1][1]) <= BRIDGE:
            out[-1][1] = a + n - out[-1][0]
        else:
            out.append([a, n])
    return [(a, n) for a, n in out]


def _run_starts(runs: list[tuple[int, int]]) -> list[int]:
    starts, at = [], 0
    for _a, n in runs:
        starts.append(at)
        at += n
    return starts


async def _chunk(src, found, head: Head, k: int, lo: int, hi: int, starts, slots, verdict, have: bytes) -> None:
    """Payload bytes [lo, hi): fetched (unless the first GET brought them), checked
    against their digest, written and pinned at their runs' places once the identity
    holds. A slot is held until the chunk is written, so at most INFLIGHT chunks are in
    memory however long the identity check takes (the full-size sidecar is 14 chunks)."""
    if head.head_len + hi <= len(have):
        await _place(src, head, k, lo, hi, starts, verdict, memoryview(have)[head.head_len + lo : head.head_len + hi])
        return
    async with slots:
        data = await found.client.get_async(head.head_len + lo, head.head_len + hi, found.info)
        src.gets += 1
        src.fetched += len(data)
        await _place(src, head, k, lo, hi, starts, verdict, data)


async def _place(src, head: Head, k: int, lo: int, hi: int, starts, verdict, data) -> None:
    """Chunk k's bytes checked against its digest, then, once the identity holds,
    written and pinned at their runs' places."""
    if xxhash.xxh3_128_digest(data) != head.digests[k]:
        raise Refused(f"bytes {head.head_len + lo}-{head.head_len + hi - 1} fail their checksum")
    await asyncio.shield(verdict)
    import bisect

    i = bisect.bisect_right(starts, lo) - 1
    view = memoryview(data)
    at = lo
    while at < hi:
        a, n = head.runs[i]
        off = at - starts[i]
        take = min(n - off, hi - at)
        src.cache.write_pinned(a + off, view[at - lo : at - lo + take])
        at += take
        i += 1


__all__ = ["SUFFIX", "Found", "Refused", "chosen", "find", "load", "write", "parse_head"]
