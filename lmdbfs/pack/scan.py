"""The tree to pack, as compact directory records, known before any file is read.

Sources (lmdbfs/pack/sources.py: a folder, a zip or tar archive) report their entries in
their own order; a `TreeBuilder` places them in one tree (several sources merge, a
path two sources both provide is an error) and numbers the files in that order, which
is the order the packer reads and stores them. The result keeps ~60 bytes per file (a
numpy row plus the name), never the contents. Knowing every path up front lets the
packer check keys, size the map and show an ETA before reading a byte.
"""

from __future__ import annotations

import fnmatch
import logging
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import SourceError
from ..format.records import (
    DEPTH_MAX,
    ENTRY_DTYPE,
    FILE_MAX,
    FLAG_SPLIT,
    KIND_DIR,
    KIND_FILE,
    KIND_SYMLINK,
    NAME_MAX,
    RECORD_MAX,
    ROWS_MAX,
    SPLIT_ABOVE,
    SPLIT_PIECE,
    TARGET_MAX,
    build_dir,
    decode_path,
    encode_path,
    new_rows,
    split_table,
)

log = logging.getLogger(__name__)


@dataclass
class ScannedDir:
    path: str  # archive-relative, '' for the root
    rows: np.ndarray  # ENTRY_DTYPE, sorted by name bytes
    blob: bytes  # names and symlink targets, see records.pack_names

    def name_and_target(self, r: int) -> tuple[bytes, bytes]:
        row = self.rows[r]
        off, n, t = int(row["name_off"]), int(row["name_len"]), int(row["target_len"])
        return self.blob[off : off + n], self.blob[off + n : off + n + t]

    def name(self, r: int) -> bytes:
        """The name of row r, without numpy scalar access (called per file, often)."""
        spans = self.__dict__.get("_spans")
        if spans is None:
            spans = self.__dict__["_spans"] = (
                array("Q", self.rows["name_off"].tolist()),
                array("H", self.rows["name_len"].tolist()),
            )
        off = spans[0][r]
        return self.blob[off : off + spans[1][r]]

    def without(self, drop: set[int]) -> ScannedDir:
        keep = [r for r in range(len(self.rows)) if r not in drop]
        pairs = [self.name_and_target(r) for r in keep]
        rows, blob, _, _ = build_dir([n for n, _ in pairs], [t for _, t in pairs], self.rows[keep].copy())
        return ScannedDir(self.path, rows, blob)


@dataclass
class Scan:
    """Everything known about the tree before reading: the future index, and the files
    numbered in reading order (file i lives in dirs[file_dir[i]].rows[file_row[i]])."""

    dirs: list[ScannedDir] = field(default_factory=list)
    file_dir: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    file_row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    file_size: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    file_src: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint16))  # index into sources
    file_ref: list[Any] = field(default_factory=list)  # what the source needs to find the bytes again
    sources: list[Any] = field(default_factory=list)  # sourcebase.Source, in the order they were added
    files: int = 0
    symlinks: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    root_mode: int = 0o755
    root_mtime_ns: int = 0
    placed: dict[str, tuple[str, str | None, str]] = field(default_factory=dict)  # sourcebase.Listing.placed

    def file_relpath(self, i: int) -> str:
        where = self.__dict__.get("_where")
        if where is None:
            where = self.__dict__["_where"] = (array("I", self.file_dir.tobytes()), array("I", self.file_row.tobytes()))
        d = self.dirs[where[0][i]]
        name = decode_path(d.name(where[1][i]))
        return f"{d.path}/{name}" if d.path else name

    def row(self, i: int) -> np.void:
        return self.dirs[int(self.file_dir[i])].rows[int(self.file_row[i])]

    def share(self, include: Callable[[str], bool], skip_errors: bool) -> Scan:
        """The part of the tree whose every path, and every folder above it, ``include``
        accepts (a shard's share: shard.ShardPlan.include), as a scan that listed only
        it would have found it: the same rows, files numbered in the same order,
        folders' subfolder counts of the share. What listing left out beyond the share is
        forgotten; within it, without ``skip_errors``, the first such entry stops the
        pack with the line a scan of the share alone would have stopped with."""
        memo: dict[str, bool] = {"": True}

        def kept(rel: str) -> bool:
            chain = []
            while rel not in memo:
                chain.append(rel)
                rel = rel.rpartition("/")[0]
            ok = memo[rel]
            for path in reversed(chain):
                ok = memo[path] = ok and include(path)
            return ok

        for rel, stop, fix in self.placed.values():
            if stop is not None and not skip_errors and kept(rel):
                raise SourceError(stop, fix)
        dirs = [d for d in self.dirs if kept(d.path)]
        subdirs: dict[str, int] = {d.path: 0 for d in dirs}
        for d in dirs:
            if d.path:
                subdirs[d.path.rpartition("/")[0]] += 1
        old_index = {d.path: k for k, d in enumerate(self.dirs)}
        # Each old row's new row (-1: left out), all directories end to end, so each
        # file's new place is one lookup for all files at once.
        starts = np.zeros(len(self.dirs) + 1, np.int64)
        starts[1:] = np.cumsum([len(d.rows) for d in self.dirs])
        new_row = np.full(int(starts[-1]), -1, np.int64)
        new_dir = np.full(len(self.dirs), -1, np.int64)
        out_dirs: list[ScannedDir] = []
        for d in dirs:
            names = [d.name(r) for r in range(len(d.rows))]
            keep = [r for r, name in enumerate(names) if include(_join(d.path, decode_path(name)))]  # d is kept
            rows = d.rows[keep].copy()
            for r in np.flatnonzero(rows["kind"] == KIND_DIR).tolist():
                rows["checksum"][r] = subdirs[_join(d.path, decode_path(names[keep[r]]))]
            ends = (rows["name_off"].astype(np.int64) + rows["name_len"]).tolist()
            targets = [d.blob[e : e + t] for e, t in zip(ends, rows["target_len"].tolist())]
            rows, blob, _, _ = build_dir([names[r] for r in keep], targets, rows)
            k = old_index[d.path]
            new_row[starts[k] + np.asarray(keep, np.int64)] = np.arange(len(keep))
            new_dir[k] = len(out_dirs)
            out_dirs.append(ScannedDir(d.path, rows, blob))
        old_dir = self.file_dir.astype(np.int64)
        place = new_row[starts[old_dir] + self.file_row.astype(np.int64)] if self.files else np.zeros(0, np.int64)
        take = np.flatnonzero(place >= 0)
        files = take.tolist()

        def left(lines: list[str]) -> list[str]:
            return [line for line in lines if line not in self.placed or kept(self.placed[line][0])]

        for line in left(self.skipped) + left(self.errors):
            log.warning("skipping %s", line)
        return Scan(
            dirs=out_dirs,
            file_dir=new_dir[old_dir[take]].astype(np.uint32),
            file_row=place[take].astype(np.uint32),
            file_size=self.file_size[take],
            file_src=self.file_src[take],
            file_ref=[self.file_ref[i] for i in files],
            sources=self.sources,
            files=len(files),
            symlinks=sum(int(np.count_nonzero(d.rows["kind"] == KIND_SYMLINK)) for d in out_dirs),
            bytes=int(self.file_size[take].sum()),
            skipped=left(self.skipped),
            errors=left(self.errors),
            root_mode=self.root_mode,
            root_mtime_ns=self.root_mtime_ns,
        )

    def drop_files(self, indices: list[int]) -> None:
        """Leave out files that could not be read (--skip-errors). Call after copying:
        file indices no longer point at the right rows afterwards."""
        by_dir: dict[int, set[int]] = {}
        for i in indices:
            by_dir.setdefault(int(self.file_dir[i]), set()).add(int(self.file_row[i]))
        self.__dict__.pop("_where", None)
        for d_idx, drop in by_dir.items():
            d = self.dirs[d_idx]
            self.bytes -= int(sum(int(d.rows[r]["size"]) for r in drop))
            self.dirs[d_idx] = d.without(drop)
        self.files -= len(indices)


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def limit_problem(rel: str, kind: int, target: bytes = b"", size: int = 0) -> tuple[str, str] | None:
    """Why the entry at tree path ``rel`` cannot be served, as (the path to leave out:
    the entry or the folder above it at fault, what is wrong), or None.

    The readers refuse what breaks these limits (recordcheck.check_rows, tree.MAX_DEPTH, the
    C server), so the packer checks every entry against them before it stores a byte."""
    if kind == KIND_FILE and size > FILE_MAX:
        return rel, f"{size} bytes, over the {FILE_MAX} a file may have"
    if kind == KIND_SYMLINK and not 1 <= len(target) <= TARGET_MAX:
        return rel, f"a symlink target of {len(target)} bytes, not 1 to {TARGET_MAX}"
    if 4 * len(rel) <= NAME_MAX:  # every name fits, whatever its encoding: the usual case
        return None
    parts = rel.split("/")
    for k, part in enumerate(parts):
        n = len(encode_path(part))
        if n > NAME_MAX:
            return "/".join(parts[: k + 1]), f"a name of {n} bytes, over the {NAME_MAX} bytes a name may have"
    levels = len(parts) if kind == KIND_DIR else len(parts) - 1
    if levels > DEPTH_MAX:
        return "/".join(parts[: DEPTH_MAX + 1]), f"folders nested over {DEPTH_MAX} levels deep"
    return None


def record_problem(path: str, rows: int, names: int) -> str | None:
    """Why a directory's record, without inline bytes, is more than the readers serve."""
    if rows > ROWS_MAX:
        return f"{rows} entries, over the {ROWS_MAX} a folder may hold"
    head = 16 + len(encode_path(path)) + rows * ENTRY_DTYPE.itemsize + names
    if head > RECORD_MAX:
        return f"its index record would be {head} bytes, over the {RECORD_MAX} a record may have"
    return None


class Excluder:
    """--exclude GLOB: a pattern with '/' matches the relative path, otherwise the name."""

    def __init__(self, patterns: list[str], include: Callable[[str], bool] | None = None) -> None:
        self.include = include  # a shard's share: only the relative paths it accepts are kept
        self.path_pats = [p.strip("/") for p in patterns if "/" in p.strip("/")]
        self.name_pats = [p for p in patterns if "/" not in p.strip("/")]

    def __call__(self, name: str, rel: str) -> bool:
        if self.include is not None and not self.include(rel):
            return True
        if any(fnmatch.fnmatchcase(name, p) for p in self.name_pats):
            return True
        return any(fnmatch.fnmatchcase(rel, p) for p in self.path_pats)

    def covers(self, rel: str) -> bool:
        """Whether ``rel`` or any folder above it is excluded (archive members come
        with whole paths, not folder by folder)."""
        if not (self.path_pats or self.name_pats or self.include):
            return False
        parts = rel.split("/")
        return any(self(parts[k], "/".join(parts[: k + 1])) for k in range(len(parts)))


class _DirAcc:
    """One directory's entries as they arrive, in compact parallel arrays."""

    __slots__ = ("names", "kinds", "modes", "sizes", "mtimes", "targets", "filenums", "srcs", "implicit", "where")

    def __init__(self, implicit: bool, where: tuple[_DirAcc, int] | None) -> None:
        self.names: list[bytes] = []
        self.kinds = array("B")
        self.modes = array("H")
        self.sizes = array("Q")
        self.mtimes = array("q")
        self.targets: list[bytes] = []
        self.filenums = array("q")  # file number, -1 for other kinds
        self.srcs = array("H")
        self.implicit = implicit  # created for a member below it, not listed itself (yet)
        self.where = where  # (parent accumulator, row) of this directory's own entry

    def append(
        self, name: bytes, kind: int, mode: int, size: int, mtime_ns: int, target: bytes, filenum: int, src: int
    ) -> int:
        self.names.append(name)
        self.kinds.append(kind)
        self.modes.append(mode)
        self.sizes.append(size)
        self.mtimes.append(mtime_ns)
        self.targets.append(target)
        self.filenums.append(filenum)
        self.srcs.append(src)
        return len(self.names) - 1


class TreeBuilder:
    """Places entries from one or more sources into one tree.

    Directories merge (the first source to list one gives its mode and mtime; a folder
    only implied by a member's path gets 0o755 and its source's time); anything else
    provided twice is an error naming the path and both sources.
    """

    def __init__(self) -> None:
        self.accs: dict[str, _DirAcc] = {"": _DirAcc(implicit=False, where=None)}
        self.labels: list[str] = []
        self.sources: list[Any] = []
        self.file_src = array("H")
        self.file_ref: list[Any] = []
        self.symlinks = 0
        self.bytes = 0
        self.skipped: list[str] = []
        self.errors: list[str] = []
        self.placed: dict[str, tuple[str, str | None, str]] = {}

    def add_source(self, source: Any, label: str) -> int:
        self.sources.append(source)
        self.labels.append(label)
        return len(self.sources) - 1

    def add(
        self,
        rel: str,
        kind: int,
        mode: int,
        mtime_ns: int,
        size: int,
        target: bytes,
        src: int,
        ref: Any,
        dir_mtime_ns: int,
    ) -> None:
        """One entry at tree path ``rel`` (no leading slash); ``dir_mtime_ns`` dates the
        folders it implies."""
        parent, _, name = rel.rpartition("/")
        acc = self._dir(parent, src, dir_mtime_ns)
        if kind == KIND_DIR:
            child = self.accs.get(rel)
            if child is None:
                row = acc.append(encode_path(name), KIND_DIR, mode, 0, mtime_ns, b"", -1, src)
                self.accs[rel] = _DirAcc(implicit=False, where=(acc, row))
            elif child.implicit and child.where is not None:
                owner, row = child.where
                owner.modes[row], owner.mtimes[row], owner.srcs[row] = mode, mtime_ns, src
                child.implicit = False
            return
        filenum = -1
        if kind == KIND_FILE:
            filenum = len(self.file_ref)
            self.file_src.append(src)
            self.file_ref.append(ref)
            self.bytes += size
        else:
            self.symlinks += 1
            size = len(target)
        acc.append(encode_path(name), kind, mode, size, mtime_ns, target, filenum, src)

    def _dir(self, rel: str, src: int, mtime_ns: int) -> _DirAcc:
        acc = self.accs.get(rel)
        if acc is not None:
            return acc
        missing = [rel]  # folders implied by the path, the deepest first (a loop: deep trees)
        while (parent := missing[-1].rpartition("/")[0]) not in self.accs:
            missing.append(parent)
        owner = self.accs[parent]
        for path in reversed(missing):
            row = owner.append(encode_path(path.rpartition("/")[2]), KIND_DIR, 0o755, 0, mtime_ns, b"", -1, src)
            owner = self.accs[path] = _DirAcc(implicit=True, where=(owner, row))
        return owner

    def build(self, root_mode: int, root_mtime_ns: int) -> Scan:
        """The compact form: sorted rows per directory, files numbered in arrival order."""
        files = len(self.file_ref)
        file_dir = np.zeros(files, np.uint32)
        file_row = np.zeros(files, np.uint32)
        file_size = np.zeros(files, np.uint64)
        dirs: list[ScannedDir] = []
        subdirs = {rel: 0 for rel in self.accs}
        for rel in self.accs:
            if rel:
                subdirs[rel.rpartition("/")[0]] += 1
        for rel, acc in self.accs.items():
            if acc.sizes and max(acc.sizes) > SPLIT_ABOVE:  # a file stored as pieces carries their table
                for k, size in enumerate(acc.sizes):
                    if size > SPLIT_ABOVE and acc.kinds[k] == KIND_FILE:
                        acc.targets[k] = split_table(size, piece=SPLIT_PIECE)
            problem = record_problem(rel, len(acc.names), sum(map(len, acc.names)) + sum(map(len, acc.targets)))
            if problem:
                raise SourceError(f"{rel or '/'}: {problem}", "split the folder into several, or --exclude some of it")
            rows = new_rows(len(acc.names))
            if len(rows):
                rows["kind"] = np.frombuffer(acc.kinds, np.uint8)
                rows["mode"] = np.frombuffer(acc.modes, np.uint16)
                rows["size"] = np.frombuffer(acc.sizes, np.uint64)
                rows["mtime_ns"] = np.frombuffer(acc.mtimes, np.int64)
                for k in np.flatnonzero(rows["kind"] == KIND_DIR).tolist():
                    # A directory row's checksum field holds its subdirectory count
                    # (st_nlink - 2), so stat never has to open the child's record.
                    child = f"{rel}/{decode_path(acc.names[k])}" if rel else decode_path(acc.names[k])
                    rows["checksum"][k] = subdirs[child]
            rows, blob, _, order = build_dir(
                acc.names,
                acc.targets,
                rows,
                on_duplicate=lambda a, b, rel=rel, acc=acc: self._duplicate(rel, acc, a, b),
            )
            if order:
                nums = np.frombuffer(acc.filenums, np.int64)[np.asarray(order, dtype=np.int64)]
                is_file = nums >= 0
                file_dir[nums[is_file]] = len(dirs)
                file_row[nums[is_file]] = np.flatnonzero(is_file)
                file_size[nums[is_file]] = rows["size"][is_file]
                rows["flags"][is_file & (rows["size"] > SPLIT_ABOVE)] = FLAG_SPLIT
            dirs.append(ScannedDir(rel, rows, blob))
        self.accs.clear()
        return Scan(
            dirs=dirs,
            file_dir=file_dir,
            file_row=file_row,
            file_size=file_size,
            file_src=np.frombuffer(self.file_src, np.uint16).copy() if files else np.zeros(0, np.uint16),
            file_ref=self.file_ref,
            sources=self.sources,
            files=files,
            symlinks=self.symlinks,
            bytes=self.bytes,
            skipped=self.skipped,
            errors=self.errors,
            root_mode=root_mode,
            root_mtime_ns=root_mtime_ns,
            placed=self.placed,
        )

    def _duplicate(self, rel: str, acc: _DirAcc, a: int, b: int) -> None:
        name = decode_path(acc.names[a])
        path = f"{rel}/{name}" if rel else name
        first, second = self.labels[acc.srcs[a]], self.labels[acc.srcs[b]]
        where = f"both {first} and {second} provide it" if first != second else f"{first} lists it twice"
        raise SourceError(
            f"{path}: {where}",
            "place one source under its own folder (DIR=SOURCE) or --exclude the path",
        )
