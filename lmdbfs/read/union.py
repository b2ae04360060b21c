"""One read-only tree served from several DBs: shards of one dataset, or datasets side by side.

Each layer is an `Archive` placed at the root or under a folder (``got10k=GOT-10k.lmdb``).
Directories present in several layers merge; a path that would be a file in one layer
and anything in another is refused when the union is opened, naming the path and both
DBs — nothing is ever shadowed. Finding those clashes only compares the directory
records (names and kinds) of the directories the layers share, never values.

`Union` is a `tree.Tree` like `Archive`: it holds one `Archive` per layer and answers
the few primitives the path-level calls (walk, scandir, resolve, read_bytes, …) rest on
from them, so `ls`/`cat`/`verify`/`unpack` and data loaders use it unchanged. The mount daemon does
not read through it: it hands the layers to the C server (`serve.ServedLayer`).
"""

from __future__ import annotations

import os
import posixpath
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BadDatabase, LayerConflict
from ..format.meta import Meta
from ..format.records import (
    KIND_DIR,
    KIND_NAMES,
    DirRecord,
    Entry,
    build_dir,
    decode_path,
    encode_path,
    new_rows,
)
from ..pack.shard import set_problems
from ..remote.url import is_url
from .handle import DirCache
from .reader import DEFAULT_DIR_CACHE_BYTES, Archive
from .tree import Tree, normpath

_SOURCES_MAX = 1 << 16  # remembered directory -> layers answers (~10 MB at most)
_VIRTUAL_MODE = 0o755


@dataclass(frozen=True)
class Layer:
    """One DB of a union and the folder it appears under ('' = the root)."""

    prefix: str
    path: str

    def __str__(self) -> str:
        return f"{self.prefix}={self.path}" if self.prefix else self.path


def parse_layer(spec: str | os.PathLike[str] | tuple[str, str] | Layer) -> Layer:
    """``DB`` (at the root), ``FOLDER=DB``, or a (folder, DB) pair."""
    if isinstance(spec, Layer):
        return spec
    if isinstance(spec, tuple):
        prefix, path = spec
    else:
        text = os.fspath(spec)
        prefix, sep, path = text.partition("=")
        if not sep or os.path.exists(text) or is_url(text):  # NAME=URL; a URL's own '=' is no folder
            prefix, path = "", text
    prefix = normpath(prefix)
    if ".." in prefix.split("/"):
        raise BadDatabase(f"{prefix}: a folder for a DB must stay inside the tree", "name a plain folder: NAME=DB")
    return Layer(prefix, os.fspath(path))


def parse_layers(specs: Iterable[Any]) -> list[Layer]:
    layers = [parse_layer(s) for s in specs]
    if not layers:
        raise BadDatabase("no DB given", "pass one or more DBs")
    return layers


class _Merged(DirRecord):
    """A directory shared by several layers: the rows of all of them, which layer each
    row comes from (its file's bytes live there), and which rows are folders of several
    layers (or made up for a layer placed below)."""

    __slots__ = ("owners", "shared")

    def __init__(
        self, path: str, rows: np.ndarray, blob: bytes, owners: np.ndarray, shared: np.ndarray, tail: bytes
    ) -> None:
        size = rows.nbytes + len(blob) + len(tail) + owners.nbytes + shared.nbytes
        super().__init__(path, rows, blob, size, tail=tail)
        self.owners = owners
        self.shared = shared


class Union(Tree):
    """Several DBs as one tree (see the module docstring): it holds one `Archive` per
    layer and answers `Tree`'s primitives from them. Safe to create before forking and
    pickles as its layer list, like `Archive`."""

    def __init__(
        self,
        layers: Sequence[Any],
        *,
        verify: bool = True,
        dir_cache_bytes: int = DEFAULT_DIR_CACHE_BYTES,
        check: bool = True,
    ) -> None:
        self.specs = parse_layers(layers)
        self.verify = verify
        self._dir_cache_bytes = dir_cache_bytes
        self.path = " ".join(map(str, self.specs))
        # The layers share one budget (merged folders have another), so memory does not
        # grow with their number.
        share = max(1 << 20, dir_cache_bytes // len(self.specs))
        self._archives: list[Archive] = []
        try:
            for spec in self.specs:
                self._archives.append(Archive(spec.path, verify=verify, dir_cache_bytes=share))
        except BaseException:
            self.close()
            raise
        self._virtual = self._virtual_dirs()
        self._lock = threading.Lock()
        self._reset()
        if check:
            try:
                self.check_layers()
            except BaseException:
                self.close()
                raise

    def layers(self) -> list[tuple[str, Archive]]:
        return [(spec.prefix, archive) for spec, archive in zip(self.specs, self._archives)]

    def _virtual_dirs(self) -> dict[str, dict[str, int]]:
        """Folders that exist because a layer sits below them: dir -> {name: layer}."""
        virtual: dict[str, dict[str, int]] = {}
        for i, spec in enumerate(self.specs):
            parts = spec.prefix.split("/") if spec.prefix else []
            for depth, name in enumerate(parts):
                virtual.setdefault("/".join(parts[:depth]), {}).setdefault(name, i)
        return virtual

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._merged = DirCache(self._dir_cache_bytes)
        self._sources_memo: OrderedDict[str, tuple[tuple[int, str], ...]] = OrderedDict()
        self._last_owner: tuple[str | None, Any, str] = (None, None, "")

    def _fresh(self) -> None:
        if self._pid != os.getpid():  # after fork: caches and locks of the parent are not ours
            self._lock = threading.Lock()
            self._reset()

    def check_layers(self) -> None:
        """Merge every directory the layers share; raises LayerConflict on a clash
        (a shard given twice is named as such, before its files would clash)."""
        for kind, line in self.shard_problems():
            if kind == "twice":
                problem, _, fix = line.partition(" — ")
                raise LayerConflict(problem, fix)
        self.record("")

    def shard_problems(self) -> list[tuple[str, str]]:
        """Missing, duplicated or mismatched shards among the layers (see shard.set_problems)."""
        return set_problems((s.path, s.prefix, layer.meta.extra) for s, layer in zip(self.specs, self._archives))

    def __getstate__(self) -> dict[str, Any]:
        return {
            "layers": [(s.prefix, s.path) for s in self.specs],
            "verify": self.verify,
            "dir_cache_bytes": self._dir_cache_bytes,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Checked when it was created; shared directories still merge (and check) lazily.
        self.__init__(state["layers"], verify=state["verify"], dir_cache_bytes=state["dir_cache_bytes"], check=False)

    def close(self) -> None:
        for layer in getattr(self, "_archives", []):
            layer.close()
        if hasattr(self, "_merged"):
            self._merged.clear()

    # -- where a directory lives ------------------------------------------------------------
    def _sources(self, rel: str) -> tuple[tuple[int, str], ...]:
        """The layers in which union directory ``rel`` is a real directory, with its
        path inside each (in layer order)."""
        if self._pid != os.getpid():
            self._fresh()
        memo = self._sources_memo
        hit = memo.get(rel)  # a plain read: entries are only ever added whole or evicted
        if hit is not None:
            return hit
        if not rel:
            found = [(i, "") for i, s in enumerate(self.specs) if not s.prefix]
        else:
            parent, name = posixpath.split(rel)
            found = []
            candidates = self._sources(parent)
            merged = self._merged.get(parent) if len(candidates) > 1 or parent in self._virtual else None
            at = merged.index_of(name) if merged is not None else None
            if at is not None and not merged.shared[at]:
                # A folder of one layer only: the merged parent knows which (one search, not one per layer).
                candidates = [c for c in candidates if c[0] == int(merged.owners[at])]
            for i, sub in candidates:
                rec = self._archives[i].record(sub)
                at = rec.index_of(name) if rec is not None else None
                if at is not None and int(rec.rows["kind"][at]) == KIND_DIR:
                    found.append((i, posixpath.join(sub, name)))
            found += [(i, "") for i, s in enumerate(self.specs) if s.prefix == rel]
            found.sort()
        result = tuple(found)
        with self._lock:
            memo[rel] = result
            if len(memo) > _SOURCES_MAX:
                memo.popitem(last=False)
        return result

    def record(self, rel: str) -> DirRecord | None:
        """Directory ``rel``'s record: a layer's own when one layer alone holds it, else
        merged from every layer holding it (cached)."""
        sources = self._sources(rel)
        virtual = self._virtual.get(rel)
        if len(sources) == 1 and not virtual:
            i, sub = sources[0]
            return self._archives[i].record(sub)
        if not sources and not virtual:
            return None
        rec = self._merged.get(rel)
        if rec is None:
            rec = self._merge(rel, sources, virtual or {})
            self._merged.put(rec)
        return rec

    def _merge(self, rel: str, sources: tuple[tuple[int, str], ...], virtual: dict[str, int]) -> _Merged:
        """One record from the records of every layer holding ``rel``, plus the folders
        of layers placed below it. Only names and kinds are compared."""
        recs = [self._archives[i].record(sub) for i, sub in sources]
        seen: dict[bytes, tuple[int, int, int]] = {}  # name -> (record k, row), or (-1, placing layer); kind
        shared: set[bytes] = set()
        for k, rec in enumerate(recs):
            for row, (name, kind) in enumerate(zip(rec.raw_names(), rec.rows["kind"].tolist())):
                prev = seen.setdefault(name, (k, row, kind))
                if prev[0] != k:
                    self._clash(rel, name, prev, (k, row, kind), sources, shared)
        for text, layer in virtual.items():
            name = encode_path(text)
            prev = seen.setdefault(name, (-1, layer, KIND_DIR))
            if prev[0] != -1 or prev[1] != layer:
                self._clash(rel, name, prev, (-1, layer, KIND_DIR), sources, shared)
        names = sorted(seen)
        where = [seen[name] for name in names]
        ks = np.fromiter((w[0] for w in where), np.int64, len(names))
        js = np.fromiter((w[1] for w in where), np.int64, len(names))
        rows = new_rows(len(names))
        owners = np.zeros(len(names), np.uint32)
        for k, rec in enumerate(recs):  # copy each layer's rows in one step
            at = np.flatnonzero(ks == k)
            rows[at] = rec.rows[js[at]]
            owners[at] = sources[k][0]
        targets: list[bytes] = []
        inline: list[bytes | None] = [None] * len(names)
        shared_rows = np.zeros(len(names), bool)
        for n, (name, (k, j, _kind)) in enumerate(zip(names, where)):
            if k < 0:
                rows[n] = self._virtual_row(j, posixpath.join(rel, decode_path(name)))
                owners[n] = j
                targets.append(b"")
            else:
                targets.append(recs[k].name_and_target(j)[len(name) :])
                inline[n] = recs[k].inline_bytes(j)
            if k < 0 or name in shared:  # a folder of several layers: Union counts all their subfolders in st_nlink
                shared_rows[n] = True
                rows[n]["checksum"] = self.record(posixpath.join(rel, decode_path(name))).subdir_count
        rows, blob, tail, _ = build_dir(names, targets, rows, inline)  # names come sorted: rows stay in place
        return _Merged(rel, rows, blob, owners, shared_rows, tail)

    def _clash(self, rel: str, name: bytes, prev: tuple, new: tuple, sources: tuple, shared: set[bytes]) -> None:
        """Two layers list ``name``: fine for two folders (they merge), else refused."""
        if prev[2] == KIND_DIR and new[2] == KIND_DIR:
            shared.add(name)
            return

        def side(k: int, j: int, kind: int) -> str:
            if k < 0:
                return f"the folder of {self.specs[j].path}"
            return f"a {KIND_NAMES.get(kind, 'entry')} in {self.specs[sources[k][0]].path}"

        raise LayerConflict(
            f"{posixpath.join(rel, decode_path(name))}: {side(*prev)} and {side(*new)}",
            "a path may come from one DB only: put the DBs under separate folders (NAME=DB) or leave one out",
        )

    def _virtual_row(self, layer: int, child: str) -> np.void:
        spec, meta = self.specs[layer], self._archives[layer].meta
        row = new_rows(1)[0]
        row["kind"] = KIND_DIR
        row["mode"] = meta.root_mode if spec.prefix == child else _VIRTUAL_MODE
        row["mtime_ns"] = meta.root_mtime_ns
        return row

    # -- entries ----------------------------------------------------------------------------
    def root_entry(self) -> Entry:
        sources = self._sources("")
        first = self._archives[sources[0][0]].meta if sources else self._archives[0].meta
        mode = first.root_mode if sources else _VIRTUAL_MODE
        root = self.record("")
        return Entry("", KIND_DIR, mode, 0, first.root_mtime_ns, checksum=root.subdir_count if root else 0)

    def owner(self, rel: str) -> tuple[Archive, str]:
        """The layer holding file ``rel`` and the file's path inside it: a union's reads
        and checks are that layer's (its values, offsets and keys are asked of it)."""
        last = self._last_owner  # a read asks twice (checksum, then location)
        if last[0] == rel:
            return last[1], last[2]
        layer, sub = self._find_owner(rel)
        self._last_owner = (rel, layer, sub)
        return layer, sub

    def _find_owner(self, rel: str) -> tuple[Archive, str]:
        parent, name = posixpath.split(rel)
        sources = self._sources(parent)
        if len(sources) != 1 or parent in self._virtual:
            rec = self.record(parent)
            at = rec.index_of(name) if isinstance(rec, _Merged) else None
            if at is None:
                self.raise_missing(rel)
            layer = int(rec.owners[at])
            sources = [s for s in sources if s[0] == layer]
        i, sub = sources[0]
        return self._archives[i], posixpath.join(sub, name)

    # -- contents: the layer that holds the file answers -------------------------------------
    def read_range(self, rel: str, entry: Entry, offset: int, size: int) -> bytes:
        if entry.inline is not None:  # the bytes came with the entry: no layer to find
            return entry.inline[offset : offset + max(0, size)]
        layer, sub = self.owner(rel)
        return layer.read_range(sub, entry, offset, size)

    def check_entry(self, rel: str, entry: Entry) -> bool:
        """`Archive.check_entry` by the layer holding the file: with checksums, or
        without them (an adopted DB) by its key, size and offset."""
        layer, sub = self.owner(rel)
        return layer.check_entry(sub, entry)

    def refetch(self, rel: str, entry: Entry) -> bool:
        if entry.inline is not None:
            return False
        layer, sub = self.owner(rel)
        return layer.refetch(sub, entry)

    def key_of(self, path: str) -> bytes:
        layer, sub = self.owner(normpath(path))
        return layer.key_of(sub)

    @property
    def data_bytes(self) -> int:
        return sum(layer.data_bytes for layer in self._archives)

    @property
    def checksummed(self) -> bool:
        """True when every layer's values carry checksums (an adopted DB may not)."""
        return all(layer.checksummed for layer in self._archives)

    @property
    def meta(self) -> Meta:
        """Totals over the layers (directories shared by several count once per layer)."""
        metas = [layer.meta for layer in self._archives]
        first = metas[0]
        excludes = sorted({g for m in metas for g in m.extra.get("excludes", [])})
        return Meta(
            files=sum(m.files for m in metas),
            dirs=sum(m.dirs for m in metas),
            symlinks=sum(m.symlinks for m in metas),
            bytes=sum(m.bytes for m in metas),
            source=" ".join(m.source for m in metas),
            root_mode=first.root_mode,
            root_mtime_ns=first.root_mtime_ns,
            complete=True,
            extra={"excludes": excludes},
        )


def open_tree(*specs: Any, **kwargs: Any) -> Tree:
    """An `Archive` for one DB at the root, else a `Union` of every DB given."""
    flat: list[Any] = []
    for spec in specs:
        flat.extend(spec if isinstance(spec, list | tuple) and not _is_pair(spec) else [spec])
    layers = parse_layers(flat)
    if len(layers) == 1 and not layers[0].prefix:
        return Archive(layers[0].path, **kwargs)
    return Union(layers, **kwargs)


def _is_pair(spec: Any) -> bool:
    return isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(s, str) for s in spec) and "=" not in spec[0]


def shard_problems(specs: Sequence[Any]) -> list[tuple[str, str]]:
    """`Union.shard_problems` for DBs not yet opened together (a shard given twice
    could not be: its files clash)."""
    members = []
    for spec in parse_layers(specs):
        with Archive(spec.path) as archive:
            members.append((spec.path, spec.prefix, archive.meta.extra))
    return set_problems(members)
