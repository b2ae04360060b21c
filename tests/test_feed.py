"""lmdbfs/pack/feed.py: the files of a scan come back in the order asked for, from a folder
(worker threads) and from a tar (one streaming pass), with failures handed on."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from lmdbfs.pack.feed import read_in_order
from lmdbfs.pack.sources import build_scan


def _folder(root: Path, n: int = 700) -> Path:
    for i in range(n):
        (root / f"d{i % 7}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 7}" / f"f{i:04d}").write_bytes(os.urandom(i * 13 % 5000))
    return root


def _read_all(scan, order, workers: int, **kw) -> list[tuple[int, bytes | None]]:
    got = []
    for batch, _listed in read_in_order(scan, order, workers, kw.get("process", lambda i, d, m: d), kw.get("on_error")):
        got.extend(batch)
    return got


@pytest.mark.parametrize("workers", [1, 4])
def test_a_folder_is_read_in_the_order_given(tmp_path: Path, workers: int) -> None:
    src = _folder(tmp_path / "src")
    scan = build_scan([str(src)])
    order = np.random.default_rng(1).permutation(scan.files)
    got = _read_all(scan, order, workers)
    assert [i for i, _ in got] == order.tolist()
    for i, data in got:
        assert data == (src / scan.file_relpath(i)).read_bytes()


def test_a_tar_is_read_in_one_pass_in_member_order(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", 60)
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname=".")
    scan = build_scan([str(archive)])
    assert scan.sources[0].sequential
    got = _read_all(scan, np.arange(scan.files), 2)
    assert [i for i, _ in got] == list(range(scan.files))
    assert all(data == (src / scan.file_relpath(i)).read_bytes() for i, data in got)


def test_a_file_gone_since_the_scan_goes_to_on_error(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", 30)
    scan = build_scan([str(src)])
    gone = scan.file_relpath(5)
    (src / gone).unlink()
    failed = []
    got = _read_all(scan, np.arange(scan.files), 2, on_error=lambda rel, exc: failed.append((rel, type(exc))))
    assert failed == [(gone, FileNotFoundError)]
    assert [i for i, data in got if data is None] == [5]  # left out, in its place
