"""Zip and tar archives as sources: their members are packed without being extracted.

The stdlib reads them (zipfile, tarfile); this module only maps members to `Member`s:
exact bytes, permission bits, mtimes and symlinks as the archive records them.

* zip: random access, so each reading thread opens its own handle. A zip records
  local time without a zone, in 2-second steps; it is read as the packing machine's
  local time, as `unzip` does. Members made on systems that record no Unix mode get
  0o644 (folders 0o755).
* tar (plain, gz, bz2, xz): listed once, then streamed front to back in one pass —
  a compressed tar cannot be read any other way. mtimes are exact (pax headers
  included). Hard links and device files are left out and listed as skipped.

A damaged or truncated archive is one `SourceError` naming the archive and the member.
"""

from __future__ import annotations

import logging
import lzma
import os
import stat as st
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import IO, Any

from ..errors import SourceError
from ..format.records import KIND_DIR, KIND_FILE, KIND_SYMLINK, encode_path
from .sourcebase import Listing, Member, Nested, Reader, Source

log = logging.getLogger(__name__)

_DAMAGED = "the archive is damaged or truncated — download or copy it again"
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError, ValueError)
_TAR_ERRORS = (tarfile.TarError, zlib.error, lzma.LZMAError, EOFError, OSError)
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def open_archive(path: str) -> Source:
    lower = path.lower()
    if lower.endswith(".zip"):
        return ZipSource(path, path, os.stat(path).st_mtime_ns)
    if lower.endswith(_TAR_SUFFIXES):
        return TarSource(path)
    if zipfile.is_zipfile(path):
        return ZipSource(path, path, os.stat(path).st_mtime_ns)
    try:
        if tarfile.is_tarfile(path):
            return TarSource(path)
    except _TAR_ERRORS:
        pass
    raise SourceError(
        f"{path}: not a folder, a zip or a tar archive", "pass a folder, .zip, .tar, .tar.gz, .tar.bz2 or .tar.xz"
    )


def _clean(label: str, name: str) -> str:
    """A member name as a tree path: no leading '/', no '.' parts; never above the root."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise SourceError(f"{label}: member {name!r} points outside the archive", "the archive is crafted or damaged")
    return "/".join(parts)


class ZipSource(Source):
    """A zip file, or a zip inside another source (``opener`` then gives its bytes as
    a seekable file)."""

    def __init__(self, path: str | bytes, label: str, mtime_ns: int, opener: Callable[[], Any] | None = None) -> None:
        self.path = path
        self.label = label
        self.mtime_ns = mtime_ns
        self.opener = opener

    def root_attrs(self) -> tuple[int, int]:
        return 0o755, self.mtime_ns

    def open(self) -> _ZipHandle:
        return _ZipHandle(self)

    def members(self, listing: Listing) -> Iterator[Member | Nested]:
        with self.open() as handle:
            for info in handle.zf.infolist():
                member = self._member(handle, info, listing)
                if member is not None:
                    yield member

    def _member(self, handle: _ZipHandle, info: zipfile.ZipInfo, listing: Listing) -> Member | Nested | None:
        path = _clean(self.label, info.filename)
        unix = info.external_attr >> 16 if info.create_system == 3 else 0
        mtime = int(time.mktime((*info.date_time, 0, 0, -1))) * 1_000_000_000
        if info.is_dir() or st.S_ISDIR(unix):
            return Member(path, KIND_DIR, st.S_IMODE(unix) or 0o755, mtime)
        if st.S_ISLNK(unix):
            target = handle.read(info)
            return Member(path, KIND_SYMLINK, st.S_IMODE(unix), mtime, len(target), target)
        if st.S_IFMT(unix) not in (0, st.S_IFREG):
            log.log(
                listing.level, "skipping %s: %s: not a regular file, directory or symlink", self.label, info.filename
            )
            listing.skipped.append(f"{self.label}: {info.filename}")
            return None
        mode = st.S_IMODE(unix) or 0o644
        if listing.expand_zips and path.lower().endswith(".zip"):
            nested = ZipSource(path, f"{self.label}/{path}", mtime, _member_opener(self, info))
            return Nested(path, mode, mtime, nested)
        return Member(path, KIND_FILE, mode, mtime, info.file_size, ref=info)

    def reader(self) -> Reader:
        return _ZipReader(self)


def _member_opener(parent: ZipSource, info: zipfile.ZipInfo) -> Callable[[], Any]:
    def opener() -> Any:
        outer = parent.open()
        return _Chained(outer, outer.zf.open(info))

    return opener


class _Chained:
    """A nested zip's file object that also closes the outer handle it reads from."""

    def __init__(self, outer: _ZipHandle, inner: IO[bytes]) -> None:
        self.outer, self.inner = outer, inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def close(self) -> None:
        self.inner.close()
        self.outer.close()


class _ZipHandle:
    def __init__(self, source: ZipSource) -> None:
        self.source = source
        self.fileobj = None
        try:
            self.fileobj = source.opener() if source.opener else None
            self.zf = zipfile.ZipFile(self.fileobj if self.fileobj is not None else source.path)
        except _ZIP_ERRORS as exc:
            if self.fileobj is not None:
                self.fileobj.close()
            raise SourceError(f"{source.label}: not a readable zip archive ({_reason(exc)})", _DAMAGED) from None

    def read(self, info: zipfile.ZipInfo) -> bytes:
        try:
            return self.zf.read(info)
        except _ZIP_ERRORS as exc:
            raise SourceError(f"{self.source.label}: {info.filename}: {_reason(exc)}", _DAMAGED) from None

    def close(self) -> None:
        self.zf.close()
        if self.fileobj is not None:
            self.fileobj.close()

    def __enter__(self) -> _ZipHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ZipReader(Reader):
    def __init__(self, source: ZipSource) -> None:
        self.handle = source.open()

    def __call__(self, rel: str | None, ref: Any) -> tuple[bytes, int | None]:
        return self.handle.read(ref), None

    def open_stream(self, rel: str, ref: Any) -> IO[bytes]:
        return _Checked(self.handle.zf.open(ref), self.handle.source.label, ref.filename)

    def close(self) -> None:
        self.handle.close()


class TarSource(Source):
    """A tar archive, plain or compressed; members are streamed in order."""

    sequential = True

    def __init__(self, path: str) -> None:
        self.path = path
        self.label = path
        self.mtime_ns = os.stat(path).st_mtime_ns
        self.compressed = not _plain_tar(path)

    def root_attrs(self) -> tuple[int, int]:
        return 0o755, self.mtime_ns

    def _members(self, mode: str) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
        """(archive, member) pairs in order. tarfile keeps every member it has seen;
        forgetting them keeps memory flat whatever the archive's size."""
        last = "its first member"
        try:
            with tarfile.open(self.path, mode) as tar:
                while (info := tar.next()) is not None:
                    tar.members.clear()
                    last = info.name
                    yield tar, info
                if not self.compressed:
                    self._check_complete(tar)
        except _TAR_ERRORS as exc:
            raise SourceError(f"{self.label}: unreadable after {last} ({_reason(exc)})", _DAMAGED) from None

    def _check_complete(self, tar: tarfile.TarFile) -> None:
        """tarfile takes a plain tar cut short for a shorter archive; a member whose
        data runs past the end of the file gives it away."""
        size = os.path.getsize(self.path)
        if tar.offset > size:
            raise SourceError(f"{self.label}: truncated ({size} bytes, its members need {tar.offset})", _DAMAGED)

    def members(self, listing: Listing) -> Iterator[Member | Nested]:
        # A plain tar is listed by seeking from header to header; a compressed one
        # has to be decompressed to find them.
        for ordinal, (_tar, info) in enumerate(self._members("r|*" if self.compressed else "r:")):
            path = _clean(self.label, info.name)
            mode, mtime = info.mode & 0o7777, _tar_mtime_ns(info)
            if info.isdir():
                yield Member(path, KIND_DIR, mode, mtime)
            elif info.issym():
                target = encode_path(info.linkname)
                yield Member(path, KIND_SYMLINK, mode, mtime, len(target), target)
            elif info.isreg():
                if listing.expand_zips and path.lower().endswith(".zip"):
                    raise SourceError(
                        f"{self.label}: {info.name}: zips inside a tar archive cannot be expanded",
                        "extract that tar first, or pack without --expand-zips",
                    )
                yield Member(path, KIND_FILE, mode, mtime, info.size, ref=ordinal)
            else:
                what = "a hard link" if info.islnk() else "not a regular file, directory or symlink"
                log.log(listing.level, "skipping %s: %s: %s", self.label, info.name, what)
                listing.skipped.append(f"{self.label}: {info.name}")

    def stream(self, wanted: Iterator[tuple[int, Any]], large: int) -> Iterator[tuple[int, bytes | IO[bytes]]]:
        todo = next(wanted, None)
        if todo is None:
            return
        for ordinal, (tar, info) in enumerate(self._members("r|*")):
            if ordinal != todo[1]:
                continue
            fh = tar.extractfile(info)
            if fh is not None and info.size >= large:
                yield todo[0], _Checked(fh, self.label, info.name)
                todo = next(wanted, None)
                if todo is None:
                    return
                continue
            data = fh.read() if fh is not None else b""
            if len(data) != info.size:
                raise SourceError(f"{self.label}: {info.name}: truncated ({len(data)} of {info.size} bytes)", _DAMAGED)
            yield todo[0], data
            todo = next(wanted, None)
            if todo is None:
                return
        raise SourceError(f"{self.label}: ends before member #{todo[1]} it listed", _DAMAGED)

    def reader(self) -> Reader:
        raise SourceError(f"{self.label}: a tar archive is read in one pass", "internal: use stream()")


class _Checked:
    """A member's file object whose read errors name the archive and the member."""

    def __init__(self, fh: IO[bytes], label: str, name: str) -> None:
        self.fh, self.label, self.name = fh, label, name

    def read(self, n: int) -> bytes:
        try:
            return self.fh.read(n)
        except _ZIP_ERRORS + _TAR_ERRORS as exc:
            raise SourceError(f"{self.label}: {self.name}: {_reason(exc)}", _DAMAGED) from None

    def close(self) -> None:
        self.fh.close()


def _plain_tar(path: str) -> bool:
    try:
        with tarfile.open(path, "r:"):
            return True
    except _TAR_ERRORS:
        return False


def _tar_mtime_ns(info: tarfile.TarInfo) -> int:
    exact = info.pax_headers.get("mtime")
    ns = int(info.mtime) * 1_000_000_000
    if exact is not None:
        try:
            ns = int(Decimal(exact) * 1_000_000_000)
        except ArithmeticError:
            pass
    return max(-(1 << 63), min(ns, (1 << 63) - 1))  # rows hold int64 times


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__
