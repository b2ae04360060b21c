"""The reading API every packed tree answers, one DB (`reader.Archive`) or several
(`union.Union`): paths resolved, listed, walked and read, written once over a few
primitives each kind of tree gives in its own way.

A tree answers:

* ``record(rel)``: the decoded record of directory ``rel``, or None when it is none;
* ``root_entry()``: the root's entry (no directory lists it);
* ``read_range(rel, entry, offset, size)``: bytes of a file already looked up;
* ``check_entry(rel, entry)``: whether a file's stored bytes are intact;
* ``refetch(rel, entry)``: drop what a remote DB cached of a file that failed its
  checksum (True: reading again may help);
* ``meta``, ``checksummed``, ``layers()`` (each DB with the folder it sits under), ``close()``.

Everything else here — lstat, stat, resolve, listdir, scandir, walk, read_bytes, open,
check, … — rests on those, so a union and a single DB behave alike by construction
(ratarmount's MountSource / UnionMountSource split is the model).
"""

from __future__ import annotations

import io
import os
import posixpath
from collections.abc import Callable, Iterator

import xxhash

from ..errors import CorruptValue, IsADirectory, LmdbfsError, NotADirectory, NotASymlink, PathNotFound
from ..format.meta import Meta
from ..format.records import DEPTH_MAX, KIND_DIR, KIND_FILE, DirRecord, Entry, checksum
from .valuefile import OPEN_WHOLE, ValueFile

_MAX_SYMLINK_HOPS = 40
MAX_DEPTH = DEPTH_MAX  # directory levels a walk descends (pack refuses deeper trees)
PIECE = 1 << 20  # read_pieces' piece size, and the step of checksums over large files


def normpath(path: str) -> str:
    """Archive-relative form of ``path``: no leading slash, '' for the root, never above it."""
    path = posixpath.normpath("/" + path.replace(os.sep, "/"))
    return path.lstrip("/")


class Tree:
    """A read-only tree of directories, files and symlinks. Paths are '/'-separated and
    relative to the tree's root. Subclasses give the primitives the module docstring lists."""

    path: str  # what the tree was opened from, for messages
    verify: bool  # reads check each file's checksum unless told otherwise

    # -- primitives ------------------------------------------------------------------------
    def record(self, rel: str) -> DirRecord | None:
        raise NotImplementedError

    def root_entry(self) -> Entry:
        raise NotImplementedError

    def read_range(self, rel: str, entry: Entry, offset: int, size: int) -> bytes:
        raise NotImplementedError

    def check_entry(self, rel: str, entry: Entry) -> bool:
        raise NotImplementedError

    def refetch(self, rel: str, entry: Entry) -> bool:
        raise NotImplementedError

    @property
    def meta(self) -> Meta:
        raise NotImplementedError

    @property
    def checksummed(self) -> bool:
        raise NotImplementedError

    def layers(self) -> list[tuple[str, Tree]]:
        """Each DB of the tree (a `reader.Archive`) with the folder it appears under ('' =
        the root)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths -----------------------------------------------------------------------------
    def lstat(self, path: str) -> Entry:
        """The entry of ``path`` itself (a symlink is not followed)."""
        return self.lstat_rel(normpath(path))

    def lstat_rel(self, rel: str) -> Entry:
        """`lstat` for a path already in tree-relative form (no normalising)."""
        if not rel:
            return self.root_entry()
        parent, name = posixpath.split(rel)
        rec = self.record(parent)
        entry = rec.lookup(name) if rec is not None else None
        if entry is None:
            self.raise_missing(rel)
        return entry

    def raise_missing(self, rel: str) -> None:
        """Say precisely why ``rel`` is absent: ENOTDIR when a parent is not a directory."""
        parts = rel.split("/")
        for depth in range(1, len(parts)):
            prefix = "/".join(parts[:depth])
            parent, name = posixpath.split(prefix)
            rec = self.record(parent)
            entry = rec.lookup(name) if rec is not None else None
            if entry is None:
                break
            if not entry.is_dir:
                raise NotADirectory(f"{prefix}: not a directory in the archive")
        raise PathNotFound(f"{rel}: no such file in the archive", "check the path with `lmdbfs ls`")

    def resolve(self, path: str) -> str:
        """``path`` with every symlink inside the tree followed, as the kernel would."""
        todo = normpath(path).split("/") if normpath(path) else []
        done: list[str] = []
        hops = 0
        while todo:
            name = todo.pop(0)
            if name == "..":
                if done:
                    done.pop()
                continue
            current = "/".join(done + [name])
            entry = self.lstat(current)
            if entry.is_symlink:
                hops += 1
                if hops > _MAX_SYMLINK_HOPS:
                    raise PathNotFound(f"{path}: too many levels of symbolic links")
                target = entry.target or ""
                if target.startswith("/"):
                    raise PathNotFound(f"{current}: symlink points outside the archive ({target})")
                todo = [p for p in target.split("/") if p not in ("", ".")] + todo
                continue
            done.append(name)
        return "/".join(done)

    def stat(self, path: str, follow_symlinks: bool = True) -> Entry:
        return self.lstat(self.resolve(path) if follow_symlinks else path)

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
        except (PathNotFound, NotADirectory):
            return False
        return True

    def scandir(self, path: str = "") -> list[Entry]:
        rel = self.resolve(path)
        rec = self.record(rel)
        if rec is None:
            entry = self.lstat(rel)  # raises PathNotFound when absent
            raise NotADirectory(f"{rel or '/'}: not a directory ({entry.name})")
        return rec.entries()

    def listdir(self, path: str = "") -> list[str]:
        rel = self.resolve(path)
        rec = self.record(rel)
        if rec is None:
            self.lstat(rel)
            raise NotADirectory(f"{rel or '/'}: not a directory")
        return list(rec.names)

    def dir_record(self, path: str) -> DirRecord:
        """The decoded record itself, for callers that want every row (verify, damaged-row reports)."""
        rel = normpath(path)
        rec = self.record(rel)
        if rec is None:
            self.lstat(rel)
            raise NotADirectory(f"{rel or '/'}: not a directory")
        return rec

    def walk(
        self, top: str = "", onerror: Callable[[LmdbfsError], None] | None = None
    ) -> Iterator[tuple[str, list[str], list[str]]]:
        """Like os.walk, top-down; symlinks (even to directories) are listed with files.

        A damaged DB cannot make it loop or explode: each directory is visited once and
        at most MAX_DEPTH levels deep. A subdirectory that cannot be read raises, or
        with ``onerror`` is reported there and skipped (top's own errors always raise)."""
        top = normpath(top)
        stack = [(top, 0)]
        seen: set[str] = set()
        while stack:
            rel, depth = stack.pop()
            try:
                if rel in seen:
                    raise CorruptValue(f"{rel}: directory listed twice", "re-pack the DB")
                if depth > MAX_DEPTH:
                    raise CorruptValue(f"{rel}: directories nested over {MAX_DEPTH} levels deep", "re-pack the DB")
                seen.add(rel)
                rec = self.record(rel)
                if rec is None:
                    self.lstat(rel)
                    raise NotADirectory(f"{rel or '/'}: not a directory")
            except LmdbfsError as exc:
                if onerror is None or rel == top:
                    raise
                onerror(exc)
                continue
            named = list(zip(rec.names, rec.rows["kind"].tolist()))
            dirs = [n for n, k in named if k == KIND_DIR]
            files = [n for n, k in named if k != KIND_DIR]
            yield rel, dirs, files
            stack.extend((posixpath.join(rel, d), depth + 1) for d in reversed(dirs))

    def readlink(self, path: str) -> str:
        entry = self.lstat(path)
        if not entry.is_symlink:
            raise NotASymlink(f"{normpath(path)}: not a symbolic link")
        return entry.target or ""

    # -- contents --------------------------------------------------------------------------
    def file_entry(self, path: str) -> tuple[str, Entry]:
        """(resolved path, entry) of the regular file at ``path``."""
        rel = self.resolve(path)
        entry = self.lstat(rel)
        if entry.kind != KIND_FILE:
            if entry.is_dir:
                raise IsADirectory(f"{rel or '/'}: is a directory")
            raise PathNotFound(f"{rel}: not a regular file")
        return rel, entry

    def read_bytes(self, path: str, verify: bool | None = None) -> bytes:
        """The file's exact bytes, checked against its checksum unless verify=False."""
        return self.read_whole(*self.file_entry(path), verify=verify)

    def read_whole(self, rel: str, entry: Entry, verify: bool | None = None) -> bytes:
        """`read_bytes` of a file already looked up (a walk's entries: no path resolved)."""
        data = self.read_range(rel, entry, 0, entry.size)
        if (self.verify if verify is None else verify) and self.checksummed and checksum(data) != entry.checksum:
            if self.refetch(rel, entry):  # a damaged cache block: fetched again, once
                data = self.read_range(rel, entry, 0, entry.size)
                if checksum(data) == entry.checksum:
                    return data
            raise CorruptValue(f"{rel}: checksum mismatch, the DB is damaged", "re-pack or restore the DB")
        return data

    def read_pieces(self, path: str, verify: bool | None = None) -> Iterator[bytes]:
        """`read_bytes` in pieces of at most 1 MiB: a file of any size in bounded memory."""
        return self.pieces_of(*self.file_entry(path), verify=verify)

    def pieces_of(self, rel: str, entry: Entry, verify: bool | None = None) -> Iterator[bytes]:
        """`read_pieces` of a file already looked up; a checksum mismatch raises after
        the last piece."""
        hasher = xxhash.xxh3_64() if (self.verify if verify is None else verify) and self.checksummed else None
        for at in range(0, entry.size, PIECE):
            piece = self.read_range(rel, entry, at, PIECE)
            if hasher is not None:
                hasher.update(piece)
            yield piece
        if hasher is not None and hasher.intdigest() != entry.checksum:
            raise CorruptValue(f"{rel}: checksum mismatch, the DB is damaged", "re-pack or restore the DB")

    def read(self, path: str, size: int, offset: int = 0) -> bytes:
        """A slice of the file (``size`` bytes from ``offset``; fewer at its end)."""
        rel, entry = self.file_entry(path)
        return self.read_range(rel, entry, offset, size)

    def open(self, path: str) -> io.BytesIO | io.BufferedReader:
        """A file object over the bytes, for PIL.Image.open, pandas.read_csv and friends
        (a file over 64 MiB is read as asked, not held whole)."""
        rel, entry = self.file_entry(path)
        if entry.size <= OPEN_WHOLE:
            return io.BytesIO(self.read_whole(rel, entry))
        return io.BufferedReader(ValueFile(self, rel, entry), PIECE)

    def check(self, path: str) -> bool:
        """True when the stored bytes of ``path`` are intact (see `check_entry`)."""
        return self.check_entry(*self.file_entry(path))
