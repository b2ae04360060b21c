"""Constants shared by the benchmark's modules: paths, systems, phases, tree sizes, targets."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("bench")

# this file is scripts/benchkit/config.py: three levels below the repo root
REPO = Path(__file__).resolve().parent.parent.parent
SCRIPTS = REPO / "scripts"
DEFAULT_WORKDIR = Path(os.environ.get("LMDBFS_BENCH_WORKDIR", "/var/tmp/lmdbfs-bench"))
ALL_SYSTEMS = (
    "native",
    "lmdbfs",
    "lmdbfs-devfuse",
    "lmdbfs-py",
    "squashfs",
    "squashfuse",
    "ratarmount",
    "tar",
    "seed",
)
MOUNTED = ("lmdbfs", "lmdbfs-devfuse", "lmdbfs-py", "squashfs", "squashfuse", "ratarmount")
# need --old-lmdbfs / root, or only time a yardstick / the other transport: when named
OPT_IN = ("lmdbfs-devfuse", "lmdbfs-py", "squashfs", "tar")
URING_PARAM = Path("/sys/module/fuse/parameters/enable_uring")
# first/steady/cold: every file once, uniform random order. seq-*: trackers' pattern, a
# random sequence then SEQ_RUN consecutive frames of it. pil: a warm epoch decoding a
# sample of the JPEGs with PIL (what a loader spends per frame beside the read).
PHASES = ("first", "steady", "cold", "seq-steady", "seq-cold", "pil", "walk-read")
# run in interleaved rounds across systems, each on a fresh mount; the digit offsets its seed.
# steady rides on the first epoch's mount: the third epoch there, the second untimed.
ROUND_PHASES = {"cold": 3, "walk-read": 7, "first": 1, "steady": 2}
SEQ_RUN = 8
PIL_SAMPLE = 2000
SIZE_ORDER = ("smoke", "medium", "full")

# Tree shapes.  ``seqs`` is per split as make_fake_got10k understands it.
SIZES: dict[str, dict[str, Any]] = {
    "smoke": dict(
        seqs=2,
        frames=6,
        splits=("train", "val"),
        tiny=True,
        readers=(1, 2),
        repeat=1,
        rounds=1,
        pack_rounds=1,
        sample=None,
        verify_sample=None,
        note="a few dozen tiny files: checks the harness, numbers mean nothing",
    ),
    "medium": dict(
        seqs=44,
        frames=150,
        splits=("train", "val", "test"),
        tiny=False,
        readers=(1, 2, 4),
        repeat=3,
        rounds=3,
        pack_rounds=3,
        sample=None,
        verify_sample=None,
        note="~20k files, ~3.5 GB, frames 35-400 KB",
    ),
    "full": dict(
        seqs=9335,
        frames=150,
        splits=("train",),
        tiny=True,
        readers=(2,),
        repeat=1,
        rounds=3,
        pack_rounds=1,
        sample=100_000,
        verify_sample=20_000,
        note="9,335 sequences x 150 tiny frames: the real GOT-10k train file count",
    ),
}

# (key, description, size where the target applies, comparison, threshold)
TARGETS: list[tuple[str, str, tuple[str, ...], str, float]] = [
    (
        "pack_vs_squashfs",
        "pack time to a durable output (runs before 2026-11-26: to the exit), lmdbfs / mksquashfs",
        ("medium",),
        "<=",
        1.0,
    ),
    (
        "pack_vs_tar",
        "pack time to a durable output (runs before 2026-11-26: to the exit), lmdbfs / tar cf",
        ("full",),
        "<=",
        1.0,
    ),
    # the packers' own exit: mksquashfs and tar return with their output still in the page cache
    ("pack_returned_vs_squashfs", "pack time to the packer's exit, lmdbfs / mksquashfs", (), "<=", 1.0),
    ("pack_returned_vs_tar", "pack time to the packer's exit, lmdbfs / tar cf", (), "<=", 1.0),
    ("seed_vs_pack", "pack speed-up vs seed converter (seed time / lmdbfs time)", ("medium", "full"), ">=", 10.0),
    ("pack_rss", "lmdbfs pack peak anon RSS, all processes (MB)", ("medium", "full"), "<=", 1024.0),
    ("first_vs_squashfuse", "first epoch files/s lmdbfs / squashfuse (2 readers)", ("medium",), ">=", 2.5),
    ("first_vs_ratarmount", "first epoch files/s lmdbfs / ratarmount (2 readers)", ("medium",), ">=", 4.0),
    ("steady_vs_native", "steady epoch files/s lmdbfs / native (2 readers)", ("medium",), ">=", 0.75),
    ("cold_vs_native", "cold-cache epoch files/s lmdbfs / native (2 readers)", ("medium",), ">=", 0.9),
    ("cold8_vs_native", "cold-cache epoch files/s lmdbfs / native (8 readers)", ("medium", "full"), ">=", 0.9),
    ("cold16_vs_native", "cold-cache epoch files/s lmdbfs / native (16 readers)", ("medium", "full"), ">=", 0.9),
    ("cold16_vs_cold1", "cold-cache epoch files/s lmdbfs, 16 readers / 1 reader", ("medium", "full"), ">=", 1.5),
    ("first8_vs_squashfs", "first epoch files/s lmdbfs / kernel squashfs (8 readers)", ("medium",), ">=", 2.0),
    ("steady8_vs_native", "steady epoch files/s lmdbfs / native (8 readers)", ("medium",), ">=", 0.9),
    (
        "walkread8_vs_native",
        "random reads after a cold walk, files/s lmdbfs / native (8 readers)",
        ("full",),
        ">=",
        0.8,
    ),
    ("walk_cold_vs_native", "walk+stat time, cold, lmdbfs / native", ("medium", "full"), "<=", 2.0),
    ("walk_warm_vs_native", "walk+stat time, warm, lmdbfs / native", ("medium", "full"), "<=", 2.0),
    ("mount_s", "lmdbfs mount time, cold (s)", ("full",), "<", 0.5),
    ("daemon_rss", "lmdbfs daemon VmRSS after the epoch (MB)", ("full",), "<=", 100.0),
    # VmRSS counts the DB file's page-cache pages the daemon has mapped (shared, reclaimable);
    # anon memory is what the daemon itself allocates.
    ("daemon_anon", "lmdbfs daemon RssAnon after the epoch (MB; VmRSS less mapped DB pages)", ("full",), "<=", 100.0),
]
