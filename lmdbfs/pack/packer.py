"""`lmdbfs pack`: copy a tree's exact bytes into one LMDB file, with a path index.

How it avoids the original converter's failures:
* bytes are stored as read, never re-encoded; every value gets an xxh3 checksum;
* it writes ``DB.partial`` and renames it to ``DB`` only after the final commit, which
  also writes the meta record: an interrupted pack is never mistaken for a whole one,
  and an existing DB is replaced only by a complete new one;
* commits are batched (bounded memory) and ``--resume`` continues an interrupted pack;
* the map grows as needed instead of a hard-coded size, and without writemap the file
  is only as big as its data;
* files are read and stored in the source's directory order (what ``tar`` reads):
  a cold tree is read sequentially, and the frames of one sequence end up next to
  each other in the DB file, where readahead helps the readers that sample them;
* files of at most INLINE_MAX bytes are also carried in their directory's record
  (``layout="compact"``: there only, stored once).
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import hashlib
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from .. import __version__
from ..errors import DestinationExists, SourceError
from ..format.meta import Meta
from ..format.records import (
    COMPACT_VERSION,
    FORMAT_VERSION,
    INDEX_DB,
    KEY_MAX,
    KEYS_MD5,
    KEYS_PATH,
    KIND_FILE,
    LAYOUT_COMPACT,
    LAYOUT_KEYED,
    META_DB,
    PARTIAL_SUFFIX,
    SPLIT_ABOVE,
    SPLIT_VERSION,
    checksum,
    output_files,
    piece_key,
)
from .feed import Large, read_in_order
from .scan import Scan
from .shard import ShardPlan, iter_scan_entries, plan
from .sources import SourceSpec, build_scan
from .writer import DATA_FILE, Keys, Writer

log = logging.getLogger(__name__)

_PAGE = 4096
# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_KEY_SCHEMES = {
    KEYS_MD5: "md5(key_prefix + relpath with '/' replaced by key_sep)",
    KEYS_PATH: "key_prefix + relpath with '/' replaced by key_sep",
}


@dataclass
class PackOptions:
    workers: int = 8
    excludes: list[str] = field(default_factory=list)
    force: bool = False
    resume: bool = False
    skip_errors: bool = False
    key_prefix: str = ""
    key_sep: str = "/"
    strip: str = "0"  # leading folders to drop from archive members: a number, or "auto"
    expand_zips: bool = False  # zips inside a source become folders named without ".zip"
    keys: str = KEYS_MD5  # KEYS_PATH: plain path keys in an LMDB directory, as STARK-style readers expect
    layout: str = LAYOUT_KEYED  # LAYOUT_COMPACT: small files stored once, in their records only
    progress: bool = True
    shard: tuple[int, int, int | None] | None = None  # (I, N, --shard-depth): pack only shard I of N
    extra: dict = field(default_factory=dict)  # added to the meta's `extra`


@dataclass
class PackResult:
    db: str
    files: int
    dirs: int
    symlinks: int
    bytes: int
    db_bytes: int
    seconds: float
    resumed_files: int = 0
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    share: ShardPlan | None = None  # with --shard: what this shard packed


def pack(src: str | list[str], db: str, opts: PackOptions | None = None) -> PackResult:
    """Pack the tree of ``src`` — a folder or an archive, or several merged, each
    ``[DIR=]PATH`` — into the DB ``db``."""
    opts = opts or PackOptions()
    specs = [src] if isinstance(src, str) else list(src)
    started = time.monotonic()
    _tune_malloc()
    partial = db + PARTIAL_SUFFIX
    _check_destination(db, partial, opts)
    skip = output_files(db)
    subdir = opts.keys == KEYS_PATH  # STARK-style readers open an LMDB directory
    log.info("scanning %s", ", ".join(specs))
    scan = build_scan(
        specs,
        excludes=opts.excludes,
        skip_abs=skip,
        # A shard deals out the whole tree, so it lists all of it, once, and keeps its
        # share (Scan.share raises what a listing of the share alone would have).
        skip_errors=opts.skip_errors or opts.shard is not None,
        strip=opts.strip,
        expand_zips=opts.expand_zips,
        progress=opts.progress,
        quiet=opts.shard is not None,
    )
    share, extra = None, dict(opts.extra)
    if opts.shard is not None:
        index, count, depth = opts.shard
        share = plan(list(iter_scan_entries(scan)), index, count, depth)
        scan = scan.share(share.include, opts.skip_errors)
        extra.update(share.extra())
    log.info(
        "found %d files, %d dirs, %d symlinks, %.1f MB", scan.files, len(scan.dirs), scan.symlinks, scan.bytes / 1e6
    )
    keys = _file_keys(scan, opts)
    if opts.force or not opts.resume:
        _remove_db_files(partial)
    writer = Writer(partial, subdir, _map_size_for(scan), scan, keys, compact=opts.layout == LAYOUT_COMPACT)
    try:
        todo = writer.resume_todo(np.arange(scan.files, dtype=np.int64))
        unreadable = _copy_contents(scan, todo, writer, opts)
        scan.drop_files(unreadable)
        writer.finish(scan, _meta_for(specs, scan, opts, extra))
    finally:
        writer.close()
    _publish(partial, db)
    return PackResult(
        db=db,
        files=scan.files,
        dirs=len(scan.dirs),
        symlinks=scan.symlinks,
        bytes=scan.bytes,
        db_bytes=os.path.getsize(os.path.join(db, DATA_FILE) if subdir else db),
        seconds=time.monotonic() - started,
        resumed_files=scan.files + len(unreadable) - len(todo),
        skipped=scan.skipped,
        errors=scan.errors,
        share=share,
    )


def _check_destination(db: str, partial: str, opts: PackOptions) -> None:
    if os.path.exists(db) and not opts.force and not (opts.resume and os.path.exists(partial)):
        raise DestinationExists(
            f"{db} already exists", "pass --force to replace it (it is kept until the new one is complete)"
        )
    if os.path.exists(partial) and not (opts.force or opts.resume):
        raise DestinationExists(
            f"{partial} holds an unfinished pack", "pass --resume to finish it, or --force to start over"
        )
    parent = os.path.dirname(os.path.abspath(db))
    if not os.path.isdir(parent):
        raise DestinationExists(f"{parent}: no such directory for the DB", "create it first")


def _file_keys(scan: Scan, opts: PackOptions) -> Keys:
    """The key maker, after checking no two files share a key.

    Keys are compared by their md5 digests, 16 bytes each, sorted with numpy: its 'S16'
    ordering agrees with memcmp for equal-length keys, so equal keys end up adjacent.
    """
    keys = Keys(scan, opts.key_prefix, opts.key_sep, opts.keys)
    if opts.keys == KEYS_PATH:
        _check_path_keys(scan, keys)
    raw = keys.digests or b"".join(hashlib.md5(keys(i)).digest() for i in range(scan.files))
    digests = np.frombuffer(raw, dtype="S16")
    order = np.argsort(digests, kind="stable")
    ordered = digests[order]
    same = np.flatnonzero(ordered[1:] == ordered[:-1])
    if len(same):
        a, b = scan.file_relpath(int(order[same[0]])), scan.file_relpath(int(order[same[0] + 1]))
        raise SourceError(f"{a} and {b} have the same key", "change --key-prefix/--key-sep")
    return keys


def _check_path_keys(scan: Scan, keys: Keys) -> None:
    """Plain path keys must fit LMDB (511 bytes) and not be the names of lmdbfs's own
    databases, which are keys of the main database too."""
    for i in range(scan.files):
        key = keys(i)
        if int(scan.file_size[i]) > SPLIT_ABOVE:  # its pieces' keys are longer (format.piece_key)
            key = piece_key(key, 0)
        if len(key) > KEY_MAX:
            raise SourceError(
                f"{scan.file_relpath(i)}: its key is {len(key)} bytes, LMDB keys are at most {KEY_MAX}",
                "shorten the path, or pack with md5 keys (the default)",
            )
        if key in (INDEX_DB, META_DB):
            raise SourceError(
                f"{scan.file_relpath(i)}: its key is the name of lmdbfs's own {key.decode()} database",
                "rename the file, exclude it, or use --key-prefix or md5 keys",
            )


def _map_size_for(scan: Scan) -> int:
    """A first map size from the scan: every value rounded up to pages, plus the index.

    Only address space is reserved (no writemap), so generous is free; it still grows
    on demand if files grow while being packed.
    """
    value_pages = int(np.sum((scan.file_size.astype(np.int64) + 16 + _PAGE - 1) // _PAGE)) + scan.files
    index_bytes = sum(len(d.blob) + d.rows.nbytes + 64 for d in scan.dirs)
    return max(64 << 20, int((value_pages * _PAGE + 2 * index_bytes) * 1.25) + (64 << 20))


def _copy_contents(scan: Scan, order: np.ndarray, writer: Writer, opts: PackOptions) -> list[int]:
    """Read files in ``order`` (the sources' own) and store them in that order.
    Returns the files that could not be read (with --skip-errors)."""
    sizes = scan.file_size
    todo = int(sizes[order].sum()) if len(order) else 0
    bar = tqdm(
        total=scan.bytes,
        initial=scan.bytes - todo,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="pack",
        disable=not opts.progress,
        smoothing=0.1,
    )
    unreadable: list[int] = []
    files_done = 0

    def on_error(rel: str, exc: OSError) -> None:
        if not opts.skip_errors:
            raise SourceError(
                f"cannot read {rel}: {exc.strerror}",
                "fix its permissions, or pass --skip-errors to leave it out and list it",
            ) from None
        log.warning("skipping %s: %s", rel, exc.strerror)
        scan.errors.append(f"{rel}: {exc.strerror}")

    def process(i: int, data: bytes, mtime_ns: int | None) -> bytes:
        row = scan.row(i)
        if len(data) != int(row["size"]):
            if mtime_ns is None:
                raise SourceError(
                    f"{scan.file_relpath(i)}: {len(data)} bytes read, the archive lists {int(row['size'])}",
                    "the archive is damaged — download or copy it again",
                )
            log.warning("%s changed while being packed; storing what was read", scan.file_relpath(i))
            row["size"] = len(data)
            row["mtime_ns"] = mtime_ns
        row["checksum"] = checksum(data)
        return data

    for results, nbytes in read_in_order(scan, order, opts.workers, process, on_error):
        for i, data in results:
            if data is None:
                unreadable.append(i)
                continue
            if isinstance(data, Large):
                _put_large(scan, writer, i, data)
                continue
            writer.put(i, writer.keys(i), data)
        files_done += len(results)
        bar.set_postfix(files=f"{files_done}/{len(order)}", refresh=False)
        bar.update(nbytes)
    writer.commit()
    bar.close()
    return unreadable


def _put_large(scan: Scan, writer: Writer, i: int, large: Large) -> None:
    """Store a file too large to read whole, piece by piece (writer.put_large)."""
    row = scan.row(i)
    try:
        put = writer.put_split if large.size > SPLIT_ABOVE else writer.put_large
        got, digest = put(i, writer.keys(i), large.size, large.pieces())
    finally:
        large.close()
    if got != large.size:
        raise SourceError(
            f"{scan.file_relpath(i)}: {'at least ' if got > large.size else ''}{got} bytes read, "
            f"{large.size} listed: it changed while being packed, or the archive is damaged",
            "pack again (a damaged archive: download or copy it again)",
        )
    row["checksum"] = digest


def _meta_for(specs: list[str], scan: Scan, opts: PackOptions, extra: dict) -> Meta:
    return Meta(
        key_prefix=opts.key_prefix,
        key_sep=opts.key_sep,
        keys=opts.keys,
        layout=opts.layout,
        format_version=_version_for(scan, opts),
        key_scheme=_KEY_SCHEMES[opts.keys],
        files=scan.files,
        dirs=len(scan.dirs),
        symlinks=scan.symlinks,
        bytes=int(sum(int(d.rows["size"][d.rows["kind"] == KIND_FILE].sum()) for d in scan.dirs)),
        tool_version=__version__,
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        pack_id=secrets.token_hex(16),
        source=", ".join(_source_name(spec) for spec in specs),
        root_mode=scan.root_mode,
        root_mtime_ns=scan.root_mtime_ns,
        complete=True,
        extra={
            "excludes": list(opts.excludes),
            "strip": opts.strip,
            "expand_zips": opts.expand_zips,
            "skipped": len(scan.skipped),
            "unreadable": len(scan.errors),
            **extra,
        },
    )


def _version_for(scan: Scan, opts: PackOptions) -> int:
    """The oldest format that holds the DB, so older readers read what they can: a split
    file needs version 6 (older readers would call its row damaged), the compact layout 5."""
    if len(scan.file_size) and int(scan.file_size.max()) > SPLIT_ABOVE:
        return SPLIT_VERSION
    return COMPACT_VERSION if opts.layout == LAYOUT_COMPACT else FORMAT_VERSION


def _source_name(spec: str) -> str:
    parsed = SourceSpec.parse(spec)
    name = os.path.basename(os.path.abspath(parsed.path))
    return f"{parsed.under}={name}" if parsed.under else name


def _tune_malloc() -> None:
    """Reuse freed file buffers instead of handing them back to the OS and faulting
    fresh zeroed pages in for the next file.

    Every file passes through two buffers of its size: the bytes read, and the pages
    LMDB allocates for its value until the commit writes them. With glibc's defaults
    each is a fresh mmap (or a trimmed heap), so packing 3.4 GB zeroed ~5.7 GB of
    new pages: 1.4M page faults, and most of the time in the kernel. Two arenas (the
    readers' and the writer's) that keep up to 64 MB of free memory cut a medium pack
    from ~12 s to ~6 s; peak anonymous memory stays near the bounded read window plus
    one batch of dirty pages. The settings are process-wide; `lmdbfs pack` is a process
    of its own, so nothing else shares them.
    """
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: libc's among them
        libc.mallopt(_M_ARENA_MAX, 2)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _remove_db_files(path: str) -> None:
    for p in (path, path + "-lock"):
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.unlink(p)


def _publish(partial: str, db: str) -> None:
    """Atomically put the finished DB in place, then make the rename durable.

    A directory DB (--keys path) cannot replace another DB in one rename: the old
    one is removed just before."""
    if os.path.isdir(db) or (os.path.isdir(partial) and os.path.lexists(db)):
        _remove_db_files(db)
    os.replace(partial, db)
    if os.path.isdir(db) and os.path.lexists(os.path.join(db, "lock.mdb")):
        os.unlink(os.path.join(db, "lock.mdb"))
    if os.path.lexists(partial + "-lock"):
        os.unlink(partial + "-lock")
    if os.path.lexists(db + "-lock"):
        os.unlink(db + "-lock")
    dfd = os.open(os.path.dirname(os.path.abspath(db)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
