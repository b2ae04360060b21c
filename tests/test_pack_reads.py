"""How the packer reads a folder: a chunk of files per call in C, and what happens when
a file is not what the scan listed by the time it is read."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import lmdbfs
from lmdbfs.errors import SourceError
from lmdbfs.pack import packer
from lmdbfs.pack.sources import FolderSource


def _tree(root: Path) -> dict[str, bytes]:
    files = {f"d{k}/f{n:03d}.bin": os.urandom(n * 37 + k) for k in range(3) for n in range(40)}
    files["top.txt"] = b""
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_read_many_reads_exact_bytes_and_flags_what_changed(tmp_path: Path) -> None:
    files = _tree(tmp_path / "src")
    reader = FolderSource(str(tmp_path / "src"), []).reader()
    rels = sorted(files)
    sizes = [len(files[r]) for r in rels]
    got = reader.read_many(rels, sizes)
    for rel, item in zip(rels, got):
        assert isinstance(item, tuple), rel
        data, mtime = item
        assert data == files[rel], rel
        assert mtime == os.stat(tmp_path / "src" / rel).st_mtime_ns
    # listed size wrong (the file changed since the scan): handed back for a re-read
    sizes[3] += 1
    (tmp_path / "src" / rels[5]).unlink()
    (tmp_path / "src" / rels[7]).chmod(0)
    got = reader.read_many(rels, sizes)
    assert got[3] is None
    assert isinstance(got[5], OSError) and got[5].errno == errno.ENOENT
    assert got[4] == (files[rels[4]], os.stat(tmp_path / "src" / rels[4]).st_mtime_ns)
    # a file swapped for a FIFO is refused at once, not waited on
    fifo = tmp_path / "src" / rels[9]
    fifo.unlink()
    os.mkfifo(fifo)
    got = reader.read_many(rels, sizes)
    assert isinstance(got[9], OSError) and got[9].errno == errno.EINVAL
    assert got[9].strerror == "no longer a regular file"
    if os.geteuid() != 0:  # root reads mode-0 files
        assert isinstance(got[7], OSError) and got[7].errno == errno.EACCES


def test_a_file_that_grows_after_the_scan_is_stored_as_read(tmp_path: Path, monkeypatch, caplog) -> None:
    files = _tree(tmp_path / "src")
    grown = "d1/f010.bin"
    real = packer.read_in_order

    def change_then_read(*args, **kwargs):
        (tmp_path / "src" / grown).write_bytes(files[grown] + b"more bytes")
        yield from real(*args, **kwargs)

    monkeypatch.setattr(packer, "read_in_order", change_then_read)
    with caplog.at_level("WARNING"):
        packer.pack(str(tmp_path / "src"), str(tmp_path / "a.lmdb"), packer.PackOptions(progress=False))
    assert any(grown in r.getMessage() and "changed while being packed" in r.getMessage() for r in caplog.records)
    with lmdbfs.open(str(tmp_path / "a.lmdb")) as db:
        assert db.read_bytes(grown) == files[grown] + b"more bytes"
        for rel, data in files.items():
            if rel != grown:
                assert db.read_bytes(rel) == data, rel


def test_a_file_that_vanishes_after_the_scan_is_named(tmp_path: Path, monkeypatch) -> None:
    files = _tree(tmp_path / "src")
    gone = "d2/f005.bin"
    real = packer.read_in_order

    def remove_then_read(*args, **kwargs):
        (tmp_path / "src" / gone).unlink()
        yield from real(*args, **kwargs)

    monkeypatch.setattr(packer, "read_in_order", remove_then_read)
    with pytest.raises(SourceError, match=f"cannot read {gone}"):
        packer.pack(str(tmp_path / "src"), str(tmp_path / "a.lmdb"), packer.PackOptions(progress=False))
    assert len(files) > 1
