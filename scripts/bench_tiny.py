#!/usr/bin/env python3
"""A tree of tiny files, packed side by side: `tar cf`, `mksquashfs` (no compression, as
the main benchmark runs it), `lmdbfs pack` (keyed layout, the default) and `lmdbfs pack
--layout compact`; then both DBs mounted and read against the tree itself (native).

Pack: each packer runs from a cold cache (caches dropped before it; root only), its old
output removed before the clock starts, and is timed until its output is on disk (the
harness fsyncs the output after the packer exits, which is what a `sync` after `tar cf`
does for it, without the other writes of a shared machine); peak memory is sampled from
/proc. Rounds rotate the order; the median of the rounds is reported, with every output's
size against the tar's and every time against `tar cf`'s.

Reads (the issue's full-size measures, as scripts/bench.py's walk-read phase takes them):
caches dropped, a fresh mount, a walk + stat of every file (its time is the cold walk),
then a seeded random sample of files read by N reader processes with plain buffered
open() + read(), as loaders read. native, keyed and compact take turns in each round,
the order rotating; each keeps its median round. A sample of files is then compared
byte for byte with the tree on each mount.

    python scripts/bench_tiny.py WORKDIR [--tree DIR | --seqs 1000 --frames 150] [--rounds 2]

Without --tree a GOT-10k-shaped tree of ~2 KB frames is made in WORKDIR/tree with
`scripts/make_fake_got10k.py --thumbs` (one split: N sequences of F frames and five
annotation files). The DBs stay in WORKDIR/out (tar and squashfs outputs are deleted as
soon as their size is known); --skip-pack reads them again with the pack figures of the
earlier run's WORKDIR/bench_tiny.json; --render writes the tables of that file again.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path[:1] != [_HERE]:
    sys.path.insert(0, _HERE)

from benchkit.config import URING_PARAM  # noqa: E402
from benchkit.docblocks import replace_block  # noqa: E402
from benchkit.phases import cold_epoch, median_run, rotated  # noqa: E402
from benchkit.proc import drop_caches, run_measured  # noqa: E402
from benchkit.readers import verify_bytes  # noqa: E402
from benchkit.report import TINY_BEGIN, TINY_END  # noqa: E402
from benchkit.systems import Lmdbfs, Native, System  # noqa: E402
from benchkit.trees import Ctx, Tree, walk_stat  # noqa: E402

TAR = "tar cf"
LAYOUTS = {"lmdbfs pack": "keyed", "lmdbfs pack --layout compact": "compact"}
# the figures for the default layout of its day, on its full-size tree (8 readers)
TODAY = {"walk": 0.92, "reads": 0.74}


def _packers(tree: Path, out: Path) -> dict[str, tuple[list[str], Path]]:
    lmdbfs = [sys.executable, "-m", "lmdbfs", "pack", "--no-progress", "--force"]
    return {
        TAR: (["tar", "cf", str(out / "tree.tar"), "-C", str(tree), "."], out / "tree.tar"),
        "mksquashfs": (
            ["mksquashfs", str(tree), str(out / "tree.sqfs"), "-noappend", "-noI", "-noD", "-noF", "-noX"]
            + ["-no-progress", "-quiet"],
            out / "tree.sqfs",
        ),
        "lmdbfs pack": ([*lmdbfs, str(tree), str(out / "keyed.lmdb")], out / "keyed.lmdb"),
        "lmdbfs pack --layout compact": (
            [*lmdbfs, "--layout", "compact", str(tree), str(out / "compact.lmdb")],
            out / "compact.lmdb",
        ),
    }


def _pack_rounds(tree: Path, out: Path, rounds: int) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    packers = _packers(tree, out)
    out.mkdir(parents=True, exist_ok=True)
    for r in range(rounds):
        for name in rotated(list(packers), r):
            cmd, output = packers[name]
            output.unlink(missing_ok=True)
            Path(f"{output}.partial").unlink(missing_ok=True)
            cold = drop_caches()
            m = run_measured(cmd, timeout=3600, durable=[output], check=False)
            if m.returncode:
                raise SystemExit(f"{name} failed: {m.stderr_tail}")
            runs.setdefault(name, []).append(
                {
                    "seconds": m.seconds,
                    "returned_seconds": m.returned_seconds,
                    "bytes": os.path.getsize(output),
                    "peak_mb": m.max_rss_mb,
                    "anon_mb": m.tree_anon_mb,
                    "cold": cold,
                }
            )
            if name not in LAYOUTS:
                output.unlink()  # only the DBs are read; the disk is shared
            print(f"round {r + 1}: {name}: {runs[name][-1]}", file=sys.stderr)
    return runs


class _Layout(Lmdbfs):
    """One of the packed DBs, mounted with `lmdbfs mount` (scripts/bench.py's lmdbfs system)."""

    def __init__(self, ctx: Ctx, name: str, db: Path) -> None:
        self.name = name
        self._db = db
        super().__init__(ctx)

    @property
    def db(self) -> Path:
        return self._db


def _read_rounds(ctx: Ctx, systems: list[System], rounds: int, readers: int) -> dict[str, Any]:
    """Cold walk, then the random reads, on a fresh mount after dropping caches: every
    system in turn, the order rotating; then a bytes check on each mount."""
    got: dict[str, list[dict[str, Any]]] = {}
    for k in range(rounds):
        for s in rotated(systems, k):
            epochs, cold = cold_epoch(ctx, s, readers, "walk-read", 7000 + k)
            e = {**epochs["walk-read"], "cold": cold}
            got.setdefault(s.name, []).append(e)
            print(
                f"read round {k + 1}: {s.name}: walk {e['walk_s']:.1f} s ({e['walk_files']:,} files), "
                f"reads {e['files_per_s']:,.0f} files/s",
                file=sys.stderr,
            )
    out: dict[str, Any] = {}
    for name, es in got.items():
        out[name] = {
            "walk_s": statistics.median(e["walk_s"] for e in es),
            "walk_rounds": [round(e["walk_s"], 2) for e in es],
            "listing_ok": all(e["walk_files"] == len(ctx.tree.sizes) for e in es),
            "reads": median_run(es, "files_per_s"),
            "cold": all(e["cold"] for e in es),
        }
    for s in systems:
        if isinstance(s, Native):
            continue
        s.mount()
        try:
            out[s.name]["verify"] = verify_bytes(ctx.tree.root, s.read_root(), ctx.verify_files)
        finally:
            s.umount()
    return out


def _pack_table(runs: dict[str, list[dict]], rounds: int) -> list[str]:
    med = {
        n: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "bytes", "peak_mb", "anon_mb")}
        for n, rs in runs.items()
    }
    tar = med[TAR]
    cold = all(r["cold"] for rs in runs.values() for r in rs)
    lines = [
        f"Pack: {f'median of {rounds} rounds' if rounds > 1 else 'one round'}, each packer from a "
        f"{'cold' if cold else 'WARM (caches not dropped)'} cache, timed until its output is on disk.",
        "",
        "| packer | output | × tar's size | time (median) | × `tar cf`'s time | each round "
        "| peak RSS, largest process | peak anon RSS, all processes |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for n, m in med.items():
        each = ", ".join(f"{r['seconds']:.1f}" for r in runs[n])
        lines.append(
            f"| {n} | {m['bytes'] / 1e6:,.1f} MB | {m['bytes'] / tar['bytes']:.2f}× | {m['seconds']:.1f} s "
            f"| {m['seconds'] / tar['seconds']:.2f}× | {each} s | {m['peak_mb']:.0f} MB | {m['anon_mb']:.0f} MB |"
        )
    return lines


def _read_table(reads: dict[str, Any], rounds: int, readers: int, sample: int, verify: int) -> list[str]:
    nat = reads["native"]
    cold = all(v["cold"] for v in reads.values())
    lines = [
        f"Reads: {rounds} round{'s' if rounds > 1 else ''}, native and the two DBs taking turns; each round "
        f"{'drops the caches' if cold else 'could NOT drop the caches (not cold)'}, mounts afresh, walks and "
        f"stats every file (*cold walk*), then {readers} reader processes read {sample:,} random files with "
        "a plain buffered `open()` + `read()` (*random reads after a walk*). Medians; every round listed.",
        "",
        "| tree | cold walk + stat | walk time × native | each round | random reads after the walk "
        "| files/s × native | each round | bytes check |",
        "|---|---:|---:|---|---:|---:|---|---|",
    ]
    for name, v in reads.items():
        r = v["reads"]
        check = "source" if "verify" not in v else ("ok" if v["verify"]["ok"] else "**FAIL**")
        if "verify" in v:
            check += f" ({verify:,} files)"
        if not v["listing_ok"]:
            check += "; **listing differs**"
        lines.append(
            f"| {name} | {v['walk_s']:.1f} s | {v['walk_s'] / nat['walk_s']:.2f}× "
            f"| {', '.join(f'{x:.1f}' for x in v['walk_rounds'])} s "
            f"| {r['files_per_s']:,.0f} files/s | {r['files_per_s'] / nat['reads']['files_per_s']:.2f}× "
            f"| {' / '.join(f'{x:,.0f}' for x in r['repeats'])} | {check} |"
        )
    lines += [
        "",
        f"The issue's figures for the default layout of its day: cold walk {TODAY['walk']}× native's time, "
        f"random reads after a walk {TODAY['reads']}× native's files/s.",
    ]
    return lines


def _table(res: dict[str, Any]) -> str:
    files, data = res["files"], res["data"]
    lines = [
        f"`scripts/bench_tiny.py`: {files:,} files, {data / 1e6:,.1f} MB of data ({data / files:,.0f} bytes a "
        f"file on average), one GOT-10k-shaped split of ~2 KB frames (`make_fake_got10k.py --thumbs`).",
        "",
        *_pack_table(res["runs"], res["rounds"]),
        "",
        "`lmdbfs pack` (the keyed layout) keeps every file under `md5(path)` and files of at most 2 KB in "
        "their directory's record as well: two copies of most files here, and LMDB fits at most two ~2 KB "
        "values in a 4 KiB leaf page. `--layout compact` keeps files of at most 4,080 bytes once, in "
        "their records.",
    ]
    if res.get("reads"):
        lines += ["", *_read_table(res["reads"], res["read_rounds"], res["readers"], res["sample"], res["verify"])]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--tree", type=Path, help="an existing tree (default: make one in WORKDIR/tree)")
    p.add_argument("--seqs", type=int, default=1000)
    p.add_argument("--frames", type=int, default=150)
    p.add_argument("--rounds", type=int, default=2, help="pack rounds")
    p.add_argument("--read-rounds", type=int, default=3, help="rounds of cold walk + random reads (0: none)")
    p.add_argument("--readers", type=int, default=8, help="reader processes")
    p.add_argument("--sample", type=int, default=100_000, help="files read after each walk")
    p.add_argument("--verify-sample", type=int, default=5_000, help="files compared byte for byte on each mount")
    p.add_argument("--skip-pack", action="store_true", help="read the DBs of an earlier run in WORKDIR/out")
    p.add_argument("--render", action="store_true", help="only print (and --doc) the table of WORKDIR/bench_tiny.json")
    p.add_argument("--doc", type=Path, help="also write the table into this benchmarks.md (its tiny-files block)")
    p.add_argument("--note", default="", help="a line added under the table (the machine's state, say)")
    args = p.parse_args()
    args.workdir = args.workdir.resolve()
    if args.render:
        return _report(json.loads((args.workdir / "bench_tiny.json").read_text()), args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    tree = (args.tree or args.workdir / "tree").resolve()
    if not tree.exists():
        subprocess.run(
            [sys.executable, os.path.join(_HERE, "make_fake_got10k.py"), str(tree), "--seqs", str(args.seqs)]
            + ["--frames", str(args.frames), "--splits", "train", "--thumbs", "--quiet"],
            check=True,
        )
    _t, sizes, ndirs = walk_stat(tree)
    out = args.workdir / "out"
    json_path = args.workdir / "bench_tiny.json"
    res: dict[str, Any] = {"files": len(sizes), "data": sum(sizes.values())}
    if args.skip_pack:
        old = json.loads(json_path.read_text())
        res.update(runs=old["runs"], rounds=old["rounds"])
    else:
        res.update(runs=_pack_rounds(tree, out, args.rounds), rounds=args.rounds)
    json_path.write_text(json.dumps(res, indent=1))
    if args.read_rounds:
        names = sorted(sizes)
        rng = random.Random(0)
        ctx = Ctx(
            args=argparse.Namespace(timeout=3600.0, phases=["walk-read"]),
            size="tiny",
            workdir=args.workdir,
            tree=Tree(root=tree, sizes=sizes, dirs=ndirs),
            epoch_files=sorted(rng.sample(names, min(args.sample, len(names)))),
            verify_files=sorted(rng.sample(names, min(args.verify_sample, len(names)))),
            cold_ok=os.geteuid() == 0,
        )
        systems = [Native(ctx)] + [_Layout(ctx, lay, out / f"{lay}.lmdb") for lay in LAYOUTS.values()]
        res.update(
            reads=_read_rounds(ctx, systems, args.read_rounds, args.readers),
            read_rounds=args.read_rounds,
            readers=args.readers,
            sample=len(ctx.epoch_files),
            verify=len(ctx.verify_files),
            fuse_io_uring=URING_PARAM.read_text().strip() if URING_PARAM.exists() else "absent",
        )
        json_path.write_text(json.dumps(res, indent=1))
    return _report(res, args)


def _report(res: dict[str, Any], args: argparse.Namespace) -> int:
    text = _table(res)
    if args.note:
        text += f"\n\n{args.note}"
    print(text)
    if args.doc:
        block = f"{TINY_BEGIN}\n## Tiny files: both layouts\n\n{text}\n{TINY_END}"
        args.doc.write_text(replace_block(args.doc.read_text(), block, TINY_BEGIN, TINY_END))
    return 0


if __name__ == "__main__":
    sys.exit(main())
