"""The on-disk format: keys, directory records, the meta record and its version.

Everything that decides what bytes land in the LMDB file lives here, so the packer and
the reader cannot disagree. docs/format.md describes the same thing for people.

Layout of one LMDB environment (a single file by default):

* main (unnamed) database: ``md5(key_prefix + relpath)`` -> the file's exact bytes.
  This is the key scheme of the original converter, so ``txn.get(md5(path))`` works
  (in the default keyed layout; the compact layout keeps small files in records only).
  A file over one LMDB value is stored as pieces under `piece_key` (FLAG_SPLIT).
* ``lmdbfs.index``: ``md5(dir relpath)`` -> one directory record (see `encode_dir`).
* ``lmdbfs.meta``: ``b"meta"`` -> JSON (see `lmdbfs.format.meta.Meta`). Written in the final commit only:
  its presence, with ``complete: true``, is what makes a DB servable.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import posixpath
import stat as _stat
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

from ..errors import CorruptValue

FORMAT_NAME = "lmdbfs"
# 4: inline bytes after all names ("LDR2" records); 3: rows' flags byte (inline values);
# 2: rows gained data_off; 1 had 36-byte rows
FORMAT_VERSION = 4
COMPACT_VERSION = 5  # what a compact-layout DB is written as: older readers refuse it
SPLIT_VERSION = 6  # a DB holding a file split into pieces (FLAG_SPLIT rows), either layout
READABLE_VERSIONS = (2, 3, 4, 5, 6)  # a version-2 row is a version-3 row with no flags set
INDEX_DB = b"lmdbfs.index"
META_DB = b"lmdbfs.meta"
META_KEY = b"meta"
CHECKSUM_ALGO = "xxh3_64"
PARTIAL_SUFFIX = ".partial"

KIND_FILE = 1
KIND_DIR = 2
KIND_SYMLINK = 3
KIND_NAMES = {KIND_FILE: "file", KIND_DIR: "dir", KIND_SYMLINK: "symlink"}
_KIND_TYPE_BITS = {KIND_FILE: _stat.S_IFREG, KIND_DIR: _stat.S_IFDIR, KIND_SYMLINK: _stat.S_IFLNK}

# One fixed-size row per directory entry (44 bytes); names and link targets live in a blob after
# the rows. Fixed rows decode with one numpy call, which keeps a 9,335-entry directory
# (GOT-10k's train/) cheap to open.
ENTRY_DTYPE = np.dtype(
    [
        ("name_off", "<u4"),
        ("name_len", "<u2"),
        ("target_len", "<u2"),
        ("kind", "u1"),
        ("flags", "u1"),
        ("mode", "<u2"),
        ("size", "<u8"),
        ("mtime_ns", "<i8"),
        ("checksum", "<u8"),
        ("data_off", "<u8"),
    ]
)
# Row flags. INLINE: a file's bytes are carried in its directory's record (version 4: in
# the record's tail, at the row's data_off; version 3: right after its name), so reading a
# small file (an annotation, a tiny frame) costs no I/O beyond the record its lookup
# already fetched. The value is also in the main database under its key, so key lookups
# keep working.
FLAG_INLINE = 1
# SPLIT (version 6): a file larger than one LMDB value may be (SPLIT_ABOVE) is stored as
# pieces of ``piece`` bytes (the last one shorter), piece k under `piece_key`. Where a
# symlink's row has its target, the row carries its piece table (`split_table`): u64
# piece, then each piece's offset in the data file (0: look it up by key), little-endian.
# The table is in the record's head, so a lookup brings it along; data_off is 0.
FLAG_SPLIT = 2
KNOWN_FLAGS = FLAG_INLINE | FLAG_SPLIT
INLINE_MAX = 2048  # values this small live in LMDB leaf pages, where no offset is stable
# The compact layout carries every file that would take one overflow page (a page less
# its header) in its record instead: a 2.1 KB file would waste half a page there.
COMPACT_INLINE_MAX = 4096 - 16
# The largest inline value a reader accepts: an adopted md5-converter DB carries its
# converted annotation files inline, whatever their size.
INLINE_LIMIT = 1 << 24

# Layouts (meta "layout"). KEYED (the default): every file's bytes are in the main
# database under its key, small files' also inline in their directory's record.
# COMPACT (version 5): small files' bytes are in their record only, stored once; only
# lmdbfs reads them (`txn.get(key)` finds the larger files only).
LAYOUT_KEYED = "keyed"
LAYOUT_COMPACT = "compact"

# Main-database key schemes (meta "keys"): md5 of the prefixed path (the original
# converter's), or the plain relative path (STARK-style LMDBs).
KEYS_MD5 = "md5"
KEYS_PATH = "path"

# Limits every decoded record is checked against (a DB file is untrusted input), and
# that `lmdbfs pack` checks every entry against, so whatever it packs, every reader
# serves. The C server (csrc/serve.h) repeats NAME_MAX, ROWS_MAX and RECORD_MAX;
# tests/test_limits.py checks that the two agree.
NAME_MAX = 255  # bytes in one name, as on Linux filesystems (serve.h NAME_MAX_LEN)
TARGET_MAX = 4095  # bytes in a symlink target (PATH_MAX less the NUL); at least 1
DEPTH_MAX = 1024  # directory levels below the root a walk descends
ROWS_MAX = (1 << 24) - 1  # entries in one directory (serve.h ROW_MAX - 1: inode bits)
RECORD_MAX = 256 << 20  # bytes of one directory record (serve.h RECORD_MAX)
KEY_MAX = 511  # bytes of an LMDB key (plain path keys, --keys path)
VALUE_MAX = (1 << 32) - 1  # bytes of an LMDB value (liblmdb's MAXDATASIZE)
SPLIT_ABOVE = VALUE_MAX  # larger files are stored as pieces (FLAG_SPLIT); others as one value
SPLIT_PIECE = 1 << 30  # the bytes of each piece the packer writes (the last one shorter)
SPLIT_TABLE_MAX = 0xFFFF // 8 * 8  # bytes of a piece table (it sits where a link's target does: u16 length)
FILE_MAX = (SPLIT_TABLE_MAX // 8 - 1) * SPLIT_PIECE  # bytes of one file (8,190 pieces)
SUBDIRS_MAX = 1 << 32  # a directory's subdirectory count (its st_nlink - 2)
META_MAX_BYTES = 1 << 20
META_MAX_DEPTH = 32  # nesting of the meta record's JSON

DIR_HEADER = struct.Struct("<4sIII")  # magic, entry count, own-path length, blob length
# "LDR2" (version 4): header, own path, rows, names blob, then the tail of inline bytes, so
# a reader that needs only names and rows reads the record's head. "LDR1" (versions 2-3):
# the blob interleaves names and inline bytes, and the record ends with the blob.
DIR_MAGIC = b"LDR2"
DIR_MAGIC_V3 = b"LDR1"


def dir_head_len(first: bytes, size: int) -> int:
    """How many of a ``size``-byte directory record's first bytes a lookup needs (its
    head), from at least its first 16 bytes; the whole record when it is not "LDR2"."""
    if len(first) < DIR_HEADER.size:
        return size
    magic, count, own_len, blob_len = DIR_HEADER.unpack_from(first)
    if magic != DIR_MAGIC:
        return size
    return min(size, DIR_HEADER.size + own_len + count * ENTRY_DTYPE.itemsize + blob_len)


def output_files(db: str) -> list[bytes]:
    """The files a pack into ``db`` writes: never packed, should they sit inside SRC."""
    out_abs = os.fsencode(os.path.abspath(db))
    return [out_abs + s for s in (b"", b"-lock", PARTIAL_SUFFIX.encode(), PARTIAL_SUFFIX.encode() + b"-lock")]


def encode_path(relpath: str) -> bytes:
    """Names are stored as UTF-8; undecodable bytes round-trip via surrogateescape."""
    return relpath.encode("utf-8", "surrogateescape")


def decode_path(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def content_key(relpath: str, prefix: str = "", sep: str = "/", scheme: str = KEYS_MD5) -> bytes:
    """The main-database key of a file: md5 digest of its (prefixed) relative path, or
    with the "path" scheme the prefixed path itself."""
    if sep != "/":
        relpath = relpath.replace("/", sep)
    raw = encode_path(prefix + relpath)
    return raw if scheme == KEYS_PATH else hashlib.md5(raw).digest()


def dir_key(relpath: str) -> bytes:
    """The index key of a directory ('' is the root). Hashed: LMDB keys are ≤ 511 bytes."""
    return hashlib.md5(encode_path(relpath)).digest()


def piece_key(key: bytes, k: int) -> bytes:
    """The main-database key of piece k of a split file whose key is ``key``: the key, a
    NUL and k as 4 big-endian bytes, so a file's pieces sort together and in order."""
    return key + b"\0" + k.to_bytes(4, "big")


def split_table(size: int, offsets: list[int] | None = None, piece: int = SPLIT_PIECE) -> bytes:
    """The piece table of a split file of ``size`` bytes: the piece size, then each
    piece's offset in the data file (None: zeros, not known yet)."""
    count = -(-size // piece)
    offsets = offsets if offsets is not None else [0] * count
    if len(offsets) != count:
        raise ValueError(f"{count} pieces, {len(offsets)} offsets")
    return struct.pack(f"<{count + 1}Q", piece, *offsets)


def split_pieces(table: bytes) -> tuple[int, ...]:
    """A piece table as (piece size, offset of piece 0, offset of piece 1, ...)."""
    return struct.unpack(f"<{len(table) // 8}Q", table)


def split_table_len(size: int, piece: int) -> int:
    """The length a piece table of a ``size``-byte file in ``piece``-byte pieces has."""
    return 8 * (1 + -(-size // piece)) if piece else 0


def checksum(data: bytes | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(data)


def type_bits(kind: int) -> int:
    return _KIND_TYPE_BITS[kind]


@dataclass(frozen=True, slots=True)
class Entry:
    """What the index knows of one path; enough for stat, listing and readlink."""

    name: str
    kind: int
    mode: int  # permission bits only (S_IMODE)
    size: int
    mtime_ns: int
    checksum: int = 0
    target: str | None = None
    data_off: int = 0  # file offset of the value in the DB's data file (files only)
    inline: bytes | None = None  # the file's bytes, when the record carries them (FLAG_INLINE)
    # A split file (FLAG_SPLIT): (piece size, offset of piece 0, ...) from its piece table
    pieces: tuple[int, ...] | None = None

    @property
    def st_mode(self) -> int:
        return type_bits(self.kind) | self.mode

    @property
    def nlink(self) -> int:
        """Directories: 2 + subdirectories (kept in the checksum field); others: 1."""
        return 2 + self.checksum if self.kind == KIND_DIR else 1

    @property
    def is_dir(self) -> bool:
        return self.kind == KIND_DIR

    @property
    def is_file(self) -> bool:
        return self.kind == KIND_FILE

    @property
    def is_symlink(self) -> bool:
        return self.kind == KIND_SYMLINK


_ENTRY_COLUMNS = (
    "name_off",
    "name_len",
    "target_len",
    "kind",
    "flags",
    "mode",
    "size",
    "mtime_ns",
    "checksum",
    "data_off",
)


class DirRecord:
    """A decoded directory record: the numpy rows and the name blob, nothing more.

    Names are found by binary search over the sorted rows instead of a dict, so a
    cached record costs what it weighs on disk (~50 bytes an entry, not ~250): the
    daemon's directory cache can then be bounded by bytes honestly.
    """

    __slots__ = ("path", "rows", "_blob", "_tail", "nbytes", "_offs", "_lens", "bad")

    def __init__(
        self,
        path: str,
        rows: np.ndarray,
        blob: bytes,
        nbytes: int,
        bad: dict[bytes, str] | None = None,
        tail: bytes | None = None,
    ) -> None:
        self.path = path
        self.rows = rows  # only rows that passed `recordcheck.check_rows`: sorted, unique, in bounds
        self._blob = blob
        # Inline bytes at each inline row's data_off; None: after each name in the blob
        # (a version 2-3 record).
        self._tail = tail
        self.nbytes = nbytes
        self._offs = rows["name_off"]
        self._lens = rows["name_len"]
        # Rows left out as damaged: name (as far as it can be read) -> what is wrong.
        self.bad = bad or {}

    def __len__(self) -> int:
        return len(self.rows)

    def _name_bytes(self, i: int) -> bytes:
        off = int(self._offs[i])
        return self._blob[off : off + int(self._lens[i])]

    def raw_names(self) -> list[bytes]:
        blob = self._blob
        return [blob[o : o + n] for o, n in zip(self._offs.tolist(), self._lens.tolist())]

    @property
    def names(self) -> list[str]:
        blob = self._blob
        return [decode_path(blob[o : o + n]) for o, n in zip(self._offs.tolist(), self._lens.tolist())]

    def index_of(self, name: str) -> int | None:
        target = encode_path(name)
        i = bisect.bisect_left(range(len(self.rows)), target, key=self._name_bytes)
        if i < len(self.rows) and self._name_bytes(i) == target:
            return i
        return None

    def name_and_target(self, i: int) -> bytes:
        """Row i's name and symlink target, as they lie in the blob."""
        off = int(self._offs[i])
        return self._blob[off : off + int(self._lens[i]) + int(self.rows["target_len"][i])]

    def inline_bytes(self, i: int) -> bytes | None:
        """Row i's inline bytes, or None when the row is not inline."""
        row = self.rows[i]
        return self._inline(
            *(int(row[f]) for f in ("name_off", "name_len", "target_len", "kind", "flags", "size", "data_off"))
        )

    def _inline(self, off: int, n: int, tlen: int, kind: int, flags: int, size: int, data_off: int) -> bytes | None:
        if kind != KIND_FILE or not flags & FLAG_INLINE:
            return None
        if self._tail is not None:  # version 4: the record's tail, at data_off
            return self._tail[data_off : data_off + size]
        at = off + n + tlen  # versions 2-3: right after the name and target
        return self._blob[at : at + size]

    def entry(self, i: int) -> Entry:
        return self.entries_at([i])[0]

    def entries_at(self, rows: list[int]) -> list[Entry]:
        """`entry` of many rows: each column is read out of numpy once, not per row
        (a walk over every file, as verify makes, then costs a third)."""
        picked = self.rows[rows]
        cols = [picked[f].tolist() for f in _ENTRY_COLUMNS]
        blob = self._blob
        out = []
        for off, n, tlen, kind, flags, mode, size, mtime_ns, csum, data_off in zip(*cols):
            target = decode_path(blob[off + n : off + n + tlen]) if kind == KIND_SYMLINK else None
            inline = self._inline(off, n, tlen, kind, flags, size, data_off)
            pieces = split_pieces(blob[off + n : off + n + tlen]) if flags & FLAG_SPLIT else None
            out.append(
                Entry(
                    name=decode_path(blob[off : off + n]),
                    kind=kind,
                    mode=mode,
                    size=size,
                    mtime_ns=mtime_ns,
                    checksum=csum,
                    target=target,
                    data_off=0 if inline is not None or pieces is not None else data_off,
                    inline=inline,
                    pieces=pieces,
                )
            )
        return out

    def lookup(self, name: str) -> Entry | None:
        i = self.index_of(name)
        if i is None:
            if self.bad and encode_path(name) in self.bad:
                where = posixpath.join(self.path, name)
                raise CorruptValue(f"{where}: damaged index entry ({self.bad[encode_path(name)]})", "re-pack the DB")
            return None
        return self.entry(i)

    def entries(self) -> list[Entry]:
        return self.entries_at(list(range(len(self.rows))))

    @property
    def subdir_count(self) -> int:
        return int(np.count_nonzero(self.rows["kind"] == KIND_DIR))


def new_rows(count: int) -> np.ndarray:
    return np.zeros(count, dtype=ENTRY_DTYPE)


def pack_names(rows: np.ndarray, names: list[bytes], targets: list[bytes]) -> bytes:
    """Fill the rows' name/target offsets and return the blob they point into: each name
    followed by its symlink target (empty for other kinds)."""
    name_lens = np.fromiter(map(len, names), dtype=np.int64, count=len(names))
    target_lens = np.fromiter(map(len, targets), dtype=np.int64, count=len(targets))
    ends = np.cumsum(name_lens + target_lens)
    rows["name_off"] = ends - name_lens - target_lens
    rows["name_len"] = name_lens
    rows["target_len"] = target_lens
    return b"".join(part for pair in zip(names, targets) for part in pair)


def pack_inline(rows: np.ndarray, inline: list[bytes | None]) -> bytes:
    """Set FLAG_INLINE and data_off (the offset in the returned tail) on each row whose
    bytes ``inline`` gives (None = not inline; b"" = an empty inline file)."""
    tail, at = [], 0
    for i, data in enumerate(inline):
        if data is None:
            continue
        rows["flags"][i] |= FLAG_INLINE
        rows["data_off"][i] = at
        tail.append(data)
        at += len(data)
    return b"".join(tail)


def build_dir(
    names: Sequence[bytes],
    targets: Sequence[bytes],
    rows: np.ndarray,
    inline: Sequence[bytes | None] | None = None,
    on_duplicate: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, bytes, bytes, list[int]]:
    """One directory record's parts, made the one way `lmdbfs pack` (scan.TreeBuilder,
    then writer), `lmdbfs adopt` and a union's merged folders make them.

    ``rows`` holds one row per entry, in the order ``names`` and ``targets`` (b"" but for
    symlinks) give them, with kind, mode, size, mtime_ns, checksum and data_off filled.
    Returns (rows sorted by name bytes with their name fields pointing into the blob,
    the blob from `pack_names`, the tail of inline bytes from `pack_inline` — FLAG_INLINE
    and data_off set on exactly the rows ``inline`` gives bytes for —, and order: sorted
    row r is the entry given at order[r]). Two entries of one name call
    ``on_duplicate(first, second)`` (given indices), which should raise; without it,
    ValueError. `encode_dir` of the parts is the record; the packer, which knows the
    inline bytes only after reading the files, adds its tail later with `pack_inline`."""
    order = sorted(range(len(names)), key=names.__getitem__)
    for a, b in zip(order, order[1:]):
        if names[a] == names[b]:
            if on_duplicate is not None:
                on_duplicate(a, b)
            raise ValueError(f"{decode_path(names[a])!r} is listed twice")
    if order != list(range(len(order))):
        rows = rows[np.asarray(order, dtype=np.int64)]
    rows["flags"] &= np.uint8(~FLAG_INLINE & 0xFF)
    blob = pack_names(rows, [names[k] for k in order], [targets[k] for k in order])
    tail = pack_inline(rows, [inline[k] for k in order]) if inline is not None else b""
    return rows, blob, tail, order


def encode_dir(path: str, rows: np.ndarray, blob: bytes, tail: bytes = b"") -> bytes:
    """Serialize one directory: header, own path (so a reader can detect a hash collision
    or a misplaced record), the fixed rows, the name blob from `pack_names`, then the
    inline bytes from `pack_inline`."""
    own = encode_path(path)
    header = DIR_HEADER.pack(DIR_MAGIC, len(rows), len(own), len(blob))
    return b"".join((header, own, rows.astype(ENTRY_DTYPE, copy=False).tobytes(), blob, tail))
