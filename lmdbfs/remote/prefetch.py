"""A remote DB's index, fetched and pinned at open (docs/remote.md, "index prefetch").

LMDB maps the cache's sparse copy, so every page a lookup touches must be present
before LMDB (in C or py-lmdb) opens it: the two meta pages, the main database's path
to the named databases `lmdbfs.index` and `lmdbfs.meta`, every page of those, and the
first page of each overflow value they hold. Then the directory records' heads (names
and rows: all a lookup, a listing or a stat needs) — not their tails (the inline files'
bytes), which in a tree of tiny files are as large as the data; a tail shorter than
`PIN_GAP` is pinned too (a reader of whole records, as `lmdbfs ls`, then needs no GET).

All of it is fetched and pinned at the grain of a 4 KiB page (`RemoteSource.ensure_pinned`),
not of a cache block: a head's block around it is not kept. Heads closer than
`cache.BRIDGE` share a GET, the tails between them dropped. The tree is walked level
by level: each level's pages are fetched together, in ranged GETs all in flight at once,
so the time grows with the index's bytes and depth, not with the number of directories.

The pinned pages a cache already holds are untrusted: each is parsed again at every
open; when one fails its check, every pin is dropped and the index fetched afresh.
"""

from __future__ import annotations

import os

from ..db import btree
from ..errors import BadDatabase
from ..format.records import INDEX_DB, META_DB, dir_head_len
from .cache import PIN_GAP, PIN_PAGE

_HEAD_PROBE = 16  # a record's header: magic, entries, own-path length, blob length
_MAX_PSIZE = 65536
_SAMPLE = 64  # records whose heads are measured before the others are fetched
_GUESS_MAX = 256 << 10  # the most fetched of a record in its one GET before its head is known


def prefetch_index(src, sidecar=None) -> tuple[int, list[tuple[int, int]]]:
    """Fetch and pin the index of ``src`` (a `RemoteSource`); the bytes pinned and the
    records' spans (`walk`).
    ``sidecar`` (a `heads.Found`, or None): the DB's heads sidecar, loaded first when
    the cache does not hold the whole index yet (lmdbfs/remote/heads.py, which builds
    on this module: it is not imported here)."""
    if src.cache.pinned_bytes():
        try:
            with src.offline():  # every page already pinned: no GET, only the checks
                spans = walk(src)
            return src.cache.pinned_bytes(), spans
        except Missing:
            pass
        except BadDatabase:
            src.cache.unpin_all()  # a damaged cache, or a damaged DB: the server decides
    if sidecar is not None:
        if sidecar.load(src):
            try:
                spans = walk(src)  # its pages parsed like any pinned page; what it lacked is fetched
                return src.cache.pinned_bytes(), spans
            except BadDatabase as exc:
                src.cache.unpin_all()
                sidecar.refuse(f"its pages fail the index's checks ({exc.message})")
    spans = walk(src)
    return src.cache.pinned_bytes(), spans


class Missing(Exception):
    """A page the walk needs is not pinned, and the source may not fetch it."""


class LocalIndex:
    """A local DB file seen by the walk as a source whose every page is at hand: what
    the walk would pin is recorded, not fetched (what `lmdbfs heads` writes)."""

    def __init__(self, fd: int, size: int, shown: str) -> None:
        self.fd, self.size, self.shown = fd, size, shown
        self.ranges: list[tuple[int, int]] = []

    def ensure_pinned(self, ranges: list[tuple[int, int]]) -> int:
        self.ranges.extend((a, min(b, self.size)) for a, b in ranges if min(b, self.size) > a)
        return 0

    def is_pinned(self, start: int, end: int) -> bool:
        return True


def walk(src) -> list[tuple[int, int]]:
    """The one walk over "which pages are the index": pins them on a `RemoteSource`,
    records them on a `LocalIndex`. ``src`` gives ``shown``, ``size``, ``fd``,
    ``ensure_pinned(ranges)`` and ``is_pinned(start, end)``. Returns the byte spans
    [start, end) of the values of the named databases (on overflow pages, heads and
    tails, or in leaf pages), in file order: the directory records (and the meta
    record), where a tiny-file tree's bytes lie."""
    shown = src.shown

    def pinned(start: int, end: int) -> bytes:
        end = min(src.size, end)
        src.ensure_pinned([(start, end)])
        return os.pread(src.fd, end - start, start)

    meta, _first = _newest_meta(pinned, shown)
    psize, last = meta.psize, meta.last_pgno
    if (last + 1) * psize > src.size:
        raise BadDatabase(f"{shown}: truncated ({src.size} of {(last + 1) * psize} bytes)", "upload the DB again")
    if psize > PIN_PAGE:
        src.ensure_pinned([(0, 2 * psize)])

    def pages(pgnos: list[int]) -> dict[int, bytes]:
        src.ensure_pinned([(p * psize, (p + 1) * psize) for p in pgnos])
        return {p: os.pread(src.fd, psize, p * psize) for p in pgnos}

    # The main database's path to the two named databases.
    trees: dict[bytes, btree.Tree] = {}
    frontier: dict[int, set[bytes]] = {}
    if meta.main.root != btree._P_INVALID:  # noqa: SLF001 - the module's own sentinel
        frontier[meta.main.root] = {INDEX_DB, META_DB}
    for _level in range(min(meta.main.depth, btree._MAX_DEPTH)):  # noqa: SLF001
        if not frontier:
            break
        got = pages(sorted(frontier))
        nxt: dict[int, set[bytes]] = {}
        for pgno, want in frontier.items():
            leaf, nodes = btree.page_nodes(got[pgno], pgno, psize, last, shown)
            if not nodes:
                continue
            if leaf:
                for node in nodes:
                    if node.key in want:
                        trees[node.key] = btree.sub_tree(node, shown)
            else:
                for key in want:
                    nxt.setdefault(btree.child_for(nodes, key), set()).add(key)
        frontier = nxt

    # Every page of the named databases; their values on overflow pages, noted.
    level = [t.root for t in trees.values() if t.root != btree._P_INVALID]  # noqa: SLF001
    big: list[btree.Node] = []
    small: list[tuple[int, int]] = []  # values in leaf pages (small records): their spans
    seen = 0
    while level:
        seen += len(level)
        if seen > last:
            raise BadDatabase(f"{shown}: cannot read its B-tree (the tree loops)", "upload the DB again")
        got = pages(sorted(set(level)))
        level = []
        for pgno, page in got.items():
            leaf, nodes = btree.page_nodes(page, pgno, psize, last, shown)
            if leaf:
                big.extend(n for n in nodes if n.flags & btree._F_BIGDATA)  # noqa: SLF001
                at = pgno * psize
                small.extend((at + n.at, at + n.at + n.size) for n in nodes if not n.flags and n.size)
            else:
                level.extend(n.child for n in nodes)

    # Overflow values: each one's head, in one GET per record. Those whose first page is
    # at hand (a sidecar's, a local file's) need no guess. Of the others a sample first
    # (their first pages give their heads' lengths), then every other one with the
    # sample's 90th-percentile head (and a quarter), then what is missing of longer heads.
    big.sort(key=lambda n: n.child)
    unknown = [n for n in big if not src.is_pinned(n.child * psize, (n.child + 1) * psize)]
    if unknown:
        step = max(1, len(unknown) // _SAMPLE)
        sample = unknown[::step]
        src.ensure_pinned([_value_span(n, psize, psize) for n in sample])
        seen = sorted(_head(src, n, psize, shown)[1] - n.child * psize for n in sample) or [psize]
        guess = seen[(len(seen) - 1) * 9 // 10]  # an outlier (the root's record) must not set it
        guess = min(-(-(guess * 5 // 4) // PIN_PAGE) * PIN_PAGE, _GUESS_MAX)  # a quarter more, in whole pages
        src.ensure_pinned([_value_span(n, psize, guess) for n in unknown])
    src.ensure_pinned([_head(src, n, psize, shown) for n in big])
    at = btree._PAGE_HEADER  # noqa: SLF001 - the value's bytes follow its first page's header
    return sorted([*small, *((n.child * psize + at, min(src.size, n.child * psize + at + n.size)) for n in big)])


def identity_ranges(read, shown: str) -> list[tuple[int, int]]:
    """The byte ranges that say which DB (and which pack of it) a sidecar belongs to: the
    two meta pages, the main database's pages on the path to `lmdbfs.meta`, and every
    page of that database with its values' overflow pages (the meta record: counts,
    the creation time, a pack id). ``read(start, end)`` gives bytes; `BadDatabase`
    when the pages do not hold such a path."""
    meta, first = _newest_meta(read, shown)
    psize, last = meta.psize, meta.last_pgno
    out = [(0, max(first, 2 * psize))]

    def page(pgno: int) -> bytes:
        out.append((pgno * psize, (pgno + 1) * psize))
        return read(pgno * psize, (pgno + 1) * psize)

    tree = None
    pgno = meta.main.root
    for _level in range(min(meta.main.depth, btree._MAX_DEPTH)):  # noqa: SLF001
        if pgno == btree._P_INVALID:  # noqa: SLF001
            break
        leaf, nodes = btree.page_nodes(page(pgno), pgno, psize, last, shown)
        if leaf:
            tree = next((btree.sub_tree(n, shown) for n in nodes if n.key == META_DB), None)
            break
        pgno = btree.child_for(nodes, META_DB) if nodes else btree._P_INVALID  # noqa: SLF001
    if tree is None:
        raise BadDatabase(f"{shown}: no lmdbfs.meta database", "pack it with `lmdbfs pack`")
    level = [tree.root] if tree.root != btree._P_INVALID else []  # noqa: SLF001
    for _level in range(min(tree.depth, btree._MAX_DEPTH)):  # noqa: SLF001
        nxt = []
        for pgno in level:
            leaf, nodes = btree.page_nodes(page(pgno), pgno, psize, last, shown)
            if not leaf:
                nxt.extend(n.child for n in nodes)
                continue
            for n in nodes:
                if n.flags & btree._F_BIGDATA:  # noqa: SLF001
                    at = n.child * psize
                    out.append((at, -(-(at + btree._PAGE_HEADER + n.size) // psize) * psize))  # noqa: SLF001
        level = nxt
        if len(out) > 4096:
            raise BadDatabase(f"{shown}: its lmdbfs.meta database is too large", "pack it with `lmdbfs pack`")
    return out


def _newest_meta(read, shown: str) -> tuple[btree.MetaPage, int]:
    """The DB's newest meta page, from the first bytes of the file (``read(start, end)``),
    and how many it took: two 4 KiB pages, or two of the largest page size when LMDB's
    pages are larger (their meta pages lie farther apart)."""
    try:
        return btree.newest_meta(read(0, 2 * PIN_PAGE), shown), 2 * PIN_PAGE
    except BadDatabase:
        return btree.newest_meta(read(0, 2 * _MAX_PSIZE), shown), 2 * _MAX_PSIZE


def _value_span(node: btree.Node, psize: int, length: int) -> tuple[int, int]:
    """The first ``length`` bytes of an overflow value's pages (at least its first page)."""
    at = node.child * psize
    return at, at + max(psize, min(length, btree._PAGE_HEADER + node.size))  # noqa: SLF001


def _head(src, node: btree.Node, psize: int, shown: str) -> tuple[int, int]:
    """The byte range of an overflow value's head, its first page being in the cache. A
    tail shorter than the gap a GET bridges anyway comes along (a reader of the whole
    record, as `lmdbfs ls`, then needs no GET); a longer one stays out."""
    at = node.child * psize
    probe = os.pread(src.fd, btree._PAGE_HEADER + _HEAD_PROBE, at)  # noqa: SLF001
    if int.from_bytes(probe[:8], "little") != node.child:  # not the page LMDB wrote there
        raise BadDatabase(f"{shown}: overflow page {node.child} is damaged", "upload the DB again")
    at += btree._PAGE_HEADER  # noqa: SLF001
    head = dir_head_len(probe[btree._PAGE_HEADER :], node.size)  # noqa: SLF001
    return at, at + (node.size if node.size - head <= PIN_GAP else head)
