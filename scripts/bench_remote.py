#!/usr/bin/env python3
"""Remote DBs side by side: local disk, lmdbfs over HTTP and S3, httpdirfs + lmdbfs, ratarmount over HTTP.

One run on one machine, so the ratios compare: the benchmark's fake GOT-10k tree (as
scripts/bench.py makes it) packed once with `lmdbfs pack` and once with `tar cf`;
nginx publishes both, SeaweedFS holds the DB; scripts/faultproxy.py sits between each
system and its server, adding round-trip time and a bandwidth cap and counting GETs
and bytes. For each case (added RTT, cap) and reader count and read pattern (uniform:
every file once in a seeded random order; seq: runs of 8 consecutive frames of a
random sequence, as trackers sample), every system reads a cold epoch on a fresh mount
and an empty cache (page cache dropped), then the cached systems a warm one on a
remount. Then N simulated nodes: N mounts, separate cache dirs, reading at once: sharing
the machine's cores, and each in a CPU budget of its own (a cgroup quota, --node-cpus), as
on machines of their own.

Results: a section of docs/benchmarks.md (kept when scripts/bench.py rewrites the
rest) and results-remote-<size>.json in the work dir.

    python scripts/bench_remote.py --size medium                   # the default matrix
    python scripts/bench_remote.py --size medium --rtt-ms 20 --readers 16 --systems local,http
    python scripts/bench_remote.py --quick                         # the smoke tree, seconds
    python scripts/bench_remote.py --size full --walk-only --tree T --db T.lmdb --rtt-ms 20 \
        --systems local,http                                       # issue 20's full-size case

"http" is the default mount (the whole-DB stream starts on its own once an epoch is
under way, docs/remote.md); "http-demand" mounts with --no-fetch-all (only what is read).

--walk (or --walk-only, without the epochs) adds issue 20's full-size case per system
at the largest RTT: mount time and GETs on an empty cache, a cold walk + lstat of every
entry (time, and the GETs it sent: none is the goal), then --random-reads files read
in a seeded random order by the most readers. --tree and --db take an existing tree
and its DB instead of generating and packing them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.config import DEFAULT_WORKDIR, REPO, log  # noqa: E402 - after the path insert
from benchkit.machine import _git_rev  # noqa: E402
from benchkit.proc import run  # noqa: E402
from benchkit.remote import REMOTE_SYSTEMS, RemoteEnv, one_run  # noqa: E402
from benchkit.remote_nodes import nodes_run  # noqa: E402
from benchkit.remote_report import ratios, verdict, write_section  # noqa: E402
from benchkit.remote_walk import walk_run  # noqa: E402
from benchkit.trees import Tree, ensure_tree, walk_stat  # noqa: E402


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("smoke", "medium", "full"), default="medium")
    ap.add_argument("--quick", action="store_true", help="the smoke tree, one small case: checks the harness")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md", help="the doc to put the section in")
    ap.add_argument("--systems", default=",".join(REMOTE_SYSTEMS), help=f"comma list of {','.join(REMOTE_SYSTEMS)}")
    ap.add_argument("--readers", default="8,16")
    ap.add_argument("--rtt-ms", default="0,5,20", help="added round-trip times, comma list")
    ap.add_argument("--patterns", default="uniform,seq")
    ap.add_argument("--cap-mbit", default="1000", help="bandwidth caps run at the largest RTT, uniform, most readers")
    ap.add_argument("--cap-systems", default="http,s3", help="systems run in the capped case")
    ap.add_argument("--nodes", type=int, default=4, help="simulated nodes (0: none)")
    ap.add_argument("--nodes-system", default="http")
    ap.add_argument(
        "--node-cpus",
        default="0,0.35",
        help="the nodes' runs, a comma list of cores per node: 0 shares this machine's cores among all, "
        "0.35 gives each node's daemon and readers a cgroup CPU quota of 0.35 core, alone as beside the others",
    )
    ap.add_argument("--sample", type=int, default=None, help="files per epoch, a seeded sample (default: all)")
    ap.add_argument(
        "--slow-sample",
        type=int,
        default=2000,
        help="files per epoch for httpdirfs and ratarmount, which are slow (0: as --sample)",
    )
    ap.add_argument("--no-warm", action="store_true", help="skip the warm-cache epochs")
    ap.add_argument("--tree", type=Path, help="an existing tree to read (instead of generating one)")
    ap.add_argument("--db", type=Path, help="an existing DB packed from --tree (instead of packing it)")
    ap.add_argument("--walk", action="store_true", help="add the mount + walk + random-reads case")
    ap.add_argument("--walk-only", action="store_true", help="only the mount + walk + random-reads case")
    ap.add_argument("--cache-size", help="--cache-size of the remote mounts (e.g. 2G; default: unbounded)")
    ap.add_argument("--random-reads", type=int, default=100_000, help="files read after the walk (a seeded sample)")
    ap.add_argument(
        "--full-matrix",
        action="store_true",
        help="every system and pattern at every RTT and reader count (default: httpdirfs, ratarmount "
        "and seq reads only at the most readers and the largest RTT)",
    )
    ap.add_argument(
        "--add",
        action="store_true",
        help="add this run's cases to the stored results of the same size (a case run again replaces "
        "its earlier figures) instead of starting afresh",
    )
    ap.add_argument("--no-drop-caches", action="store_true", help="never drop the page cache ('cold' is then not cold)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:  # each default below unless given: one small case of each kind
        given = set(argv if argv is not None else sys.argv[1:])
        a.size = "smoke"
        for flag, attr, value in (
            ("--readers", "readers", "2"),
            ("--rtt-ms", "rtt_ms", "5"),
            ("--patterns", "patterns", "uniform"),
            ("--cap-mbit", "cap_mbit", "100"),
            ("--cap-systems", "cap_systems", "http"),
            ("--nodes", "nodes", 2),
        ):
            if flag not in given:
                setattr(a, attr, value)
    a.systems = [s for s in a.systems.split(",") if s]
    bad = set(a.systems) - set(REMOTE_SYSTEMS)
    if bad:
        ap.error(f"unknown systems {sorted(bad)}; choose from {','.join(REMOTE_SYSTEMS)}")
    a.readers = [int(x) for x in a.readers.split(",")]
    a.rtts, a.caps, a.node_cpus = floats(a.rtt_ms), floats(a.cap_mbit), floats(a.node_cpus)
    a.patterns = [p for p in a.patterns.split(",") if p]
    a.cap_systems = [s for s in a.cap_systems.split(",") if s in a.systems]
    if a.db and not a.tree:
        ap.error("--db needs --tree (the files to read are listed from it)")
    a.walk = a.walk or a.walk_only
    return a


def artifacts(
    work: Path, tree_root: Path, size: str, db: Path | None = None, tar_too: bool = True
) -> tuple[Path, Path]:
    """The DB and the tar of the tree, made once per size and reused."""
    art = work / "artifacts" / size
    art.mkdir(parents=True, exist_ok=True)
    tar = art / "tree.tar"
    if db is not None:
        db = db.resolve()
    else:
        db = art / "tree.lmdb"
    if not db.exists():
        log.info("packing %s", db)
        run([sys.executable, "-m", "lmdbfs", "pack", str(tree_root), str(db), "--no-progress"], timeout=7200)
    if tar_too and not tar.exists():
        log.info("writing %s", tar)
        part = tar.with_suffix(".tar.part")
        run(["tar", "cf", str(part), "-C", str(tree_root), "."], timeout=7200)
        os.replace(part, tar)
    return db, tar


def merged(old: dict, new: dict) -> dict:
    """An earlier run's results with this run's cases added (or replacing the same cases)."""

    def key(r):
        return (r["system"], r["readers"], r["pattern"], r["rtt_ms"], r.get("mbit"))

    fresh = {key(r) for r in new["runs"]}
    out = dict(new)
    out["runs"] = [r for r in old["runs"] if key(r) not in fresh] + new["runs"]
    for field in ("systems", "readers", "rtts", "caps", "patterns"):
        out[field] = sorted(set(old.get(field, [])) | set(new[field]))
    for field in ("nodes_runs", "walk_runs", "random_reads"):
        if field not in new and field in old:
            out[field] = old[field]
    out["started"] = f"{old['started']} and {new['started']}" if old["started"] != new["started"] else new["started"]
    out["notes"] = list(dict.fromkeys(old.get("notes", []) + new["notes"]))
    return out


def write_heads(db: Path, work: Path) -> Path:
    """The DB's heads sidecar for the http-heads system: DB.heads beside it when there is
    one, else written (`lmdbfs heads`) into the work folder."""
    beside = db.with_name(db.name + ".heads")
    if beside.exists() and beside.stat().st_mtime >= db.stat().st_mtime:
        return beside
    out = work / (db.name + ".heads")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "lmdbfs", "heads", str(db), "--out", str(out)], check=True)
    log.info("wrote %s in %.1f s", out.name, time.monotonic() - t0)
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    work = a.workdir.resolve()
    a.out = Path(a.out).resolve()  # before the chdir below: --out is relative to where it was given
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # not the repo root: `python -m lmdbfs` must import the installed package
    if a.tree:
        log.info("listing %s", a.tree)
        _t, sizes, ndirs = walk_stat(a.tree.resolve())
        tree = Tree(root=a.tree.resolve(), sizes=sizes, dirs=ndirs)
    else:
        tree = ensure_tree(work, a.size, a.seed, os.cpu_count() or 1, False)
    want_tar = "ratarmount" in a.systems and not a.walk_only
    db, tar = artifacts(work, tree.root, a.size, a.db, want_tar)
    rng = random.Random(a.seed)
    files = tree.files
    epoch_files = sorted(rng.sample(files, a.sample)) if a.sample and a.sample < len(files) else files
    slow_files = (
        sorted(rng.sample(epoch_files, a.slow_sample))
        if a.slow_sample and a.slow_sample < len(epoch_files)
        else epoch_files
    )
    res = {
        "size": a.size,
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
        "commit": _git_rev(),
        "tree": {"files": len(files), "bytes": tree.nbytes, "dirs": tree.dirs},
        "load": {"start": round(os.getloadavg()[0], 1)},
        "db_bytes": db.stat().st_size,
        "epoch_files": len(epoch_files),
        "sampled": len(epoch_files) < len(files),
        "slow_files": len(slow_files),
        "systems": a.systems,
        "readers": a.readers,
        "rtts": a.rtts,
        "caps": a.caps,
        "patterns": a.patterns,
        "runs": [],
        "notes": [],
    }
    if len(slow_files) < len(epoch_files) and not a.walk_only:
        res["notes"].append(
            f"httpdirfs and ratarmount read a seeded sample of {len(slow_files):,} of the epoch's "
            "files (they are slow); their files/s compare, their totals do not."
        )
    remote_dir = work / "remote" / a.size
    heads = write_heads(db, remote_dir) if "http-heads" in a.systems else None
    env = RemoteEnv(
        remote_dir, db, tar if want_tar else None, "", "s3" in a.systems, not a.no_drop_caches, a.cache_size, heads
    )
    if a.cache_size:
        res["notes"].append(f"Remote mounts ran with --cache-size {a.cache_size}.")
    if heads is not None:
        res["notes"].append(
            f"*http-heads* is *http* with the DB's heads sidecar (`lmdbfs heads`, {heads.stat().st_size / 1e6:.0f} MB) "
            "published beside it as DB.heads; *http* has none."
        )
    if a.walk:
        res["notes"].append(
            "The remote walks read the index pages their mount has just written to the cache (still in the page "
            "cache); the local walk reads them from the DB after the page cache was dropped."
        )
    try:
        if a.walk:
            res["random_reads"] = min(a.random_reads, len(files))
            sample = rng.sample(files, res["random_reads"])
            res["walk_runs"] = []
            for system in [s for s in a.systems if s in ("local", "http", "http-heads", "http-demand", "s3")]:
                log.info(
                    "walk: %s, +%g ms, then %d random reads by %d readers",
                    system,
                    max(a.rtts),
                    len(sample),
                    max(a.readers),
                )
                r = walk_run(env, system, sample, max(a.readers), max(a.rtts), a.seed, a.timeout)
                if "walk_s" in r:
                    log.info(
                        "    mount %.2f s (%s GETs), walk %.1f s (%s GETs), %.0f random reads/s",
                        r["mount_s"],
                        r.get("mount_gets", "-"),
                        r["walk_s"],
                        r.get("walk_gets", "-"),
                        r["random"]["files_per_s"],
                    )
                res["walk_runs"].append(r)
        plan = []
        if a.walk_only:
            a.caps, a.nodes = [], 0
        top = (max(a.readers), max(a.rtts))
        for rtt in [] if a.walk_only else a.rtts:
            for readers in a.readers:
                for pattern in a.patterns:
                    for system in a.systems:
                        if system == "local" and rtt != a.rtts[0]:
                            continue  # no network: once is enough
                        # The slow baselines and the seq pattern: only at the most readers and the
                        # largest RTT (the headline case) unless --full-matrix.
                        slow = system in ("httpdirfs", "ratarmount") or (pattern != "uniform" and system != "local")
                        if slow and not a.full_matrix and (readers, rtt) != top:
                            continue
                        plan.append((system, readers, pattern, rtt, None))
        for mbit in a.caps:
            for system in a.cap_systems:
                plan.append((system, max(a.readers), "uniform", max(a.rtts), mbit))
        for i, (system, readers, pattern, rtt, mbit) in enumerate(plan, 1):
            slow = system in ("httpdirfs", "ratarmount")
            log.info(
                "[%d/%d] %s, %d readers, %s, +%g ms%s",
                i,
                len(plan),
                system,
                readers,
                pattern,
                rtt,
                f", {mbit:g} Mbit/s" if mbit else "",
            )
            r = one_run(
                env,
                system,
                slow_files if slow else epoch_files,
                readers,
                pattern,
                rtt,
                mbit,
                a.seed,
                a.timeout,
                warm=not a.no_warm,
            )
            if "cold" in r:
                log.info(
                    "    %.0f files/s cold, %s GETs/file, fetched/read %s",
                    r["cold"]["files_per_s"],
                    f"{r['cold'].get('gets_per_file', 0):.3f}",
                    f"{r['cold'].get('fetch_ratio', 0):.2f}",
                )
            res["runs"].append(r)
        if a.nodes and a.nodes_system in a.systems:
            readers = max(1, max(a.readers) // a.nodes)
            res["nodes_runs"] = []
            for cpus in a.node_cpus:
                log.info(
                    "%d nodes over %s, %d readers each, %s",
                    *(a.nodes, a.nodes_system, readers),
                    f"{cpus:g} core each" if cpus else "sharing the machine",
                )
                res["nodes_runs"].append(
                    nodes_run(
                        *(env, a.nodes_system, epoch_files, a.nodes, readers, max(a.rtts), None, a.seed, a.timeout),
                        cpus=cpus or None,
                    )
                )
    finally:
        env.close()
    res["load"]["end"] = round(os.getloadavg()[0], 1)
    json_path = work / f"results-remote-{a.size}.json"
    if a.add and json_path.exists():
        res = merged(json.loads(json_path.read_text()), res)
    json_path.write_text(json.dumps(res, indent=1))
    write_section(a.out, res)
    print(f"\n== remote, {a.size}: ratios (see {a.out}) ==")
    for what, value, cmp, target in ratios(res):
        shown = "n/a" if value is None else f"{value:.2f}"
        print(f"  {what}: {shown} (goal {cmp} {target:g}) {verdict(value, cmp, target)}")
    errors = [
        f"{r['system']} {r['readers']} {r['pattern']} +{r['rtt_ms']:g}: {r['error']}"
        for r in res["runs"]
        if "error" in r
    ]
    errors += [f"nodes: {n['error']}" for n in res.get("nodes_runs", []) if "error" in n]
    if errors:
        print("errors:")
        for e in errors:
            print("  " + e)
    return 1 if errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as e:
        print(f"bench_remote: {e}", file=sys.stderr)
        sys.exit(1)
