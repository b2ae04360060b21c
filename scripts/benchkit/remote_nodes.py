"""Issue 20's simulated nodes for scripts/bench_remote.py: N mounts of one URL with
separate cache dirs reading at once, then one alone; each in a CPU budget of its own
(benchkit.cpubudget) or all sharing this machine's cores."""

from __future__ import annotations

import shutil
import threading
from typing import Any

from .config import log
from .cpubudget import CpuBudget
from .proc import cpu_seconds, drop_caches
from .readers import read_epoch
from .remote import SYSTEMS, Proxy, RemoteEnv, RemoteSystem
from .trees import fuse_unmount, is_mounted


def daemon_cpu(obj: RemoteSystem) -> dict[str, float]:
    """The CPU a node's mount daemon has used (user and system seconds)."""
    used = [cpu_seconds(pid) for pid in obj.pids]
    return {"daemon_user_s": sum(u for u, _s in used), "daemon_sys_s": sum(s for _u, s in used)}


def nodes_run(
    env: RemoteEnv,
    system: str,
    files: list[str],
    nodes: int,
    readers: int,
    rtt_ms: float,
    mbit: float | None,
    seed: int,
    timeout: float,
    cpus: float | None = None,
) -> dict[str, Any]:
    """N simulated nodes: N mounts of one URL with separate cache dirs, all reading an epoch
    at once (`readers` processes each); GETs and bytes counted per node by the proxy.
    Then node 0 alone, on a fresh cache, for comparison. With ``cpus``, each node's
    daemon and readers run in a CPU budget of that many cores (benchkit.cpubudget), alone
    as beside the others, as on machines of their own; without, all share this one."""
    labels = [f"node{i}" for i in range(nodes)]
    objs = [SYSTEMS[system](env, label) for label in labels]
    proxy = Proxy(env.upstream_port(system), labels, rtt_ms, mbit)
    out: dict[str, Any] = {
        "system": system,
        "nodes": nodes,
        "readers_per_node": readers,
        "rtt_ms": rtt_ms,
        "mbit": mbit,
        "cpus_per_node": cpus,
        "per_node": {},
    }
    budgets: dict[str, CpuBudget] = {}

    def mount(obj: RemoteSystem) -> None:
        obj.fresh_cache()
        obj.mount(proxy)
        if obj.label in budgets:
            if not obj.pids:
                raise RuntimeError(f"{obj.label}: no mount daemon found to give its CPU budget")
            for pid in obj.pids:
                budgets[obj.label].add(pid)

    def group(obj: RemoteSystem) -> str | None:
        return budgets[obj.label].procs if obj.label in budgets else None

    try:
        for obj in objs if cpus else ():
            budgets[obj.label] = CpuBudget(f"lmdbfs-bench-{obj.label}", cpus)
        drop_caches(env.drop)
        for obj in objs:
            mount(obj)
        proxy.reset()
        results: dict[str, Any] = {}

        def node(obj: RemoteSystem, i: int) -> None:
            try:
                results[obj.label] = read_epoch("fs", obj.root(), files, readers, seed + i, timeout, group=group(obj))
            except Exception as e:  # noqa: BLE001 - reported per node
                results[obj.label] = {"error": str(e)[:300]}

        threads = [threading.Thread(target=node, args=(obj, i)) for i, obj in enumerate(objs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for obj in objs:
            results[obj.label].update(daemon_cpu(obj))
            if obj.label in budgets:  # the daemon is still in its group (the readers have ended)
                results[obj.label]["budget_procs"] = len(budgets[obj.label].members())
            if "error" not in results[obj.label]:
                proxy.count_into(results[obj.label], obj.label)
            results[obj.label]["cache_bytes"] = obj.cache_bytes()
            obj.umount()
        out["per_node"] = results
        # node 0 alone
        alone = objs[0]
        drop_caches(env.drop)
        mount(alone)
        proxy.reset()
        try:
            out["alone"] = read_epoch("fs", alone.root(), files, readers, seed, timeout, group=group(alone))
            out["alone"].update(daemon_cpu(alone))
            proxy.count_into(out["alone"], alone.label)
        finally:
            alone.umount()
    except Exception as e:
        log.exception("nodes: failed")
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    finally:
        for obj in objs:
            for mnt in (obj.mnt, getattr(obj, "http_mnt", None)):
                if mnt is not None and is_mounted(mnt):
                    fuse_unmount(mnt)
            shutil.rmtree(obj.cache, ignore_errors=True)
        proxy.stop()
        for budget in budgets.values():
            budget.close()
    return out
