#!/usr/bin/env python3
"""How long `lmdbfs adopt` takes next to reading the DB's keys, side by side.

Builds a STARK-style LMDB directory (plain path keys, raw values; GOT-10k-like: per
sequence N frames plus 5 small annotation files), then times, cold (the DB file's
pages evicted from the page cache with posix_fadvise, this file only) and warm:

* keys only:   py-lmdb cursor walk, keys without values (the floor: B-tree pages only),
               opened as STARK opens it (readahead=False); "keys, ra" with readahead
* leaf walk:   lmdbfs.db.btree.leaves (keys + value sizes + offsets, no value page read)
* adopt:       the whole `lmdbfs adopt` (leaf walk, index build, index write)
* with values: py-lmdb cursor walk taking each value as a buffer and its len() —
               what adopt would cost through py-lmdb, which touches every value page

    python scripts/bench_adopt.py WORKDIR [--seqs 1000] [--frames 100] [--frame-kb 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np


def build(db: Path, seqs: int, frames: int, frame_kb: int) -> int:
    rng = np.random.default_rng(1)
    env = lmdb.open(str(db), map_size=1 << 40)
    txn = env.begin(write=True)
    n = 0
    names = [f"GOT-10k_Train_{i:06d}" for i in range(1, seqs + 1)]
    txn.put(b"train/list.txt", "\n".join(names).encode())
    blob = rng.bytes(frame_kb * 2048)
    for seq in names:
        for f in range(1, frames + 1):
            size = int(rng.integers(frame_kb * 512, frame_kb * 1536))
            start = int(rng.integers(0, len(blob) - size))
            txn.put(f"train/{seq}/{f:08d}.jpg".encode(), blob[start : start + size])
            n += 1
            if n % 100_000 == 0:
                txn.commit()
                txn = env.begin(write=True)
        for name, size in (
            ("groundtruth.txt", 40 * frames),
            ("absence.label", 2 * frames),
            ("cover.label", 2 * frames),
        ):
            txn.put(f"train/{seq}/{name}".encode(), b"1\n" * (size // 2))
        txn.put(f"train/{seq}/cut_by_image.label".encode(), b"0\n" * frames)
        txn.put(f"train/{seq}/meta_info.ini".encode(), b"[METAINFO]\nurl: x\n" * 8)
        n += 5
    txn.commit()
    env.close()
    return n + 1


def evict(db: Path) -> None:
    fd = os.open(db / "data.mdb", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(label: str, code: str, db: Path, cold: bool) -> float:
    """Run ``code`` in a fresh interpreter (no shared mappings), return its seconds
    (imports are done before the clock starts)."""
    if cold:
        evict(db)
    prog = (
        "import time, lmdb, sys\n"
        "from lmdbfs.db import btree\n"
        "from lmdbfs.adopt.adopt import AdoptOptions, adopt\n"
        f"db = {str(db)!r}\n"
        "t = time.perf_counter()\n" + code + "\nprint(time.perf_counter() - t)\n"
    )
    out = subprocess.run([sys.executable, "-c", prog], check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


KEYS_ONLY = """
env = lmdb.open(db, readonly=True, lock=False, readahead=False)
with env.begin() as txn:
    n = sum(1 for _ in txn.cursor().iternext(keys=True, values=False))
"""
KEYS_ONLY_RA = KEYS_ONLY.replace("readahead=False", "readahead=True")
WITH_VALUES = """
env = lmdb.open(db, readonly=True, lock=False, readahead=False)
with env.begin(buffers=True) as txn:
    n = sum(len(v) for _k, v in txn.cursor().iternext())
"""
LEAF_WALK = """
env = lmdb.open(db, readonly=True, lock=False, readahead=False)
i, s = env.info(), env.stat()
btree.leaves(db + "/data.mdb", db, s["psize"], i["last_pgno"], i["last_txnid"])
"""
ADOPT = """
adopt(db, AdoptOptions(index=db + ".bench.lmdbfs", force=True))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--seqs", type=int, default=1000)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--frame-kb", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each measurement; the median is shown")
    ap.add_argument("--keep", action="store_true", help="keep the generated DB")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    db = args.workdir / "stark_lmdb"
    if not db.exists():
        t = time.perf_counter()
        keys = build(db, args.seqs, args.frames, args.frame_kb)
        print(
            f"built {db}: {keys} keys, {os.path.getsize(db / 'data.mdb') / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s"
        )
    rows = []
    for label, code in (
        ("keys only", KEYS_ONLY),
        ("keys, ra", KEYS_ONLY_RA),
        ("leaf walk", LEAF_WALK),
        ("adopt", ADOPT),
        ("with values", WITH_VALUES),
    ):
        cold, warm = [], []
        for _ in range(args.repeat):  # medians: the machine may be shared
            cold.append(timed(label, code, db, cold=True))
            warm.append(timed(label, code, db, cold=False))
        rows.append((label, statistics.median(cold), statistics.median(warm)))
    base_cold, base_warm = rows[0][1], rows[0][2]
    print(f"{'':<12} {'cold s':>8} {'ratio':>6} {'warm s':>8} {'ratio':>6}")
    for label, cold, warm in rows:
        print(f"{label:<12} {cold:8.2f} {cold / base_cold:6.1f} {warm:8.2f} {warm / base_warm:6.1f}")
    if not args.keep:
        shutil.rmtree(db)
        for extra in (Path(str(db) + ".bench.lmdbfs"),):
            extra.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
