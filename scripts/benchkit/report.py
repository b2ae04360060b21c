"""Ratios against the targets, and the markdown of docs/benchmarks.md (results stored in it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import ALL_SYSTEMS, PHASES, ROUND_PHASES, SIZE_ORDER, SIZES, TARGETS, log
from .docblocks import kept_block
from .remote_report import REMOTE_BEGIN, REMOTE_END

# --------------------------------------------------------------------------- ratios


def epoch_rate(res: dict[str, Any], system: str, readers: int, phase: str) -> float | None:
    for e in res.get("epochs", []):
        if e["system"] == system and e["readers"] == readers and e["phase"] == phase:
            return e["files_per_s"]
    return None


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def compute_ratios(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets evaluated on one run's results."""
    size = res["size"]
    pack = res.get("pack", {})
    walk = res.get("walk", {})

    def ps(name: str, part: str | None = None, key: str = "seconds") -> float | None:
        """A packer's time (or that of one part of it); key "returned_seconds" is to its exit,
        which results stored before the harness made outputs durable do not separate."""
        p = pack.get(name)
        if part and p:
            p = p.get("parts", {}).get(part)
        return p.get(key, p["seconds"]) if p else None

    def pr(name: str, part: str | None = None) -> float | None:
        return ps(name, part, "returned_seconds")

    rss = res.get("daemon_rss", {}).get("lmdbfs", {})
    daemon = max((v.get("after_steady", {}).get("rss_mb", 0) for v in rss.values()), default=None) if rss else None
    anon = max((v.get("after_steady", {}).get("anon_mb", 0) for v in rss.values()), default=None) if rss else None
    r2 = 2 if any(e["readers"] == 2 for e in res.get("epochs", [])) else None
    vals: dict[str, float | None] = {
        "pack_vs_squashfs": _div(ps("lmdbfs"), ps("squashfs") or ps("squashfuse")),  # both run mksquashfs
        "pack_vs_tar": _div(ps("lmdbfs"), ps("tar") or ps("ratarmount", "tar cf")),
        "pack_returned_vs_squashfs": _div(pr("lmdbfs"), pr("squashfs") or pr("squashfuse")),
        "pack_returned_vs_tar": _div(pr("lmdbfs"), pr("tar") or pr("ratarmount", "tar cf")),
        "seed_vs_pack": _div(ps("seed"), ps("lmdbfs")),
        "pack_rss": pack.get("lmdbfs", {}).get("tree_anon_mb"),
        "first_vs_squashfuse": _div(epoch_rate(res, "lmdbfs", 2, "first"), epoch_rate(res, "squashfuse", 2, "first"))
        if r2
        else None,
        "first_vs_ratarmount": _div(epoch_rate(res, "lmdbfs", 2, "first"), epoch_rate(res, "ratarmount", 2, "first"))
        if r2
        else None,
        "steady_vs_native": _div(epoch_rate(res, "lmdbfs", 2, "steady"), epoch_rate(res, "native", 2, "steady"))
        if r2
        else None,
        "cold_vs_native": _div(epoch_rate(res, "lmdbfs", 2, "cold"), epoch_rate(res, "native", 2, "cold"))
        if r2
        else None,
        "cold8_vs_native": _div(epoch_rate(res, "lmdbfs", 8, "cold"), epoch_rate(res, "native", 8, "cold")),
        "cold16_vs_native": _div(epoch_rate(res, "lmdbfs", 16, "cold"), epoch_rate(res, "native", 16, "cold")),
        "cold16_vs_cold1": _div(epoch_rate(res, "lmdbfs", 16, "cold"), epoch_rate(res, "lmdbfs", 1, "cold")),
        "first8_vs_squashfs": _div(epoch_rate(res, "lmdbfs", 8, "first"), epoch_rate(res, "squashfs", 8, "first")),
        "steady8_vs_native": _div(epoch_rate(res, "lmdbfs", 8, "steady"), epoch_rate(res, "native", 8, "steady")),
        "walkread8_vs_native": _div(
            epoch_rate(res, "lmdbfs", 8, "walk-read"), epoch_rate(res, "native", 8, "walk-read")
        ),
        "walk_cold_vs_native": _div(walk.get("lmdbfs", {}).get("cold_s"), walk.get("native", {}).get("cold_s")),
        "walk_warm_vs_native": _div(walk.get("lmdbfs", {}).get("warm_s"), walk.get("native", {}).get("warm_s")),
        "mount_s": res.get("mount", {}).get("lmdbfs", {}).get("cold_s"),
        "daemon_rss": daemon,
        "daemon_anon": anon,
    }
    out = []
    for key, desc, sizes, op, thr in TARGETS:
        v = vals.get(key)
        applies = size in sizes
        if v is None:
            verdict = "n/a"
        elif not applies:
            verdict = "info"
        else:
            ok = {"<=": v <= thr, ">=": v >= thr, "<": v < thr}[op]
            verdict = "PASS" if ok else "MISS"
        out.append(
            {"key": key, "desc": desc, "value": v, "op": op, "target": thr, "applies": applies, "verdict": verdict}
        )
    return out


def fmt_ratio(r: dict[str, Any]) -> str:
    v = r["value"]
    unit = "" if r["key"] in ("pack_rss", "daemon_rss", "daemon_anon", "mount_s") else "×"
    val = "–" if v is None else (f"{v:.3f}" if r["key"] == "mount_s" else f"{v:.2f}") + unit
    return f"{r['desc']}: {val} (target {r['op']} {r['target']:g}{unit}) {r['verdict']}"


# --------------------------------------------------------------------------- report


def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}"


def render_size(res: dict[str, Any], chart: str | None) -> str:
    """Markdown section for one size's results."""
    size = res["size"]
    t = res["tree"]
    L: list[str] = []
    L.append(f"## {size}")
    L.append("")
    L.append(
        f"{SIZES[size]['note']}. Tree: {t['files']:,} files in {t['dirs']:,} dirs, "
        f"{t['bytes'] / 1e9:.2f} GB. Run {res['started']} UTC, took {res.get('elapsed_s', 0) / 60:.1f} min. "
        f"Readers: {', '.join(map(str, res['readers']))}."
    )
    if res.get("sampled"):
        L.append("")
        L.append(
            f"**Epochs read a seeded random sample of {res['epoch_files']:,} files** (not the whole tree); "
            f"bytes checked on {res['verify_files']:,} files. Walk+stat, mount and pack cover everything."
        )
    if not res.get("cold_ok"):
        L.append("")
        L.append("**Caches were not dropped in this run: 'cold' columns are not cold.**")
    L.append("")
    pack = res.get("pack", {})
    if pack:
        L.append("### Pack")
        L.append("")
        L.append(
            "| system | tool | time to a durable output (s) | returned after (s) | "
            "peak RSS, largest process (MB) | peak RSS, all processes (MB) | "
            "peak anon RSS, all processes (MB) | output (GB) |"
        )
        L.append("|---|---|---:|---:|---:|---:|---:|---:|")
        for name in ALL_SYSTEMS:
            p = pack.get(name)
            if not p:
                continue
            extra = ""
            if p.get("parts"):
                extra = " (" + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in p["parts"].items()) + ")"
            if len(p.get("repeats", ())) > 1:
                extra += " (median of " + " / ".join(f"{x:.1f}" for x in p["repeats"]) + " s)"
            if p.get("reused"):
                extra += " (from an earlier run)"
            durable = _f(p["seconds"]) if "returned_seconds" in p else "–"  # older runs timed the exit only
            L.append(
                f"| {name} | {p['tool']}{extra} | {durable} | {_f(p.get('returned_seconds', p['seconds']))} | "
                f"{_f(p['max_rss_mb'], 0)} | "
                f"{_f(p['tree_rss_mb'], 0)} | {_f(p['tree_anon_mb'], 0)} | {p['out_bytes'] / 1e9:.3f} |"
            )
        L.append("")
    walk, mount, drss, ver = res.get("walk", {}), res.get("mount", {}), res.get("daemon_rss", {}), res.get("verify", {})
    if walk or mount:
        L.append("### Metadata, mount, memory, correctness")
        L.append("")
        L.append(
            "| system | walk+stat cold (s) | walk+stat warm (s) | mount cold (s) | mount warm (s) | "
            "daemon RSS after mount (MB) | daemon RSS after epochs (MB, anon) | bytes check |"
        )
        L.append("|---|---:|---:|---:|---:|---:|---:|---|")
        for name in ALL_SYSTEMS:
            if name not in walk and name not in mount and name not in ver:
                continue
            w, m = walk.get(name, {}), mount.get(name, {})
            d = drss.get(name, {})
            d_last = d[max(d, key=int)] if d else {}
            after = d_last.get("after_steady") or d_last.get("after_first") or {}
            v = ver.get(name)
            if v is None:
                vs = "–"
            elif v.get("note") == "source":
                vs = "source"
            else:
                vs = ("ok" if v["ok"] else "**FAIL**") + f" ({v['files_checked']:,} files"
                vs += ", sample" if v.get("sampled") else ""
                vs += f", {v['note']}" if v.get("note") else ""
                vs += ")"
            if w and not w.get("listing_ok", True):
                vs += "; **listing differs**"
            L.append(
                f"| {name} | {_f(w.get('cold_s'))} | {_f(w.get('warm_s'))} | {_f(m.get('cold_s'), 3)} | "
                f"{_f(m.get('warm_s'), 3)} | {_f(d_last.get('after_mount', {}).get('rss_mb'), 0)} | "
                f"{_f(after.get('rss_mb'), 0)} ({_f(after.get('anon_mb'), 0)}) | {vs} |"
            )
        L.append("")
    eps = res.get("epochs", [])
    if eps:
        readers = sorted({e["readers"] for e in eps})
        phases = [p for p in PHASES if any(e["phase"] == p for e in eps)]
        L.append("### Read epochs (files/s; MB/s in parentheses)")
        L.append("")
        cols = [(r, p) for r in readers for p in phases]
        L.append("| system | " + " | ".join(f"{p}, {r} reader{'s' if r > 1 else ''}" for r, p in cols) + " |")
        L.append("|---|" + "---:|" * len(cols))
        for name in ALL_SYSTEMS:
            if not any(e["system"] == name for e in eps):
                continue
            cells = []
            for r, p in cols:
                e = next((e for e in eps if e["system"] == name and e["readers"] == r and e["phase"] == p), None)
                cells.append("–" if e is None else f"{e['files_per_s']:,.0f} ({e['mb_per_s']:,.0f})")
            L.append(f"| {name} | " + " | ".join(cells) + " |")
        L.append("")
        rounds = [e for e in eps if e["phase"] in ROUND_PHASES and len(e.get("repeats", ())) > 1]
        if rounds:
            L.append(
                "Each cold, walk-read, first and steady figure above is the median of these rounds (files/s, in the order "
                "run; the systems took turns within each round):"
            )
            L.append("")
            for e in rounds:
                L.append(
                    f"- {e['system']}, {e['phase']}, {e['readers']} reader{'s' if e['readers'] > 1 else ''}: "
                    + " / ".join(f"{x:,}" for x in e["repeats"])
                )
            L.append("")
    if res.get("errors"):
        L.append("### Errors")
        L.append("")
        for k, v in res["errors"].items():
            L.append(f"- {k}: `{v[:300]}`")
        L.append("")
    L.append("### Targets")
    L.append("")
    if not any(r["applies"] for r in compute_ratios(res)):
        L.append("_No target applies at this size; ratios are informational._")
        L.append("")
    for r in compute_ratios(res):
        if r["verdict"] == "n/a" and not r["applies"]:
            continue
        L.append(f"- {fmt_ratio(r)}")
    L.append("")
    if chart:
        L.append(f"![{size} benchmark]({chart})")
        L.append("")
    return "\n".join(L)


PROFILE_BEGIN = "<!-- profile-findings:begin -->"
PROFILE_END = "<!-- profile-findings:end -->"
PROFILE_PLACEHOLDER = (
    "_To be filled in by the daemon owner: py-spy profiles of the lmdbfs daemon during a "
    "first epoch and a walk, and what was changed because of them._"
)


# Written by scripts/bench_tiny.py (a tree of tiny files, both layouts); kept as it is.
TINY_BEGIN = "<!-- tiny-files:begin -->"
TINY_END = "<!-- tiny-files:end -->"
# the sections other scripts write, in the order they stand before "How to reproduce"
KEPT_BLOCKS = ((REMOTE_BEGIN, REMOTE_END), (TINY_BEGIN, TINY_END))


DATA_BEGIN = "<!-- bench-results "
DATA_END = " -->"


def stored_results(md_path: Path) -> dict[str, dict[str, Any]]:
    """Results embedded in an existing benchmarks.md, by size (so sizes run separately add up)."""
    out: dict[str, dict[str, Any]] = {}
    if not md_path.exists():
        return out
    for line in md_path.read_text().splitlines():
        if line.startswith(DATA_BEGIN) and line.endswith(DATA_END):
            try:
                res = json.loads(line[len(DATA_BEGIN) : -len(DATA_END)])
                out[res["size"]] = res
            except (ValueError, KeyError):
                log.warning("ignoring unreadable stored results in %s", md_path)
    return out


def render_doc(out_dir: Path, new: dict[str, Any]) -> str:
    """The whole benchmarks.md: this run's results plus other sizes' stored in the old file."""
    md_path = out_dir / "benchmarks.md"
    by_size = stored_results(md_path)
    by_size[new["size"]] = new
    results = [by_size[s] for s in SIZE_ORDER if s in by_size]
    old = md_path.read_text() if md_path.exists() else ""
    profile = PROFILE_PLACEHOLDER
    if PROFILE_BEGIN in old and PROFILE_END in old:
        profile = old.split(PROFILE_BEGIN, 1)[1].split(PROFILE_END, 1)[0].strip() or PROFILE_PLACEHOLDER
    L = ["# Benchmarks", ""]
    L.append(
        "`scripts/bench.py` compares, in one run on one machine, the ways of keeping a GOT-10k-like "
        "tree of small files: the raw tree (**native**), **lmdbfs**, a SquashFS image mounted with "
        "**squashfuse**, a tar mounted with **ratarmount**, and the **seed**-style LMDB (md5 keys, "
        "re-encoded JPEGs) that loaders read directly. Tables and charts below are generated by it; "
        "only the profile findings section is written by hand."
    )
    L.append("")
    if results:
        m = results[-1]["machine"]
        L.append("## Machine")
        L.append("")
        L.append(f"- CPU: {m['cpu']}, {m['cores']} cores; RAM {m['ram_gb']} GB; no swap assumed")
        L.append(f"- OS: {m['os']}, kernel {m['kernel']}; work dir on {m['workdir_fs']}")
        L.append(f"- Python {m['python']}; " + "; ".join(f"{k} {v}" for k, v in m["versions"].items()))
        commits = ", ".join(
            f"{r['size']}: {r.get('commit_at_start', r['machine'].get('commit', '?'))}"
            + (
                f" → {r['machine']['commit']}"
                if r.get("commit_at_start", r["machine"].get("commit")) != r["machine"].get("commit")
                else ""
            )
            for r in results
        )
        L.append(f"- lmdbfs code measured: {commits}")
        rings = ", ".join(f"{r['size']}: {r.get('fuse_io_uring', 'not recorded')}" for r in results)
        L.append(f"- the kernel's FUSE over io_uring (`lmdbfs` uses it where on): {rings}")
        L.append("")
    L.append("## Method")
    L.append("")
    L.append(METHOD)
    L.append("")
    for res in results:
        chart = f"bench-{res['size']}.png" if (out_dir / f"bench-{res['size']}.png").exists() else None
        L.append(render_size(res, chart))
    for begin, end in KEPT_BLOCKS:  # scripts/bench_remote.py's and bench_tiny.py's: kept as they are
        block = kept_block(old, begin, end)
        if block:
            L.extend([block, ""])
    L.append("## How to reproduce")
    L.append("")
    L.append(REPRODUCE)
    L.append("")
    L.append("## Profile findings")
    L.append("")
    L.append(PROFILE_BEGIN)
    L.append(profile)
    L.append(PROFILE_END)
    L.append("")
    L.append("<!-- Raw results, read back by scripts/bench.py when another size is run: -->")
    for res in results:
        L.append(DATA_BEGIN + json.dumps(res, separators=(",", ":")).replace("--", "-\\u002d") + DATA_END)
    L.append("")
    return "\n".join(L)


METHOD = """\
- **Pack**: each packer runs on the same tree, after `sync; echo 3 > /proc/sys/vm/drop_caches`, with
  its old output removed beforehand; at medium size the packers take turns for three rounds
  (`--pack-rounds`) and each keeps its median. Time is wall time until the output is on disk:
  when the packer exits, the harness fsyncs its output and stops the clock after that
  (`lmdbfs pack` has synced its DB already; mksquashfs and `tar` leave theirs dirty in the
  page cache), so every packer is timed to the same end state; *returned after* is when the
  packer itself exited (results stored by earlier versions of this script have only that). *Peak RSS, largest process* is the kernel's `ru_maxrss` from `wait4` (what
  `/usr/bin/time -v` prints); *all processes* sums `VmRSS` / `RssAnon` over the packer and its workers,
  sampled every 0.2 s (file-backed pages of an mmap'd output count in `VmRSS` but are reclaimable, so
  the RSS target is judged on anon memory). `lmdbfs pack SRC DB`; the seed-style converter
  (`scripts/seed_convert.py`: md5 keys, PIL re-encode of every JPEG, `Pool(cpu_count()).imap_unordered`,
  one commit per 50k puts, `map_size` = 2× tree size instead of the original 112 GB);
  `tar cf` followed by ratarmount's index creation (first mount with `--recreate-index`, timed to the
  mount being ready); `mksquashfs SRC IMG -noI -noD -noF -noX -noappend`; **tar** (opt-in): `tar cf`
  alone, only timed, the yardstick for pack speed.
- **Transport**: the run turns the kernel's FUSE over io_uring on (`--fuse-io-uring on`, root; the
  fuse module's `enable_uring`), so `lmdbfs` takes its requests from io_uring rings where the kernel
  has them; **lmdbfs-devfuse** (opt-in) is the same DB and daemon mounted with `--no-io-uring`,
  reading /dev/fuse, measured in the same run.
- **Walk+stat**: `os.walk` + `os.stat` of every file on a fresh mount after dropping caches (*cold*),
  then again (*warm*; median of `--repeat` runs, 3 at medium size). The listing (paths and sizes) must equal the source's.
- **Mount**: wall time from starting the mount command to the mount point answering `readdir`, on
  dropped caches (*cold*) and with the backing file in the page cache (*warm*).
- **Epochs**: N reader processes (fork) read every file (`open` + `read()`) in a seeded random
  order, each its share; files/s = files / (last reader done − first reader started).
  *cold*: caches dropped, fresh mount. *first*: backing file (the `.lmdb`, `.sqsh`, `.tar` + index;
  for native, the files) read into the page cache, fresh mount. *steady*: the third epoch on the
  first epoch's mount, each in its own order; the second, untimed, is the one that moves every
  page it reads to the kernel's active list, which native's first epoch did already (its pages
  were read once to warm them). Cold, walk-read, first and steady epochs
  run in `--rounds` rounds (3 at medium and full size), every system in turn within a round, the
  order rotating between rounds, and each figure is the median of its rounds (all rounds are
  listed under the table; first epochs joined the rounds on 2026-11-26, steady epochs later that
  day: before, each system's steady epochs ran in its own turn, minutes from the others', and
  steady was the second epoch).
  *walk-read*: caches dropped,
  fresh mount, a whole walk+stat, then the epoch (the issue's "random reads after a walk").
  *seq-*: a random sequence, then 8 consecutive frames of it. The seed LMDB is read directly with py-lmdb by md5 key
  (`readonly, lock=False, readahead=False`); it has no file system, so no walk or mount.
- **Daemon RSS**: `VmRSS` (and `RssAnon`) of the FUSE daemon found through `/proc/*/cmdline` and its
  `/dev/fuse` descriptor, right after mounting and after the epochs. `VmRSS` includes the mmap'd
  pages of the backing file that the epoch touched.
- **Bytes check**: once per mounted system, every (or, at full size, a seeded sample of) file
  compared byte for byte with the source; the seed DB, which re-encodes, is checked for keys only.
- 'Cold' means the guest's page cache was dropped. On a VM the host may still cache the disk image,
  so cold reads can be faster than the physical disk; every system gets the same treatment.
- The machine is shared with other work; numbers from a quiet machine may differ, and small
  differences (±20 %) between runs are noise, not findings."""

REPRODUCE = """\
```sh
pip install -e '.[bench]'                      # lmdbfs, matplotlib, psutil
apt-get install fuse3 squashfs-tools squashfuse  # mksquashfs, squashfuse
# ratarmount is installed by the script into a venv under --workdir on first use
python scripts/bench.py --size smoke           # seconds: checks the harness
python scripts/bench.py --size medium          # ~20k files, ~3.5 GB; tens of minutes
python scripts/bench.py --size full            # 1.44M tiny files; epochs on a 100k-file sample
# reuse the tree and packed artifacts of an earlier run, only some systems / reader counts:
python scripts/bench.py --size medium --skip-pack --systems native,lmdbfs --readers 2
# remote DBs: local disk vs lmdbfs over HTTP and S3, httpdirfs + lmdbfs, ratarmount over HTTP
python scripts/bench_remote.py --size medium   # its own section above, kept by bench.py
python scripts/bench_remote.py --quick         # the smoke tree: checks the harness
# a tree of ~2 KB files, both layouts beside tar and mksquashfs, then a cold walk and random
# reads on both mounts beside the tree (the tiny-files section); --tree for an existing tree:
python scripts/bench_tiny.py /var/tmp/lmdbfs-tiny --seqs 1000 --frames 150 --doc docs/benchmarks.md
python scripts/bench_tiny.py /var/tmp/lmdbfs-tiny-full --seqs 9335 --frames 150 --rounds 1 --read-rounds 2
```
Run as root so caches can be dropped (otherwise 'cold' numbers are marked not cold). Results go to
`docs/bench-<size>.png` and this file (raw numbers are embedded at its end) (`--out-dir` to write elsewhere);
the tree and artifacts stay in `--workdir` (default `/var/tmp/lmdbfs-bench`, or
`$LMDBFS_BENCH_WORKDIR`) and are reused by later runs."""
