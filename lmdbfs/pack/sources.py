"""Where a packed tree comes from: folders and archives, each read in its own order.

A source lists its entries (`Member`: path, kind, mode, mtime, size, symlink target)
in its natural order — a folder directory by directory, names sorted; an archive as
its members lie — and hands back a member's bytes: any member at any time from a
per-thread `reader()` (folders, zips), or all wanted members in one pass from
`stream()` (tar, above all compressed tar, which can only be read front to back).

`build_scan` turns source specs (``[DIR=]PATH``) into one `Scan`: sources merge,
``DIR=`` places one under a folder, ``strip`` drops folders an archive wraps
everything in, and zips inside a source can be expanded into folders.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as st
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from tqdm import tqdm

from ..errors import SourceError
from ..format.records import KIND_DIR, KIND_FILE, KIND_SYMLINK, decode_path
from .archives import ZipSource, open_archive
from .scan import Excluder, Scan, TreeBuilder, limit_problem
from .sourcebase import Listing, Member, Nested, Reader, Source

log = logging.getLogger(__name__)

try:
    from .._readfiles import read_files
except ImportError:  # installed without a C compiler: each file is read in Python instead
    read_files = None

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class FolderSource(Source):
    is_folder = True

    def __init__(self, path: str, skip_abs: list[bytes]) -> None:
        self.root = os.fsencode(os.path.abspath(path))
        self.label = path
        self.skip_abs = set(skip_abs)
        try:
            self.top = os.stat(self.root)
        except OSError as exc:
            raise SourceError(f"{path}: {exc.strerror}", "pass an existing folder or archive to pack") from None

    def root_attrs(self) -> tuple[int, int]:
        return st.S_IMODE(self.top.st_mode), self.top.st_mtime_ns

    def members(self, listing: Listing) -> Iterator[Member | Nested]:
        """lstat every entry (symlinks are recorded, never followed): a directory's
        entries sorted by name, then its subdirectories, depth first."""
        stack = [""]
        while stack:
            rel = stack.pop()
            abs_dir = os.path.join(self.root, os.fsencode(rel)) if rel else self.root
            try:
                with os.scandir(abs_dir) as it:
                    found = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                _problem(listing, rel or ".", exc)
                continue
            subdirs = []
            for entry in found:
                name = decode_path(entry.name)
                child = f"{rel}/{name}" if rel else name
                if entry.path in self.skip_abs or listing.prune(name, child):
                    log.debug("excluded %s", child)
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                    target = os.readlink(entry.path) if st.S_ISLNK(info.st_mode) else b""
                except OSError as exc:
                    _problem(listing, child, exc)
                    continue
                mode, mtime = st.S_IMODE(info.st_mode), info.st_mtime_ns
                if st.S_ISREG(info.st_mode):
                    if listing.expand_zips and name.lower().endswith(".zip"):
                        yield Nested(
                            child, mode, mtime, ZipSource(os.fsdecode(entry.path), f"{self.label}/{child}", mtime)
                        )
                    else:
                        yield Member(child, KIND_FILE, mode, mtime, info.st_size)
                elif st.S_ISDIR(info.st_mode):
                    yield Member(child, KIND_DIR, mode, mtime)
                    subdirs.append(child)
                elif st.S_ISLNK(info.st_mode):
                    yield Member(child, KIND_SYMLINK, mode, mtime, len(target), target)
                else:
                    log.log(listing.level, "skipping %s: not a regular file, directory or symlink", child)
                    listing.skipped.append(child)
                    listing.placed[child] = (listing.in_tree(child), None, "")
            stack.extend(reversed(subdirs))

    def reader(self) -> Reader:
        return _FolderReader(self)


class _FolderReader(Reader):
    def __init__(self, source: FolderSource) -> None:
        self.root, self.cut = source.root, len(source.under) + 1 if source.under else 0

    def __call__(self, rel: str | None, ref: Any) -> tuple[bytes, int | None]:
        path = os.path.join(self.root, os.fsencode(rel[self.cut :]))
        with open(path, "rb", buffering=0) as fh:
            return fh.read(), os.fstat(fh.fileno()).st_mtime_ns

    def open_stream(self, rel: str, ref: Any) -> IO[bytes]:
        return open(os.path.join(self.root, os.fsencode(rel[self.cut :])), "rb", buffering=0)

    def read_many(self, rels: list[str], sizes: list[int]) -> list[tuple[bytes, int] | OSError | None] | None:
        # In C, with the GIL released once for the chunk rather than four times a file.
        if read_files is None:
            return None
        datas, mtimes, errs = read_files(self.root, [os.fsencode(r[self.cut :]) for r in rels], sizes)
        return [
            (data, mtime) if not err else (None if err < 0 else _read_error(err))
            for data, mtime, err in zip(datas, mtimes, errs)
        ]


def _read_error(err: int) -> OSError:
    # _readfiles answers EINVAL for what was listed as a file and is no longer one.
    return OSError(err, "no longer a regular file" if err == errno.EINVAL else os.strerror(err))


def _problem(listing: Listing, rel: str, exc: OSError) -> None:
    reason = exc.strerror or str(exc)
    stop, fix = f"cannot read {rel}: {reason}", "fix its permissions, or pass --skip-errors to leave it out"
    if not listing.skip_errors:
        raise SourceError(stop, fix)
    log.log(listing.level, "skipping %s: %s", rel, reason)
    listing.errors.append(f"{rel}: {reason}")
    listing.placed[f"{rel}: {reason}"] = (listing.in_tree(rel), stop, fix)


@dataclass(frozen=True)
class SourceSpec:
    """``[DIR=]PATH``: PATH (a folder or an archive) placed under DIR of the tree."""

    path: str
    under: str = ""

    @classmethod
    def parse(cls, text: str) -> SourceSpec:
        if os.path.lexists(text) or "=" not in text:
            return cls(text)
        under, _, path = text.partition("=")
        parts = [p for p in under.replace(os.sep, "/").split("/") if p not in ("", ".")]
        if ".." in parts:
            raise SourceError(
                f"{text}: a source cannot be placed above the tree's root", "use DIR=PATH with DIR inside"
            )
        return cls(path, "/".join(parts))

    def __str__(self) -> str:
        return f"{self.under}={self.path}" if self.under else self.path


def open_source(path: str, skip_abs: list[bytes]) -> Source:
    """A folder, or a zip or tar archive (chosen by its name, else by its contents)."""
    if os.path.isdir(path):
        return FolderSource(path, skip_abs)
    if not os.path.exists(path):
        raise SourceError(f"{path}: no such folder or archive", "check the path")
    return open_archive(path)


def build_scan(
    specs: list[str],
    *,
    excludes: list[str] | None = None,
    skip_abs: list[bytes] | None = None,
    skip_errors: bool = False,
    strip: str = "0",
    expand_zips: bool = False,
    progress: bool = False,
    quiet: bool = False,
    include: Callable[[str], bool] | None = None,
) -> Scan:
    """List every source (nothing is read yet) and merge them into one tree."""
    excluded = Excluder(excludes or [], include)
    builder = TreeBuilder()
    bar = tqdm(desc="scan", unit=" entries", disable=not progress, smoothing=0.1)
    root: tuple[int, int] | None = None
    for text in specs:
        spec = SourceSpec.parse(text)
        source = open_source(spec.path, skip_abs or [])
        if root is None and not spec.under:
            root = source.root_attrs()
        listing = Listing(_pruner(excluded, spec.under), builder.skipped, builder.errors, skip_errors, expand_zips)
        listing.level = logging.DEBUG if quiet else logging.WARNING
        listing.under, listing.placed = spec.under, builder.placed
        _add(builder, source, spec.under, "0" if source.is_folder else strip, listing, excluded, bar, str(spec))
    bar.close()
    mode, mtime = root if root is not None else (0o755, 0)
    return builder.build(mode, mtime)


def _pruner(excluded: Excluder, under: str) -> Callable[[str, str], bool]:
    return lambda name, rel: excluded(name, f"{under}/{rel}" if under else rel)


def _add(
    builder: TreeBuilder,
    source: Source,
    under: str,
    strip: str,
    listing: Listing,
    excluded: Excluder,
    bar: tqdm,
    label: str,
) -> None:
    source.under = under
    src = builder.add_source(source, label)
    _, dir_mtime = source.root_attrs()
    items: Iterator[Member | Nested] = source.members(listing)
    cut = 0
    if strip != "0":
        listed = list(items)
        cut = _strip_count(listed, strip, label)
        items = iter(listed)
    refused: tuple[str, ...] = ()  # folders left out for breaking a limit: so is all below them
    for item in items:
        path = item.path
        if cut:
            parts = path.split("/")
            if len(parts) <= cut:
                continue  # the wrapping folder itself
            path = "/".join(parts[cut:])
        rel = f"{under}/{path}" if under and path else under or path
        if not rel:
            continue  # the archive's own root entry ("./")
        if not source.is_folder and excluded.covers(rel):
            continue
        if refused and rel.startswith(refused):
            continue
        if isinstance(item, Nested):
            problem = limit_problem(rel, KIND_DIR)
        else:
            problem = limit_problem(rel, item.kind, item.target, item.size)
        if problem:
            at, why = problem
            where = at if source.is_folder else f"{label}: {item.path}"
            fix = "rename or exclude it, or pass --skip-errors to leave it out"
            if not listing.skip_errors:
                raise SourceError(f"{where}: {why}", fix)
            log.log(listing.level, "skipping %s: %s", where, why)
            listing.skipped.append(f"{where} ({why})")
            listing.placed[f"{where} ({why})"] = (at, f"{where}: {why}", fix)
            refused = (*refused, at + "/")
            continue
        bar.update(1)
        if isinstance(item, Nested):
            mode = item.mode | ((item.mode & 0o444) >> 2)  # a folder: x wherever r
            folder = rel[: -len(".zip")]
            builder.add(folder, KIND_DIR, mode, item.mtime_ns, 0, b"", src, None, dir_mtime)
            sub = Listing(
                _pruner(excluded, folder),
                listing.skipped,
                listing.errors,
                listing.skip_errors,
                True,
                listing.level,
                folder,
                listing.placed,
            )
            _add(builder, item.source, folder, "0", sub, excluded, bar, item.source.label)
        else:
            builder.add(rel, item.kind, item.mode, item.mtime_ns, item.size, item.target, src, item.ref, dir_mtime)


def _strip_count(listed: list[Member | Nested], strip: str, label: str) -> int:
    """How many leading folders to drop: a number, or 'auto': one when every member
    lies below the same single top folder, else none."""
    if strip != "auto":
        try:
            count = int(strip)
        except ValueError:
            raise SourceError(f"--strip {strip}: not a number or 'auto'", "pass e.g. --strip 1") from None
        return max(0, count)
    tops = {item.path.split("/", 1)[0] for item in listed if item.path}
    nested = any("/" in item.path for item in listed)
    if len(tops) == 1 and nested:
        only = next(iter(tops))
        if all(item.path == only or item.path.startswith(only + "/") for item in listed if item.path):
            if not any(item.path == only and item.kind != KIND_DIR for item in listed if isinstance(item, Member)):
                log.info("%s: stripping its single top folder %s", label, only)
                return 1
    return 0
