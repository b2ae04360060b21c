"""Property tests of the record and meta codecs: what is encoded decodes the same, and
no input whatever makes decoding raise anything but the typed errors."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from lmdbfs.errors import BadDatabase, CorruptValue
from lmdbfs.format.meta import Meta
from lmdbfs.format.recordcheck import decode_dir
from lmdbfs.format.records import (
    INLINE_MAX,
    KIND_DIR,
    KIND_FILE,
    KIND_SYMLINK,
    NAME_MAX,
    DirRecord,
    encode_dir,
    new_rows,
)

from .records import FAST, entries, names, record_of, record_v3


def _assert_sane(rec: DirRecord) -> None:
    """Whatever a record decoded to, every row it serves is usable."""
    seen = []
    for entry in rec.entries():
        raw = entry.name.encode("utf-8", "surrogateescape")
        assert 0 < len(raw) <= NAME_MAX and b"/" not in raw and b"\0" not in raw and raw not in (b".", b"..")
        assert entry.kind in (KIND_FILE, KIND_DIR, KIND_SYMLINK)
        if entry.inline is not None:
            assert len(entry.inline) == entry.size <= INLINE_MAX
        if entry.is_symlink:
            assert entry.target and "\0" not in entry.target
        assert rec.lookup(entry.name) == entry
        seen.append(raw)
    assert seen == sorted(set(seen))


@FAST
@given(st.dictionaries(names, entries, max_size=40))
def test_encode_then_decode_gives_back_every_entry(listing) -> None:
    raw, listing = record_of(listing)
    rec = decode_dir(raw, "some/dir", data_size=10**6, check_offsets=True)
    assert not rec.bad
    assert rec.raw_names() == sorted(listing)
    for entry in rec.entries():
        kind, mode, mtime, target, inline, _size = listing[entry.name.encode("utf-8", "surrogateescape")]
        assert (entry.kind, entry.mode, entry.mtime_ns) == (kind, mode, mtime)
        if kind == KIND_SYMLINK:
            assert entry.target.encode("utf-8", "surrogateescape") == target
        if kind == KIND_FILE and inline is not None:
            assert entry.inline == inline
    _assert_sane(rec)


@FAST
@given(st.dictionaries(names, entries, max_size=40))
def test_a_version_3_record_decodes_to_the_same_entries(listing) -> None:
    """DBs packed before format 4 interleave inline bytes with the names; they still read."""
    raw, listing = record_of(listing)
    new = decode_dir(raw, "some/dir", data_size=10**6, check_offsets=True)
    old = decode_dir(record_v3(listing), "some/dir", data_size=10**6, check_offsets=True)
    assert not old.bad and old.entries() == new.entries()


@FAST
@given(
    st.dictionaries(names, entries, min_size=1, max_size=20),
    st.lists(st.tuples(st.integers(0), st.integers(1, 255)), min_size=1, max_size=12),
)
def test_damaged_records_decode_to_sane_rows_or_fail_typed(listing, flips) -> None:
    raw, _listing = record_of(listing)
    damaged = bytearray(raw)
    for at, xor in flips:
        damaged[at % len(damaged)] ^= xor
    try:
        rec = decode_dir(bytes(damaged), "some/dir", data_size=5000, check_offsets=True)
    except CorruptValue:
        return
    _assert_sane(rec)


@FAST
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise_untyped(raw) -> None:
    try:
        rec = decode_dir(raw, "", data_size=1000)
    except CorruptValue:
        return
    _assert_sane(rec)


@FAST
@given(st.binary(min_size=44, max_size=44 * 30), st.binary(max_size=600), st.binary(max_size=600))
def test_arbitrary_rows_behind_a_valid_header_never_raise_untyped(row_bytes, blob, tail) -> None:
    count = len(row_bytes) // 44
    rows = np.frombuffer(row_bytes[: count * 44], dtype=new_rows(0).dtype).copy()
    try:
        rec = decode_dir(encode_dir("d", rows, blob, tail), "d", data_size=4096, check_offsets=True)
    except CorruptValue:
        return
    _assert_sane(rec)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=30,
)
meta_fields = st.sampled_from(sorted(Meta.__dataclass_fields__))


@FAST
@given(st.dictionaries(meta_fields, json_values, max_size=6))
def test_meta_with_any_field_values_is_read_or_refused_typed(change) -> None:
    data = json.loads(Meta(complete=True).encode())
    data.update(change)
    try:
        meta = Meta.decode(json.dumps(data).encode(), "x.lmdb")
    except BadDatabase:
        return
    assert isinstance(meta.key_prefix, str) and isinstance(meta.extra, dict)
    assert isinstance(meta.root_mode, int) and 0 <= meta.root_mode <= 0o7777
    assert isinstance(meta.files, int) and meta.files >= 0


@FAST
@given(st.binary(max_size=500))
def test_meta_from_arbitrary_bytes_is_refused_typed(raw) -> None:
    try:
        Meta.decode(raw, "x.lmdb")
    except BadDatabase:
        pass
