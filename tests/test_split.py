"""Files stored as several values (format.FLAG_SPLIT), read by every reader, with the
split made small: files over 2 MiB become pieces of 1 MiB + 12,345 bytes (so pieces
fall across the packer's 1 MiB reads and the mount's reads). tests/test_huge.py packs a
real file over LMDB's 4 GiB value limit; this one checks the same code at every edge
cheaply: reads across pieces, the keys a user's own LMDB code sees, pieces found by key
when the offsets no longer hold, and a missing or damaged piece answering EIO."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import lmdb
import numpy as np
import pytest

import lmdbfs
from lmdbfs.errors import CorruptValue
from lmdbfs.format.records import FLAG_SPLIT, SPLIT_VERSION, checksum, piece_key, split_table
from lmdbfs.pack import feed, packer, scan
from lmdbfs.pack.packer import PackOptions, pack
from lmdbfs.read.ops import unpack
from lmdbfs.read.verify import verify

from .conftest import one_error_line, run_cli
from .hostile import edit_row
from .servers import nginx

PIECE = (1 << 20) + 12345
DATA = np.random.default_rng(23).integers(0, 256, 5 * PIECE + 4567, dtype=np.uint8).tobytes()
MEMBER = DATA[: 3 * PIECE - 5]


@pytest.fixture(scope="module")
def packed_split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """One DB of a folder and a zip, each with a file over the (lowered) split size,
    packed once; each test gets a copy of it (`split_db`)."""
    root = tmp_path_factory.mktemp("split")
    tree = root / "tree"
    tree.mkdir()
    (tree / "big.bin").write_bytes(DATA)
    (tree / "small.txt").write_bytes(b"small\n")
    zipped = root / "z.zip"
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("member.bin", MEMBER)
    db = root / "split.db"
    sources = [str(tree), f"z={zipped}"]
    with pytest.MonkeyPatch.context() as patch:  # split files over 2 MiB, in pieces of PIECE bytes
        patch.setattr(feed, "LARGE_BYTES", 1 << 20)
        patch.setattr(scan, "SPLIT_ABOVE", 2 << 20)
        patch.setattr(packer, "SPLIT_ABOVE", 2 << 20)
        patch.setattr(scan, "SPLIT_PIECE", PIECE)
        pack(sources, str(db), PackOptions(progress=False))
        with lmdbfs.open(str(db)) as fs:  # verify --against scans the sources as packed
            report = verify(fs, sources)
    assert report.ok and report.checked == 3, report.problems
    return db, sources


@pytest.fixture
def split_db(packed_split: tuple[Path, list[str]], tmp_path: Path) -> tuple[Path, list[str]]:
    db, sources = packed_split
    copy = tmp_path / "split.db"
    shutil.copyfile(db, copy)
    return copy, sources


def _edit(db: Path, change) -> None:
    """A write transaction of our own: the DB's last transaction id moves on, so the
    recorded offsets no longer hold and readers look pieces up by key."""
    env = lmdb.open(str(db), subdir=False, max_dbs=4, lock=False)
    with env.begin(write=True) as txn:
        change(txn)
    env.close()


def test_split_files_read_back_through_every_reader(split_db, tmp_path: Path, mount_db) -> None:
    db, _ = split_db
    with lmdbfs.open(str(db)) as fs:
        assert fs.meta.format_version == SPLIT_VERSION
        entry = fs.stat("big.bin")
        assert entry.pieces is not None and entry.pieces[0] == PIECE and len(entry.pieces) == 1 + 6
        assert all(entry.pieces[1:])  # every piece's offset recorded
        assert fs.read_bytes("big.bin") == DATA and fs.read_bytes("z/member.bin") == MEMBER
        for at in (PIECE - 1, PIECE - 100, 2 * PIECE - 7, 5 * PIECE):  # reads across pieces
            assert fs.read("big.bin", 300, at) == DATA[at : at + 300]
        with fs.open("big.bin") as fh:
            fh.seek(3 * PIECE - 10)
            assert fh.read(PIECE + 20) == DATA[3 * PIECE - 10 : 4 * PIECE + 10]
        assert b"".join(fs.read_pieces("z/member.bin")) == MEMBER
        with pytest.raises(lmdbfs.LmdbfsError, match="stored in pieces"):
            fs.value_view("big.bin", entry)
        key = fs.key_of("big.bin")
    # What a user's own LMDB code sees: nothing under the file's key; its pieces right
    # after it, in key order.
    env = lmdb.open(str(db), subdir=False, readonly=True, lock=False, max_dbs=4)
    with env.begin() as txn:
        assert txn.get(hashlib.md5(b"big.bin").digest()) is None and key == hashlib.md5(b"big.bin").digest()
        cur = txn.cursor()
        assert cur.set_range(key)
        pieces = []
        for k, v in cur:
            if not k.startswith(key + b"\0"):
                break
            pieces.append((k, bytes(v)))
        assert [k for k, _ in pieces] == [piece_key(key, n) for n in range(6)]
        assert b"".join(v for _, v in pieces) == DATA
    env.close()
    out = tmp_path / "out"
    with lmdbfs.open(str(db)) as fs:
        unpack(fs, str(out))
    assert (out / "big.bin").read_bytes() == DATA and (out / "z" / "member.bin").read_bytes() == MEMBER
    cat = subprocess.run([sys.executable, "-m", "lmdbfs", "cat", str(db), "big.bin"], capture_output=True)
    assert cat.returncode == 0 and cat.stdout == DATA
    mnt = mount_db(db)
    fd = os.open(mnt.mnt / "big.bin", os.O_RDONLY)
    try:  # the first reads cross pieces, before the page cache holds anything
        for at in (2 * PIECE - 4096, PIECE - 1):
            assert os.pread(fd, 64 << 10, at) == DATA[at : at + (64 << 10)]
    finally:
        os.close(fd)
    assert (mnt.mnt / "big.bin").read_bytes() == DATA
    assert (mnt.mnt / "z" / "member.bin").read_bytes() == MEMBER


def test_pieces_are_found_by_key_when_offsets_no_longer_hold(split_db, mount_db) -> None:
    db, _ = split_db
    _edit(db, lambda txn: txn.put(b"unrelated", b"x"))
    with lmdbfs.open(str(db)) as fs:
        assert not fs.locations().offsets_ok
        assert fs.read("big.bin", 500, 4 * PIECE - 250) == DATA[4 * PIECE - 250 : 4 * PIECE + 250]
        assert fs.read_bytes("big.bin") == DATA
    mnt = mount_db(db)
    assert (mnt.mnt / "big.bin").read_bytes() == DATA


def test_a_missing_piece_is_one_line_and_eio(split_db, mount_db) -> None:
    db, _ = split_db
    with lmdbfs.open(str(db)) as fs:
        key = fs.key_of("big.bin")
    _edit(db, lambda txn: txn.delete(piece_key(key, 2)))
    with lmdbfs.open(str(db)) as fs:
        assert fs.read("big.bin", 100, 0) == DATA[:100]  # pieces before it still read
        with pytest.raises(CorruptValue, match="piece 2 of its contents is missing"):
            fs.read_bytes("big.bin")
    line = one_error_line(run_cli("cat", db, "big.bin", check=False))
    assert "piece 2" in line, line
    proc = run_cli("verify", db, check=False)
    assert proc.returncode != 0 and "big.bin: piece 2 of its contents is missing" in proc.stdout + proc.stderr
    mnt = mount_db(db)
    with pytest.raises(OSError) as err:
        (mnt.mnt / "big.bin").read_bytes()
    assert err.value.errno == errno.EIO
    assert (mnt.mnt / "small.txt").read_bytes() == b"small\n"


def test_a_damaged_piece_is_never_served(split_db, mount_db) -> None:
    db, _ = split_db
    with lmdbfs.open(str(db)) as fs:
        at = fs.stat("big.bin").pieces[1 + 3] + 77  # inside piece 3
    with open(db, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0xFF]))
    proc = run_cli("verify", db, check=False)
    assert proc.returncode != 0 and "big.bin: checksum mismatch" in proc.stdout + proc.stderr
    mnt = mount_db(db)
    with pytest.raises(OSError) as err:
        (mnt.mnt / "big.bin").read_bytes()
    assert err.value.errno == errno.EIO


def test_a_remote_db_serves_split_files(split_db, tmp_path: Path, mount_db) -> None:
    """Over HTTP (nginx), through the block cache: the reader and the mount read the
    pieces at the offsets of the piece table, across pieces too."""
    db, _ = split_db
    with nginx(tmp_path / "www") as web:
        url = web.put(db, "sets/split.db")
        cache = tmp_path / "cache"
        cat = subprocess.run(
            [sys.executable, "-m", "lmdbfs", "cat", url, "big.bin", "--cache-dir", str(cache)], capture_output=True
        )
        assert cat.returncode == 0 and cat.stdout == DATA, cat.stderr
        assert web.bytes_sent() <= 1.2 * os.path.getsize(db)
        web.reset()
        mnt = mount_db(url, "--cache-dir", tmp_path / "cache2")
        fd = os.open(mnt.mnt / "big.bin", os.O_RDONLY)
        try:
            assert os.pread(fd, 64 << 10, 3 * PIECE - 5000) == DATA[3 * PIECE - 5000 : 3 * PIECE - 5000 + (64 << 10)]
        finally:
            os.close(fd)
        assert (mnt.mnt / "big.bin").read_bytes() == DATA
        assert (mnt.mnt / "z" / "member.bin").read_bytes() == MEMBER
        assert web.bytes_sent() <= 1.2 * os.path.getsize(db)


def test_an_empty_split_file_reads_as_empty(split_db, mount_db) -> None:
    """A crafted row: split, no pieces (its table holds the piece size only). Both readers
    answer no bytes, and the server reads nothing past the table."""
    db, _ = split_db
    edit_row(db, "", b"big.bin", target=split_table(0, [], PIECE), size=0, checksum=checksum(b""), flags=FLAG_SPLIT)
    with lmdbfs.open(str(db)) as fs:
        assert fs.stat("big.bin").pieces == (PIECE,) and fs.read_bytes("big.bin") == b""
    mnt = mount_db(db)
    assert (mnt.mnt / "big.bin").read_bytes() == b""
    assert (mnt.mnt / "small.txt").read_bytes() == b"small\n"
