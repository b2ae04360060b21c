"""Side-by-side benchmark: raw tree vs lmdbfs vs SquashFS vs tar+ratarmount vs seed LMDB.

The command line and main() of scripts/bench.py.  parse_args takes --help's
description from the first line above: keep it the same as scripts/bench.py's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import random
from pathlib import Path

from .chart import make_chart
from .config import ALL_SYSTEMS, DEFAULT_WORKDIR, OPT_IN, PHASES, REPO, SIZES, URING_PARAM, log
from .machine import _git_rev, machine_info
from .phases import bench_zip_source, do_cold_rounds, do_packs, do_reads
from .proc import drop_caches, now
from .report import compute_ratios, fmt_ratio, render_doc, stored_results
from .systems import SYSTEM_CLASSES, set_fuse_io_uring
from .trees import Ctx, ensure_tree, is_mounted
from .union import union_scaling

# --------------------------------------------------------------------------- main


def render_only(out_dir: Path) -> int:
    """Rebuild the doc and charts (e.g. after editing the hand-written sections)."""
    stored = stored_results(out_dir / "benchmarks.md")
    if not stored:
        log.error("no stored results in %s", out_dir / "benchmarks.md")
        return 1
    for size, res in stored.items():
        make_chart(res, out_dir / f"bench-{size}.png")
        (out_dir / "benchmarks.md").write_text(render_doc(out_dir, res))
        print(f"\n== {size}: ratios ==")
        for r in compute_ratios(res):
            if r["verdict"] != "n/a":
                print("  " + fmt_ratio(r))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="medium")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help="trees, artifacts, mount points and the ratarmount venv (default %(default)s)",
    )
    ap.add_argument(
        "--out-dir",
        type=Path,
        default=REPO / "docs",
        help="where benchmarks.md and bench-<size>.png go (default docs/)",
    )
    ap.add_argument(
        "--systems",
        default=",".join(n for n in ALL_SYSTEMS if n not in OPT_IN),
        help=f"comma list of {','.join(ALL_SYSTEMS)} (default all but {','.join(OPT_IN)})",
    )
    ap.add_argument("--readers", default=None, help="comma list of reader process counts (default per size)")
    ap.add_argument("--phases", default=",".join(PHASES), help="comma list of " + ",".join(PHASES))
    ap.add_argument(
        "--sample",
        type=int,
        default=None,
        help="epochs read a seeded random sample of N files (default: all; full: 100000; 0 = all)",
    )
    ap.add_argument(
        "--verify-sample", type=int, default=None, help="bytes check on N files (default: all; full: 20000; 0 = all)"
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="run the warm walk N times and keep the median (default: medium 3, else 1)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="run the cold, walk-read, first and steady epochs N times, systems interleaved, and keep each median "
        "(default: medium and full 3, smoke 1)",
    )
    ap.add_argument(
        "--pack-rounds",
        type=int,
        default=None,
        help="pack N times, packers interleaved, and keep each median (default: medium 3, else 1)",
    )
    ap.add_argument(
        "--skip-pack",
        action="store_true",
        help="reuse packed artifacts in --workdir when present (their earlier pack numbers are kept)",
    )
    ap.add_argument("--no-pack", action="store_true", help="do not pack or report packing at all")
    ap.add_argument("--no-reads", action="store_true", help="pack only")
    ap.add_argument(
        "--zip-source", action="store_true", help="also time `lmdbfs pack TREE.zip` against unzip + lmdbfs pack"
    )
    ap.add_argument("--no-verify", action="store_true", help="skip the bytes check")
    ap.add_argument("--regen-tree", action="store_true", help="regenerate the fake tree even if present")
    ap.add_argument("--no-drop-caches", action="store_true", help="never drop caches ('cold' is then not cold)")
    ap.add_argument("--seed", type=int, default=0, help="tree and read-order seed")
    ap.add_argument("--gen-workers", type=int, default=os.cpu_count() or 1, help="tree generator processes")
    ap.add_argument("--pack-workers", type=int, default=None, help="--workers for lmdbfs pack (default: its own)")
    ap.add_argument("--squashfuse-bin", default="squashfuse", help="squashfuse or squashfuse_ll")
    ap.add_argument("--old-lmdbfs", help="directory holding an older lmdbfs/ package (system lmdbfs-py)")
    ap.add_argument("--ratarmount-bin", default=None, help="use this ratarmount instead of the work-dir venv")
    ap.add_argument("--ratarmount-spec", default="ratarmount", help="pip spec for the ratarmount venv")
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="per command / epoch timeout (s)")
    ap.add_argument(
        "--render-only",
        action="store_true",
        help="only rebuild benchmarks.md and the charts from the results stored in it",
    )
    ap.add_argument(
        "--union-dbs",
        type=int,
        default=None,
        metavar="N",
        help="only compare one mount of 1 DB with one of the same files as N shard DBs (source: --union-src or the --size tree)",
    )
    ap.add_argument("--union-src", type=Path, default=None, help="tree for --union-dbs")
    ap.add_argument(
        "--fuse-io-uring",
        choices=("on", "off", "asis"),
        default="on",
        help="turn the kernel's FUSE over io_uring on (default, root) or off for the run, or leave it",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    a.systems = [s for s in a.systems.split(",") if s]
    bad = set(a.systems) - set(ALL_SYSTEMS)
    if bad:
        ap.error(f"unknown systems: {sorted(bad)}")
    a.readers = [int(x) for x in a.readers.split(",")] if a.readers else list(SIZES[a.size]["readers"])
    a.phases = [p for p in a.phases.split(",") if p]
    a.repeat = max(1, a.repeat if a.repeat is not None else SIZES[a.size]["repeat"])
    a.rounds = max(1, a.rounds if a.rounds is not None else SIZES[a.size]["rounds"])
    a.pack_rounds = max(1, a.pack_rounds if a.pack_rounds is not None else SIZES[a.size]["pack_rounds"])
    if set(a.phases) - set(PHASES):
        ap.error(f"unknown phases: {a.phases}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    t_start = now()
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
    a.workdir = a.workdir.resolve()
    a.out_dir = a.out_dir.resolve()
    if a.render_only:
        return render_only(a.out_dir)
    a.workdir.mkdir(parents=True, exist_ok=True)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    # Run from the work dir: `python -m lmdbfs` from the repo root would import the
    # working tree's lmdbfs/ ahead of PYTHONPATH or the installed package.
    os.chdir(a.workdir)
    cold_ok = not a.no_drop_caches and os.geteuid() == 0
    if not a.no_drop_caches and not cold_ok:
        drop_caches(True)  # logs the warning once

    if a.union_dbs:
        src = (
            a.union_src.resolve() if a.union_src else ensure_tree(a.workdir, a.size, a.seed, a.gen_workers, False).root
        )
        union_scaling(a.workdir, src, a.union_dbs, max(a.readers), a.timeout)
        return 0
    tree = ensure_tree(a.workdir, a.size, a.seed, a.gen_workers, a.regen_tree)
    cfg = SIZES[a.size]
    sample = cfg["sample"] if a.sample is None else (a.sample or None)
    vsample = cfg["verify_sample"] if a.verify_sample is None else (a.verify_sample or None)
    all_files = tree.files
    rng = random.Random(a.seed)
    epoch_files = sorted(rng.sample(all_files, sample)) if sample and sample < len(all_files) else all_files
    verify_files = sorted(rng.sample(all_files, vsample)) if vsample and vsample < len(all_files) else all_files

    json_path = a.workdir / f"results-{a.size}.json"
    prev = stored_results(a.out_dir / "benchmarks.md").get(a.size) or (
        json.loads(json_path.read_text()) if json_path.exists() else {}
    )
    ctx = Ctx(
        args=a,
        size=a.size,
        workdir=a.workdir,
        tree=tree,
        epoch_files=epoch_files,
        verify_files=verify_files,
        cold_ok=cold_ok,
    )
    ctx.res = {
        "size": a.size,
        "started": started,
        "systems": a.systems,
        "readers": a.readers,
        "phases": a.phases,
        "cold_ok": cold_ok,
        "seed": a.seed,
        "tree": {"files": len(tree.sizes), "bytes": tree.nbytes, "dirs": tree.dirs, "gen_s": tree.gen_seconds},
        "sampled": len(epoch_files) < len(all_files),
        "epoch_files": len(epoch_files),
        "verify_files": len(verify_files),
        "pack": {},
        "walk": {},
        "mount": {},
        "epochs": [],
        "daemon_rss": {},
        "verify": {},
        "errors": {},
    }
    ctx.res["commit_at_start"] = _git_rev()
    ctx.res["fuse_io_uring"], uring_before = set_fuse_io_uring(a.fuse_io_uring)
    systems = [SYSTEM_CLASSES[n](ctx) for n in ALL_SYSTEMS if n in a.systems]
    try:
        if not a.no_pack:
            do_packs(ctx, systems, prev)
        if a.zip_source:
            try:
                ctx.res["zip_source"] = bench_zip_source(ctx)
            except Exception as e:
                log.exception("zip source failed")
                ctx.res["errors"]["zip source"] = str(e)
        if not a.no_reads:
            for s in systems:
                if not s.readable:
                    continue
                if s.name != "native" and not s.packed():
                    ctx.res["errors"].setdefault(f"{s.name} reads", "not packed")
                    continue
                try:
                    do_reads(ctx, s)
                except Exception as e:
                    log.exception("%s: reads failed", s.name)
                    ctx.res["errors"][f"{s.name} reads"] = str(e)
                    s.umount()
            readable = [
                s
                for s in systems
                if s.readable and (s.name == "native" or s.packed()) and f"{s.name} reads" not in ctx.res["errors"]
            ]
            do_cold_rounds(ctx, readable)
    finally:
        for s in systems:
            if s.mountable and is_mounted(s.mnt):
                s.umount()
        if uring_before is not None and a.fuse_io_uring != "asis":
            URING_PARAM.write_text(uring_before)

    ctx.res["machine"] = machine_info(a.workdir, ctx.ratarmount_bin if "ratarmount" in a.systems else None)
    ctx.res["elapsed_s"] = now() - t_start
    json_path.write_text(json.dumps(ctx.res, indent=1))
    make_chart(ctx.res, a.out_dir / f"bench-{a.size}.png")
    (a.out_dir / "benchmarks.md").write_text(render_doc(a.out_dir, ctx.res))
    print(f"\n== {a.size}: ratios (see {a.out_dir / 'benchmarks.md'}) ==")
    for r in compute_ratios(ctx.res):
        if r["verdict"] != "n/a":
            print("  " + fmt_ratio(r))
    if ctx.res["errors"]:
        print("errors:")
        for k, v in ctx.res["errors"].items():
            print(f"  {k}: {v[:300]}")
    return 1 if ctx.res["errors"] else 0
