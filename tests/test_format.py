"""lmdbfs/format/records.py: keys, rows, the record codec and the meta record, byte for
byte."""

from __future__ import annotations

import hashlib
import json
import stat

import pytest

from lmdbfs.errors import BadDatabase, FormatVersionError, IncompleteDatabase
from lmdbfs.format.meta import Meta
from lmdbfs.format.recordcheck import decode_dir
from lmdbfs.format.records import (
    DIR_HEADER,
    DIR_MAGIC,
    ENTRY_DTYPE,
    FLAG_INLINE,
    FORMAT_VERSION,
    KEYS_PATH,
    KIND_DIR,
    KIND_FILE,
    KIND_SYMLINK,
    Entry,
    build_dir,
    content_key,
    decode_path,
    dir_key,
    encode_dir,
    encode_path,
    new_rows,
    output_files,
    pack_inline,
    pack_names,
)


def test_keys_are_the_md5_of_the_prefixed_path_or_the_path_itself() -> None:
    assert content_key("train/a.jpg") == hashlib.md5(b"train/a.jpg").digest()
    assert content_key("train/a.jpg", prefix="GOT/") == hashlib.md5(b"GOT/train/a.jpg").digest()
    assert content_key("train/a.jpg", sep="__") == hashlib.md5(b"train__a.jpg").digest()
    assert content_key("train/a.jpg", prefix="p/", scheme=KEYS_PATH) == b"p/train/a.jpg"
    assert dir_key("") == hashlib.md5(b"").digest() and dir_key("train") == hashlib.md5(b"train").digest()


def test_undecodable_names_round_trip_through_surrogateescape() -> None:
    raw = b"latin1-\xe9t\xe9.txt"
    assert encode_path(decode_path(raw)) == raw
    assert content_key(decode_path(raw)) == hashlib.md5(raw).digest()


def test_entry_attributes() -> None:
    d = Entry("d", KIND_DIR, 0o755, 0, 0, checksum=3)
    f = Entry("f", KIND_FILE, 0o644, 5, 0)
    link = Entry("l", KIND_SYMLINK, 0o777, 1, 0, target="f")
    assert d.st_mode == stat.S_IFDIR | 0o755 and d.nlink == 5 and d.is_dir
    assert f.st_mode == stat.S_IFREG | 0o644 and f.nlink == 1 and f.is_file
    assert stat.S_ISLNK(link.st_mode) and link.is_symlink


def test_rows_are_44_bytes_little_endian() -> None:
    assert ENTRY_DTYPE.itemsize == 44
    rows = new_rows(1)
    rows[0]["size"] = 0x0102030405060708
    assert rows.tobytes()[12:20] == bytes.fromhex("0807060504030201")


def _record() -> bytes:
    rows = new_rows(3)
    rows["kind"] = [KIND_FILE, KIND_DIR, KIND_SYMLINK]
    rows["mode"] = [0o644, 0o755, 0o777]
    rows["size"] = [3, 0, 1]
    rows["mtime_ns"] = [-5, 6, 7]
    rows["checksum"] = [99, 2, 0]
    blob = pack_names(rows, [b"a", b"b", b"c"], [b"", b"", b"a"])
    tail = pack_inline(rows, [b"xyz", None, None])
    return encode_dir("top", rows, blob, tail)


def test_a_record_is_header_own_path_rows_names_then_inline_bytes() -> None:
    raw = _record()
    magic, count, own_len, blob_len = DIR_HEADER.unpack_from(raw)
    assert (magic, count, own_len, blob_len) == (DIR_MAGIC, 3, 3, 4)  # names a, b, c and c's target a
    head = DIR_HEADER.size + own_len + count * ENTRY_DTYPE.itemsize
    assert raw[DIR_HEADER.size : DIR_HEADER.size + 3] == b"top"
    assert raw[head : head + blob_len] == b"abca"
    assert raw[head + blob_len :] == b"xyz"


def test_a_record_decodes_to_what_was_encoded() -> None:
    rec = decode_dir(_record(), "top", data_size=100, check_offsets=True)
    assert rec.names == ["a", "b", "c"] and not rec.bad and len(rec) == 3
    a, b, c = rec.entries()
    assert a == Entry("a", KIND_FILE, 0o644, 3, -5, 99, None, 0, b"xyz")
    assert rec.rows["flags"][0] == FLAG_INLINE
    assert b.nlink == 4 and rec.subdir_count == 1
    assert c.target == "a" and c.size == 1
    assert rec.lookup("b") == b and rec.lookup("zz") is None and rec.index_of("c") == 2
    assert rec.inline_bytes(0) == b"xyz" and rec.inline_bytes(1) is None


def test_the_record_builder_sorts_names_packs_them_and_carries_inline_bytes() -> None:
    """format.build_dir, the one way pack, adopt and unions make a record's parts."""
    rows = new_rows(4)
    rows["kind"] = [KIND_SYMLINK, KIND_FILE, KIND_DIR, KIND_FILE]
    rows["size"] = [1, 3, 0, 5]
    rows["data_off"] = [0, 0, 0, 8192 + 16]
    rows["checksum"] = [0, 99, 2, 7]
    rows["flags"] = FLAG_INLINE  # stale flags never survive: inline says which rows carry bytes
    names = [b"c", "é".encode(), b"b", b"a"]
    out, blob, tail, order = build_dir(names, [b"a", b"", b"", b""], rows, [None, b"xyz", None, None])
    assert order == [3, 2, 0, 1] and blob == b"abca" + "é".encode() and tail == b"xyz"
    assert out["kind"].tolist() == [KIND_FILE, KIND_DIR, KIND_SYMLINK, KIND_FILE]
    assert out["flags"].tolist() == [0, 0, 0, FLAG_INLINE] and out["data_off"].tolist() == [8192 + 16, 0, 0, 0]
    rec = decode_dir(encode_dir("top", out, blob, tail), "top", data_size=1 << 20, check_offsets=True)
    assert rec.names == ["a", "b", "c", "é"] and not rec.bad
    assert rec.lookup("é").inline == b"xyz" and rec.lookup("c").target == "a" and rec.lookup("b").nlink == 4
    # Already sorted (a union's merged names): the rows stay in place; no inline: no tail.
    again, blob2, tail2, order2 = build_dir([b"a", b"b"], [b"", b""], new_rows(2))
    assert order2 == [0, 1] and blob2 == b"ab" and tail2 == b"" and again["name_off"].tolist() == [0, 1]
    seen = []
    with pytest.raises(ValueError, match="listed twice"):
        build_dir([b"x", b"y", b"x"], [b""] * 3, new_rows(3), on_duplicate=lambda a, b: seen.append((a, b)))
    assert seen == [(0, 2)]


def test_meta_round_trips_and_marks_a_finished_pack() -> None:
    meta = Meta(files=2, dirs=1, bytes=10, root_mode=0o750, complete=True, extra={"excludes": ["*.bak"]})
    back = Meta.decode(meta.encode(), "x.lmdb")
    assert back == meta and back.format_version == FORMAT_VERSION
    with pytest.raises(IncompleteDatabase):
        Meta.decode(Meta().encode(), "x.lmdb")


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"format": "other"}, BadDatabase),
        ({"format_version": 1}, FormatVersionError),
        ({"format_version": 99}, FormatVersionError),
        ({"root_mode": 0o10000}, BadDatabase),
        ({"files": "many"}, BadDatabase),
        ({"keys": "sha1"}, BadDatabase),
        ({"extra": {"excludes": "*.bak"}}, BadDatabase),
    ],
)
def test_a_damaged_meta_record_is_refused_typed(change: dict, error: type) -> None:
    data = json.loads(Meta(complete=True).encode())
    data.update(change)
    with pytest.raises(error):
        Meta.decode(json.dumps(data).encode(), "x.lmdb")


def test_garbage_is_not_a_meta_record() -> None:
    for raw in (b"", b"{", b"[1]", b"x" * (1 << 21)):
        with pytest.raises(BadDatabase):
            Meta.decode(raw, "x.lmdb")


def test_a_pack_never_packs_its_own_output(tmp_path) -> None:
    files = output_files(str(tmp_path / "d.lmdb"))
    assert [f.rsplit(b"/", 1)[1] for f in files] == [
        b"d.lmdb",
        b"d.lmdb-lock",
        b"d.lmdb.partial",
        b"d.lmdb.partial-lock",
    ]
