#!/usr/bin/env python3
"""A tree of tiny files, packed side by side: `tar cf` + `sync`, `mksquashfs` (no
compression, as the main benchmark runs it), `lmdbfs pack` (keyed layout, the default)
and `lmdbfs pack --layout compact`.

Each packer runs from a cold cache (caches dropped before it; root only), its time runs
until its output is on disk (`sync` for tar and mksquashfs; lmdbfs pack syncs itself),
and its peak memory is sampled from /proc. Rounds rotate the order; the median of the
rounds is reported, with every output's size against the tar's and every time against
`tar cf` + `sync`.

    python scripts/bench_tiny.py WORKDIR [--tree DIR | --seqs 1000 --frames 150] [--rounds 2]

Without --tree a GOT-10k-shaped tree of ~2 KB frames is made in WORKDIR/tree with
`scripts/make_fake_got10k.py --thumbs` (one split: N sequences of F frames and five
annotation files).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path[:1] != [_HERE]:
    sys.path.insert(0, _HERE)

from benchkit.proc import drop_caches, run_measured  # noqa: E402
from benchkit.report import TINY_BEGIN, TINY_END  # noqa: E402


def _packers(tree: Path, out: Path) -> dict[str, tuple[list[str], Path]]:
    lmdbfs = [sys.executable, "-m", "lmdbfs", "pack", "--no-progress", "--force"]
    return {
        "tar cf + sync": (["sh", "-c", f"tar cf {out / 'tree.tar'} -C {tree} . && sync"], out / "tree.tar"),
        "mksquashfs + sync": (
            [
                "sh",
                "-c",
                f"mksquashfs {tree} {out / 'tree.sqfs'} -noappend -noI -noD -noF -noX -no-progress -quiet && sync",
            ],
            out / "tree.sqfs",
        ),
        "lmdbfs pack": ([*lmdbfs, str(tree), str(out / "keyed.lmdb")], out / "keyed.lmdb"),
        "lmdbfs pack --layout compact": (
            [*lmdbfs, "--layout", "compact", str(tree), str(out / "compact.lmdb")],
            out / "compact.lmdb",
        ),
    }


def _tree_stats(tree: Path) -> tuple[int, int]:
    files = data = 0
    for dirpath, _dirs, names in os.walk(tree):
        for name in names:
            files += 1
            data += os.lstat(os.path.join(dirpath, name)).st_size
    return files, data


def _table(runs: dict[str, list[dict]], files: int, data: int, rounds: int, cold: bool) -> str:
    med = {
        n: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "bytes", "peak_mb")} for n, rs in runs.items()
    }
    tar = med["tar cf + sync"]
    lines = [
        f"`scripts/bench_tiny.py`: {files:,} files, {data / 1e6:,.1f} MB of data ({data / files:,.0f} bytes a "
        f"file on average), one GOT-10k-shaped split of ~2 KB frames (`make_fake_got10k.py --thumbs`); "
        f"median of {rounds} rounds, each packer from a {'cold' if cold else 'WARM (caches not dropped)'} cache, "
        "timed until its output is on disk.",
        "",
        "| packer | output | × tar's size | time (median) | × `tar cf` + `sync` | each round | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, m in med.items():
        each = ", ".join(f"{r['seconds']:.1f}" for r in runs[n])
        lines.append(
            f"| {n} | {m['bytes'] / 1e6:,.1f} MB | {m['bytes'] / tar['bytes']:.2f}× | {m['seconds']:.1f} s "
            f"| {m['seconds'] / tar['seconds']:.2f}× | {each} s | {m['peak_mb']:.0f} MB |"
        )
    lines += [
        "",
        "`lmdbfs pack` (the keyed layout) keeps every file under `md5(path)` and files of at most 2 KB in "
        "their directory's record as well: two copies of most files here, and LMDB fits at most two ~2 KB "
        "values in a 4 KiB leaf page. `--layout compact` keeps files of at most 4,080 bytes once, in "
        "their records.",
    ]
    return "\n".join(lines)


def _into_doc(doc: Path, text: str) -> None:
    """Replace (or add, before the reproduce section) the tiny-files block of benchmarks.md."""
    old = doc.read_text()
    block = f"{TINY_BEGIN}\n{text}\n{TINY_END}"
    if TINY_BEGIN in old and TINY_END in old:
        head, rest = old.split(TINY_BEGIN, 1)
        new = head + block + rest.split(TINY_END, 1)[1]
    else:
        new = old.replace("## How to reproduce", f"## Tiny files: both layouts\n\n{block}\n\n## How to reproduce", 1)
    doc.write_text(new)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--tree", type=Path, help="an existing tree (default: make one in WORKDIR/tree)")
    p.add_argument("--seqs", type=int, default=1000)
    p.add_argument("--frames", type=int, default=150)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--doc", type=Path, help="also write the table into this benchmarks.md (its tiny-files block)")
    p.add_argument("--note", default="", help="a line added under the table (the machine's state, say)")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    tree = args.tree or args.workdir / "tree"
    if not tree.exists():
        subprocess.run(
            [sys.executable, os.path.join(_HERE, "make_fake_got10k.py"), str(tree), "--seqs", str(args.seqs)]
            + ["--frames", str(args.frames), "--splits", "train", "--thumbs", "--quiet"],
            check=True,
        )
    files, data = _tree_stats(tree)
    out = args.workdir / "out"
    runs: dict[str, list[dict]] = {}
    names = list(_packers(tree, out))
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            cmd, output = _packers(tree, out)[name]
            cold = drop_caches()
            m = run_measured(cmd, timeout=3600)
            if m.returncode:
                raise SystemExit(f"{name} failed: {m.stderr_tail}")
            runs.setdefault(name, []).append(
                {"seconds": m.seconds, "bytes": os.path.getsize(output), "peak_mb": m.max_rss_mb, "cold": cold}
            )
            print(f"round {r + 1}: {name}: {runs[name][-1]}", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    text = _table(runs, files, data, args.rounds, all(r["cold"] for rs in runs.values() for r in rs))
    if args.note:
        text += f"\n\n{args.note}"
    print(text)
    if args.doc:
        _into_doc(args.doc, text)
    (args.workdir / "bench_tiny.json").write_text(json.dumps({"files": files, "data": data, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
