"""What a mount reads of a DB (lmdbfs/remote/served.py): the records' and the values'
block runs the stream of an epoch brings, on a real packed DB, and a hostile record
that must cost neither an exception nor its claimed gigabytes."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np

from lmdbfs.format.records import DIR_HEADER, DIR_MAGIC
from lmdbfs.remote.prefetch import LocalIndex, walk
from lmdbfs.remote.served import Spread, value_runs
from tests.test_remote import cli

BLOCK = 256 << 10


def _blocks(runs: list[tuple[int, int]]) -> set[int]:
    return {b for lo, hi in runs for b in range(lo, hi)}


def test_the_runs_hold_every_file_the_mount_reads_and_not_the_md5_copies(tmp_path: Path) -> None:
    """A tree of large frames and tiny labels: every large file's bytes lie in the value
    runs; every tiny file's record copy in the records' runs. Tiny files' md5 copies lie
    in blocks of neither (but the few they share with a record or a value)."""
    rng = random.Random(3)
    tree = tmp_path / "src"
    for d in range(6):
        seq = tree / f"seq{d}"
        seq.mkdir(parents=True)
        for f in range(8):
            (seq / f"{f:08d}.jpg").write_bytes(rng.randbytes(90_000))
        for f in range(300):
            (seq / f"{f:08d}.label").write_bytes(rng.randbytes(1500))
    db = tmp_path / "tree.lmdb"
    cli("pack", tree, db, "--no-progress")
    data = db.read_bytes()
    fd = os.open(db, os.O_RDONLY)
    try:
        records = walk(LocalIndex(fd, len(data), str(db)))
        values = value_runs(fd, len(data), np.array(records, dtype=np.uint64), BLOCK)
    finally:
        os.close(fd)
    assert values is not None
    record_blocks = {b for lo, hi in records for b in range(lo // BLOCK, (hi - 1) // BLOCK + 1)}
    value_blocks = _blocks(values)
    served = record_blocks | value_blocks
    md5_only = 0
    for path in sorted(tree.rglob("*")):
        if not path.is_file():
            continue
        body = path.read_bytes()
        at, places = data.find(body), []
        while at >= 0:
            places.append((at // BLOCK, (at + len(body) - 1) // BLOCK))
            at = data.find(body, at + 1)
        if path.suffix == ".jpg":
            assert any(set(range(a, b + 1)) <= value_blocks for a, b in places), path
        else:
            assert any(set(range(a, b + 1)) <= record_blocks for a, b in places), path
            md5_only += any(not set(range(a, b + 1)) & served for a, b in places)
    assert md5_only > 0.6 * 6 * 300  # most md5 copies of the labels are left to the readers by key
    assert len(values) <= 6 * 2  # a run or two per directory, not a span per file


def test_a_hostile_record_costs_nothing(tmp_path: Path) -> None:
    """A record claiming a billion rows (or rows past its span) is skipped: no exception,
    no read of its claimed size."""
    path = tmp_path / "hostile"
    head = DIR_HEADER.pack(DIR_MAGIC, 1_000_000_000, 0, 0)
    path.write_bytes(head + bytes(BLOCK))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert value_runs(fd, BLOCK + len(head), np.array([(0, BLOCK)], dtype=np.uint64), BLOCK) == []
    finally:
        os.close(fd)


def test_the_spread_is_measured_over_the_runs_alone() -> None:
    spread = Spread([(100, 110), (0, 10), (5, 12)], regions=4, share=256)
    assert spread.total == 22 and spread.regions == 4 and spread.need == 2
    assert [spread.slice(b) for b in (0, 11, 12, 50, 100, 109, 110)] == [0, 2, None, None, 2, 3, None]
