"""Directory records read from untrusted bytes: `decode_dir` and the checks of its rows.

A DB file is untrusted input. Every record the reader decodes passes through here:
the header must fit and name the directory asked for, and each row must be servable
(known kind and flags, a name that is a name, contents inside the record or the data
file, strictly ascending names). A damaged row is left out and named, never served.
The C server checks the same things in csrc/record.c; tests/test_record_parsers.py
holds the two to one verdict.
"""

from __future__ import annotations

import numpy as np

from ..errors import CorruptValue
from .records import (
    DIR_HEADER,
    DIR_MAGIC,
    DIR_MAGIC_V3,
    ENTRY_DTYPE,
    FLAG_INLINE,
    FLAG_SPLIT,
    INLINE_LIMIT,
    KIND_DIR,
    KIND_FILE,
    KIND_SYMLINK,
    KNOWN_FLAGS,
    NAME_MAX,
    SUBDIRS_MAX,
    TARGET_MAX,
    VALUE_MAX,
    DirRecord,
    decode_path,
    split_pieces,
    split_table_len,
)


def decode_dir(
    raw: bytes | memoryview,
    expect_path: str,
    data_size: int | None = None,
    check_offsets: bool = False,
    tail_at: int | None = None,
    tail_len: int = 0,
) -> DirRecord:
    """Parse a directory record, refusing one that is truncated or not the one asked for.

    Rows that fail `check_rows` are left out (and listed in ``DirRecord.bad``): one
    damaged entry must not take its whole directory down.

    ``tail_at``: ``raw`` is the record's head only, its ``tail_len``-byte tail lying at
    that offset of the DB file (a remote DB: the tail is not fetched to list or stat).
    The inline rows then become plain files whose bytes lie at ``tail_at + data_off``."""
    raw = bytes(raw)
    if len(raw) < DIR_HEADER.size:
        raise CorruptValue(f"directory record of {expect_path or '/'!r} is truncated", "re-pack the DB")
    magic, count, own_len, blob_len = DIR_HEADER.unpack_from(raw)
    rows_at = DIR_HEADER.size + own_len
    blob_at = rows_at + count * ENTRY_DTYPE.itemsize
    head = blob_at + blob_len
    if not (magic == DIR_MAGIC and head <= len(raw) or magic == DIR_MAGIC_V3 and head == len(raw)):
        raise CorruptValue(f"directory record of {expect_path or '/'!r} is damaged", "re-pack the DB")
    if tail_at is not None and (magic != DIR_MAGIC or head != len(raw)):
        raise CorruptValue(f"directory record of {expect_path or '/'!r} is damaged", "re-pack the DB")
    own = decode_path(raw[DIR_HEADER.size : rows_at])
    if own != expect_path:
        raise CorruptValue(f"index record for {expect_path or '/'!r} belongs to {own!r}", "re-pack the DB")
    rows = np.frombuffer(raw, dtype=ENTRY_DTYPE, count=count, offset=rows_at)
    blob = raw[blob_at:head]
    tail = raw[head:] if magic == DIR_MAGIC else None
    tail_size = None if tail is None else tail_len if tail_at is not None else len(tail)
    reasons = check_rows(rows, blob, data_size, check_offsets, tail_size)
    bad: dict[bytes, str] = {}
    if reasons.any():
        for i in np.flatnonzero(reasons).tolist():
            off, n = int(rows["name_off"][i]), int(rows["name_len"][i])
            if 0 < n <= NAME_MAX and off + n <= len(blob):  # a name a lookup can ask for (as csrc/record.c)
                bad.setdefault(blob[off : off + n], ROW_PROBLEMS[int(reasons[i])])
        rows = rows[reasons == 0]
    if tail_at is not None:
        inline = (rows["kind"] == KIND_FILE) & (rows["flags"] & FLAG_INLINE != 0)
        if inline.any():
            rows = rows.copy()
            rows["data_off"][inline] += tail_at
            rows["flags"][inline] &= np.uint8(0xFF ^ FLAG_INLINE)
    return DirRecord(own, rows, blob, len(raw), bad, tail)


# Why `check_rows` leaves a row out (index = the code it returns; 0 = the row is fine).
ROW_PROBLEMS = (
    "",
    "unknown kind",
    "unknown flag bits",
    "name empty or over 255 bytes",
    "name or contents outside the record",
    "name with '/' or NUL, or '.' or '..'",
    "bad symlink target",
    "attributes out of range",
    "contents outside the data file",
    "name out of order or listed twice",
    "bad piece table",
)
_KIND, _FLAGS, _NAME_LEN, _BOUNDS, _NAME_CHARS, _TARGET, _ATTRS, _DATA, _ORDER, _PIECES = range(1, 11)
BAD_NAME = ROW_PROBLEMS[_NAME_CHARS]
_CHECK_CHUNK = 16384  # rows whose names are checked together (at most 4 MB of name bytes)


def check_rows(
    rows: np.ndarray,
    blob: bytes,
    data_size: int | None = None,
    check_offsets: bool = False,
    tail_len: int | None = None,
) -> np.ndarray:
    """Why each row cannot be served (a `ROW_PROBLEMS` code per row, 0 = fine).

    Every field of every row is checked with whole-array numpy operations, once per
    decoded record (records are cached): first all at once, and only if some row fails,
    again one check at a time to say why. ``data_size`` (the data file's size) bounds
    file sizes, and with ``check_offsets`` (the offsets are trusted) data_off + size too.
    ``tail_len``: the length of a version-4 record's tail, where inline rows' bytes lie at
    their data_off (None: a version 2-3 record, inline bytes after each name).
    """
    reason = np.zeros(len(rows), np.uint8)
    if not len(rows):
        return reason
    kind, flags, size = rows["kind"], rows["flags"], rows["size"]
    nlen, tlen = rows["name_len"], rows["target_len"]
    off = rows["name_off"].astype(np.int64)
    is_link, inline, split = kind == KIND_SYMLINK, (flags & FLAG_INLINE) != 0, (flags & FLAG_SPLIT) != 0
    stored = (kind == KIND_FILE) & ~inline
    limit = np.uint64(max(data_size or 0, 0))
    clipped = np.where(inline, np.minimum(size, INLINE_LIMIT + 1), 0).astype(np.int64)
    if tail_len is None:
        end, outside_tail = off + nlen + tlen + clipped, False
    else:
        at = np.minimum(rows["data_off"], np.uint64(tail_len + 1)).astype(np.int64)
        end, outside_tail = off + nlen + tlen, inline & (at + clipped > tail_len)
    masks = [
        (_KIND, (kind - np.uint8(1)) > 2),
        (_FLAGS, ((flags & np.uint8(~KNOWN_FLAGS & 0xFF)) != 0) | ((inline | split) & (kind != KIND_FILE))),
        (_FLAGS, inline & split),
        (_NAME_LEN, (nlen - np.uint16(1)) >= NAME_MAX),
        (_BOUNDS, (end > len(blob)) | (inline & (size > INLINE_LIMIT)) | outside_tail),
        (_TARGET, is_link & ((tlen == 0) | (tlen > TARGET_MAX) | (size != tlen))),
        (_ATTRS, ((tlen != 0) & ~is_link & ~split) | (rows["mode"] > 0o7777)),
        (_ATTRS, (kind == KIND_DIR) & (rows["checksum"] > SUBDIRS_MAX)),
    ]
    if data_size is not None:
        masks.append((_DATA, stored & (size > limit)))
        if check_offsets:
            data_off = rows["data_off"]
            masks.append(
                (_DATA, stored & (data_off != 0) & ((data_off > limit) | (size > limit - np.minimum(data_off, limit))))
            )
    if np.logical_or.reduce([mask for _code, mask in masks]).any():
        for code, mask in masks:
            reason[(reason == 0) & mask] = code
    for i in np.flatnonzero(split & (reason == 0)).tolist():
        table = blob[int(off[i] + nlen[i]) : int(off[i] + nlen[i] + tlen[i])]
        if _pieces_problem(table, int(size[i]), data_size if check_offsets else None):
            reason[i] = _DATA if _pieces_problem(table, int(size[i]), None) is None else _PIECES
    _check_names(blob, reason, off, nlen, is_link, tlen)
    return reason


def _pieces_problem(table: bytes, size: int, data_size: int | None) -> str | None:
    """What is wrong with a split file's piece table (as csrc/record.c judges it): a
    piece size of 1 to VALUE_MAX bytes, one offset per piece, and with ``data_size``
    (offsets trusted) each known piece inside the data file."""
    piece = split_pieces(table[:8])[0] if len(table) >= 8 else 0
    if not 1 <= piece <= VALUE_MAX or len(table) != split_table_len(size, piece):
        return "bad piece table"
    if data_size is not None:
        offsets = split_pieces(table)[1:]
        for k, at in enumerate(offsets):
            length = min(piece, size - k * piece)
            if at and (at > data_size or length > data_size - at):
                return "piece outside the data file"
    return None


def _check_names(blob: bytes, reason: np.ndarray, off, nlen, is_link, tlen) -> None:
    """Name bytes (no '/', NUL, '.', '..'), symlink targets (no NUL), and strict order.

    Names are gathered into (rows x longest name) byte arrays, a bounded chunk of rows
    at a time, and checked and compared there without a Python loop."""
    good = np.flatnonzero(reason == 0)
    if not len(good):
        return
    nlen = nlen.astype(np.int64)
    width = int(nlen[good].max())
    padded = blob + bytes(width)
    # Row i of `windows` is the `width` bytes starting at blob offset i (a view, no copy).
    windows = np.ndarray((len(padded) - width + 1, width), np.uint8, padded, 0, (1, 1))
    columns = np.arange(width)
    ordered, last = True, None
    for at in range(0, len(good), _CHECK_CHUNK):
        idx = good[at : at + _CHECK_CHUNK]
        lens = nlen[idx]
        names = windows[off[idx]]
        inside = columns < lens[:, None]
        bad = (((names == 0) | (names == 47)) & inside).any(axis=1)
        names *= inside  # zero past each name's end: compares as the name itself
        bad |= (names[:, 0] == 46) & ((lens == 1) | ((lens == 2) & (names[:, min(1, width - 1)] == 46)))
        reason[idx[bad]] = _NAME_CHARS
        keys = np.ascontiguousarray(names[~bad]).view(f"S{width}").ravel()
        if len(keys):
            if not (keys[1:] > keys[:-1]).all() or (last is not None and not keys[0] > last):
                ordered = False
            last = keys[-1]
    for i in np.flatnonzero(is_link & (reason == 0)).tolist():
        at = int(off[i] + nlen[i])
        if b"\0" in blob[at : at + int(tlen[i])]:
            reason[i] = _TARGET
    if not ordered:
        # Damaged order: keep the rows that still ascend, so binary search stays exact.
        last_name = None
        for i in np.flatnonzero(reason == 0).tolist():
            name = blob[int(off[i]) : int(off[i] + nlen[i])]
            if last_name is not None and name <= last_name:
                reason[i] = _ORDER
            else:
                last_name = name
