"""The run's phases: packing (in rounds), walks, mounts and warm epochs per system,
the interleaved cold rounds, the bytes check, and the zip-source comparison."""

from __future__ import annotations

import hashlib
import random
import shutil
import statistics
import sys
from typing import Any

from .config import PIL_SAMPLE, ROUND_PHASES, log
from .proc import drop_caches, now, path_bytes, run, run_measured, warm_files
from .readers import read_epoch, verify_bytes
from .systems import System, measured_dict
from .trees import Ctx, walk_stat

# --------------------------------------------------------------------------- phases


def bench_zip_source(ctx: Ctx) -> dict[str, Any]:
    """Packing straight from a zip of the tree vs `unzip` then `lmdbfs pack`, caches
    dropped before each (the zip is made once, stored: JPEGs do not compress)."""
    art = ctx.art_dir
    art.mkdir(parents=True, exist_ok=True)
    archive = art / "tree.zip"
    if not archive.exists():
        run(["zip", "-q", "-r", "-0", str(archive), "."], cwd=ctx.tree.root, timeout=ctx.args.timeout)
    cli = [sys.executable, "-m", "lmdbfs", "pack", "--force", "--no-progress"]
    from_zip, unzipped, from_dir = art / "from-zip.lmdb", art / "unzipped", art / "from-unzipped.lmdb"
    shutil.rmtree(unzipped, ignore_errors=True)
    try:
        cold = drop_caches(ctx.cold_ok)
        m_zip = run_measured([*cli, str(archive), str(from_zip)], timeout=ctx.args.timeout)
        cold = drop_caches(ctx.cold_ok) and cold
        m_unzip = run_measured(["unzip", "-q", str(archive), "-d", str(unzipped)], timeout=ctx.args.timeout)
        m_pack = run_measured([*cli, str(unzipped), str(from_dir)], timeout=ctx.args.timeout)
    finally:
        shutil.rmtree(unzipped, ignore_errors=True)
        for db in (from_zip, from_dir):
            db.unlink(missing_ok=True)
    out = {
        "cold": cold,
        "zip_bytes": path_bytes(archive),
        "pack_zip": measured_dict(m_zip),
        "unzip": measured_dict(m_unzip),
        "pack_unzipped": measured_dict(m_pack),
        "ratio": m_zip.seconds / (m_unzip.seconds + m_pack.seconds),
    }
    log.info(
        "zip source: lmdbfs pack ZIP %.1f s vs unzip %.1f s + lmdbfs pack %.1f s (ratio %.2f)",
        m_zip.seconds,
        m_unzip.seconds,
        m_pack.seconds,
        out["ratio"],
    )
    return out


def rotated(items: list[Any], k: int) -> list[Any]:
    """Round k's turn order: the list rotated by k, so no system always runs first."""
    k %= len(items) or 1
    return items[k:] + items[:k]


def median_run(runs: list[dict[str, Any]], key: str, ndigits: int | None = None) -> dict[str, Any]:
    """The run with the median ``key``, and every run's ``key`` as ``repeats`` (in run order)."""
    out = dict(sorted(runs, key=lambda x: x[key])[len(runs) // 2])
    out["repeats"] = [round(x[key], ndigits) for x in runs]
    return out


def do_packs(ctx: Ctx, systems: list[System], prev: dict[str, Any]) -> None:
    """Pack every system, in interleaved rounds (the order rotating) when --pack-rounds
    asks for more than one, keeping each packer's median; or, with --skip-pack, reuse
    an artifact and its earlier numbers."""
    a = ctx.args
    todo = []
    for s in systems:
        if s.name == "native" or s.copies_pack:
            continue
        if a.skip_pack and s.packed():
            old = prev.get("pack", {}).get(s.name)
            if old:
                ctx.res["pack"][s.name] = {**old, "reused": True}
            log.info("%s: reusing packed artifact", s.name)
            continue
        todo.append(s)
    ctx.art_dir.mkdir(parents=True, exist_ok=True)
    got: dict[str, list[dict[str, Any]]] = {}
    rounds = a.pack_rounds if len(todo) > 1 else 1
    for k in range(rounds):
        for s in rotated(todo, k):
            if f"{s.name} pack" in ctx.res["errors"]:
                continue
            log.info("%s: packing with %s (round %d of %d)", s.name, s.pack_tool, k + 1, rounds)
            try:
                r = s.pack()
            except Exception as e:
                log.exception("%s: packing failed", s.name)
                ctx.res["errors"][f"{s.name} pack"] = str(e)
                continue
            got.setdefault(s.name, []).append(r)
            log.info(
                "%s: packed in %.2f s, max RSS %.0f MB, tree anon %.0f MB, %.2f GB",
                s.name,
                r["seconds"],
                r["max_rss_mb"],
                r["tree_anon_mb"],
                r["out_bytes"] / 1e9,
            )
    for name, runs in got.items():
        ctx.res["pack"][name] = median_run(runs, "seconds", 2)
    for s in systems:
        if s.copies_pack and s.name not in ctx.res["pack"]:
            done = ctx.res["pack"].get(s.copies_pack)
            if not done and a.skip_pack and s.packed():
                done = prev.get("pack", {}).get(s.name)
            if done and s.packed():
                ctx.res["pack"][s.name] = {**done, "tool": s.pack_tool}
            else:
                try:
                    ctx.res["pack"][s.name] = s.pack()
                except Exception as e:
                    log.exception("%s: packing failed", s.name)
                    ctx.res["errors"][f"{s.name} pack"] = str(e)


def do_reads(ctx: Ctx, s: System) -> None:
    """Walk/mount/epochs/daemon RSS/bytes check for one system."""
    a = ctx.args
    name = s.name
    mode = "seed" if name == "seed" else "fs"
    timeout = a.timeout
    files = ctx.epoch_files
    sampled = len(files) < len(ctx.tree.sizes)

    # mount (cold and warm) + walk+stat (cold then warm)
    if name != "seed":
        cold = drop_caches(ctx.cold_ok)
        mount_cold = s.mount()
        try:
            t_cold, listing, _ = walk_stat(s.read_root())
            warm_runs = [walk_stat(s.read_root())[0] for _ in range(a.repeat)]
            t_warm = statistics.median(warm_runs)
        finally:
            s.umount()
        warm_files(s.backing()) if s.mountable else None
        mount_warm = s.mount()
        s.umount()
        same = listing == ctx.tree.sizes
        if not same:
            missing = set(ctx.tree.sizes) - set(listing)
            extra = set(listing) - set(ctx.tree.sizes)
            log.error(
                "%s: listing differs: %d missing, %d extra, %d size mismatches",
                name,
                len(missing),
                len(extra),
                sum(1 for k in set(listing) & set(ctx.tree.sizes) if listing[k] != ctx.tree.sizes[k]),
            )
        ctx.res["walk"][name] = {
            "cold_s": t_cold,
            "warm_s": t_warm,
            "warm_runs": warm_runs,
            "cold": cold,
            "listing_ok": same,
            "files": len(listing),
        }
        if s.mountable:
            ctx.res["mount"][name] = {"cold_s": mount_cold, "warm_s": mount_warm, "cold": cold}
        log.info(
            "%s: walk+stat cold %.2f s, warm %.2f s; mount cold %.3f s, warm %.3f s; listing %s",
            name,
            t_cold,
            t_warm,
            mount_cold,
            mount_warm,
            "ok" if same else "DIFFERS",
        )

    for r in a.readers:
        base = a.seed * 1000 + r * 10
        if "seq-cold" in a.phases:
            cold = drop_caches(ctx.cold_ok)
            s.mount()
            try:
                e = read_epoch(mode, s.read_root(), files, r, base + 4, timeout, pattern="seq")
            finally:
                s.umount()
            add_epoch(ctx, name, r, "seq-cold", e, cold, sampled)
        if {"first", "steady", "seq-steady", "pil"} & set(a.phases):
            warm_files(s.backing())
            s.mount()
            try:
                rss0 = s.daemon_rss()
                # a first epoch fills the mount's cache; it (and the steady epoch after it) is
                # measured in do_cold_rounds' rounds
                read_epoch(mode, s.read_root(), files, r, base + 1, timeout)
                rss1 = s.daemon_rss()
                if "seq-steady" in a.phases:
                    e = read_epoch(mode, s.read_root(), files, r, base + 5, timeout, pattern="seq")
                    add_epoch(ctx, name, r, "seq-steady", e, False, sampled)
                if "pil" in a.phases and mode != "seed":
                    jpgs = [f for f in files if f.endswith(".jpg")]
                    jpgs = random.Random(base + 6).sample(jpgs, min(PIL_SAMPLE, len(jpgs)))
                    add_epoch(
                        ctx, name, r, "pil", read_epoch("pil", s.read_root(), jpgs, r, base + 6, timeout), False, True
                    )
                rss2 = s.daemon_rss()
                if s.mountable:
                    ctx.res["daemon_rss"].setdefault(name, {})[str(r)] = {
                        "after_mount": rss0,
                        "after_first": rss1,
                        "after_steady": rss2,
                    }
                if name not in ctx.res["verify"] and not a.no_verify:
                    ctx.res["verify"][name] = check_bytes(ctx, s)
            finally:
                s.umount()


def cold_epoch(ctx: Ctx, s: System, readers: int, phase: str, seed: int) -> tuple[dict[str, dict[str, Any]], bool]:
    """The epochs of one round on a fresh mount, the epoch's files in random order: caches
    dropped first (cold, walk-read), or the backing file read into the page cache (first,
    then steady: the third epoch on the same mount, the second untimed). walk-read (the
    issue's full-size measure) first walks and stats the whole mount, the walk's time and
    file count kept in the epoch (``walk_s``, ``walk_files``). Returns the epochs by phase,
    and whether the caches were dropped."""
    mode = "seed" if s.name == "seed" else "fs"
    if phase == "first":
        warm_files(s.backing())
        cold = False
    else:
        cold = drop_caches(ctx.cold_ok)
    s.mount()
    try:
        walk = walk_stat(s.read_root()) if phase == "walk-read" else None
        out = {phase: read_epoch(mode, s.read_root(), ctx.epoch_files, readers, seed, ctx.args.timeout)}
        if walk:
            out[phase].update(walk_s=walk[0], walk_files=len(walk[1]))
        if phase == "first" and "steady" in ctx.args.phases:
            # The epoch after a first one touches every page a second time, which moves it
            # to the kernel's active list (native's first epoch already did, after the
            # warm-up read); steady is the epoch after that, as every later epoch of a run.
            steady_seed = seed - ROUND_PHASES["first"] + ROUND_PHASES["steady"]
            read_epoch(mode, s.read_root(), ctx.epoch_files, readers, steady_seed + 50, ctx.args.timeout)
            out["steady"] = read_epoch(mode, s.read_root(), ctx.epoch_files, readers, steady_seed, ctx.args.timeout)
        return out, cold
    finally:
        s.umount()


def do_cold_rounds(ctx: Ctx, systems: list[System]) -> None:
    """The cold and first epochs, interleaved: round after round, every system in turn,
    the order rotating, so a slow minute of the shared machine falls on all systems alike
    rather than on whichever ran then. Each (system, readers, phase) keeps its median epoch."""
    a = ctx.args
    # the steady epoch runs on the first epoch's mount, so steady alone still mounts for a first
    phases = [p for p in ROUND_PHASES if p != "steady" and (p in a.phases or (p == "first" and "steady" in a.phases))]
    sampled = len(ctx.epoch_files) < len(ctx.tree.sizes)
    runs: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    all_cold: dict[tuple[str, int, str], bool] = {}
    failed: set[str] = set()
    for k in range(a.rounds):
        turn = rotated(systems, k)
        for r in a.readers:
            for s in turn:
                for phase in phases:
                    if s.name in failed:
                        continue
                    seed = a.seed * 1000 + r * 10 + ROUND_PHASES[phase] + 100 * k
                    try:
                        got, cold = cold_epoch(ctx, s, r, phase, seed)
                    except Exception as exc:
                        log.exception("%s: %s epoch failed", s.name, phase)
                        ctx.res["errors"][f"{s.name} {phase} reads"] = str(exc)
                        failed.add(s.name)
                        s.umount()
                        continue
                    for ph, e in got.items():
                        if ph not in a.phases:
                            continue
                        log.info(
                            "%s: %d readers, %s epoch, round %d of %d: %.0f files/s",
                            s.name,
                            r,
                            ph,
                            k + 1,
                            a.rounds,
                            e["files_per_s"],
                        )
                        key = (s.name, r, ph)
                        runs.setdefault(key, []).append(e)
                        all_cold[key] = all_cold.get(key, True) and cold
    for (name, r, phase), got in runs.items():
        add_epoch(ctx, name, r, phase, median_run(got, "files_per_s"), all_cold[(name, r, phase)], sampled)


def check_bytes(ctx: Ctx, s: System) -> dict[str, Any]:
    """Bytes check once per system (the seed DB re-encodes, so only key presence)."""
    files = ctx.verify_files
    sampled = len(files) < len(ctx.tree.sizes)
    if s.name == "native":
        return {"files_checked": 0, "ok": True, "note": "source"}
    if s.name == "seed":
        import lmdb

        env = lmdb.open(str(s.read_root()), readonly=True, lock=False)
        with env.begin() as txn:
            missing = [f for f in files if txn.get(hashlib.md5(f.encode()).digest()) is None]
        entries = env.stat()["entries"]
        env.close()
        return {
            "files_checked": len(files),
            "ok": not missing,
            "sampled": sampled,
            "entries": entries,
            "note": "keys only (values are re-encoded)",
        }
    t0 = now()
    v = verify_bytes(ctx.tree.root, s.read_root(), files)
    v["sampled"] = sampled
    log.info(
        "%s: bytes check of %d files: %s (%.1f s)",
        s.name,
        len(files),
        "ok" if v["ok"] else f"{v['mismatches']} MISMATCHES",
        now() - t0,
    )
    return v


def add_epoch(ctx: Ctx, name: str, readers: int, phase: str, e: dict[str, Any], cold: bool, sampled: bool) -> None:
    e.update(system=name, readers=readers, phase=phase, cold=cold, sampled=sampled)
    ctx.res["epochs"].append(e)
    log.info(
        "%s: %d readers, %-6s epoch: %8.0f files/s %7.1f MB/s (%.2f s%s)",
        name,
        readers,
        phase,
        e["files_per_s"],
        e["mb_per_s"],
        e["seconds"],
        "" if phase != "cold" or cold else ", NOT cold",
    )
