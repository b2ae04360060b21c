"""A remote DB's index, fetched and pinned at open (docs/remote.md, "index prefetch").

LMDB maps the cache's sparse copy, so every page a lookup touches must be present
before LMDB (in C or py-lmdb) opens it: the two meta pages, the main database's path
to the named databases `lmdbfs.index` and `lmdbfs.meta`, every page of those, and the
first page of each overflow value they hold. Then the directory records' heads (names
and rows: all a lookup, a listing or a stat needs) — not their tails, which in a tree
of tiny files are as large as the data.

The tree is walked level by level: each level's pages are fetched together, in a few
coalesced ranged GETs in flight at once, so the time grows with the index's bytes and
depth, not with the number of directories.
"""

from __future__ import annotations

import os

from ..db import btree
from ..errors import BadDatabase
from ..format.records import INDEX_DB, META_DB, dir_head_len

_HEAD_PROBE = 16  # a record's header: magic, entries, own-path length, blob length


def prefetch_index(src) -> int:
    """Fetch and pin the index of ``src`` (a `RemoteSource`); the bytes pinned."""
    shown = src.url.shown
    first = min(src.size, 2 * src.block_size)
    src.ensure([(0, first)], pin=True)
    meta = btree.newest_meta(os.pread(src.fd, first, 0), shown)
    psize, last = meta.psize, meta.last_pgno
    if (last + 1) * psize > src.size:
        raise BadDatabase(f"{shown}: truncated ({src.size} of {(last + 1) * psize} bytes)", "upload the DB again")
    pinned = first

    def pages(pgnos: list[int]) -> dict[int, bytes]:
        nonlocal pinned
        src.ensure([(p * psize, (p + 1) * psize) for p in pgnos], pin=True)
        pinned += len(pgnos) * psize
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
            else:
                level.extend(n.child for n in nodes)

    # Overflow values: first the page with each one's header, then the heads.
    starts = [(n.child * psize, n.child * psize + psize) for n in big]
    src.ensure(starts, pin=True)
    heads = []
    for node in big:
        at = node.child * psize + btree._PAGE_HEADER  # noqa: SLF001
        probe = os.pread(src.fd, _HEAD_PROBE, at)
        heads.append((at, at + dir_head_len(probe, node.size)))
    src.ensure(heads, pin=True)
    return pinned + sum(min(e - s, psize) for s, e in starts) + sum(e - s for s, e in heads)
