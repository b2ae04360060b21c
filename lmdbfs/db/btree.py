"""Reading the keys of an LMDB file, with each value's size and file offset, without
touching a single value page.

py-lmdb touches every 4 KiB page of each value it hands out, even as a buffer (it
pre-faults values so page faults happen without the GIL): a cursor walk over a 300 GB
tracking DB to learn value sizes would read 300 GB. The sizes and positions are in the
leaf pages already, so `leaves` reads only the B-tree's branch and leaf pages (what a
keys-only walk reads) and decodes them itself.

The layout read here is LMDB's data format version 1 on a 64-bit little-endian host
(liblmdb 0.9.x, what py-lmdb bundles). A file is untrusted input: every page number,
offset and length is bounds-checked and any surprise becomes `BadDatabase`; callers
also cross-check a sample of the results against LMDB's own lookups.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ..errors import BadDatabase

_MAGIC = 0xBEEFC0DE
_DATA_VERSION = 1
_PAGE_HEADER = 16  # mp_pgno u64, mp_pad u16, mp_flags u16, mp_lower u16, mp_upper u16
_NODE_HEADER = 8  # mn_lo u16, mn_hi u16, mn_flags u16, mn_ksize u16
_P_BRANCH, _P_LEAF, _P_LEAF2 = 0x01, 0x02, 0x20
_F_BIGDATA, _F_SUBDATA, _F_DUPDATA = 0x01, 0x02, 0x04
_MDB_DUPSORT = 0x04
_P_INVALID = (1 << 64) - 1
# MDB_meta after the page header: magic, version, address, mapsize, then two MDB_db
# (pad u32, flags u16, depth u16, branch, leaf, overflow, entries, root: u64 each),
# then last_pg and txnid.
_META = struct.Struct("<IIQQ" + "IHHQQQQQ" * 2 + "QQ")
_MAX_DEPTH = 64
_BATCH_PAGES = 1024  # leaf pages decoded together (4 MB with 4 KiB pages)


@dataclass
class Leaves:
    """Every main-database key, in key order, with its value's size and file offset."""

    keys: list[bytes]
    sizes: np.ndarray  # uint64
    offsets: np.ndarray  # uint64: where the value's bytes start in the data file
    sub_databases: list[bytes]  # keys that name a database, not a value (left out)


def _bad(shown: str, why: str) -> BadDatabase:
    return BadDatabase(f"{shown}: cannot read its B-tree ({why})", "check the DB with `mdb_stat`, or copy it again")


def _main_root(fd: int, shown: str, psize: int, txnid: int) -> tuple[int, int, int]:
    """(root page, depth, entries) of the main database in the meta page of ``txnid``."""
    for page in (0, 1):
        raw = os.pread(fd, _PAGE_HEADER + _META.size, page * psize)
        if len(raw) < _PAGE_HEADER + _META.size:
            raise _bad(shown, "short meta page")
        f = _META.unpack_from(raw, _PAGE_HEADER)
        magic, version = f[0], f[1]
        if magic != _MAGIC or version != _DATA_VERSION:
            raise _bad(shown, f"meta page {page}: not LMDB data format {_DATA_VERSION} of a 64-bit host")
        main = f[12:20]  # pad, flags, depth, branch, leaf, overflow, entries, root
        if f[21] == txnid:
            if main[1] & _MDB_DUPSORT:
                raise _bad(shown, "its main database has duplicate keys (MDB_DUPSORT)")
            return main[7], main[2], main[6]
    raise _bad(shown, f"no meta page holds transaction {txnid}")


def leaves(data_file: str, shown: str, psize: int, last_pgno: int, txnid: int, progress: tqdm | None = None) -> Leaves:
    """Walk the main database's B-tree from the meta page of transaction ``txnid``
    (``progress`` is advanced by one per leaf page)."""
    fd = os.open(data_file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        root, depth, entries = _main_root(fd, shown, psize, txnid)
        keys: list[bytes] = []
        sizes: list[np.ndarray] = []
        offsets: list[np.ndarray] = []
        subs: list[bytes] = []
        if root != _P_INVALID:
            if depth > _MAX_DEPTH:
                raise _bad(shown, f"depth {depth}")
            pgnos: list[int] = []
            pages: list[bytes] = []
            for pgno, page in _leaf_pages(fd, shown, psize, last_pgno, root, depth):
                pgnos.append(pgno)
                pages.append(page)
                if len(pages) == _BATCH_PAGES:
                    _decode_leaves(shown, psize, last_pgno, pgnos, pages, keys, sizes, offsets, subs)
                    if progress is not None:
                        progress.update(len(pages))
                    pgnos, pages = [], []
            if pages:
                _decode_leaves(shown, psize, last_pgno, pgnos, pages, keys, sizes, offsets, subs)
                if progress is not None:
                    progress.update(len(pages))
        if len(keys) + len(subs) != entries:
            raise _bad(shown, f"found {len(keys) + len(subs)} keys, its meta page says {entries}")
        return Leaves(
            keys,
            np.concatenate(sizes) if sizes else np.zeros(0, np.uint64),
            np.concatenate(offsets) if offsets else np.zeros(0, np.uint64),
            subs,
        )
    finally:
        os.close(fd)


def _read_page(fd: int, shown: str, psize: int, last_pgno: int, pgno: int) -> bytes:
    if not 2 <= pgno <= last_pgno:
        raise _bad(shown, f"page number {pgno} out of range")
    page = os.pread(fd, psize, pgno * psize)
    if len(page) != psize:
        raise _bad(shown, f"page {pgno} is past the end of the file")
    return page


def _node_offsets(shown: str, psize: int, pgno: int, page: bytes) -> np.ndarray:
    lower, upper = struct.unpack_from("<HH", page, 12)
    if not _PAGE_HEADER <= lower <= upper <= psize or lower % 2:
        raise _bad(shown, f"page {pgno} has a damaged header")
    ptrs = np.frombuffer(page, "<u2", count=(lower - _PAGE_HEADER) // 2, offset=_PAGE_HEADER).astype(np.int64)
    if len(ptrs) and (ptrs.min() < upper or ptrs.max() > psize - _NODE_HEADER or (ptrs % 2).any()):
        raise _bad(shown, f"page {pgno} has a node outside its free space")
    return ptrs


def _leaf_pages(fd: int, shown: str, psize: int, last_pgno: int, root: int, depth: int) -> Iterator[tuple[int, bytes]]:
    """Leaf pages in key order (depth-first over branch pages, children in order)."""
    stack: list[tuple[int, int]] = [(root, 1)]
    visited = 0
    while stack:
        pgno, level = stack.pop()
        visited += 1
        if visited > last_pgno:
            raise _bad(shown, "the tree loops")
        page = _read_page(fd, shown, psize, last_pgno, pgno)
        flags = struct.unpack_from("<H", page, 10)[0]
        if flags & _P_LEAF2:
            raise _bad(shown, "fixed-size duplicate pages (MDB_DUPFIXED)")
        if flags & _P_LEAF:
            if level != depth:
                raise _bad(shown, f"leaf page {pgno} at level {level} of {depth}")
            yield pgno, page
            continue
        if not flags & _P_BRANCH or level >= depth:
            raise _bad(shown, f"page {pgno} is neither a branch nor a leaf where one is expected")
        ptrs = _node_offsets(shown, psize, pgno, page)
        u16 = np.frombuffer(page, "<u2")
        at = ptrs // 2
        children = (
            u16[at].astype(np.uint64) | (u16[at + 1].astype(np.uint64) << 16) | (u16[at + 2].astype(np.uint64) << 32)
        )
        stack.extend((int(c), level + 1) for c in reversed(children.tolist()))


def _decode_leaves(
    shown: str,
    psize: int,
    last_pgno: int,
    pgnos: list[int],
    pages: list[bytes],
    keys: list[bytes],
    sizes: list[np.ndarray],
    offsets: list[np.ndarray],
    subs: list[bytes],
) -> None:
    """Decode a batch of leaf pages at once (numpy over all their nodes: per page, the
    calls would cost more than the reading)."""
    buf = b"".join(pages)
    u8 = np.frombuffer(buf, np.uint8)
    u16 = np.frombuffer(buf, "<u2")
    head = u16.reshape(len(pages), psize // 2)
    lower, upper = head[:, 6].astype(np.int64), head[:, 7].astype(np.int64)
    bad = (lower < _PAGE_HEADER) | (lower > upper) | (upper > psize) | (lower % 2 == 1)
    if bad.any():
        raise _bad(shown, f"page {pgnos[int(np.argmax(bad))]} has a damaged header")
    counts = (lower - _PAGE_HEADER) // 2
    total = int(counts.sum())
    if not total:
        return
    page_of = np.repeat(np.arange(len(pages)), counts)
    slot = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    page_at = page_of * psize  # where each node's page starts in buf
    ptrs = u16[(page_at + _PAGE_HEADER) // 2 + slot].astype(np.int64)
    bad = (ptrs < upper[page_of]) | (ptrs > psize - _NODE_HEADER) | (ptrs % 2 == 1)
    if bad.any():
        raise _bad(shown, f"page {pgnos[int(page_of[np.argmax(bad)])]} has a node outside its free space")
    node = page_at + ptrs
    at = node // 2
    dsize = u16[at].astype(np.int64) | (u16[at + 1].astype(np.int64) << 16)
    nflags = u16[at + 2]
    ksize = u16[at + 3].astype(np.int64)
    data_at = ptrs + _NODE_HEADER + ksize  # within the page
    big = (nflags & _F_BIGDATA) != 0
    bad = np.where(big, data_at + 8, data_at + dsize) > psize
    if bad.any():
        raise _bad(shown, f"page {pgnos[int(page_of[np.argmax(bad)])]} has a node running past its end")
    if (nflags & _F_DUPDATA).any():
        raise _bad(shown, "duplicate keys (MDB_DUPSORT)")
    offs = np.asarray(pgnos, dtype=np.int64)[page_of] * psize + data_at
    if big.any():
        at8 = (page_at + data_at)[big]
        raw = u8[at8[:, None] + np.arange(8)].astype(np.uint64)
        over = np.bitwise_or.reduce(raw << np.arange(0, 64, 8, dtype=np.uint64), axis=1)
        ends = over * np.uint64(psize) + np.uint64(_PAGE_HEADER) + dsize[big].astype(np.uint64)
        if ((over < 2) | (over > last_pgno) | (ends > np.uint64((last_pgno + 1) * psize))).any():
            raise _bad(shown, "a value's overflow pages lie outside the file")
        offs[big] = (over * np.uint64(psize)).astype(np.int64) + _PAGE_HEADER
    names = [buf[n + _NODE_HEADER : n + _NODE_HEADER + k] for n, k in zip(node.tolist(), ksize.tolist())]
    sub = (nflags & _F_SUBDATA) != 0
    if sub.any():
        subs.extend(n for n, s in zip(names, sub.tolist()) if s)
        keep = ~sub
        names = [n for n, k in zip(names, keep.tolist()) if k]
        dsize, offs = dsize[keep], offs[keep]
    keys.extend(names)
    sizes.append(dsize.astype(np.uint64))
    offsets.append(offs.astype(np.uint64))


# -- reading pages one at a time (a remote DB's index prefetch walks the tree level by level)


@dataclass(frozen=True)
class Tree:
    """A database's B-tree as its MDB_db record gives it."""

    root: int  # _P_INVALID: empty
    depth: int
    entries: int


@dataclass(frozen=True)
class MetaPage:
    psize: int
    last_pgno: int
    txnid: int
    main: Tree


@dataclass(frozen=True)
class Node:
    key: bytes
    flags: int  # _F_BIGDATA: the value is on overflow pages; _F_SUBDATA: it names a database
    size: int  # the value's size (a branch node: 0)
    child: int  # a branch node's child page, a big value's first overflow page, else 0
    value: bytes  # the value itself when it lies in the leaf page
    at: int = 0  # where that value lies in its page


def newest_meta(head: bytes, shown: str) -> MetaPage:
    """The meta page LMDB would use (the valid one with the highest transaction id), from
    the file's first bytes (both meta pages)."""
    found: list[MetaPage] = []
    psize = 0
    for page in (0, 1):
        at = page * psize
        if page and not psize:
            break
        if len(head) < at + _PAGE_HEADER + _META.size:
            raise _bad(shown, "short meta page")
        f = _META.unpack_from(head, at + _PAGE_HEADER)
        if f[0] != _MAGIC or f[1] != _DATA_VERSION:
            raise _bad(shown, f"meta page {page}: not LMDB data format {_DATA_VERSION} of a 64-bit host")
        psize = psize or f[4]  # the free DB's md_pad holds the page size
        if psize < 512 or psize > 65536 or psize & (psize - 1):
            raise _bad(shown, f"page size {psize}")
        main = f[12:20]
        found.append(MetaPage(psize, f[20], f[21], Tree(main[7], main[2], main[6])))
    return max(found, key=lambda m: m.txnid)


def page_nodes(page: bytes, pgno: int, psize: int, last_pgno: int, shown: str) -> tuple[bool, list[Node]]:
    """(is a leaf, its nodes) of one branch or leaf page, every bound checked."""
    if len(page) != psize:
        raise _bad(shown, f"page {pgno} is past the end of the file")
    flags = struct.unpack_from("<H", page, 10)[0]
    if flags & _P_LEAF2 or not flags & (_P_LEAF | _P_BRANCH):
        raise _bad(shown, f"page {pgno} is neither a branch nor a leaf where one is expected")
    leaf = bool(flags & _P_LEAF)
    nodes = []
    for ptr in _node_offsets(shown, psize, pgno, page).tolist():
        lo, hi, nflags, ksize = struct.unpack_from("<HHHH", page, ptr)
        kstart = ptr + _NODE_HEADER
        if kstart + ksize > psize:
            raise _bad(shown, f"page {pgno} has a node running past its end")
        key = page[kstart : kstart + ksize]
        if not leaf:
            child = lo | hi << 16 | nflags << 32
            if not 2 <= child <= last_pgno:
                raise _bad(shown, f"page number {child} out of range")
            nodes.append(Node(key, 0, 0, child, b""))
            continue
        size = lo | hi << 16
        at = kstart + ksize
        if nflags & _F_BIGDATA:
            if at + 8 > psize:
                raise _bad(shown, f"page {pgno} has a node running past its end")
            (child,) = struct.unpack_from("<Q", page, at)
            if not 2 <= child <= last_pgno or child * psize + _PAGE_HEADER + size > (last_pgno + 1) * psize:
                raise _bad(shown, "a value's overflow pages lie outside the file")
            nodes.append(Node(key, nflags, size, child, b""))
        else:
            if at + size > psize:
                raise _bad(shown, f"page {pgno} has a node running past its end")
            nodes.append(Node(key, nflags, size, 0, page[at : at + size], at))
    return leaf, nodes


def sub_tree(node: Node, shown: str) -> Tree:
    """The MDB_db record a named database's node holds."""
    if not node.flags & _F_SUBDATA or len(node.value) < 48:
        raise _bad(shown, f"{node.key!r} does not name a database")
    _pad, flags, depth, _b, _l, _o, entries, root = struct.unpack_from("<IHHQQQQQ", node.value)
    if flags & _MDB_DUPSORT or depth > _MAX_DEPTH:
        raise _bad(shown, f"database {node.key!r} has duplicate keys or depth {depth}")
    return Tree(root, depth, entries)


def child_for(nodes: list[Node], key: bytes) -> int:
    """The child of a branch page whose range holds ``key`` (LMDB's default order:
    bytes compared, then the shorter first; the first node's key stands for -inf)."""
    pick = nodes[0].child
    for node in nodes[1:]:
        if node.key <= key:
            pick = node.child
        else:
            break
    return pick
