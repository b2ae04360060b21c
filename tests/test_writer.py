"""lmdbfs/pack/writer.py: keys, batched puts, offsets, resume and the final commit, driven
directly on a real small tree (what `pack` does, step by step)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

import lmdbfs
from lmdbfs.format.meta import Meta
from lmdbfs.format.records import INLINE_MAX, KEYS_MD5, KEYS_PATH, checksum, content_key
from lmdbfs.pack.sources import build_scan
from lmdbfs.pack.writer import Keys, Writer, _files_by_dir

SIZES = {"a/small.txt": 10, "a/big.bin": 3 * INLINE_MAX, "b/empty": 0, "b/c/tiny": 1, "top.bin": 70_000}


def _scan(tmp_path: Path):
    src = tmp_path / "src"
    for rel, size in SIZES.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(os.urandom(size))
    return src, build_scan([str(src)])


def _write(src: Path, scan, db: Path, keys: Keys, files: list[int]) -> Writer:
    writer = Writer(str(db), False, 1 << 20, scan, keys)
    for i in files:
        data = (src / scan.file_relpath(i)).read_bytes()
        scan.row(i)["checksum"] = checksum(data)  # the packer's part: the writer stores rows as given
        writer.put(i, keys(i), data)
    return writer


def test_keys_are_made_once_and_agree_with_the_format(tmp_path: Path) -> None:
    _src, scan = _scan(tmp_path)
    md5 = Keys(scan, "P/", "/", KEYS_MD5)
    path = Keys(scan, "P/", "/", KEYS_PATH)
    assert len(md5.digests) == 16 * scan.files and path.digests is None
    for i in range(scan.files):
        rel = scan.file_relpath(i)
        assert md5(i) == content_key(rel, "P/") and path(i) == b"P/" + rel.encode()


def test_a_written_db_reads_back_with_inline_bytes_and_offsets(tmp_path: Path) -> None:
    src, scan = _scan(tmp_path)
    keys = Keys(scan, "", "/", KEYS_MD5)
    db = tmp_path / "out.lmdb"
    writer = _write(src, scan, db, keys, list(range(scan.files)))
    try:
        writer.commit()
        writer.finish(scan, Meta(files=scan.files, dirs=len(scan.dirs), complete=True))
    finally:
        writer.close()
    with lmdbfs.open(str(db)) as archive:
        for rel in SIZES:
            entry = archive.lstat(rel)
            assert archive.read_bytes(rel) == (src / rel).read_bytes()
            if entry.size <= INLINE_MAX:
                assert entry.inline == (src / rel).read_bytes()  # carried in the record
            else:
                assert entry.inline is None and archive.value_offset(rel, entry)  # read by offset


def test_rows_map_to_the_files_numbered_in_them_until_files_are_dropped(tmp_path: Path) -> None:
    _src, scan = _scan(tmp_path)
    files_of = _files_by_dir(scan)
    for k, d in enumerate(scan.dirs):
        numbers = files_of(k)
        for r, i in enumerate(numbers.tolist()):
            if i >= 0:
                rel = f"{d.path}/{d.name(r).decode()}" if d.path else d.name(r).decode()
                assert scan.file_relpath(i) == rel
            else:
                assert d.rows["kind"][r] != 1
    scan.drop_files([0])
    assert _files_by_dir(scan)(0) is None  # rows renumbered: keys come from the paths again


def test_a_second_writer_resumes_where_the_first_committed(tmp_path: Path) -> None:
    src, scan = _scan(tmp_path)
    keys = Keys(scan, "", "/", KEYS_MD5)
    db = tmp_path / "out.lmdb.partial"
    first = _write(src, scan, db, keys, [0, 1])
    first.commit()
    first.close()
    second = Writer(str(db), False, 1 << 20, scan, keys)
    try:
        todo = second.resume_todo(np.arange(scan.files))
    finally:
        second.close()
    assert todo.tolist() == list(range(2, scan.files))
