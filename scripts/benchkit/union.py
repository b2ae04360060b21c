"""``--union-dbs N``: one mount of 1 DB against one mount of the same files as N shard DBs."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from .proc import now, proc_status, run, warm_files
from .readers import read_epoch
from .trees import find_daemon, fuse_unmount, walk_stat


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _union_run(mnt: Path, dbs: list[Path], files: dict[str, int], readers: int, timeout: float) -> dict[str, float]:
    """One fresh mount of ``dbs``: mount time, walk+stat, a first epoch, daemon memory."""
    warm_files(dbs)
    mnt.mkdir(exist_ok=True)
    t0 = now()
    run([sys.executable, "-m", "lmdbfs", "mount", *map(str, dbs), str(mnt)], timeout=timeout)
    mount_s = now() - t0
    try:
        walk_s, seen, _ = walk_stat(mnt)
        if seen != files:
            raise RuntimeError(f"{mnt}: the mount does not list the source's files")
        epoch = read_epoch("fs", mnt, sorted(files), readers, 0, timeout)
        daemon = find_daemon(mnt)
        status = proc_status(daemon) if daemon else {}
        cpu_s = _cpu_seconds(daemon) if daemon else 0.0
    finally:
        fuse_unmount(mnt)
    return {
        "daemon_cpu_ms_per_1k_files": 1e6 * cpu_s / max(1, len(files)),  # steadier than wall time when busy
        "mount_s": mount_s,
        "walk_s": walk_s,
        "files_per_s": epoch["files_per_s"],
        "rss_mb": status.get("VmRSS", 0) / 1024,
        "anon_mb": status.get("RssAnon", 0) / 1024,
    }


def union_scaling(
    workdir: Path, src: Path, nshards: int, readers: int, timeout: float, rounds: int = 3
) -> dict[str, Any]:
    """One mount of 1 DB vs one mount of the same files packed as ``nshards`` DBs
    (`lmdbfs pack --shard I/N`): mount time, walk+stat, a first epoch (fresh mount,
    DB files in the page cache) and the daemon's memory, side by side."""
    work = workdir / "union"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    lmdbfs = [sys.executable, "-m", "lmdbfs"]
    one = work / "one.lmdb"
    run([*lmdbfs, "pack", str(src), str(one), "--no-progress"], timeout=timeout)
    shards = [work / f"shard.{i}.lmdb" for i in range(nshards)]
    for i, db in enumerate(shards):
        run([*lmdbfs, "pack", "--shard", f"{i}/{nshards}", str(src), str(db), "--no-progress"], timeout=timeout)
    files = walk_stat(src)[1]
    out: dict[str, Any] = {"files": len(files), "bytes": sum(files.values()), "shards": nshards, "runs": {}}
    samples: dict[str, list[dict[str, float]]] = {}
    for _round in range(rounds):  # alternating, the median of each: shared machines are noisy
        for label, dbs in (("1 DB", [one]), (f"{nshards} DBs", shards)):
            samples.setdefault(label, []).append(_union_run(work / "mnt", dbs, files, readers, timeout))
    for label, runs in samples.items():
        out["runs"][label] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    a, b = out["runs"].values()
    print(f"{out['files']} files, {out['bytes'] / 1e6:.0f} MB; {readers} readers; fresh mounts; median of {rounds}")
    print(f"{'':24}{'1 DB':>12}{f'{nshards} DBs':>12}{'ratio':>8}")
    for key, name in (("mount_s", "mount (s)"), ("walk_s", "walk+stat (s)"), ("files_per_s", "files/s"),
                      ("daemon_cpu_ms_per_1k_files", "daemon CPU ms/1k files"),
                      ("rss_mb", "daemon VmRSS (MB)"), ("anon_mb", "daemon RssAnon (MB)")):  # fmt: skip
        print(f"{name:24}{a[key]:12.2f}{b[key]:12.2f}{b[key] / a[key] if a[key] else float('nan'):8.2f}")
    (workdir / "results-union.json").write_text(json.dumps(out, indent=2))
    return out
