"""lmdbfs/read/reader.py and tree.py: the Archive API on a small DB packed in-process —
lookups, listings, links, reads and their typed errors, without FUSE."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

import lmdbfs
from lmdbfs.errors import IsADirectory, NotADirectory, NotASymlink, PathNotFound
from lmdbfs.format.records import INLINE_MAX
from lmdbfs.pack.packer import PackOptions, pack

FILES = {"a/1.txt": b"one\n", "a/big.bin": os.urandom(3 * INLINE_MAX), "b/c/deep.txt": b"deep", "top.txt": b""}


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("reader") / "src"
    for rel, data in FILES.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    os.symlink("a/1.txt", src / "to_one")
    os.symlink("a", src / "to_a")
    os.symlink("../../outside", src / "a/escape")
    os.chmod(src / "a/1.txt", 0o600)
    out = src.parent / "r.lmdb"
    pack(str(src), str(out), PackOptions(progress=False))
    return out


def test_lookups_give_each_entry_its_attributes(db: Path) -> None:
    with lmdbfs.open(str(db)) as archive:
        assert archive.lstat("a/1.txt").mode == 0o600 and archive.lstat("a/1.txt").size == 4
        assert archive.lstat("/a//1.txt") == archive.lstat("a/1.txt")  # paths are normalised
        assert archive.stat("").is_dir and archive.stat("").nlink == 4  # a, b and the root's own two
        assert archive.lstat("to_one").is_symlink and archive.stat("to_one").is_file
        assert archive.exists("b/c") and not archive.exists("b/x")


def test_listings_and_walks_follow_the_tree(db: Path) -> None:
    with lmdbfs.open(str(db)) as archive:
        assert archive.listdir("") == ["a", "b", "to_a", "to_one", "top.txt"]
        assert [e.name for e in archive.scandir("a")] == ["1.txt", "big.bin", "escape"]
        walked = {top: (sorted(dirs), sorted(files)) for top, dirs, files in archive.walk()}
        assert walked["b"] == (["c"], []) and walked["b/c"] == ([], ["deep.txt"])


def test_reads_give_the_exact_bytes(db: Path) -> None:
    with lmdbfs.open(str(db)) as archive:
        for rel, data in FILES.items():
            assert archive.read_bytes(rel) == data and archive.check(rel)
        assert archive.read("a/big.bin", 10, offset=INLINE_MAX) == FILES["a/big.bin"][INLINE_MAX : INLINE_MAX + 10]
        assert archive.read("a/1.txt", 100, offset=2) == b"e\n" and archive.read("a/1.txt", 5, offset=9) == b""
        assert archive.read_bytes("to_a/1.txt") == b"one\n" and archive.open("b/c/deep.txt").read() == b"deep"
        assert archive.readlink("to_one") == "a/1.txt"


def test_wrong_paths_raise_typed_errors(db: Path) -> None:
    with lmdbfs.open(str(db)) as archive:
        with pytest.raises(PathNotFound):
            archive.lstat("nope")
        with pytest.raises(NotADirectory):
            archive.listdir("top.txt")
        with pytest.raises(NotADirectory):
            archive.lstat("top.txt/x")
        with pytest.raises(IsADirectory):
            archive.read_bytes("a")
        with pytest.raises(NotASymlink):
            archive.readlink("a/1.txt")
        with pytest.raises(PathNotFound, match="outside"):
            archive.read_bytes("a/escape")


def test_an_archive_pickles_and_reads_in_the_copy(db: Path) -> None:
    with lmdbfs.open(str(db)) as archive:
        copy = pickle.loads(pickle.dumps(archive))
        try:
            assert copy.read_bytes("b/c/deep.txt") == b"deep"
        finally:
            copy.close()


def test_the_calls_ops_and_union_build_on(db: Path) -> None:
    with lmdbfs.open(str(db)) as archive:
        where = archive.locations()
        assert where.index == where.values and not where.adopted and where.offsets_ok
        assert where.values.data_file == str(db) and archive.data_bytes == db.stat().st_size
        assert archive.index_stat()["psize"] >= 4096 and archive.index_stat()["depth"] >= 1
        assert archive.record("a").names == ["1.txt", "big.bin", "escape"] and archive.record("a/1.txt") is None
        big = archive.lstat("a/big.bin")
        assert archive.read_range("a/big.bin", big, 5, 7) == FILES["a/big.bin"][5:12]
