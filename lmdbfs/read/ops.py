"""Whole-archive operations built on the reader: info and unpack (verify has its own module).

They live apart from the CLI so tests and scripts can call them and get results,
not printed text.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from ..db.foreign import CHECKSUM_NONE, KIND_MD5, KIND_PATH
from ..errors import CorruptValue, DestinationExists, UnsafePath
from ..format.recordcheck import BAD_NAME
from ..format.records import LAYOUT_COMPACT, decode_path
from ..pack.feed import is_zeros
from .reader import Archive, Locations
from .tree import Tree

log = logging.getLogger(__name__)


def info(archive: Archive) -> dict[str, Any]:
    """Format, counts and sizes: what `lmdbfs info` shows."""
    meta = archive.meta
    stat = archive.index_stat()
    size = archive.data_bytes
    out = {
        "path": archive.path,
        "format": f"{meta.format} v{meta.format_version}",
        "complete": meta.complete,
        "files": meta.files,
        "dirs": meta.dirs,
        "symlinks": meta.symlinks,
        "content_bytes": meta.bytes,
        "db_bytes": size,
        "overhead": f"{(size / meta.bytes - 1) * 100:.1f}%" if meta.bytes else "n/a",
        "layout": meta.layout
        + (" (small files in their directory records only)" if meta.layout == LAYOUT_COMPACT else ""),
        "keys": meta.keys,
        "key_scheme": meta.key_scheme,
        "key_prefix": meta.key_prefix,
        "key_sep": meta.key_sep,
        "checksum": meta.checksum,
        "source": meta.source,
        "created": meta.created,
        "tool_version": meta.tool_version,
        "page_size": stat["psize"],
        "btree_depth": stat["depth"],
        "excludes": meta.extra.get("excludes", []),
        **{key: meta.extra[key] for key in ("shard", "shard_units", "shard_units_checksum") if key in meta.extra},
    }
    if meta.data is not None:
        out.update(_adopted_info(meta, archive.locations()))
    return out


_KIND_TEXT = {KIND_PATH: "keyed by plain paths", KIND_MD5: "md5-keyed converter DB"}


def _adopted_info(meta, where: Locations) -> dict[str, Any]:
    """What `lmdbfs adopt` recorded: the foreign DB, how its values are served."""
    data, counts = meta.data or {}, meta.extra.get("adopted", {})
    converted = counts.get("converted", 0)
    values = "as stored in the adopted DB (read at recorded offsets, no key lookups)"
    if data.get("kind") == KIND_MD5:
        values = (
            f"{converted} converted back to files at adopt time (float32 .txt, uint8 .label, pickled .ini; "
            "inline in the index); JPEGs as the converter stored them (re-encoded)"
        )
    return {
        "adopted": f"yes, from {where.values.path} ({_KIND_TEXT.get(data.get('kind'), '?')}, {counts.get('keys', '?')} keys)",
        "index": where.index.path,
        "index_bytes": os.path.getsize(where.index.data_file),
        "adopted_txnid": data.get("last_txnid"),
        "values": values,
        "left_out": f"{counts.get('skipped', 0)} keys, {counts.get('missing', 0)} listed paths not found",
        "checksum": "none: adopted values were not hashed (reads are not verified; `lmdbfs adopt --checksum` records xxh3)"
        if meta.checksum == CHECKSUM_NONE
        else f"{meta.checksum} (recorded by `lmdbfs adopt --checksum`)",
        "overhead": "n/a",
    }


def iter_files(archive: Tree, top: str = "") -> Iterator[str]:
    for dirpath, _dirs, files in archive.walk(top):
        for name in files:
            yield posixpath.join(dirpath, name)


@dataclass
class UnpackResult:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0


def _safe_name(name: str, where: str) -> str:
    """A single path component, or refuse: a crafted index must not escape DST."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise UnsafePath(
            f"refusing entry {name!r} in {where or '/'}: it would land outside the destination",
            "the DB is damaged or crafted; do not unpack it",
        )
    return name


def unpack(
    archive: Tree, dst: str, force: bool = False, progress: bool = False, keep_special_bits: bool = False
) -> UnpackResult:
    """Restore names, bytes, symlinks, permission bits and mtimes under ``dst``.

    Nothing is ever written through a symlink: every entry is created fresh
    (O_EXCL / mkdir), so a crafted duplicate name fails instead of escaping. A damaged
    entry stops the unpack with one line. setuid, setgid and sticky bits come from an
    untrusted file, so they are dropped unless ``keep_special_bits``.
    """
    mode_mask = 0o7777 if keep_special_bits else 0o777
    if os.path.lexists(dst):
        if not os.path.isdir(dst) or os.path.islink(dst):
            raise DestinationExists(f"{dst} exists and is not a directory", "choose a new destination")
        if os.listdir(dst) and not force:
            raise DestinationExists(f"{dst} is not empty", "choose an empty or new directory (or --force to add to it)")
    else:
        os.makedirs(dst)
    result = UnpackResult()
    bar = tqdm(total=archive.meta.bytes, unit="B", unit_scale=True, desc="unpack", disable=not progress)
    finish_dirs: list[tuple[str, int, int]] = []
    for rel_dir, _dirs, _files in archive.walk():
        base = os.path.join(dst, *rel_dir.split("/")) if rel_dir else dst
        _refuse_damaged(archive, rel_dir)
        for entry in archive.scandir(rel_dir):
            name = _safe_name(entry.name, rel_dir)
            rel = posixpath.join(rel_dir, name)
            path = os.path.join(base, name)
            try:
                if entry.is_dir:
                    os.mkdir(path, 0o700)
                    finish_dirs.append((path, entry.mode & mode_mask, entry.mtime_ns))
                    result.dirs += 1
                elif entry.is_symlink:
                    os.symlink(entry.target or "", path)
                    _set_mtime(path, entry.mtime_ns, follow_symlinks=False)
                    result.symlinks += 1
                else:
                    _write_file(path, archive.pieces_of(rel, entry), entry.mode & mode_mask, entry.mtime_ns)
                    result.files += 1
                    result.bytes += entry.size
                    bar.update(entry.size)
            except FileExistsError:
                raise UnsafePath(
                    f"{rel}: listed twice in the DB, refusing to overwrite", "the DB is damaged or crafted"
                ) from None
    bar.close()
    # Directories last and deepest first: a read-only mode must not block their contents.
    for path, mode, mtime_ns in reversed(finish_dirs):
        os.chmod(path, mode)
        _set_mtime(path, mtime_ns)
    meta = archive.meta
    os.chmod(dst, meta.root_mode & mode_mask)
    _set_mtime(dst, meta.root_mtime_ns)
    return result


def _refuse_damaged(archive: Tree, rel_dir: str) -> None:
    """Stop at a directory with damaged entries: unpacking must not drop files silently."""
    bad = archive.dir_record(rel_dir).bad
    if not bad:
        return
    name, why = next(iter(bad.items()))
    where = f"{decode_path(name)!r} in {rel_dir or '/'}"
    if why == BAD_NAME:
        raise UnsafePath(
            f"refusing entry {where}: it would land outside the destination", "the DB is damaged or crafted"
        )
    raise CorruptValue(f"damaged entry {where} ({why})", "the DB is damaged or crafted; re-pack it")


def _set_mtime(path: str | int, mtime_ns: int, follow_symlinks: bool = True) -> None:
    """Set atime and mtime; a time this filesystem cannot store is left as now, with a warning."""
    try:
        os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=follow_symlinks)
    except (OverflowError, OSError) as exc:
        log.warning("%s: mtime %d ns not set (%s)", path, mtime_ns, getattr(exc, "strerror", None) or exc)


_HOLE_MIN = 64 << 10  # zero pieces at least this long are left as holes


def _write_file(path: str, pieces: Iterator[bytes], mode: int, mtime_ns: int) -> None:
    """Write a file piece by piece (any size, bounded memory); pieces of zeros become a
    hole, as `cp --sparse=auto` makes them. A piece that fails its checksum at the end
    leaves no file behind."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o600)
    try:
        size = 0
        try:
            for piece in pieces:
                size += len(piece)
                if len(piece) >= _HOLE_MIN and is_zeros(piece):
                    os.lseek(fd, len(piece), os.SEEK_CUR)
                    continue
                view = memoryview(piece)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            os.ftruncate(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        os.fchmod(fd, mode)
        _set_mtime(fd, mtime_ns)
    finally:
        os.close(fd)
