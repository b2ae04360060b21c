"""Reader processes and one read epoch over them; the byte-for-byte check of a mount.

read_epoch starts the readers from a fork context, so ``_reader`` runs in a copy of
this process; it is also importable as ``benchkit.readers._reader`` should that change.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing as mp
import os
import random
from pathlib import Path
from typing import Any

from .config import SEQ_RUN
from .cpubudget import join
from .proc import now

# --------------------------------------------------------------------------- readers


def _reader(mode: str, root: str, rels: list[str], barrier: Any, q: Any, group: str | None = None) -> None:
    """One reader process: read its share of the files, report count/bytes/times (in the
    CPU budget ``group`` of its simulated node, if any: benchkit.cpubudget)."""
    try:
        join(group)
        if mode == "seed":
            import lmdb

            env = lmdb.open(root, readonly=True, lock=False, readahead=False, meminit=False, max_readers=512)
            keys = [hashlib.md5(r.encode()).digest() for r in rels]
            txn = env.begin()
            barrier.wait()
            t0 = now()
            n = nb = 0
            for k in keys:
                v = txn.get(k)
                if v is None:
                    raise KeyError(k.hex())
                nb += len(v)
                n += 1
            t1 = now()
            txn.abort()
            env.close()
        elif mode == "pil":
            from PIL import Image

            paths = [os.path.join(root, r) for r in rels]
            barrier.wait()
            t0 = now()
            n = nb = 0
            for p in paths:
                with Image.open(p) as im:  # a plain buffered open(), as every loader does
                    im.load()
                    nb += im.width * im.height
                n += 1
            t1 = now()
        else:
            paths = [os.path.join(root, r) for r in rels]
            # Default buffering, as PIL, pandas and np.loadtxt open files: Python up to
            # 3.13 then asks isatty() per open, which a FUSE mount answers with a round
            # trip. "fs314" opens as CPython 3.14's open() does a regular file: it knows
            # from the open's fstat that the file is no terminal and asks nothing; a
            # given buffer size takes that path on older Pythons too.
            buffering = io.DEFAULT_BUFFER_SIZE if mode == "fs314" else -1
            barrier.wait()
            t0 = now()
            n = nb = 0
            for p in paths:
                with open(p, "rb", buffering=buffering) as f:
                    nb += len(f.read())
                n += 1
            t1 = now()
        q.put((n, nb, t0, t1, None))
    except BaseException as e:  # report instead of hanging the parent
        try:
            barrier.abort()
        except Exception:
            pass
        q.put((0, 0, 0.0, 0.0, f"{type(e).__name__}: {e}"))


def seq_shares(files: list[str], readers: int, seed: int) -> list[list[str]]:
    """Trackers' sampling: runs of SEQ_RUN consecutive frames of one sequence, the runs
    in a seeded random order and dealt to the readers; every file once."""
    by_dir: dict[str, list[str]] = {}
    for rel in files:
        by_dir.setdefault(os.path.dirname(rel), []).append(rel)
    for names in by_dir.values():
        names.sort()
    runs = [names[i : i + SEQ_RUN] for _d, names in sorted(by_dir.items()) for i in range(0, len(names), SEQ_RUN)]
    random.Random(seed).shuffle(runs)
    return [[rel for run in runs[i::readers] for rel in run] for i in range(readers)]


def read_epoch(
    mode: str,
    root: Path,
    files: list[str],
    readers: int,
    seed: int,
    timeout: float,
    pattern: str = "uniform",
    group: str | None = None,
) -> dict[str, Any]:
    """Read every file once in a seeded random order (or in sequence runs), split over N
    processes (joining the CPU budget whose procs file is ``group``, if given)."""
    if pattern == "seq":
        shares = seq_shares(files, readers, seed)
    else:
        order = list(files)
        random.Random(seed).shuffle(order)
        shares = [order[i::readers] for i in range(readers)]
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(readers)
    q = ctx.Queue()
    procs = [ctx.Process(target=_reader, args=(mode, str(root), shares[i], barrier, q, group)) for i in range(readers)]
    for p in procs:
        p.start()
    outs = []
    try:
        for _ in procs:
            outs.append(q.get(timeout=timeout))
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    errs = [o[4] for o in outs if o[4]]
    if errs:
        raise RuntimeError(f"reader failed: {errs[0]}")
    n = sum(o[0] for o in outs)
    nb = sum(o[1] for o in outs)
    secs = max(o[3] for o in outs) - min(o[2] for o in outs)
    return {
        "files": n,
        "bytes": nb,
        "seconds": secs,
        "files_per_s": n / secs if secs > 0 else 0.0,
        "mb_per_s": nb / 1e6 / secs if secs > 0 else 0.0,
    }


def verify_bytes(src: Path, root: Path, files: list[str]) -> dict[str, Any]:
    """Compare the mounted bytes with the source, file by file."""
    bad: list[str] = []
    for rel in files:
        with open(src / rel, "rb") as a, open(root / rel, "rb") as b:
            if a.read() != b.read():
                bad.append(rel)
    return {"files_checked": len(files), "mismatches": len(bad), "examples": bad[:5], "ok": not bad}
