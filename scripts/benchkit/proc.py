"""Child processes and measurement: the clock, dropping caches, RSS of a process tree,
timed commands (run_measured, run), file sizes, warming the page cache, loading scripts/."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import SCRIPTS, log

# --------------------------------------------------------------------------- utils


def now() -> float:
    """Monotonic clock shared by all processes (CLOCK_MONOTONIC on Linux)."""
    return time.perf_counter()


_warned_not_root = False


def drop_caches(enabled: bool = True) -> bool:
    """Sync and drop the page/dentry/inode caches; False when that was not possible.

    A 'cold' number measured without this is not cold, so callers record the
    return value next to the measurement.
    """
    global _warned_not_root
    if not enabled:
        return False
    if os.geteuid() != 0:
        if not _warned_not_root:
            log.warning("not root: cannot drop caches, 'cold' results are marked not cold")
            _warned_not_root = True
        return False
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        log.warning("drop_caches failed (%s): 'cold' results are marked not cold", e)
        return False
    return True


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/RssAnon/RssFile of one process in kB (empty when it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    out[k] = int(v.split()[0])
    except (OSError, ValueError):
        pass
    return out


def proc_children(pid: int) -> list[int]:
    """All descendants of pid, via psutil when present, else /proc/*/stat."""
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        pass
    except Exception:
        return []
    parents: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in parents.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def tree_rss_kb(pid: int) -> tuple[int, int]:
    """(sum VmRSS, sum RssAnon) in kB over pid and its descendants."""
    rss = anon = 0
    for p in [pid, *proc_children(pid)]:
        s = proc_status(p)
        rss += s.get("VmRSS", 0)
        anon += s.get("RssAnon", 0)
    return rss, anon


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process has used (0, 0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


@dataclass
class Measured:
    """Outcome of one measured child command."""

    seconds: float
    returncode: int
    max_rss_mb: float  # ru_maxrss of the largest process in the tree (wait4)
    tree_rss_mb: float  # peak of the sampled sum of VmRSS over the process tree
    tree_anon_mb: float  # peak of the sampled sum of RssAnon over the process tree
    stderr_tail: str = ""
    returned_seconds: float | None = None  # when the command exited, before its output was made durable


def fsync_tree(path: Path) -> None:
    """fsync a file, or every file under a directory and the directories themselves."""
    paths = [path] if not path.is_dir() else [path, *sorted(path.rglob("*"))]
    for q in paths:
        fd = os.open(q, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def run_measured(
    cmd: list[str],
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
    sample_every: float = 0.2,
    durable: Sequence[Path] = (),
) -> Measured:
    """Run cmd, timing it exactly and tracking peak memory of it and its children.

    With ``durable``, the clock runs on after the command exits until those outputs are
    on disk (fsync of every file): a packer that leaves its output dirty in the page
    cache and one that syncs it are then timed to the same end state.

    ``os.wait4`` gives the kernel's ru_maxrss (what ``/usr/bin/time -v``
    prints); sampling /proc adds the sum over worker processes, which is what
    actually has to fit in RAM for pool-based packers.
    """
    log.debug("run: %s", " ".join(cmd))
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    t0 = now()
    result: dict[str, Any] = {}
    stderr_chunks: list[bytes] = []

    def reap() -> None:
        _, status, ru = os.wait4(p.pid, 0)
        result["t1"] = now()
        result["status"] = status
        result["ru"] = ru

    def drain() -> None:
        assert p.stderr is not None
        for chunk in iter(lambda: p.stderr.read(65536), b""):
            stderr_chunks.append(chunk)
            if len(stderr_chunks) > 64:
                del stderr_chunks[:32]

    th = threading.Thread(target=reap, daemon=True)
    dr = threading.Thread(target=drain, daemon=True)
    th.start()
    dr.start()
    peak_rss = peak_anon = 0
    while th.is_alive():
        rss, anon = tree_rss_kb(p.pid)
        peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
        th.join(sample_every)
        if timeout is not None and now() - t0 > timeout and th.is_alive():
            log.error("timeout after %.0f s, killing: %s", timeout, " ".join(cmd))
            try:
                os.killpg(p.pid, 9)
            except ProcessLookupError:
                pass
            th.join()
    dr.join(5)
    p.returncode = os.waitstatus_to_exitcode(result["status"])
    t_end = result["t1"]
    if durable and p.returncode == 0:
        for path in durable:
            fsync_tree(path)
        t_end = now()
    tail = b"".join(stderr_chunks)[-4000:].decode(errors="replace")
    m = Measured(
        seconds=t_end - t0,
        returned_seconds=result["t1"] - t0,
        returncode=p.returncode,
        max_rss_mb=result["ru"].ru_maxrss / 1024,
        tree_rss_mb=peak_rss / 1024,
        tree_anon_mb=peak_anon / 1024,
        stderr_tail=tail,
    )
    if check and m.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {m.returncode}: {tail[-1500:]}")
    return m


def run(cmd: list[str], timeout: float = 600, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    """Plain subprocess.run with logging and a timeout."""
    log.debug("run: %s", " ".join(map(str, cmd)))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if check and r.returncode != 0:
        tail = (r.stderr or r.stdout or "").strip()[-1500:]
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {r.returncode}: {tail}")
    return r


def path_bytes(p: Path) -> int:
    """Disk footprint of a file or directory (apparent sizes)."""
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def warm_files(paths: Iterable[Path | str]) -> int:
    """Read files sequentially so they sit in the page cache; returns bytes."""
    n = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(8 << 20):
                n += len(chunk)
    return n


def load_script(name: str) -> Any:
    """Import scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(name)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
