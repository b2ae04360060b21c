"""`lmdbfs verify`: every way a tree can differ from its DB is named, once a file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lmdb
import pytest

import lmdbfs

from .conftest import one_error_line, run_cli

pytestmark = pytest.mark.slow  # packs, damages and verifies real trees


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.write_bytes(data)
    os.chmod(path, mode)


def _rewrite_keeping_mtime(path: Path, data: bytes) -> None:
    """New bytes, same mtime: only a comparison of contents can tell."""
    st = path.lstat()
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _source(root: Path) -> None:
    seq = root / "seq"
    seq.mkdir(parents=True)
    for name in ("same.txt", "mode.txt", "mtime.txt", "gone.txt", "becomes_dir"):
        _write(seq / name, name.encode() * 3)
    _write(seq / "small.bin", b"0123456789")
    _write(seq / "size.txt", b"12345")
    _write(seq / "big.bin", bytes(range(256)) * 800)  # 200 KB: stored outside the index
    os.symlink("same.txt", seq / "link")
    (root / "olddir").mkdir()
    _write(root / "olddir" / "x.txt", b"x")


def test_verify_against_names_every_difference(tmp_path: Path) -> None:
    src, db = tmp_path / "src", tmp_path / "t.lmdb"
    _source(src)
    run_cli("pack", src, db, "--no-progress")
    assert run_cli("verify", db, "--against", src).stdout.startswith("ok: ")

    seq = src / "seq"
    os.chmod(seq / "mode.txt", 0o600)
    os.utime(seq / "mtime.txt", ns=(10**18, 10**18))
    _rewrite_keeping_mtime(seq / "small.bin", b"0123456780")
    big = bytearray((seq / "big.bin").read_bytes())
    big[150_000] ^= 0xFF
    _rewrite_keeping_mtime(seq / "big.bin", bytes(big))
    _rewrite_keeping_mtime(seq / "size.txt", b"123456789")
    (seq / "gone.txt").unlink()
    _write(seq / "new.txt", b"new")
    (seq / "becomes_dir").unlink()
    (seq / "becomes_dir").mkdir()
    st = (seq / "link").lstat()
    (seq / "link").unlink()
    os.symlink("mode.txt", seq / "link")
    os.utime(seq / "link", ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    shutil.rmtree(src / "olddir")
    (src / "newdir").mkdir()
    _write(src / "newdir" / "y.txt", b"y")

    proc = run_cli("verify", db, "--against", src, check=False)
    assert proc.returncode == 6
    assert "verify found 13 problems" in one_error_line(proc)
    assert sorted(proc.stdout.splitlines()) == sorted(
        [
            "seq/mode.txt: mode 0o644 in the DB, 0o600 in the source",
            "seq/mtime.txt: mtime differs",
            "seq/small.bin: contents differ",
            "seq/big.bin: contents differ",
            "seq/size.txt: size 5 in the DB, 9 in the source",
            f"seq/gone.txt: in the DB but not in {src}",
            "seq/new.txt: in the source but not in the DB",
            "seq/becomes_dir: kind differs (file in the DB, dir in the source)",
            "seq/link: symlink target differs",
            f"olddir: in the DB but not in {src}",
            f"olddir/x.txt: in the DB but not in {src}",
            "newdir: in the source but not in the DB",
            "newdir/y.txt: in the source but not in the DB",
        ]
    )


def test_verify_names_a_small_file_whose_keyed_copy_is_gone(tmp_path: Path) -> None:
    """The second copy of a small file (under its md5 key) is checked too. Writing to the
    DB voids its recorded offsets, so the large value is then found by its key as well."""
    src, db = tmp_path / "src", tmp_path / "t.lmdb"
    _source(src)
    run_cli("pack", src, db, "--no-progress")
    with lmdbfs.open(db) as archive:
        assert archive.lstat("seq/same.txt").inline is not None
        key = archive.key_of("seq/same.txt")
    env = lmdb.open(str(db), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        assert txn.delete(key)
    env.close()
    proc = run_cli("verify", db, check=False)
    assert proc.returncode == 6
    assert proc.stdout.splitlines() == ["seq/same.txt: listed in the index but its contents are missing"]
    assert "verify found 1 problem in" in one_error_line(proc)
