"""`lmdbfs adopt`: serve an LMDB that another tool built, without copying its values.

The index is derived from the foreign DB's keys and written beside it, in its own
lmdbfs-format file (``DB.lmdbfs``); the foreign DB is opened read-only, without a lock
file, and never written to. Each file row records where its value starts in the
foreign data file, so reading needs no key lookup; those offsets hold while the foreign
file keeps the size and last transaction id recorded in the index's meta ``data``.

* Path-keyed DBs (STARK's ``lmdb_utils``): keys are the relative paths. Keys that are
  not clean relative paths are reported and left out.
* md5-keyed DBs (the original converter): names come from a listing (``--paths``);
  ``md5(key_prefix + path)`` finds each value. The converter did not store files, so
  ``.txt``/``.label``/``.ini`` values are converted back (convert.py) at adopt time and
  their bytes stored inline in the index; JPEGs are served as stored (re-encoded).

Sizes and offsets come from the B-tree's leaf pages (lmdbfs/db/btree.py): value pages are never
read unless ``--checksum`` asks for every value's xxh3.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import secrets
import time
from array import array
from dataclasses import dataclass, field

import lmdb
import numpy as np
from tqdm import tqdm

from .. import __version__
from ..db import btree, foreign, store
from ..errors import BadDatabase, DestinationExists, LmdbfsError, SourceError
from ..format.meta import Meta
from ..format.records import (
    CHECKSUM_ALGO,
    INDEX_DB,
    KEYS_MD5,
    KEYS_PATH,
    KIND_DIR,
    KIND_FILE,
    META_DB,
    META_KEY,
    build_dir,
    checksum,
    dir_key,
    encode_dir,
    new_rows,
)
from . import convert

log = logging.getLogger(__name__)

SHOW = 5  # problems named in the summary; the rest are counted
CROSS_CHECKS = 64  # values whose parsed offset is compared with LMDB's own lookup
_PARTIAL = ".partial"


@dataclass
class AdoptOptions:
    index: str | None = None  # default: DB.lmdbfs beside the DB
    paths: str | None = None  # md5-keyed DBs: a listing file, or a tree whose files to list
    key_prefix: str = ""
    key_sep: str = "/"
    checksum: bool = False  # read every value and record its xxh3
    force: bool = False  # replace an existing file at the index path that is not an adopted index
    progress: bool = False


@dataclass
class AdoptResult:
    db: str
    index: str
    kind: str
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    converted: int = 0
    keys: int = 0
    skipped: list[str] = field(default_factory=list)  # "key: reason"
    missing: list[str] = field(default_factory=list)  # listed paths the DB does not hold
    seconds: float = 0.0
    index_bytes: int = 0


class _Dir:
    """One directory's files (parallel arrays: ~70 bytes a file) and subdirectory names."""

    __slots__ = ("names", "sizes", "offs", "sums", "inline", "subdirs")

    def __init__(self) -> None:
        self.names: list[bytes] = []
        self.sizes = array("Q")
        self.offs = array("Q")
        self.sums = array("Q")
        self.inline: dict[int, bytes] = {}
        self.subdirs: set[bytes] = set()


class _Tree:
    def __init__(self) -> None:
        self.dirs: dict[bytes, _Dir] = {b"": _Dir()}

    def _dir(self, path: bytes) -> _Dir:
        d = self.dirs.get(path)
        if d is None:
            parent, _, name = path.rpartition(b"/")
            self._dir(parent).subdirs.add(name)
            d = self.dirs[path] = _Dir()
        return d

    def add(self, path: bytes, size: int, off: int, csum: int = 0, inline: bytes | None = None) -> None:
        parent, _, name = path.rpartition(b"/")
        d = self._dir(parent)
        if inline is not None:
            d.inline[len(d.names)] = inline
        d.names.append(name)
        d.sizes.append(size)
        d.offs.append(off)
        d.sums.append(csum)

    def records(self, mtime_ns: int, skipped: list[str]) -> tuple[list[tuple[str, bytes]], int, int, int]:
        """Encoded directory records; a name that is both a file and a directory keeps
        the directory (the file's key is reported)."""
        out: list[tuple[str, bytes]] = []
        files = nbytes = 0
        for path, d in self.dirs.items():
            entries: list[tuple[bytes, int, int, int, int, bytes | None]] = []
            for i, name in enumerate(d.names):
                if name in d.subdirs:
                    full = (path + b"/" + name) if path else name
                    skipped.append(f"{full.decode()}: both a file and a directory (kept the directory)")
                    continue
                entries.append((name, KIND_FILE, d.sizes[i], d.offs[i], d.sums[i], d.inline.get(i)))
                files += 1
                nbytes += d.sizes[i]
            for name in d.subdirs:
                sub = self.dirs[(path + b"/" + name) if path else name]
                entries.append((name, KIND_DIR, 0, 0, len(sub.subdirs), None))
            rows = new_rows(len(entries))
            if entries:
                rows["kind"] = [e[1] for e in entries]
                rows["mode"] = [0o755 if e[1] == KIND_DIR else 0o644 for e in entries]
                rows["size"] = [e[2] for e in entries]
                rows["data_off"] = [e[3] for e in entries]
                rows["checksum"] = [e[4] for e in entries]
                rows["mtime_ns"] = mtime_ns
            names = [e[0] for e in entries]
            rows, blob, tail, _ = build_dir(names, [b""] * len(entries), rows, [e[5] for e in entries])
            rel = path.decode()
            out.append((rel, encode_dir(rel, rows, blob, tail)))
        return out, files, nbytes, len(self.dirs)


def adopt(db: str, opts: AdoptOptions | None = None) -> AdoptResult:
    """Write the sidecar index of the foreign DB ``db``; ``db`` itself is only read."""
    opts = opts or AdoptOptions()
    started = time.perf_counter()
    loc = store.locate(db)
    index = opts.index or foreign.sidecar_of(db)
    _check_index_path(index, loc, opts.force)
    env, _ = store.acquire_readonly(db)
    try:
        stat, info = env.stat(), env.info()
        data = os.stat(loc.data_file)
        # The tree is read and checked by btree before LMDB itself walks it.
        with tqdm(total=stat["leaf_pages"], unit=" pages", desc="keys", disable=not opts.progress) as bar:
            leaves = btree.leaves(loc.data_file, db, stat["psize"], info["last_pgno"], info["last_txnid"], bar)
        if META_DB in leaves.sub_databases:
            raise BadDatabase(f"{db}: already an lmdbfs DB", f"use it as it is: `lmdbfs mount {db} MOUNTPOINT`")
        _cross_check(env, loc, db, leaves)
        kind = foreign.KIND_MD5 if opts.paths else foreign.KIND_PATH
        result = AdoptResult(db, index, kind, keys=len(leaves.keys))
        result.skipped.extend(f"{k!r}: names a database, not a file" for k in leaves.sub_databases)
        fd = os.open(loc.data_file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            tree = _Tree()
            if opts.paths:
                _add_listed(tree, leaves, fd, opts, result)
            else:
                _add_path_keys(tree, leaves, fd, opts, result)
        finally:
            os.close(fd)
        records, result.files, result.bytes, result.dirs = tree.records(data.st_mtime_ns, result.skipped)
        if not result.files:
            raise SourceError(
                f"{db}: none of its {len(leaves.keys)} keys could be adopted"
                + (
                    f" (first problem: {(result.missing or result.skipped)[0]})"
                    if result.missing or result.skipped
                    else ""
                ),
                "check the DB (and --paths/--key-prefix for an md5-keyed DB)",
            )
        where = os.path.relpath(os.path.abspath(db), os.path.dirname(os.path.abspath(index)))
        meta = Meta(
            key_scheme="the adopted DB's keys: "
            + ("md5(key_prefix + relpath with '/' replaced by key_sep)" if opts.paths else "the plain relpath"),
            key_prefix=opts.key_prefix if opts.paths else "",
            key_sep=opts.key_sep if opts.paths else "/",
            keys=KEYS_MD5 if opts.paths else KEYS_PATH,
            checksum=CHECKSUM_ALGO if opts.checksum else foreign.CHECKSUM_NONE,
            files=result.files,
            dirs=result.dirs,
            bytes=result.bytes,
            tool_version=__version__,
            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            pack_id=secrets.token_hex(16),
            source=os.path.basename(os.path.abspath(db)),
            root_mode=0o755,
            root_mtime_ns=data.st_mtime_ns,
            offsets_txnid=info["last_txnid"],
            complete=True,
            extra={
                "adopted": {
                    "keys": result.keys,
                    "skipped": len(result.skipped),
                    "missing": len(result.missing),
                    "converted": result.converted,
                }
            },
            data={
                "path": where,
                "subdir": loc.subdir,
                "size": data.st_size,
                "last_txnid": info["last_txnid"],
                "kind": kind,
            },
        )
    finally:
        store.release_readonly(env)
    result.index_bytes = _write_index(index, records, meta)
    result.seconds = time.perf_counter() - started
    return result


def _check_index_path(index: str, loc: store.Location, force: bool) -> None:
    """Never inside the user's DB files; replace only an index adopt wrote (or --force)."""
    target = os.path.realpath(index)
    own = {os.path.realpath(loc.path), os.path.realpath(loc.data_file)}
    if loc.subdir:
        own.add(os.path.realpath(os.path.join(loc.path, "lock.mdb")))
    if target in own:
        raise DestinationExists(f"{index} is the DB itself", "the index goes beside the DB: pass another path")
    if os.path.isdir(index):
        raise DestinationExists(f"{index} is a directory", "pass a file path for the index")
    if os.path.exists(index) and not force and not _is_adopted_index(index):
        raise DestinationExists(
            f"{index} exists and is not an index written by `lmdbfs adopt`", "pass --force to replace it"
        )
    parent = os.path.dirname(os.path.abspath(index))
    if not os.access(parent, os.W_OK):
        raise DestinationExists(
            f"cannot write the index in {parent} (read-only)", "pass an INDEX path somewhere writable"
        )


def _is_adopted_index(path: str) -> bool:
    try:
        env = lmdb.open(path, subdir=False, readonly=True, lock=False, max_dbs=store.MAX_DBS)
    except lmdb.Error:
        return False
    try:
        return store.read_meta(env, path).data is not None
    except (LmdbfsError, lmdb.Error):
        return False
    finally:
        env.close()


def _cross_check(env: lmdb.Environment, loc: store.Location, db: str, leaves: btree.Leaves) -> None:
    """Compare a sample of the parsed sizes and offsets with LMDB's own lookups."""
    n = len(leaves.keys)
    if not n:
        return
    base = store.map_base(loc.data_file)
    if base is None:
        raise BadDatabase(f"{db}: cannot locate its memory map (/proc/self/maps)", "adopt needs Linux")
    picks = sorted(set(np.linspace(0, n - 1, min(n, CROSS_CHECKS)).astype(int).tolist()))
    with env.begin(buffers=True) as txn:
        for i in picks:
            view = txn.get(leaves.keys[i])
            size, off = int(leaves.sizes[i]), int(leaves.offsets[i])
            if view is None or len(view) != size or (size and store.map_offset(view, base) != off):
                raise BadDatabase(
                    f"{db}: its layout is not the one lmdbfs reads (key {leaves.keys[i][:60]!r})", "please report it"
                )
    store.unmap_pages(base, env.info()["map_size"])


def _value(fd: int, size: int, off: int) -> bytes:
    data = os.pread(fd, size, off) if size else b""
    if len(data) != size:
        raise BadDatabase("short read from the adopted DB", "the DB file is truncated; copy it again")
    return data


def _add_path_keys(tree: _Tree, leaves: btree.Leaves, fd: int, opts: AdoptOptions, result: AdoptResult) -> None:
    sizes, offs = leaves.sizes.tolist(), leaves.offsets.tolist()
    for key, size, off in tqdm(
        zip(leaves.keys, sizes, offs), total=len(sizes), unit=" keys", desc="adopt", disable=not opts.progress
    ):
        why = foreign.bad_path_reason(key)
        if why is not None:
            result.skipped.append(f"{key[:80]!r}: {why}")
            continue
        if size == 0:
            tree.add(key, 0, 0, checksum(b"") if opts.checksum else 0, b"")
        else:
            tree.add(key, size, off, checksum(_value(fd, size, off)) if opts.checksum else 0)


def _listing(paths: str) -> list[str]:
    """Relative paths from a listing file (one a line) or from a tree's files."""
    if os.path.isdir(paths):
        out = []
        for dirpath, dirnames, filenames in os.walk(paths):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, paths)
            for name in sorted(filenames):
                out.append(name if rel_dir == "." else os.path.join(rel_dir, name).replace(os.sep, "/"))
        return out
    try:
        with open(paths, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise SourceError(
            f"{paths}: {exc.strerror}", "pass a listing file (one path a line) or a source tree"
        ) from None
    return [line.decode("utf-8", "surrogateescape") for line in raw.splitlines() if line.strip()]


def _add_listed(tree: _Tree, leaves: btree.Leaves, fd: int, opts: AdoptOptions, result: AdoptResult) -> None:
    """md5-keyed DB: find each listed path's value by md5(prefix + path)."""
    if any(len(k) != 16 for k in leaves.keys):
        raise BadDatabase(f"{result.db}: not every key is a 16-byte md5 digest", "adopt it without --paths")
    # Keys come in memcmp order, so their first 8 bytes read big-endian are sorted: a
    # compact array to search (numpy's S16 would drop a digest's trailing NUL bytes).
    heads = np.frombuffer(b"".join(leaves.keys), dtype=">u8")[::2].copy() if leaves.keys else np.zeros(0, ">u8")
    listed = list(dict.fromkeys(_listing(opts.paths or "")))
    for rel in tqdm(listed, unit=" paths", desc="adopt", disable=not opts.progress):
        raw = rel.encode("utf-8", "surrogateescape")
        why = foreign.bad_path_reason(raw)
        if why is not None:
            result.skipped.append(f"{rel[:80]!r}: {why}")
            continue
        text = opts.key_prefix + (rel.replace("/", opts.key_sep) if opts.key_sep != "/" else rel)
        digest = hashlib.md5(text.encode("utf-8", "surrogateescape")).digest()
        i = int(np.searchsorted(heads, np.frombuffer(digest[:8], ">u8")[0]))
        while i < len(heads) and leaves.keys[i] < digest:
            i += 1
        if i >= len(heads) or leaves.keys[i] != digest:
            result.missing.append(rel)
            continue
        size, off = int(leaves.sizes[i]), int(leaves.offsets[i])
        _add_converted(tree, raw, rel, size, off, fd, opts, result)


def _add_converted(
    tree: _Tree, raw: bytes, rel: str, size: int, off: int, fd: int, opts: AdoptOptions, result: AdoptResult
) -> None:
    name = rel.rpartition("/")[2]
    restored = None
    if os.path.splitext(name)[1].lower() in (".txt", ".label", ".ini"):
        try:
            restored = convert.restore(name, _value(fd, size, off))
        except convert.ConvertError as exc:
            result.skipped.append(f"{rel}: {exc}")
            return
    if restored is not None:
        result.converted += 1
        tree.add(raw, len(restored), 0, checksum(restored) if opts.checksum else 0, restored)
    elif size == 0:
        tree.add(raw, 0, 0, checksum(b"") if opts.checksum else 0, b"")
    else:
        tree.add(raw, size, off, checksum(_value(fd, size, off)) if opts.checksum else 0)


def _write_index(index: str, records: list[tuple[str, bytes]], meta: Meta) -> int:
    """Write the index file whole (INDEX.partial, then renamed): never half of one."""
    partial = index + _PARTIAL
    if os.path.lexists(partial):
        os.unlink(partial)
    need = sum(len(r) + 4096 for _, r in records) * 2 + (16 << 20)
    try:
        env = lmdb.open(
            partial, subdir=False, map_size=need, max_dbs=store.MAX_DBS, lock=False, sync=False, metasync=False
        )
    except lmdb.Error as exc:
        raise SourceError(f"cannot create {partial}: {exc}", "check the index's folder is writable") from None
    try:
        index_db = env.open_db(INDEX_DB, create=True)
        meta_db = env.open_db(META_DB, create=True)
        with env.begin(write=True) as txn:
            for rel, record in records:
                txn.put(dir_key(rel), record, db=index_db)
            txn.put(META_KEY, meta.encode(), db=meta_db)
        env.sync(True)
    finally:
        env.close()
    os.replace(partial, index)
    dfd = os.open(os.path.dirname(os.path.abspath(index)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return os.path.getsize(index)
