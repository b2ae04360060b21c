"""Property tests of the record and meta codecs: what is encoded decodes the same, and
no input whatever makes decoding raise anything but the typed errors."""

from __future__ import annotations

import json
import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmdbfs.errors import BadDatabase, CorruptValue
from lmdbfs.format import (
    INLINE_MAX,
    KIND_DIR,
    KIND_FILE,
    KIND_SYMLINK,
    NAME_MAX,
    DirRecord,
    Meta,
    encode_dir,
    new_rows,
    pack_inline,
    pack_names,
)
from lmdbfs.recordcheck import decode_dir

from .hostile import encode_dir_v3

# LMDBFS_FUZZ_EXAMPLES raises the count for a deeper run than CI's.
FAST = settings(
    max_examples=int(os.environ.get("LMDBFS_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

names = st.binary(min_size=1, max_size=NAME_MAX).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)
targets = st.binary(min_size=1, max_size=300).filter(lambda b: b"\0" not in b)
entries = st.tuples(
    st.sampled_from([KIND_FILE, KIND_DIR, KIND_SYMLINK]),
    st.integers(0, 0o7777),
    st.integers(-(2**63), 2**63 - 1),
    targets,
    st.one_of(st.none(), st.binary(max_size=INLINE_MAX)),
    st.integers(0, 10_000),
)


def _rows_of(listing: dict[bytes, tuple]) -> tuple[list[bytes], np.ndarray, list[bytes], list[bytes | None]]:
    ordered = sorted(listing)
    rows = new_rows(len(ordered))
    tlist, ilist = [], []
    for i, name in enumerate(ordered):
        kind, mode, mtime, target, inline, size = listing[name]
        rows[i]["kind"], rows[i]["mode"], rows[i]["mtime_ns"] = kind, mode, mtime
        target = target if kind == KIND_SYMLINK else b""
        is_inline = kind == KIND_FILE and inline is not None
        if kind == KIND_SYMLINK:
            rows[i]["size"] = len(target)
        elif kind == KIND_FILE:
            rows[i]["size"] = len(inline) if is_inline else size
            rows[i]["data_off"] = size  # a stored file's offset; pack_inline sets an inline one's
        tlist.append(target)
        ilist.append(inline if is_inline else None)
    return ordered, rows, tlist, ilist


def _build(listing: dict[bytes, tuple]) -> tuple[bytes, dict[bytes, tuple]]:
    ordered, rows, tlist, ilist = _rows_of(listing)
    blob = pack_names(rows, ordered, tlist)
    tail = pack_inline(rows, ilist)
    return encode_dir("some/dir", rows, blob, tail), listing


def _build_v3(listing: dict[bytes, tuple]) -> bytes:
    """The same directory as a version 2-3 ("LDR1") record."""
    ordered, rows, tlist, ilist = _rows_of(listing)
    return encode_dir_v3(b"some/dir", rows, ordered, tlist, ilist)


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
    raw, listing = _build(listing)
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
    raw, listing = _build(listing)
    new = decode_dir(raw, "some/dir", data_size=10**6, check_offsets=True)
    old = decode_dir(_build_v3(listing), "some/dir", data_size=10**6, check_offsets=True)
    assert not old.bad and old.entries() == new.entries()


@FAST
@given(
    st.dictionaries(names, entries, min_size=1, max_size=20),
    st.lists(st.tuples(st.integers(0), st.integers(1, 255)), min_size=1, max_size=12),
)
def test_damaged_records_decode_to_sane_rows_or_fail_typed(listing, flips) -> None:
    raw, _listing = _build(listing)
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
