"""The on-disk format: keys, directory records, the meta record and its version.

Everything that decides what bytes land in the LMDB file lives here, so the packer and
the reader cannot disagree. docs/format.md describes the same thing for people.

Layout of one LMDB environment (a single file by default):

* main (unnamed) database: ``md5(key_prefix + relpath)`` -> the file's exact bytes.
  This is the key scheme of the original converter, so ``txn.get(md5(path))`` works.
* ``lmdbfs.index``: ``md5(dir relpath)`` -> one directory record (see `encode_dir`).
* ``lmdbfs.meta``: ``b"meta"`` -> JSON (see `Meta`). Written in the final commit only:
  its presence, with ``complete: true``, is what makes a DB servable.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import stat as _stat
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import xxhash

from .errors import BadDatabase, CorruptValue, FormatVersionError, IncompleteDatabase

FORMAT_NAME = "lmdbfs"
FORMAT_VERSION = 3  # 3: rows' flags byte (inline values); 2: rows gained data_off; 1 had 36-byte rows
READABLE_VERSIONS = (2, 3)  # a version-2 row is a version-3 row with no flags set
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
# Row flags. INLINE: a file's bytes sit in the directory record's blob right after its
# name, so reading a small file (an annotation, a tiny frame) costs no I/O beyond the
# record its lookup already fetched. The value is also in the main database under its
# key, so key lookups keep working.
FLAG_INLINE = 1
KNOWN_FLAGS = FLAG_INLINE
INLINE_MAX = 2048  # values this small live in LMDB leaf pages, where no offset is stable

# Main-database key schemes (meta "keys"): md5 of the prefixed path (the original
# converter's), or the plain relative path (STARK-style LMDBs).
KEYS_MD5 = "md5"
KEYS_PATH = "path"

_DIR_HEADER = struct.Struct("<4sIII")  # magic, entry count, own-path length, blob length
_DIR_MAGIC = b"LDR1"


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


class DirRecord:
    """A decoded directory record: the numpy rows and the name blob, nothing more.

    Names are found by binary search over the sorted rows instead of a dict, so a
    cached record costs what it weighs on disk (~50 bytes an entry, not ~250): the
    daemon's directory cache can then be bounded by bytes honestly.
    """

    __slots__ = ("path", "rows", "_blob", "nbytes", "_offs", "_lens")

    def __init__(self, path: str, rows: np.ndarray, blob: bytes, nbytes: int) -> None:
        self.path = path
        self.rows = rows
        self._blob = blob
        self.nbytes = nbytes
        self._offs = rows["name_off"]
        self._lens = rows["name_len"]

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

    def entry(self, i: int) -> Entry:
        row = self.rows[i]
        kind = int(row["kind"])
        off, n = int(row["name_off"]), int(row["name_len"])
        target = inline = None
        tlen = int(row["target_len"])
        if kind == KIND_SYMLINK:
            target = decode_path(self._blob[off + n : off + n + tlen])
        elif int(row["flags"]) & FLAG_INLINE:
            at = off + n + tlen
            inline = self._blob[at : at + int(row["size"])]
        return Entry(
            name=decode_path(self._blob[off : off + n]),
            kind=kind,
            mode=int(row["mode"]),
            size=int(row["size"]),
            mtime_ns=int(row["mtime_ns"]),
            checksum=int(row["checksum"]),
            target=target,
            data_off=int(row["data_off"]),
            inline=inline,
        )

    def lookup(self, name: str) -> Entry | None:
        i = self.index_of(name)
        return None if i is None else self.entry(i)

    def entries(self) -> list[Entry]:
        return [self.entry(i) for i in range(len(self.rows))]

    @property
    def subdir_count(self) -> int:
        return int(np.count_nonzero(self.rows["kind"] == KIND_DIR))


def new_rows(count: int) -> np.ndarray:
    return np.zeros(count, dtype=ENTRY_DTYPE)


def pack_names(rows: np.ndarray, names: list[bytes], targets: list[bytes], inline: list[bytes] | None = None) -> bytes:
    """Fill the rows' name/target offsets and return the blob they point into.

    Each name is followed by its symlink target (empty for other kinds), then by the
    file's inline bytes when ``inline`` gives some for that row (b"" = not inline; the
    caller sets FLAG_INLINE on rows whose bytes it passes, empty files included).
    """
    extras = targets if inline is None else [t + d for t, d in zip(targets, inline)]
    name_lens = np.fromiter(map(len, names), dtype=np.int64, count=len(names))
    target_lens = np.fromiter(map(len, targets), dtype=np.int64, count=len(targets))
    extra_lens = np.fromiter(map(len, extras), dtype=np.int64, count=len(extras))
    ends = np.cumsum(name_lens + extra_lens)
    rows["name_off"] = ends - name_lens - extra_lens
    rows["name_len"] = name_lens
    rows["target_len"] = target_lens
    return b"".join(part for pair in zip(names, extras) for part in pair)


def encode_dir(path: str, rows: np.ndarray, blob: bytes) -> bytes:
    """Serialize one directory: header, own path (so a reader can detect a hash collision
    or a misplaced record), the fixed rows, then the name blob from `pack_names`."""
    own = encode_path(path)
    header = _DIR_HEADER.pack(_DIR_MAGIC, len(rows), len(own), len(blob))
    return b"".join((header, own, rows.astype(ENTRY_DTYPE, copy=False).tobytes(), blob))


def decode_dir(raw: bytes | memoryview, expect_path: str) -> DirRecord:
    """Parse a directory record, refusing one that is truncated or not the one asked for."""
    raw = bytes(raw)
    if len(raw) < _DIR_HEADER.size:
        raise CorruptValue(f"directory record of {expect_path or '/'!r} is truncated", "re-pack the DB")
    magic, count, own_len, blob_len = _DIR_HEADER.unpack_from(raw)
    rows_at = _DIR_HEADER.size + own_len
    blob_at = rows_at + count * ENTRY_DTYPE.itemsize
    if magic != _DIR_MAGIC or blob_at + blob_len != len(raw):
        raise CorruptValue(f"directory record of {expect_path or '/'!r} is damaged", "re-pack the DB")
    own = decode_path(raw[_DIR_HEADER.size : rows_at])
    if own != expect_path:
        raise CorruptValue(f"index record for {expect_path or '/'!r} belongs to {own!r}", "re-pack the DB")
    rows = np.frombuffer(raw, dtype=ENTRY_DTYPE, count=count, offset=rows_at)
    return DirRecord(own, rows, raw[blob_at:], len(raw))


@dataclass
class Meta:
    """The archive-wide record; its presence with ``complete`` marks a finished pack."""

    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    key_scheme: str = "md5(key_prefix + relpath with '/' replaced by key_sep)"
    key_prefix: str = ""
    key_sep: str = "/"
    keys: str = KEYS_MD5  # KEYS_MD5 or KEYS_PATH
    checksum: str = CHECKSUM_ALGO
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    tool_version: str = ""
    created: str = ""
    source: str = ""
    root_mode: int = 0o755
    root_mtime_ns: int = 0
    # The rows' data_off fields hold for the file as committed in this transaction; a
    # later write (or a compacting copy) changes last_txnid and readers fall back to
    # looking values up by key.
    offsets_txnid: int = 0
    complete: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # None: values live in this environment. An adopted DB's index lives beside a DB
    # someone else built; then this names that DB ({"path", "subdir", "size",
    # "last_txnid", "kind"}) and data_off is an offset into its data file.
    data: dict[str, Any] | None = None

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes | memoryview, where: str) -> Meta:
        try:
            data = json.loads(bytes(raw))
        except ValueError:
            raise BadDatabase(f"{where}: meta record is not valid JSON", "re-pack the DB") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise BadDatabase(f"{where}: not an lmdbfs DB", "pack one with `lmdbfs pack SRC DB`")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise FormatVersionError(
                f"{where}: lmdbfs format version {version}, this lmdbfs reads versions {', '.join(map(str, READABLE_VERSIONS))}",
                "use the lmdbfs release that wrote it, or re-pack the source",
            )
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        meta = cls(**known)
        if not meta.complete:
            raise IncompleteDatabase(f"{where}: the pack that wrote this DB never finished", "re-run `lmdbfs pack`")
        return meta
