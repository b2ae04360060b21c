#!/usr/bin/env python3
"""Steady epochs through the mount and native, opening files the two ways CPython does.

Up to 3.13, `open(path, "rb")` asks `isatty()` of every file, an IOCTL that FUSE forwards
to the daemon every time; 3.14 knows from the open's own fstat that a regular file is no
terminal and asks nothing (`FileIO._isatty_open_only`). A buffer size given to open()
takes that path on older Pythons too, which is how the "3.14" epochs are read here.

Uses the benchmark's tree and DB (run `scripts/bench.py --size SIZE` once first). Per
round, each system in turn (the order rotating): its files read once into the page
cache, a fresh mount, two untimed epochs (the pages come in, then are activated, as
native's warm-up did), then timed epochs: default open(), 3.14's open(), default again.
Prints the medians of the rounds side by side.

    python scripts/bench_open.py [--size medium] [--readers 8] [--rounds 3] [--sample 100000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.config import DEFAULT_WORKDIR  # noqa: E402 - after the path insert
from benchkit.proc import warm_files  # noqa: E402
from benchkit.readers import read_epoch  # noqa: E402

EPOCHS = (("3.11-3.13 open()", "fs"), ("3.14 open()", "fs314"), ("3.11-3.13 open(), again", "fs"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="medium")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--readers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sample", type=int, default=100_000, help="files per epoch at most (a seeded sample)")
    a = ap.parse_args()
    tree = a.workdir / "trees" / a.size
    db = a.workdir / "artifacts" / a.size / "tree.lmdb"
    mnt = a.workdir / "mnt" / "bench_open"
    if not tree.is_dir() or not db.exists():
        print(f"no {a.size} tree or DB under {a.workdir}: run scripts/bench.py --size {a.size} first", file=sys.stderr)
        return 2
    mnt.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file())
    if len(files) > a.sample:
        files = sorted(random.Random(0).sample(files, a.sample))
    rates: dict[tuple[str, str], list[float]] = {}
    for k in range(a.rounds):
        for system in ("native", "lmdbfs") if k % 2 == 0 else ("lmdbfs", "native"):
            if system == "native":
                warm_files(tree / rel for rel in files)
                root = tree
            else:
                warm_files([db])
                subprocess.run([sys.executable, "-m", "lmdbfs", "mount", str(db), str(mnt)], check=True)
                root = mnt
            try:
                for seed in (1, 2):
                    read_epoch("fs", root, files, a.readers, 100 * k + seed, 600)
                for n, (label, mode) in enumerate(EPOCHS):
                    got = read_epoch(mode, root, files, a.readers, 100 * k + 3 + n, 600)["files_per_s"]
                    rates.setdefault((system, label), []).append(got)
                    print(f"round {k + 1}, {system}, {label}: {got:,.0f} files/s", flush=True)
            finally:
                if system == "lmdbfs":
                    subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
                    time.sleep(0.3)
    print(f"\n{a.size}, {len(files):,} files, {a.readers} readers, medians of {a.rounds} interleaved rounds (files/s)")
    print("| open() as | lmdbfs | native | ratio |\n|---|---|---|---|")
    for label, _mode in EPOCHS:
        ours, theirs = (statistics.median(rates[(s, label)]) for s in ("lmdbfs", "native"))
        print(f"| {label} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
