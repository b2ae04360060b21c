"""Issue 20's full-size metadata case for scripts/bench_remote.py: mount on an empty
cache, a cold walk + lstat of every entry (and the GETs it sent), then random reads,
each system side by side with the same DB on local disk."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from .config import log
from .proc import now
from .readers import read_epoch
from .remote import SYSTEMS, Proxy, RemoteEnv, cold_mount
from .trees import fuse_unmount, is_mounted


def walk_entries(root: Path) -> int:
    """os.walk + os.lstat of every entry, as a loader's dataset indexer does: how many."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return n


def walk_run(
    env: RemoteEnv, system: str, sample: list[str], readers: int, rtt_ms: float, seed: int, timeout: float
) -> dict[str, Any]:
    """Issue 20's full-size case: mount on an empty cache and a dropped page cache (its
    time and GETs), a cold walk + lstat of every entry (its time and the GETs it sent),
    then `sample` files read in a seeded random order by `readers` processes."""
    sysobj = SYSTEMS[system](env)
    out: dict[str, Any] = {"system": system, "readers": readers, "rtt_ms": rtt_ms}
    proxy = Proxy(env.upstream_port(system), [sysobj.label], rtt_ms, None) if sysobj.remote else None
    try:
        cold_mount(sysobj, env, proxy, out)
        try:
            t0 = now()
            out["walk_entries"] = walk_entries(sysobj.root())
            out["walk_s"] = now() - t0
            if proxy:
                out["walk_gets"] = proxy.totals(sysobj.label)["gets"]
                proxy.reset()
            out["random"] = read_epoch("fs", sysobj.root(), sample, readers, seed, timeout, "uniform")
            if proxy:
                proxy.count_into(out["random"], sysobj.label)
            out.update(sysobj.memory())
            out["cache_bytes"] = sysobj.cache_bytes()
        finally:
            sysobj.umount()
    except Exception as e:  # a failing system is a result, not the end of the run
        log.exception("%s: failed", system)
        out["error"] = f"{type(e).__name__}: {e}"[:500]
        if is_mounted(sysobj.mnt):
            fuse_unmount(sysobj.mnt)
    finally:
        if proxy:
            proxy.stop()
        shutil.rmtree(sysobj.cache, ignore_errors=True)
    return out
