#!/usr/bin/env python3
"""Seed-style GOT-10k -> LMDB converter, kept only as a benchmark baseline.

This reproduces the converter that lmdbfs replaces, so that ``scripts/bench.py``
can report how much faster ``lmdbfs pack`` is on the same tree and machine.
It deliberately keeps the original's design choices, including the slow ones:

* keys are ``hashlib.md5(path.encode()).digest()`` (no way back to a name);
* every ``.jpg`` is decoded and re-encoded with PIL (lossy, CPU bound);
* ``.label`` files become ``np.uint8`` array bytes, ``.txt`` files become
  ``pandas.read_csv(...)`` float32 bytes, ``.ini`` files a pickle of
  ``readlines()``; anything else is stored raw;
* a ``multiprocessing.Pool(cpu_count())`` with ``imap_unordered`` and tqdm;
* one ``lmdb`` environment (a directory), one commit every 50,000 puts.

Differences from the original, both needed to run it here:

* the key is the md5 of the path *relative to SRC* (the original hashed the
  absolute path, which ties a DB to one machine; the cost is the same);
* ``map_size`` is derived from the tree size with headroom instead of the
  original's fixed 112 GB (``--map-size`` overrides it).

It is not part of the lmdbfs package and is not meant for real use.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import pickle
import sys
import time
from multiprocessing import Pool, cpu_count
from pathlib import Path

import lmdb
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

log = logging.getLogger("seed_convert")

COMMIT_EVERY = 50_000
ORIGINAL_MAP_SIZE = 112 * 1024**3  # what the seed converter hard-coded


def md5_key(rel: str) -> bytes:
    """Key of one file, as the seed converter computed it (md5 of the path)."""
    return hashlib.md5(rel.encode()).digest()


def encode_file(path: str, rel: str) -> bytes:
    """Turn one file into the value the seed converter stored for it."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jpg":
        with Image.open(path) as img:
            buf = io.BytesIO()
            img.save(buf, format="JPEG")
            return buf.getvalue()
    if ext == ".label":
        try:
            return np.loadtxt(path, dtype=np.uint8, ndmin=1).tobytes()
        except ValueError:
            pass
    elif ext == ".txt":
        try:
            return pd.read_csv(path, header=None).to_numpy(dtype=np.float32).tobytes()
        except (ValueError, pd.errors.EmptyDataError, pd.errors.ParserError):
            # list.txt (sequence names) is not numeric; the seed stored it raw.
            pass
    elif ext == ".ini":
        with open(path) as f:
            return pickle.dumps(f.readlines())
    with open(path, "rb") as f:
        return f.read()


def _work(item: tuple[str, str]) -> tuple[bytes, bytes]:
    """Pool worker: (abs path, rel path) -> (key, value)."""
    path, rel = item
    return md5_key(rel), encode_file(path, rel)


def list_files(src: Path) -> list[tuple[str, str]]:
    """All regular files under SRC as (abs path, path relative to SRC)."""
    out: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            out.append((p, os.path.relpath(p, src)))
    return out


def tree_bytes(files: list[tuple[str, str]]) -> int:
    """Total size of the files, to size the LMDB map."""
    return sum(os.path.getsize(p) for p, _ in files)


def convert(
    src: Path,
    dst: Path,
    map_size: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, float | int]:
    """Convert SRC into an LMDB environment directory DST the seed way."""
    files = list_files(src)
    if map_size is None:
        # Re-encoding can grow tiny or noisy JPEGs; leave generous headroom.
        map_size = max(64 * 1024**2, int(tree_bytes(files) * 2.0) + len(files) * 4096)
    dst.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    env = lmdb.open(str(dst), map_size=map_size)
    n = 0
    nbytes = 0
    txn = env.begin(write=True)
    with Pool(workers or cpu_count()) as pool:
        for key, value in tqdm(pool.imap_unordered(_work, files), total=len(files), disable=not progress):
            txn.put(key, value)
            n += 1
            nbytes += len(value)
            if n % COMMIT_EVERY == 0:
                txn.commit()
                txn = env.begin(write=True)
    txn.commit()
    env.sync()
    env.close()
    return {
        "files": n,
        "value_bytes": nbytes,
        "map_size": map_size,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="tree to convert")
    ap.add_argument("dst", type=Path, help="LMDB environment directory to create")
    ap.add_argument(
        "--map-size",
        type=int,
        default=None,
        help=f"LMDB map size in bytes (default: 2x tree size; the seed used {ORIGINAL_MAP_SIZE})",
    )
    ap.add_argument("--workers", type=int, default=None, help="pool size (default: cpu_count())")
    ap.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    stats = convert(args.src, args.dst, args.map_size, args.workers, not args.no_progress)
    log.info(
        "%d files, %.1f MB of values, map_size %d, %.2f s",
        stats["files"],
        stats["value_bytes"] / 1e6,
        stats["map_size"],
        stats["seconds"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
