"""The two readers of a directory record must agree: the C server's parser (csrc/record.c,
reached through ``lmdbfs._serve._parse_record``) and the Python reader's
(lmdbfs/format/recordcheck.py). Both refuse the same records whole, leave out the same rows
(and answer EIO for the same names), and decode every row they keep to the same fields,
over valid records, records with one field set to an edge value, flipped bytes and
arbitrary rows. A check added to one parser alone makes these tests fail.
"""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from lmdbfs import _serve
from lmdbfs.errors import CorruptValue
from lmdbfs.format.recordcheck import decode_dir
from lmdbfs.format.records import (
    ENTRY_DTYPE,
    FLAG_INLINE,
    FLAG_SPLIT,
    INLINE_LIMIT,
    KIND_FILE,
    SPLIT_TABLE_MAX,
    TARGET_MAX,
    VALUE_MAX,
    encode_dir,
    encode_path,
    new_rows,
    pack_names,
)

from .hostile import split_record
from .records import FAST, entries, names, record_of, record_v3

OWN = "some/dir"
data_sizes = st.sampled_from([0, 1, 100, 5000, 10**6, 2**63])


def python_verdict(raw: bytes, own: str, data_size: int, offsets_ok: bool):
    """None (refused whole), or (rows kept, names answered as damaged), as the C side gives them."""
    try:
        rec = decode_dir(raw, own, data_size, offsets_ok)
    except CorruptValue:
        return None
    rows = []
    for entry, flags in zip(rec.entries(), rec.rows["flags"].tolist()):
        target = encode_path(entry.target) if entry.target is not None else b""
        if entry.pieces is not None:  # a split file's piece table, where a link's target sits
            target = struct.pack(f"<{len(entry.pieces)}Q", *entry.pieces)
        fields = (entry.kind, flags, entry.mode, entry.size, entry.mtime_ns, entry.checksum)
        rows.append((encode_path(entry.name), *fields, target, entry.inline, entry.data_off))
    return rows, sorted(rec.bad)


def c_verdict(raw: bytes, own: str, data_size: int, offsets_ok: bool):
    try:
        rows, bad = _serve._parse_record(raw, encode_path(own), data_size, offsets_ok)
    except ValueError:
        return None
    return rows, sorted(set(bad) - {b""})  # a row whose name is unreadable cannot be asked for


def assert_agree(raw: bytes, own: str = OWN, data_size: int = 10**6, offsets_ok: bool = True) -> None:
    py, c = python_verdict(raw, own, data_size, offsets_ok), c_verdict(raw, own, data_size, offsets_ok)
    assert (py is None) == (c is None), f"refused whole by {'Python' if py is None else 'C'} only"
    if py is not None:
        assert py[0] == c[0], "rows kept or decoded differently"
        assert py[1] == c[1], "names answered as damaged differ"


def test_the_parsers_tell_good_from_bad_alike() -> None:
    """A hand-made record with a good row of each kind and one bad row per check."""
    good = {b"a": (1, 0o644, 5, b"x", b"hi", 0), b"b": (2, 0o755, 6, b"x", None, 0), b"c": (3, 0o777, 7, b"t", None, 0)}
    raw, _ = record_of(good, OWN)
    py = python_verdict(raw, OWN, 10**6, True)
    assert [r[0] for r in py[0]] == [b"a", b"b", b"c"] and not py[1]
    assert_agree(raw)
    rows, blob, tail, own = split_record(raw)
    for field, value in [("kind", 4), ("flags", 2), ("mode", 0o10000), ("name_len", 0), ("target_len", 1)]:
        bad = rows.copy()
        bad[0][field] = value
        damaged = encode_dir(OWN, bad, blob, tail)
        got = python_verdict(damaged, OWN, 10**6, True)
        assert len(got[0]) == 2, field  # the damaged row is left out, its neighbours kept
        assert_agree(damaged)
    assert python_verdict(raw, "other", 10**6, True) is None
    assert_agree(raw, own="other")


@FAST
@given(st.dictionaries(names, entries, max_size=30), data_sizes, st.booleans(), st.booleans())
def test_valid_records_decode_alike(listing, data_size, offsets_ok, v3) -> None:
    raw = record_v3(listing, OWN.encode()) if v3 else record_of(listing, OWN)[0]
    assert_agree(raw, OWN, data_size, offsets_ok)


# Values that sit on either side of a check in either parser.
EDGES = {
    "name_off": [0, 1, 255, 2**31, 2**32 - 1],
    "name_len": [0, 1, 2, 255, 256, 65535],
    "target_len": [0, 1, 4095, 4096, 65535],
    "kind": [0, 1, 2, 3, 4, 255],
    "flags": [0, FLAG_INLINE, FLAG_SPLIT, 3, 4, 255],
    "mode": [0, 0o7777, 0o10000, 65535],
    "size": [0, 1, 2, 4095, 4096, 5000, 2**24, 2**24 + 1, 10**6, 2**63, 2**64 - 1],
    "checksum": [0, 1, 2**32, 2**32 + 1, 2**64 - 1],
    "data_off": [0, 1, 16, 4096, 10**6, 2**63, 2**64 - 1],
    "mtime_ns": [-(2**63), -1, 0, 2**63 - 1],
}


# Fields set just inside or just past a bound that depends on the record or the data file:
# (field, what the bound is) -> the field's value is bound + delta.
RELATIVE = ("data_off_in_file", "size_of_file", "data_off_in_tail", "name_off_in_blob")


def _set_relative(row: np.void, how: str, delta: int, data_size: int, blob: bytes, tail: bytes) -> None:
    size, n, t = int(row["size"]), int(row["name_len"]), int(row["target_len"])
    value, field = {
        "data_off_in_file": (data_size - size + delta, "data_off"),
        "size_of_file": (data_size + delta, "size"),
        "data_off_in_tail": (len(tail) - size + delta, "data_off"),
        "name_off_in_blob": (len(blob) - n - t + delta, "name_off"),
    }[how]
    bits = 32 if field == "name_off" else 64
    row[field] = value % (1 << bits)


@FAST
@given(
    st.dictionaries(names, entries, min_size=1, max_size=12),
    st.lists(st.tuples(st.integers(0), st.sampled_from(sorted(EDGES)), st.integers(0)), max_size=4),
    st.lists(st.tuples(st.integers(0), st.sampled_from(RELATIVE), st.integers(-2, 2)), max_size=2),
    data_sizes,
    st.booleans(),
    st.booleans(),
)
def test_rows_with_edge_fields_are_judged_alike(listing, edits, bounds, data_size, offsets_ok, v3) -> None:
    raw = record_v3(listing, OWN.encode()) if v3 else record_of(listing, OWN)[0]
    rows, blob, tail, own = split_record(raw)
    for at, field, pick in edits:
        values = EDGES[field]
        rows[at % len(rows)][field] = values[pick % len(values)]
    for at, how, delta in bounds:
        _set_relative(rows[at % len(rows)], how, delta, min(data_size, 2**63), blob, tail)
    damaged = raw[: 16 + len(own)] + rows.tobytes() + blob + tail
    assert_agree(damaged, OWN, data_size, offsets_ok)


# One row of each sort: a stored file, an inline file, a folder, a symlink.
SWEEP = {
    b"dir": (2, 0o755, 1, b"x", None, 0),
    b"inline": (1, 0o644, 2, b"x", b"tiny", 0),
    b"link": (3, 0o777, 3, b"../stored", None, 0),
    b"stored": (1, 0o600, 4, b"x", None, 4000),
}


def test_every_edge_of_every_row_is_judged_alike() -> None:
    """Each edge value and each bound +-2, on each sort of row, in both record layouts,
    with and without trusted offsets: every check's boundary is crossed both ways."""
    checked = 0
    for raw in (record_of(SWEEP, OWN)[0], record_v3(SWEEP, OWN.encode())):
        rows, blob, tail, own = split_record(raw)
        for r in range(len(rows)):
            changes = [(field, value) for field, values in EDGES.items() for value in values]
            changes += [(how, delta) for how in RELATIVE for delta in range(-2, 3)]
            for data_size in (4000, 4100, 10**6):
                for change, value in changes:
                    edited = rows.copy()
                    if change in RELATIVE:
                        _set_relative(edited[r], change, value, data_size, blob, tail)
                    else:
                        edited[r][change] = value
                    for offsets_ok in (False, True):
                        assert_agree(raw[: 16 + len(own)] + edited.tobytes() + blob + tail, OWN, data_size, offsets_ok)
                        checked += 1
    assert checked > 2000


def test_the_longest_targets_and_largest_inline_files_are_judged_alike() -> None:
    """Symlink targets and inline files at their limits and one byte past, really there."""
    for extra in (-1, 0, 1):
        target = b"t" * (TARGET_MAX + extra)
        inline = bytes(INLINE_LIMIT + extra)
        listing = {b"big": (1, 0o644, 0, b"x", inline, 0), b"link": (3, 0o777, 0, target, None, 0)}
        for raw in (record_of(listing, OWN)[0], record_v3(listing, OWN.encode())):
            kept = [row[0] for row in python_verdict(raw, OWN, 10**6, True)[0]]
            assert kept == ([b"big", b"link"] if extra <= 0 else [])
            assert_agree(raw)


@FAST
@given(
    st.dictionaries(names, entries, min_size=1, max_size=20),
    st.lists(st.tuples(st.integers(0), st.integers(1, 255)), min_size=1, max_size=12),
    data_sizes,
    st.booleans(),
    st.booleans(),
)
def test_records_with_flipped_bytes_are_judged_alike(listing, flips, data_size, offsets_ok, v3) -> None:
    raw = bytearray(record_v3(listing, OWN.encode()) if v3 else record_of(listing, OWN)[0])
    for at, xor in flips:
        raw[at % len(raw)] ^= xor
    assert_agree(bytes(raw), OWN, data_size, offsets_ok)


@FAST
@given(
    st.binary(min_size=44, max_size=44 * 20),
    st.binary(max_size=400),
    st.binary(max_size=400),
    data_sizes,
    st.booleans(),
)
def test_arbitrary_rows_are_judged_alike(row_bytes, blob, tail, data_size, offsets_ok) -> None:
    count = len(row_bytes) // ENTRY_DTYPE.itemsize
    rows = np.frombuffer(row_bytes[: count * ENTRY_DTYPE.itemsize], dtype=ENTRY_DTYPE).copy()
    assert_agree(encode_dir("d", rows, blob, tail), "d", data_size, offsets_ok)


@FAST
@given(st.binary(max_size=300), st.sampled_from([b"", b"LDR1", b"LDR2"]), st.sampled_from(["", "d", OWN]))
def test_arbitrary_bytes_are_judged_alike(raw, magic, own) -> None:
    assert_agree(magic + raw, own)


def test_truncated_and_misplaced_records_are_refused_by_both() -> None:
    listing = {b"x": (1, 0o644, 1, b"t", b"abc", 0), b"y": (3, 0o777, 2, b"../x", None, 0)}
    for raw in (record_of(listing, OWN)[0], record_v3(listing, OWN.encode())):
        for cut in range(len(raw)):
            assert_agree(raw[:cut])
        assert_agree(raw + b"more")  # after a v3 record's blob: refused; a v4 record's tail: longer
    assert c_verdict(encode_dir(OWN, new_rows(0), b""), "elsewhere", 0, False) is None


def split_file_record(size: int, table: bytes, target_len: int | None = None, data_off: int = 0) -> bytes:
    """A record of a stored file "a" and a split file "b" whose piece table is ``table``
    (``target_len``: what its row says the table's length is)."""
    rows = new_rows(2)
    rows["kind"] = KIND_FILE
    rows["size"] = [100, size]
    rows["data_off"] = [4096 + 16, data_off]
    rows["flags"][1] = FLAG_SPLIT
    blob = pack_names(rows, [b"a", b"b"], [b"", table]) + bytes(16)  # room for a longer table
    if target_len is not None:
        rows["target_len"][1] = target_len
    return encode_dir(OWN, rows, blob, b"")


def table_of(piece: int, offsets: list[int]) -> bytes:
    return struct.pack(f"<{1 + len(offsets)}Q", piece % 2**64, *(o % 2**64 for o in offsets))


def test_a_good_piece_table_is_kept_by_both() -> None:
    raw = split_file_record(5000, table_of(2048, [8192, 16384, 32768]))
    rows, bad = python_verdict(raw, OWN, 10**6, True)
    assert [r[0] for r in rows] == [b"a", b"b"] and not bad
    assert rows[1][-3] == table_of(2048, [8192, 16384, 32768])
    assert_agree(raw)


def test_piece_tables_at_their_edges_are_judged_alike() -> None:
    """Piece sizes, piece counts, table lengths and piece offsets on either side of each
    check, with and without trusted offsets."""
    checked = kept = 0
    for data_size in (10**6, 2**40):
        for size in (0, 1, 5000, 10**6, 10**6 + 1, 2**64 - 1):
            for piece in (0, 1, 4096, 10**6, VALUE_MAX, VALUE_MAX + 1, 2**64 - 1):
                count = -(-size // piece) if piece else 1
                if count > SPLIT_TABLE_MAX // 8:
                    count = 2  # a table that cannot be this file's
                for delta in (-2, -1, 0, 1, 2):
                    last = min(piece, size - (count - 1) * piece) if piece and count else 1
                    offsets = [4096 * (k + 1) for k in range(count - 1)] + [data_size - last + delta]
                    for tlen in (None, 8 * count, 8 * (count + 2)):
                        raw = split_file_record(size, table_of(piece, offsets), tlen)
                        for offsets_ok in (False, True):
                            assert_agree(raw, OWN, data_size, offsets_ok)
                            kept += len(python_verdict(raw, OWN, data_size, offsets_ok)[0]) - 1
                            checked += 1
    assert checked > 1000 and 100 < kept < checked - 100  # both verdicts, often


@FAST
@given(st.binary(max_size=120), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), data_sizes, st.booleans())
def test_arbitrary_piece_tables_are_judged_alike(table, size, data_off, data_size, offsets_ok) -> None:
    assert_agree(split_file_record(size, table, data_off=data_off), OWN, data_size, offsets_ok)
    if len(table) >= 8:  # the same bytes as a table of the right length for its piece size
        piece = struct.unpack_from("<Q", table)[0] or 1
        count = min(-(-size // piece), 20)
        whole = (table + bytes(8 * count))[: 8 * (count + 1)]
        assert_agree(split_file_record(min(size, count * piece), whole), OWN, data_size, offsets_ok)
