"""Packing one tree as N shards, on N machines at once: which part each one packs.

The tree is cut into *units* — the entries at one depth (plus files and empty folders
above it), so a sequence folder is never split — and the units are dealt out by bytes:
largest first, each to the least-loaded shard, ties broken by name and shard number.
Every machine scanning the same SRC computes the same deal. Each shard records
``shard: "I/N"`` and a checksum of the whole unit list in its meta, so a set of shards
can be checked for missing, duplicated or mismatched members.

The depth is the first level of the tree with more than N entries (GOT-10k:
``train/<sequence>``; LaSOT: ``<class>``), or what ``--shard-depth`` says.
"""

from __future__ import annotations

import hashlib
import heapq
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ..errors import UsageError
from ..format.records import KIND_DIR, decode_path


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = -1
    if not sep or n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text!r}: expected I/N with 0 <= I < N", "e.g. --shard 0/8 … --shard 7/8")
    return i, n


def _depth(rel: str) -> int:
    return rel.count("/") + 1


def split_depth(entries: Iterable[tuple[str, int, int]], count: int) -> int:
    """The first level with more than ``count`` entries; else the most populated one."""
    per_level: dict[int, int] = {}
    for rel, _kind, _size in entries:
        per_level[_depth(rel)] = per_level.get(_depth(rel), 0) + 1
    for level in sorted(per_level):
        if per_level[level] > count:
            return level
    return max(per_level, key=lambda lv: (per_level[lv], -lv), default=1)


def units_at(entries: Iterable[tuple[str, int, int]], depth: int) -> dict[str, int]:
    """Unit path -> bytes of the files below it. Units are the entries at ``depth``,
    and above it the files, symlinks and empty folders (which have nothing to split)."""
    units: dict[str, int] = {}
    shallow_dirs: list[str] = []
    parents: set[str] = set()
    for rel, kind, size in entries:
        parents.add(posixpath.dirname(rel))
        d = _depth(rel)
        if d < depth and kind == KIND_DIR:
            shallow_dirs.append(rel)
            continue
        unit = rel if d <= depth else "/".join(rel.split("/")[:depth])
        units[unit] = units.get(unit, 0) + (size if kind != KIND_DIR else 0)
    for rel in shallow_dirs:
        if rel not in parents:
            units[rel] = 0
    return units


def deal(units: dict[str, int], count: int) -> list[list[str]]:
    """Largest unit first, each into the least-loaded shard (ties: lower shard number).
    Equal sizes are taken in name order, so the deal is the same everywhere."""
    shards: list[list[str]] = [[] for _ in range(count)]
    loads = [(0, i) for i in range(count)]
    heapq.heapify(loads)
    for path, size in sorted(units.items(), key=lambda item: (-item[1], item[0].encode("utf-8", "surrogateescape"))):
        load, i = heapq.heappop(loads)
        shards[i].append(path)
        heapq.heappush(loads, (load + size, i))
    return shards


def units_checksum(units: dict[str, int], depth: int) -> str:
    """Identifies the unit list (paths and sizes): shards of one set share it."""
    h = hashlib.sha256(f"lmdbfs-shard-units depth={depth}\n".encode())
    for path in sorted(units, key=lambda p: p.encode("utf-8", "surrogateescape")):
        h.update(path.encode("utf-8", "surrogateescape") + b"\t" + str(units[path]).encode() + b"\n")
    return h.hexdigest()


@dataclass
class ShardPlan:
    """What shard ``index`` of ``count`` packs: an include-filter on relative paths."""

    index: int
    count: int
    depth: int
    units: set[str]
    checksum: str
    unit_count: int
    bytes: int
    _ancestors: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        for unit in self.units:
            parent = posixpath.dirname(unit)
            while parent:
                self._ancestors.add(parent)
                parent = posixpath.dirname(parent)

    def include(self, rel: str) -> bool:
        """Keep ``rel``: a unit of this shard, a folder above one, or anything below one
        (the scan only descends into kept folders)."""
        return rel in self.units or rel in self._ancestors or _depth(rel) > self.depth

    def units_text(self) -> str:
        return f"{len(self.units)} of {self.unit_count} units at depth {self.depth}"

    def extra(self) -> dict[str, object]:
        """What the shard records in its meta (``extra``)."""
        return {
            "shard": f"{self.index}/{self.count}",
            "shard_depth": self.depth,
            "shard_units": self.unit_count,
            "shard_units_checksum": self.checksum,
        }


def plan(entries: list[tuple[str, int, int]], index: int, count: int, depth: int | None = None) -> ShardPlan:
    """The share of shard ``index`` of ``count``, from every entry of the tree as
    (relative path, kind, size)."""
    if depth is None:
        depth = split_depth(entries, count)
    if depth < 1:
        raise UsageError(f"--shard-depth {depth}: must be at least 1", "1 splits the top-level entries")
    units = units_at(entries, depth)
    mine = set(deal(units, count)[index])
    return ShardPlan(
        index=index,
        count=count,
        depth=depth,
        units=mine,
        checksum=units_checksum(units, depth),
        unit_count=len(units),
        bytes=sum(units[u] for u in mine),
    )


def set_problems(members: Iterable[tuple[str, str, dict]]) -> list[tuple[str, str]]:
    """Check shard sets among (DB, folder, meta extra): every folder's shards must come
    from one unit list and hold each of 0..N-1 exactly once. Returns (kind, line)
    pairs, kind being "mismatch", "twice" or "missing"."""
    groups: dict[str, list[tuple[str, int, int, str]]] = {}
    for db, folder, extra in members:
        if "shard" in extra:
            i, n = parse_shard(str(extra["shard"]))
            groups.setdefault(folder, []).append((db, i, n, str(extra.get("shard_units_checksum", ""))))
    problems: list[tuple[str, str]] = []
    add = problems.append
    for folder, shards in groups.items():
        where = f" (under {folder}/)" if folder else ""
        first_db, _, n, checksum = shards[0]
        odd = [db for db, _, m, c in shards if (m, c) != (n, checksum)]
        if odd:
            line = (
                f"{odd[0]} and {first_db} are shards of different packs{where} (other N, or SRC changed between "
                "shard packs) — re-pack the odd ones from the same SRC with the same N"
            )
            add(("mismatch", line))
            continue
        by_index: dict[int, list[str]] = {}
        for db, i, _, _ in shards:
            by_index.setdefault(i, []).append(db)
        for i in range(n):
            found = by_index.get(i, [])
            if len(found) > 1:
                add(("twice", f"shard {i}/{n}{where} is given twice: {', '.join(found)} — pass it once"))
            elif not found:
                line = f"shard {i}/{n}{where} is missing — pack it with `lmdbfs pack --shard {i}/{n} SRC DB` and add it"
                add(("missing", line))
    return problems


def iter_scan_entries(scan) -> Iterator[tuple[str, int, int]]:
    """(relative path, kind, size) of every entry of a `scan.Scan`."""
    for d in scan.dirs:
        kinds = d.rows["kind"].tolist()
        sizes = d.rows["size"].tolist()
        for r, (kind, size) in enumerate(zip(kinds, sizes)):
            name = decode_path(d.name_and_target(r)[0])
            yield (f"{d.path}/{name}" if d.path else name), kind, size
