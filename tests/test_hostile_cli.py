"""Every command on crafted and randomly damaged DBs: one error line or a right answer.

Each hostile case is a DB packed normally, then altered (records rewritten through
LMDB with the value offsets still trusted, or bytes patched in place). Every command
runs on it with limited memory and time, and must keep the contract (see hostile.py).
"""

from __future__ import annotations

import json
import os
import random
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from lmdbfs.format.records import encode_dir, new_rows, pack_names

from . import hostile as H
from .conftest import one_error_line, run_cli

pytestmark = pytest.mark.slow  # hundreds of commands on damaged DBs, each in a bounded child


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    return H.base_db(tmp_path_factory.mktemp("hostile"))


def _rows_of(db: Path, rel: str, edit: Callable[[np.ndarray, bytes], tuple[np.ndarray, bytes]]) -> None:
    rows, blob, _own = H.read_record(db, rel)
    H.put_rows(db, rel, *edit(rows, blob))


def _repeated(db: Path, name_len: int) -> None:
    """One 64 KB name 4,000 times in the root; or a subdirectory listed 300 times at
    two levels (a walk that followed every row would visit seq2/deep 90,000 times)."""
    if name_len:
        rows, blob, _own = H.read_record(db, "")
        many = np.repeat(rows[H.split_blob(rows, blob)[0].index(b"seq1")], 4000)
        many["name_off"], many["name_len"] = 0, name_len
        H.put_rows(db, "", many, b"s" * name_len)
        return
    for rel, name in (("", b"seq2"), ("seq2", b"deep")):
        rows, blob, _own = H.read_record(db, rel)
        H.put_rows(db, rel, np.repeat(rows[H.split_blob(rows, blob)[0].index(name)], 300), blob)


def _shared_names(db: Path) -> None:
    """255 valid rows whose names ("s", "ss", ... 255 's') all start at one place in the
    blob: their names together are far longer than the record that holds them."""
    rows, blob, _own = H.read_record(db, "many")
    row = rows[H.split_blob(rows, blob)[0].index(b"m07.txt")]
    many = np.repeat(row, 255)
    many["name_off"], many["name_len"], many["data_off"] = 0, np.arange(1, 256), 0
    H.put_rows(db, "many", many, b"s" * 255, bytes(int(row["size"])))


def _meta(change: dict | None = None, raw: bytes | None = None) -> Callable[[Path], None]:
    return lambda db: H.put_records(db, {}, meta_change=change, meta_raw=raw)


def _patch_node(rel: str, at: int, fmt: str, value: int) -> Callable[[Path], None]:
    def patch(db: Path) -> None:
        node = H.node_of(db, rel)
        H.patch_bytes(db, node + at, struct.pack(fmt, value))

    return patch


def _nested(depth: int) -> bytes:
    return b'{"format": "lmdbfs", "format_version": 3, "complete": true, "extra": ' + b"[" * depth + b"]" * depth + b"}"


CASES: dict[str, Callable[[Path], None]] = {
    # names
    "empty_dir_name": lambda db: H.edit_row(db, "", b"seq1", new_name=b""),
    "slash_in_name": lambda db: H.edit_row(db, "", b"a.txt", new_name=b"x/y"),
    "nul_in_name": lambda db: H.edit_row(db, "seq1", b"f1.txt", new_name=b"f1\0.txt"),
    "dot_dir_name": lambda db: H.edit_row(db, "", b"seq2", new_name=b"."),
    "dotdot_dir_name": lambda db: H.edit_row(db, "", b"seq2", new_name=b".."),
    "name_outside_blob": lambda db: H.edit_row(db, "", b"a.txt", name_off=10**9),
    "name_300_bytes": lambda db: H.edit_row(db, "seq1", b"f0.txt", new_name=b"n" * 300),
    "unsorted_rows": lambda db: _rows_of(db, "", lambda r, b: (r[::-1].copy(), b)),
    "duplicate_row": lambda db: _rows_of(db, "seq1", lambda r, b: (np.concatenate([r[:2], r[1:]]), b)),
    "repeated_dir_name": lambda db: _repeated(db, 0),
    "repeated_64k_name": lambda db: _repeated(db, 65535),
    "shared_name_bytes": _shared_names,
    # kinds, flags, attributes
    "kind_0": lambda db: H.edit_row(db, "", b"a.txt", kind=0),
    "kind_9": lambda db: H.edit_row(db, "seq1", b"frame.jpg", kind=9),
    "unknown_flag": lambda db: H.edit_row(db, "", b"big.bin", flags=0x80),
    "inline_flag_on_dir": lambda db: H.edit_row(db, "", b"seq1", flags=1),
    "mode_with_type_bits": lambda db: H.edit_row(db, "", b"a.txt", mode=0o170755),
    "subdir_count_huge": lambda db: H.edit_row(db, "", b"seq1", checksum=2**62),
    "mtime_extremes": lambda db: H.edit_row(db, "seq1", b"f0.txt", mtime_ns=-(2**63)),
    # sizes and offsets (still trusted)
    "size_beyond_file": lambda db: H.edit_row(db, "", b"big.bin", size=2**40),
    "size_2_63": lambda db: H.edit_row(db, "", b"big.bin", size=2**63 + 5),
    "offset_beyond_file": lambda db: H.edit_row(db, "", b"big.bin", data_off=2**40),
    "offset_near_2_64": lambda db: H.edit_row(db, "", b"big.bin", data_off=2**64 - 4096),
    "inline_beyond_blob": lambda db: H.edit_row(db, "", b"a.txt", size=2000),
    "inline_over_max": lambda db: H.edit_row(db, "", b"a.txt", size=70_000),
    "inline_offset_beyond_tail": lambda db: H.edit_row(db, "", b"a.txt", data_off=2**64 - 1),
    # symlinks
    "symlink_target_nul": lambda db: H.edit_row(db, "seq2", b"link", target=b"../a\0.txt"),
    "symlink_target_5000": lambda db: H.edit_row(db, "seq2", b"link", target=b"x/" * 2500),
    "symlink_empty_target": lambda db: H.edit_row(db, "seq2", b"link", target=b""),
    # the meta record
    "meta_nested_deep": _meta(raw=_nested(100_000)),
    "meta_nested_40": _meta(raw=_nested(40)),
    "meta_not_json": _meta(raw=b"\xff{not json"),
    "meta_root_mode_str": _meta({"root_mode": "0755"}),
    "meta_root_mtime_huge": _meta({"root_mtime_ns": 2**70}),
    "meta_files_negative": _meta({"files": -1}),
    "meta_bytes_float": _meta({"bytes": 1.5}),
    "meta_key_prefix_int": _meta({"key_prefix": 5}),
    "meta_keys_unknown": _meta({"keys": "sha1"}),
    "meta_excludes_str": _meta({"extra": {"excludes": "*.bak"}}),
    "meta_data_list": _meta({"data": [1, 2]}),
    "meta_complete_str": _meta({"complete": "yes"}),
    "meta_2mb": _meta({"source": "s" * (2 << 20)}),
    # LMDB pages patched in place
    "node_size_inline_record": _patch_node("seq1", 0, "<I", 0xFFFFFFFF),
    "node_size_overflow_record": _patch_node("many", 0, "<I", 0xFFFFFFFF),
    "node_pgno_far": _patch_node("many", 8 + 16, "<Q", 2**40),
    "node_flags_bigdata": _patch_node("seq1", 4, "<H", 1),
    "node_flags_cleared": _patch_node("many", 4, "<H", 0),
}


def _commands(db: Path, files: dict[str, bytes], out: Path) -> list[list[str]]:
    some = ["a.txt", "big.bin", "seq1/f1.txt", "seq2/deep/h.bin", "many/m07.txt"]
    return [
        ["info", str(db)],
        ["ls", "-R", "-l", str(db)],
        ["ls", "-l", str(db), "seq1"],
        *(["cat", str(db), rel] for rel in some),
        ["verify", str(db)],
        ["unpack", str(db), str(out)],
    ]


def _check_all(db: Path, files: dict[str, bytes], tmp: Path) -> dict[str, H.Outcome]:
    """Run every command; assert the contract and that what succeeds is right."""
    results: dict[str, H.Outcome] = {}
    problems = []
    for argv in _commands(db, files, tmp / "out"):
        res = H.run_forked(argv, tmp)
        problem = H.contract_problem(res)
        if problem:
            problems.append(problem)
        if argv[0] == "cat" and res.code == 0 and res.stdout != files[argv[2]]:
            problems.append(f"cat {argv[2]} gave wrong bytes")
        results[" ".join(argv[:1] + argv[2:] if argv[0] == "cat" else argv[:2])] = res
    assert not problems, "\n".join(problems)
    return results


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_db_keeps_the_contract(case: str, base, tmp_path: Path) -> None:
    base_db, files = base
    db = H.fresh_copy(base_db, tmp_path, case)
    CASES[case](db)
    results = _check_all(db, files, tmp_path)
    untouched = "many/m03.txt"
    if case.startswith("meta_") and case != "meta_nested_40":
        assert results["info " + str(db)].code != 0  # a damaged meta record refuses the DB
        return
    if not case.startswith(("node_", "meta_", "repeated_", "unsorted_", "shared_")):
        # Damage to one row leaves the rest of the DB readable.
        res = H.run_forked(["cat", str(db), untouched], tmp_path)
        assert res.code == 0 and res.stdout == files[untouched], res.stderr


def test_a_bad_row_is_left_out_and_its_siblings_stay(base, tmp_path: Path) -> None:
    base_db, files = base
    db = H.fresh_copy(base_db, tmp_path, "kind")
    H.edit_row(db, "seq1", b"frame.jpg", kind=9)
    res = H.run_forked(["ls", "-l", str(db), "seq1"], tmp_path)
    assert res.code == 0
    assert [line.split()[-1] for line in res.stdout.decode().splitlines()] == ["f0.txt", "f1.txt"]
    assert "1 damaged entries of seq1 not listed ('frame.jpg')" in res.stderr
    line = one_error_line(run_cli("cat", db, "seq1/frame.jpg", check=False))
    assert "seq1/frame.jpg: damaged index entry (unknown kind)" in line
    res = H.run_forked(["verify", str(db)], tmp_path)
    assert res.code == 6 and b"'seq1/frame.jpg': damaged index entry (unknown kind)" in res.stdout


def test_an_empty_name_does_not_loop(base, tmp_path: Path) -> None:
    base_db, _files = base
    db = H.fresh_copy(base_db, tmp_path, "loop")
    H.edit_row(db, "", b"seq1", new_name=b"")
    res = H.run_forked(["ls", "-R", str(db)], tmp_path)
    assert res.code == 0
    assert res.stdout.decode().count(".:") == 1  # the root is listed once


def test_unpack_drops_special_bits_unless_asked(base, tmp_path: Path) -> None:
    base_db, files = base
    run_cli("unpack", base_db, tmp_path / "plain")
    run_cli("unpack", base_db, tmp_path / "kept", "--keep-special-bits")
    assert stat.S_IMODE(os.stat(tmp_path / "plain" / "a.txt").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "kept" / "a.txt").st_mode) == 0o4755
    for rel, data in files.items():
        assert (tmp_path / "plain" / rel).read_bytes() == data


def test_unpack_refuses_a_symlink_target_with_nul(base, tmp_path: Path) -> None:
    base_db, _files = base
    db = H.fresh_copy(base_db, tmp_path, "nul")
    H.edit_row(db, "seq2", b"link", target=b"../a\0.txt")
    line = one_error_line(run_cli("unpack", db, tmp_path / "out", check=False))
    assert "damaged entry 'link' in seq2 (bad symlink target)" in line


# -- seeded random damage ----------------------------------------------------------------

_INTERESTING = [0, 1, 2, 3, 9, 0x7F, 0x80, 0xFF, 0xFFFF, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1]


def _flip_record(db: Path, rng: random.Random) -> None:
    rel = rng.choice(["", "seq1", "seq2", "seq2/deep", "many"])
    rows, blob, own = H.read_record(db, rel)
    tail = H.read_tail(db, rel)
    if rng.random() < 0.5 and len(rows):
        field = rng.choice(rows.dtype.names)
        info = np.iinfo(rows.dtype[field])
        value = rng.choice(_INTERESTING + [len(blob), len(blob) - 1, rng.randrange(1 << 16)])
        rows[field][rng.randrange(len(rows))] = min(max(value, info.min), info.max) if value >= 0 else info.min
        raw = encode_dir(rel, rows, blob, tail)
    else:
        raw = bytearray(encode_dir(rel, rows, blob, tail))
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] ^= rng.randint(1, 255)
        raw = bytes(raw)
    H.put_records(db, {rel: raw})


def _flip_meta(db: Path, rng: random.Random) -> None:
    key = rng.choice(
        ["files", "bytes", "root_mode", "root_mtime_ns", "key_prefix", "key_sep", "keys", "extra", "data", "complete"]
    )
    value = rng.choice([None, True, -1, 2**64, 1.5, "x", "", [], {}, [[["deep"]]], {"excludes": [1]}, "md5", 0o7777])
    H.put_records(db, {}, meta_change={key: value})


def _flip_pages(db: Path, rng: random.Random) -> None:
    size = db.stat().st_size
    pages = size // 4096
    with open(db, "r+b") as fh:
        for _ in range(rng.randint(1, 6)):
            page = rng.randrange(2, pages)  # pages 0 and 1 are LMDB's own meta pages
            at = page * 4096 + rng.randrange(4096)
            fh.seek(at)
            old = fh.read(1)
            fh.seek(at)
            fh.write(bytes([old[0] ^ rng.randint(1, 255)]))


@pytest.mark.parametrize("strategy", [_flip_record, _flip_meta, _flip_pages], ids=["records", "meta", "pages"])
def test_seeded_damage_keeps_the_contract(strategy, base, tmp_path: Path) -> None:
    base_db, files = base
    for seed in range(int(os.environ.get("LMDBFS_FUZZ_SEEDS", "16"))):  # raise it for a deeper run
        rng = random.Random(f"{strategy.__name__}-{seed}")
        db = H.fresh_copy(base_db, tmp_path, f"fuzz{seed}")
        strategy(db, rng)
        _check_all(db, files, tmp_path)
        db.unlink()


def test_the_meta_record_as_written_stays_valid(base) -> None:
    """The validation must accept every field the packer writes."""
    base_db, _files = base
    import lmdbfs

    with lmdbfs.open(base_db) as archive:
        meta = archive.meta
    assert json.loads(meta.encode())["complete"] is True


def test_a_record_packed_with_pack_names_decodes_whole() -> None:
    rows = new_rows(3)
    rows["kind"] = [1, 2, 3]
    rows["size"] = [0, 0, 4]
    blob = pack_names(rows, [b"a", b"b", b"c"], [b"", b"", b"../a"])
    from lmdbfs.format.recordcheck import decode_dir

    rec = decode_dir(encode_dir("x", rows, blob), "x", data_size=0)
    assert rec.names == ["a", "b", "c"] and not rec.bad


def test_fuse_option_values_are_escaped_for_libfuse() -> None:
    from lmdbfs.fuse.serve import fuse_option_value

    assert fuse_option_value("lmdbfs:a,b=c\\d.lmdb") == "lmdbfs:a\\,b=c\\\\d.lmdb"
    assert fuse_option_value("plain name.lmdb") == "plain name.lmdb"
