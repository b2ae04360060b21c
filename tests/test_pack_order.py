"""Pack order and inline values: what a packed DB promises about where bytes lie."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import lmdbfs
from lmdbfs.format.records import FLAG_INLINE, INLINE_MAX

from .conftest import run_cli

pytestmark = pytest.mark.slow  # packs real trees

SIZES = [0, 1, 100, 2000, 2013, 2014, 2015, 2016, 2047, 2048, 2049, 2050, 2100, 4079, 4080, 4096, 5000, 70_000]


def _boundary_tree(root: Path) -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    files = {}
    for seq in range(3):
        for n, size in enumerate(SIZES):
            rel = f"seq{seq}/{n:08d}.bin"
            files[rel] = rng.bytes(size)
    files["top.txt"] = b"x" * 3000
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_every_file_is_inline_or_has_an_offset(tmp_path: Path) -> None:
    """Around the 2 KB boundary, each file is either carried in its record or has a
    valid recorded offset; a pread there returns its bytes."""
    src = tmp_path / "src"
    files = _boundary_tree(src)
    db = tmp_path / "b.lmdb"
    run_cli("pack", src, db, "--no-progress")
    with lmdbfs.open(db) as archive:
        assert archive._h().offsets_ok
        fd = archive.data_fd
        for rel, data in files.items():
            entry = archive.lstat(rel)
            inline = archive.dir_record(os.path.dirname(rel)).rows["flags"][
                archive.dir_record(os.path.dirname(rel)).index_of(os.path.basename(rel))
            ]
            if len(data) <= INLINE_MAX:
                assert inline & FLAG_INLINE and entry.inline == data, rel
            else:
                assert not inline & FLAG_INLINE and entry.inline is None, rel
                assert entry.data_off and entry.data_off % 4096 == 16, (rel, entry.data_off)
                assert os.pread(fd, len(data), entry.data_off) == data, rel
            assert archive.read_bytes(rel) == data
    run_cli("verify", db, "--against", src)


def test_values_lie_in_directory_order(tmp_path: Path) -> None:
    """A sequence's frames are stored one after the other, in name order, so a reader
    sampling several frames of one sequence reads nearby bytes."""
    src = tmp_path / "src"
    rng = np.random.default_rng(5)
    for seq in range(4):
        for n in range(20):
            (src / f"seq{seq}").mkdir(parents=True, exist_ok=True)
            (src / f"seq{seq}" / f"{n:08d}.jpg").write_bytes(rng.bytes(int(rng.integers(5000, 60000))))
    db = tmp_path / "o.lmdb"
    run_cli("pack", src, db, "--no-progress")
    with lmdbfs.open(db) as archive:
        offsets = [archive.lstat(f"seq{s}/{n:08d}.jpg").data_off for s in range(4) for n in range(20)]
    assert offsets == sorted(offsets), "values follow the walk order"
    sizes = [os.path.getsize(src / f"seq{s}" / f"{n:08d}.jpg") for s in range(4) for n in range(20)]
    pages = sum((size + 16 + 4095) // 4096 for size in sizes)  # overflow values take whole pages
    span_pages = (offsets[-1] - offsets[0]) // 4096 + (sizes[-1] + 16 + 4095) // 4096
    assert span_pages <= pages + 4, "values are contiguous: only a few B-tree pages in between"
