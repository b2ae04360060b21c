#!/usr/bin/env python3
"""Side-by-side benchmark: raw tree vs lmdbfs vs SquashFS vs tar+ratarmount vs seed LMDB.

Users choose between keeping the raw tree, ``tar`` + ratarmount, a SquashFS
image + squashfuse, or an LMDB their loaders read directly.  This script
measures all of them in one run on one machine so the ratios are comparable:

1. generate (or reuse) a fake GOT-10k tree (``--size smoke|medium|full``);
2. pack it with ``lmdbfs pack``, the seed-style converter
   (``scripts/seed_convert.py``), ``tar cf`` + ratarmount's index, and
   ``mksquashfs -noI -noD -noF -noX``; caches dropped before each; wall time,
   peak RSS and output size;
3. mount lmdbfs, ratarmount and squashfuse and read every file in a seeded
   random order with 1/2/4 reader processes: first epoch (backing file in page
   cache, fresh mount), steady epoch, cold cache; ``os.walk`` + ``stat``,
   mount time and daemon RSS; every mount's bytes checked against the source;
4. write ``bench-<size>.png`` and ``benchmarks.md`` (raw results embedded, so
   sizes run separately accumulate) to ``--out-dir`` (default ``docs/``), a
   JSON copy to ``--workdir``, and print the ratios against the targets.

It is not a unit test.  ``--size smoke`` (a few dozen files) exists so that a
test can check the harness does not crash.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import multiprocessing as mp
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
DEFAULT_WORKDIR = Path(os.environ.get("LMDBFS_BENCH_WORKDIR", "/var/tmp/lmdbfs-bench"))
ALL_SYSTEMS = (
    "native",
    "lmdbfs",
    "lmdbfs-devfuse",
    "lmdbfs-py",
    "squashfs",
    "squashfuse",
    "ratarmount",
    "tar",
    "seed",
)
MOUNTED = ("lmdbfs", "lmdbfs-devfuse", "lmdbfs-py", "squashfs", "squashfuse", "ratarmount")
# need --old-lmdbfs / root, or only time a yardstick / the other transport: when named
OPT_IN = ("lmdbfs-devfuse", "lmdbfs-py", "squashfs", "tar")
URING_PARAM = Path("/sys/module/fuse/parameters/enable_uring")
# first/steady/cold: every file once, uniform random order. seq-*: trackers' pattern, a
# random sequence then SEQ_RUN consecutive frames of it. pil: a warm epoch decoding a
# sample of the JPEGs with PIL (what a loader spends per frame beside the read).
PHASES = ("first", "steady", "cold", "seq-steady", "seq-cold", "pil", "walk-read")
COLD_PHASES = ("cold", "walk-read")  # run in interleaved rounds across systems
SEQ_RUN = 8
PIL_SAMPLE = 2000
SIZE_ORDER = ("smoke", "medium", "full")

# Tree shapes.  ``seqs`` is per split as make_fake_got10k understands it.
SIZES: dict[str, dict[str, Any]] = {
    "smoke": dict(
        seqs=2,
        frames=6,
        splits=("train", "val"),
        tiny=True,
        readers=(1, 2),
        repeat=1,
        rounds=1,
        pack_rounds=1,
        sample=None,
        verify_sample=None,
        note="a few dozen tiny files: checks the harness, numbers mean nothing",
    ),
    "medium": dict(
        seqs=44,
        frames=150,
        splits=("train", "val", "test"),
        tiny=False,
        readers=(1, 2, 4),
        repeat=3,
        rounds=3,
        pack_rounds=3,
        sample=None,
        verify_sample=None,
        note="~20k files, ~3.5 GB, frames 35-400 KB",
    ),
    "full": dict(
        seqs=9335,
        frames=150,
        splits=("train",),
        tiny=True,
        readers=(2,),
        repeat=1,
        rounds=3,
        pack_rounds=1,
        sample=100_000,
        verify_sample=20_000,
        note="9,335 sequences x 150 tiny frames: the real GOT-10k train file count",
    ),
}

# (key, description, size where the target applies, comparison, threshold)
TARGETS: list[tuple[str, str, tuple[str, ...], str, float]] = [
    ("pack_vs_squashfs", "pack time lmdbfs / mksquashfs", ("medium",), "<=", 1.0),
    ("pack_vs_tar", "pack time lmdbfs / tar cf", ("full",), "<=", 1.0),
    ("seed_vs_pack", "pack speed-up vs seed converter (seed time / lmdbfs time)", ("medium", "full"), ">=", 10.0),
    ("pack_rss", "lmdbfs pack peak anon RSS, all processes (MB)", ("medium", "full"), "<=", 1024.0),
    ("first_vs_squashfuse", "first epoch files/s lmdbfs / squashfuse (2 readers)", ("medium",), ">=", 2.5),
    ("first_vs_ratarmount", "first epoch files/s lmdbfs / ratarmount (2 readers)", ("medium",), ">=", 4.0),
    ("steady_vs_native", "steady epoch files/s lmdbfs / native (2 readers)", ("medium",), ">=", 0.75),
    ("cold_vs_native", "cold-cache epoch files/s lmdbfs / native (2 readers)", ("medium",), ">=", 0.9),
    ("cold8_vs_native", "cold-cache epoch files/s lmdbfs / native (8 readers)", ("medium", "full"), ">=", 0.9),
    ("cold16_vs_native", "cold-cache epoch files/s lmdbfs / native (16 readers)", ("medium", "full"), ">=", 0.9),
    ("cold16_vs_cold1", "cold-cache epoch files/s lmdbfs, 16 readers / 1 reader", ("medium", "full"), ">=", 1.5),
    ("first8_vs_squashfs", "first epoch files/s lmdbfs / kernel squashfs (8 readers)", ("medium",), ">=", 2.0),
    ("steady8_vs_native", "steady epoch files/s lmdbfs / native (8 readers)", ("medium",), ">=", 0.9),
    (
        "walkread8_vs_native",
        "random reads after a cold walk, files/s lmdbfs / native (8 readers)",
        ("full",),
        ">=",
        0.8,
    ),
    ("walk_cold_vs_native", "walk+stat time, cold, lmdbfs / native", ("medium", "full"), "<=", 2.0),
    ("walk_warm_vs_native", "walk+stat time, warm, lmdbfs / native", ("medium", "full"), "<=", 2.0),
    ("mount_s", "lmdbfs mount time, cold (s)", ("full",), "<", 0.5),
    ("daemon_rss", "lmdbfs daemon VmRSS after the epoch (MB)", ("full",), "<=", 100.0),
    # VmRSS counts the DB file's page-cache pages the daemon has mapped (shared, reclaimable);
    # anon memory is what the daemon itself allocates.
    ("daemon_anon", "lmdbfs daemon RssAnon after the epoch (MB; VmRSS less mapped DB pages)", ("full",), "<=", 100.0),
]


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


@dataclass
class Measured:
    """Outcome of one measured child command."""

    seconds: float
    returncode: int
    max_rss_mb: float  # ru_maxrss of the largest process in the tree (wait4)
    tree_rss_mb: float  # peak of the sampled sum of VmRSS over the process tree
    tree_anon_mb: float  # peak of the sampled sum of RssAnon over the process tree
    stderr_tail: str = ""


def run_measured(
    cmd: list[str],
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
    sample_every: float = 0.2,
) -> Measured:
    """Run cmd, timing it exactly and tracking peak memory of it and its children.

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
    tail = b"".join(stderr_chunks)[-4000:].decode(errors="replace")
    m = Measured(
        seconds=result["t1"] - t0,
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


# --------------------------------------------------------------------------- tree


@dataclass
class Tree:
    """The source tree and its listing (relative path -> size)."""

    root: Path
    sizes: dict[str, int]
    dirs: int
    gen_seconds: float | None = None

    @property
    def files(self) -> list[str]:
        return sorted(self.sizes)

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values())


def walk_stat(root: Path) -> tuple[float, dict[str, int], int]:
    """os.walk + os.stat of every file, as a loader's dataset indexer would do."""
    t0 = now()
    sizes: dict[str, int] = {}
    ndirs = 0
    base = len(str(root)) + 1
    for dirpath, dirnames, filenames in os.walk(root):
        ndirs += len(dirnames)
        rel = dirpath[base:]
        for name in filenames:
            st = os.stat(os.path.join(dirpath, name))
            sizes[f"{rel}/{name}" if rel else name] = st.st_size
    return now() - t0, sizes, ndirs


def ensure_tree(workdir: Path, size: str, seed: int, workers: int, regen: bool) -> Tree:
    """Generate the fake GOT-10k tree for this size, or reuse the one on disk."""
    params = dict(SIZES[size])
    shape = {k: params[k] for k in ("seqs", "frames", "splits", "tiny")}
    shape["splits"] = list(shape["splits"])
    shape["seed"] = seed
    root = workdir / "trees" / size
    marker = workdir / "trees" / f"{size}.done.json"
    gen_seconds = None
    if not regen and marker.exists() and root.is_dir():
        old = json.loads(marker.read_text())
        if old.get("shape") == shape:
            log.info("reusing tree %s (%s)", root, old.get("summary"))
            gen_seconds = old.get("seconds")
        else:
            regen = True
    else:
        regen = True
    if regen:
        if root.exists():
            shutil.rmtree(root)
        marker.unlink(missing_ok=True)
        root.parent.mkdir(parents=True, exist_ok=True)
        mk = load_script("make_fake_got10k")
        kw: dict[str, Any] = dict(splits=tuple(shape["splits"]), tiny=shape["tiny"], seed=seed, workers=workers)
        sig = inspect.signature(mk.make_tree).parameters
        if "force" in sig:
            kw["force"] = True
        log.info("generating %s tree: %s", size, shape)
        t0 = now()
        mk.make_tree(root, shape["seqs"], shape["frames"], **kw)
        gen_seconds = now() - t0
    t, sizes, ndirs = walk_stat(root)
    summary = f"{len(sizes)} files, {sum(sizes.values()) / 1e9:.2f} GB, {ndirs} dirs"
    if regen:
        marker.write_text(json.dumps({"shape": shape, "summary": summary, "seconds": gen_seconds}))
        log.info("generated tree in %.1f s: %s", gen_seconds, summary)
    return Tree(root=root, sizes=sizes, dirs=ndirs, gen_seconds=gen_seconds)


# --------------------------------------------------------------------------- systems


def find_daemon(mnt: Path) -> int | None:
    """PID of the FUSE daemon serving mnt: cmdline names mnt and it holds /dev/fuse."""
    target = str(mnt)
    cands: list[int] = []
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.rstrip("/") == target or a.endswith(target) for a in args):
            continue
        cands.append(int(d))
    for pid in cands:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                    return pid
        except OSError:
            continue
    return cands[0] if cands else None


def wait_mounted(mnt: Path, timeout: float = 30.0) -> None:
    """Block until mnt is a mount point that answers readdir."""
    t0 = now()
    while now() - t0 < timeout:
        if os.path.ismount(mnt):
            try:
                os.listdir(mnt)
                return
            except OSError:
                pass
        time.sleep(0.002)
    raise RuntimeError(f"{mnt} not mounted after {timeout} s")


def is_mounted(mnt: Path) -> bool:
    """True when mnt is in the mount table (os.path.ismount is False for a mount answering EIO)."""
    target = str(mnt)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 1 and fields[1].replace("\\040", " ") == target:
                    return True
    except OSError:
        return os.path.ismount(mnt)
    return False


def fuse_unmount(mnt: Path) -> None:
    """fusermount3 -u, lazily as a last resort."""
    if not is_mounted(mnt):
        return
    r = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0 and is_mounted(mnt):
        log.warning("fusermount3 -u %s: %s; lazy unmount", mnt, r.stderr.strip())
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)


class System:
    """One way of storing the tree: how to pack it, mount it and where to read it."""

    name = "?"
    pack_tool = "?"
    mountable = True
    readable = True  # has walks and epochs (tar: only a pack time)
    copies_pack: str | None = None  # serves another system's artifact: its pack figures

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.art = ctx.art_dir
        self.mnt = ctx.mnt_dir / self.name
        self.pid: int | None = None

    # -- packing
    def outputs(self) -> list[Path]:
        return []

    def packed(self) -> bool:
        return all(p.exists() for p in self.outputs())

    def pack(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- mounting
    def mount_cmd(self) -> list[str]:
        raise NotImplementedError

    def mount(self) -> float:
        """Mount and return seconds until the mount answers readdir."""
        self.mnt.mkdir(parents=True, exist_ok=True)
        fuse_unmount(self.mnt)
        t0 = now()
        try:
            run(self.mount_cmd(), timeout=3600)
            wait_mounted(self.mnt)
        except BaseException:
            # A daemon that came up late or answers EIO must not outlive the run.
            self.pid = find_daemon(self.mnt)
            self.umount()
            if self.pid and os.path.exists(f"/proc/{self.pid}"):
                os.kill(self.pid, 15)
            raise
        t = now() - t0
        self.pid = find_daemon(self.mnt)
        if self.pid is None:
            log.warning("%s: daemon pid not found", self.name)
        return t

    def umount(self) -> None:
        """Unmount and wait for the daemon to exit (so its mmap is released)."""
        fuse_unmount(self.mnt)
        if self.pid:
            t0 = now()
            while os.path.exists(f"/proc/{self.pid}") and now() - t0 < 20:
                try:
                    with open(f"/proc/{self.pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                            break
                except OSError:
                    break
                time.sleep(0.01)
        self.pid = None

    def read_root(self) -> Path:
        return self.mnt

    def backing(self) -> list[Path]:
        """Files whose page-cache residency makes an epoch 'first' rather than cold."""
        return self.outputs()

    def daemon_rss(self) -> dict[str, float]:
        if not self.pid:
            return {}
        rss, anon = tree_rss_kb(self.pid)
        return {"rss_mb": rss / 1024, "anon_mb": anon / 1024}


class Native(System):
    name = "native"
    pack_tool = "-"
    mountable = False

    def mount(self) -> float:
        return 0.0

    def umount(self) -> None:
        pass

    def read_root(self) -> Path:
        return self.ctx.tree.root

    def backing(self) -> list[Path]:
        return [self.ctx.tree.root / f for f in self.ctx.epoch_files]


class Lmdbfs(System):
    name = "lmdbfs"
    pack_tool = "lmdbfs pack"

    @property
    def db(self) -> Path:
        return self.art / "tree.lmdb"

    def cli(self) -> list[str]:
        return [sys.executable, "-m", "lmdbfs"]

    def outputs(self) -> list[Path]:
        return [self.db]

    def pack(self) -> dict[str, Any]:
        # The old DB goes before the clock starts, as the other packers' outputs do:
        # replacing it inside the timed run adds its unlink (0.6 s for 3.4 GB here).
        self.db.unlink(missing_ok=True)
        Path(f"{self.db}.partial").unlink(missing_ok=True)
        cmd = [*self.cli(), "pack", str(self.ctx.tree.root), str(self.db), "--no-progress"]
        if self.ctx.args.pack_workers:
            cmd += ["--workers", str(self.ctx.args.pack_workers)]
        cold = drop_caches(self.ctx.cold_ok)
        m = run_measured(cmd, timeout=self.ctx.args.timeout)
        return {"tool": "lmdbfs pack", "cold": cold, **measured_dict(m), "out_bytes": path_bytes(self.db)}

    def mount_cmd(self) -> list[str]:
        return [*self.cli(), "mount", str(self.db), str(self.mnt)]

    def umount(self) -> None:
        if is_mounted(self.mnt):
            r = subprocess.run([*self.cli(), "umount", str(self.mnt)], capture_output=True, text=True)
            if r.returncode != 0:
                log.warning("lmdbfs umount: %s", r.stderr.strip()[-500:])
        super().umount()


class Squashfuse(System):
    name = "squashfuse"
    pack_tool = "mksquashfs -noI -noD -noF -noX"

    @property
    def img(self) -> Path:
        return self.art / "tree.sqsh"

    def outputs(self) -> list[Path]:
        return [self.img]

    def pack(self) -> dict[str, Any]:
        self.img.unlink(missing_ok=True)
        cmd = [
            "mksquashfs",
            str(self.ctx.tree.root),
            str(self.img),
            "-noI",
            "-noD",
            "-noF",
            "-noX",
            "-noappend",
            "-no-progress",
            "-quiet",
        ]
        cold = drop_caches(self.ctx.cold_ok)
        m = run_measured(cmd, timeout=self.ctx.args.timeout)
        return {"tool": "mksquashfs", "cold": cold, **measured_dict(m), "out_bytes": path_bytes(self.img)}

    def mount_cmd(self) -> list[str]:
        return [self.ctx.args.squashfuse_bin, str(self.img), str(self.mnt)]


def tar_cf(ctx: Ctx, out: Path) -> Measured:
    """``tar cf`` of the tree, measured (the tar half of ratarmount's pack, and the tar yardstick)."""
    return run_measured(["tar", "cf", str(out), "-C", str(ctx.tree.root), "."], timeout=ctx.args.timeout)


class Ratarmount(System):
    name = "ratarmount"
    pack_tool = "tar cf + ratarmount index"

    @property
    def tar(self) -> Path:
        return self.art / "tree.tar"

    @property
    def index(self) -> Path:
        return self.art / "tree.tar.index.sqlite"

    def outputs(self) -> list[Path]:
        return [self.tar, self.index]

    def binary(self) -> str:
        return self.ctx.ratarmount_bin()

    def pack(self) -> dict[str, Any]:
        self.tar.unlink(missing_ok=True)
        self.index.unlink(missing_ok=True)
        cold = drop_caches(self.ctx.cold_ok)
        m_tar = tar_cf(self.ctx, self.tar)
        # Index creation happens on the first mount; time mount-with-indexing.
        cold2 = drop_caches(self.ctx.cold_ok)
        self.mnt.mkdir(parents=True, exist_ok=True)
        fuse_unmount(self.mnt)
        m_idx = run_measured([*self._mount_args(recreate=True)], timeout=self.ctx.args.timeout)
        wait_mounted(self.mnt)
        self.pid = find_daemon(self.mnt)
        self.umount()
        return {
            "tool": "tar cf + ratarmount index",
            "cold": cold and cold2,
            **measured_dict(m_tar, m_idx),
            "parts": {"tar cf": measured_dict(m_tar), "ratarmount index": measured_dict(m_idx)},
            "out_bytes": path_bytes(self.tar) + path_bytes(self.index),
        }

    def _mount_args(self, recreate: bool = False) -> list[str]:
        cmd = [self.binary(), "--index-file", str(self.index)]
        if recreate:
            cmd.append("--recreate-index")
        return [*cmd, str(self.tar), str(self.mnt)]

    def mount_cmd(self) -> list[str]:
        return self._mount_args()


class Seed(System):
    """The seed-style LMDB, read directly by loaders (md5 keys), never mounted."""

    name = "seed"
    pack_tool = "seed-style converter (PIL re-encode, Pool)"
    mountable = False

    @property
    def dbdir(self) -> Path:
        return self.art / "seed-lmdb"

    def outputs(self) -> list[Path]:
        return [self.dbdir / "data.mdb"]

    def pack(self) -> dict[str, Any]:
        if self.dbdir.exists():
            shutil.rmtree(self.dbdir)
        cmd = [
            sys.executable,
            str(SCRIPTS / "seed_convert.py"),
            str(self.ctx.tree.root),
            str(self.dbdir),
            "--no-progress",
        ]
        cold = drop_caches(self.ctx.cold_ok)
        m = run_measured(cmd, timeout=self.ctx.args.timeout)
        return {"tool": "seed_convert.py", "cold": cold, **measured_dict(m), "out_bytes": path_bytes(self.dbdir)}

    def mount(self) -> float:
        return 0.0

    def umount(self) -> None:
        pass

    def read_root(self) -> Path:
        return self.dbdir


def measured_dict(*ms: Measured) -> dict[str, Any]:
    """Seconds add up over steps; memory is the max over steps."""
    return {
        "seconds": sum(m.seconds for m in ms),
        "max_rss_mb": max(m.max_rss_mb for m in ms),
        "tree_rss_mb": max(m.tree_rss_mb for m in ms),
        "tree_anon_mb": max(m.tree_anon_mb for m in ms),
    }


class LmdbfsPy(Lmdbfs):
    """The same DB served by an older lmdbfs (e.g. the Python server), side by side:
    --old-lmdbfs names a directory holding that version's lmdbfs/ package."""

    name = "lmdbfs-py"
    pack_tool = "(the lmdbfs DB)"
    copies_pack = "lmdbfs"

    @property
    def db(self) -> Path:
        return self.art / "tree.lmdb"

    def cli(self) -> list[str]:
        if not self.ctx.args.old_lmdbfs:
            raise SystemExit("lmdbfs-py needs --old-lmdbfs DIR")
        return ["env", f"PYTHONPATH={self.ctx.args.old_lmdbfs}", sys.executable, "-m", "lmdbfs"]

    def pack(self) -> dict[str, Any]:
        return Lmdbfs(self.ctx).pack()


class LmdbfsDevFuse(Lmdbfs):
    """The same DB and daemon with --no-io-uring: requests through /dev/fuse even where
    the kernel offers FUSE over io_uring, to show what the rings change side by side."""

    name = "lmdbfs-devfuse"
    pack_tool = "(the lmdbfs DB)"
    copies_pack = "lmdbfs"

    def pack(self) -> dict[str, Any]:
        return Lmdbfs(self.ctx).pack()

    def mount_cmd(self) -> list[str]:
        return [*super().mount_cmd(), "--no-io-uring"]


def set_fuse_io_uring(want: str) -> tuple[str, str | None]:
    """Turn the fuse module's enable_uring on or off for the run (root; 'asis' leaves it).
    Returns the state measured ('on', 'off', or 'unavailable') and the value to restore."""
    if not URING_PARAM.exists():
        return "unavailable", None
    before = URING_PARAM.read_text().strip()
    if want != "asis":
        try:
            URING_PARAM.write_text("Y" if want == "on" else "N")
        except OSError as e:
            log.warning("cannot set %s (%s): measuring with it as it is", URING_PARAM, e)
    return ("on" if URING_PARAM.read_text().strip() == "Y" else "off"), before


class KernelSquashfs(Squashfuse):
    """The squashfuse image mounted by the kernel's own squashfs (root only): an anchor
    with no FUSE round trips at all."""

    name = "squashfs"
    pack_tool = "(the squashfuse image)"

    def mount_cmd(self) -> list[str]:
        return ["mount", "-t", "squashfs", "-o", "loop,ro", str(self.img), str(self.mnt)]

    def umount(self) -> None:
        if is_mounted(self.mnt):
            subprocess.run(["umount", str(self.mnt)], capture_output=True)
        self.pid = None


class Tar(System):
    """``tar cf`` of the tree, timed as a packer and never read: the issue's yardstick
    for pack speed at full size, without ratarmount's indexing."""

    name = "tar"
    pack_tool = "tar cf"
    mountable = False
    readable = False

    @property
    def tar(self) -> Path:
        return self.art / "plain.tar"

    def outputs(self) -> list[Path]:
        return [self.tar]

    def pack(self) -> dict[str, Any]:
        self.tar.unlink(missing_ok=True)
        cold = drop_caches(self.ctx.cold_ok)
        m = tar_cf(self.ctx, self.tar)
        out = {"tool": self.pack_tool, "cold": cold, **measured_dict(m), "out_bytes": path_bytes(self.tar)}
        self.tar.unlink(missing_ok=True)  # only the time matters; keep the disk
        return out


SYSTEM_CLASSES: dict[str, type[System]] = {
    "native": Native,
    "lmdbfs": Lmdbfs,
    "lmdbfs-devfuse": LmdbfsDevFuse,
    "lmdbfs-py": LmdbfsPy,
    "squashfs": KernelSquashfs,
    "squashfuse": Squashfuse,
    "ratarmount": Ratarmount,
    "tar": Tar,
    "seed": Seed,
}


# --------------------------------------------------------------------------- readers


def _reader(mode: str, root: str, rels: list[str], barrier: Any, q: Any) -> None:
    """One reader process: read its share of the files, report count/bytes/times."""
    try:
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
            barrier.wait()
            t0 = now()
            n = nb = 0
            for p in paths:
                # Default buffering, as PIL, pandas and np.loadtxt open files: Python then
                # asks isatty() per open, which a FUSE mount answers with a round trip.
                with open(p, "rb") as f:
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
    mode: str, root: Path, files: list[str], readers: int, seed: int, timeout: float, pattern: str = "uniform"
) -> dict[str, Any]:
    """Read every file once in a seeded random order (or in sequence runs), split over N processes."""
    if pattern == "seq":
        shares = seq_shares(files, readers, seed)
    else:
        order = list(files)
        random.Random(seed).shuffle(order)
        shares = [order[i::readers] for i in range(readers)]
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(readers)
    q = ctx.Queue()
    procs = [ctx.Process(target=_reader, args=(mode, str(root), shares[i], barrier, q)) for i in range(readers)]
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


# --------------------------------------------------------------------------- context


@dataclass
class Ctx:
    """Everything a benchmark run shares."""

    args: argparse.Namespace
    size: str
    workdir: Path
    tree: Tree
    epoch_files: list[str]
    verify_files: list[str]
    cold_ok: bool
    res: dict[str, Any] = field(default_factory=dict)
    _ratarmount: str | None = None

    @property
    def art_dir(self) -> Path:
        return self.workdir / "artifacts" / self.size

    @property
    def mnt_dir(self) -> Path:
        return self.workdir / "mnt" / self.size

    def ratarmount_bin(self) -> str:
        """ratarmount from --ratarmount-bin, or from a venv in the work dir (created once)."""
        if self._ratarmount:
            return self._ratarmount
        if self.args.ratarmount_bin:
            self._ratarmount = self.args.ratarmount_bin
            return self._ratarmount
        venv = self.workdir / "venvs" / "ratarmount"
        exe = venv / "bin" / "ratarmount"
        if not exe.exists():
            log.info("creating ratarmount venv in %s (%s)", venv, self.args.ratarmount_spec)
            run([sys.executable, "-m", "venv", str(venv)], timeout=600)
            run([str(venv / "bin" / "pip"), "install", "-q", self.args.ratarmount_spec], timeout=1800)
        self._ratarmount = str(exe)
        return self._ratarmount


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
                if "first" in a.phases:
                    e = read_epoch(mode, s.read_root(), files, r, base + 1, timeout)
                    add_epoch(ctx, name, r, "first", e, False, sampled)
                rss1 = s.daemon_rss()
                if "steady" in a.phases:
                    runs = [
                        read_epoch(mode, s.read_root(), files, r, base + 2 + 100 * k, timeout) for k in range(a.repeat)
                    ]
                    e = median_run(runs, "files_per_s")
                    add_epoch(ctx, name, r, "steady", e, False, sampled)
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


def cold_epoch(ctx: Ctx, s: System, readers: int, phase: str, seed: int) -> tuple[dict[str, Any], bool]:
    """One cold epoch: caches dropped, a fresh mount, the epoch's files in random order.
    walk-read (the issue's full-size measure) first walks and stats the whole mount."""
    mode = "seed" if s.name == "seed" else "fs"
    cold = drop_caches(ctx.cold_ok)
    s.mount()
    try:
        if phase == "walk-read":
            walk_stat(s.read_root())
        return read_epoch(mode, s.read_root(), ctx.epoch_files, readers, seed, ctx.args.timeout), cold
    finally:
        s.umount()


def do_cold_rounds(ctx: Ctx, systems: list[System]) -> None:
    """The cold epochs, interleaved: round after round, every system in turn, the order
    rotating, so a slow minute of the shared machine falls on all systems alike rather
    than on whichever ran then. Each (system, readers, phase) keeps its median epoch."""
    a = ctx.args
    phases = [p for p in COLD_PHASES if p in a.phases]
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
                    seed = a.seed * 1000 + r * 10 + (3 if phase == "cold" else 7) + 100 * k
                    try:
                        e, cold = cold_epoch(ctx, s, r, phase, seed)
                    except Exception as exc:
                        log.exception("%s: %s epoch failed", s.name, phase)
                        ctx.res["errors"][f"{s.name} {phase} reads"] = str(exc)
                        failed.add(s.name)
                        s.umount()
                        continue
                    log.info(
                        "%s: %d readers, %s epoch, round %d of %d: %.0f files/s",
                        s.name,
                        r,
                        phase,
                        k + 1,
                        a.rounds,
                        e["files_per_s"],
                    )
                    key = (s.name, r, phase)
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


# --------------------------------------------------------------------------- machine


def _first_line(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return ((r.stdout or r.stderr).strip().splitlines() or ["?"])[0]
    except (OSError, subprocess.SubprocessError):
        return "not found"


def _git_rev() -> str:
    """Which lmdbfs code the numbers belong to.

    The repo's HEAD (flagged when lmdbfs/ has uncommitted changes), unless the
    lmdbfs that child processes import lives elsewhere, e.g. a snapshot put
    first on PYTHONPATH so that a long run is not measured on code edited
    mid-run; such a snapshot may carry a REVISION file naming its commit.
    """
    where = _first_line([sys.executable, "-c", "import lmdbfs; print(lmdbfs.__file__)"])
    pkg = Path(where).resolve().parent if where.endswith(".py") else None
    if pkg is not None and REPO not in pkg.parents:
        rev_file = pkg.parent / "REVISION"
        rev = rev_file.read_text().strip() if rev_file.exists() else "unknown commit"
        return f"{rev} (snapshot on PYTHONPATH)"
    rev = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", str(REPO), "status", "--porcelain", "--", "lmdbfs"])
    return rev + (" (lmdbfs/ modified)" if dirty not in ("?", "", "not found") else "")


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(workdir: Path, ctx_rat: Callable[[], str] | None) -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, RAM, kernel, disk, tool versions."""
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    fs = _first_line(["findmnt", "-n", "-o", "FSTYPE", "--target", str(workdir)])
    try:
        import lmdb

        liblmdb = ".".join(map(str, lmdb.version()))
    except Exception:
        liblmdb = "?"
    info: dict[str, Any] = {
        "commit": _git_rev(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(mem / 1024**3, 1),
        "kernel": platform.release(),
        "os": _os_name(),
        "workdir_fs": fs,
        "python": platform.python_version(),
        "versions": {
            "lmdbfs": _dist_version("lmdbfs"),
            "py-lmdb": _dist_version("lmdb"),
            "liblmdb": liblmdb,
            "mfusepy": _dist_version("mfusepy"),
            "Pillow": _dist_version("Pillow"),
            "fuse3": _first_line(["fusermount3", "-V"]).replace("fusermount3 version: ", ""),
            "squashfuse": _first_line(["dpkg-query", "-W", "-f", "${Version}", "squashfuse"]),
            "mksquashfs": _first_line(["mksquashfs", "-version"]).replace("mksquashfs version ", ""),
            "tar": _first_line(["tar", "--version"]).replace("tar (GNU tar) ", "GNU "),
        },
    }
    if ctx_rat is not None:
        try:
            info["versions"]["ratarmount"] = _first_line([ctx_rat(), "--version"]).replace("ratarmount ", "")
        except Exception as e:
            info["versions"]["ratarmount"] = f"unavailable ({e})"
    return info


def _os_name() -> str:
    try:
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


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

    def ps(name: str, part: str | None = None) -> float | None:
        p = pack.get(name)
        if not p:
            return None
        if part:
            return p.get("parts", {}).get(part, {}).get("seconds")
        return p["seconds"]

    rss = res.get("daemon_rss", {}).get("lmdbfs", {})
    daemon = max((v.get("after_steady", {}).get("rss_mb", 0) for v in rss.values()), default=None) if rss else None
    anon = max((v.get("after_steady", {}).get("anon_mb", 0) for v in rss.values()), default=None) if rss else None
    r2 = 2 if any(e["readers"] == 2 for e in res.get("epochs", [])) else None
    vals: dict[str, float | None] = {
        "pack_vs_squashfs": _div(ps("lmdbfs"), ps("squashfs") or ps("squashfuse")),  # both run mksquashfs
        "pack_vs_tar": _div(ps("lmdbfs"), ps("tar") or ps("ratarmount", "tar cf")),
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
            "| system | tool | time (s) | peak RSS, largest process (MB) | peak RSS, all processes (MB) | "
            "peak anon RSS, all processes (MB) | output (GB) |"
        )
        L.append("|---|---|---:|---:|---:|---:|---:|")
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
            L.append(
                f"| {name} | {p['tool']}{extra} | {_f(p['seconds'])} | {_f(p['max_rss_mb'], 0)} | "
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
        rounds = [e for e in eps if e["phase"] in COLD_PHASES and len(e.get("repeats", ())) > 1]
        if rounds:
            L.append(
                "Each cold and walk-read figure above is the median of these rounds (files/s, in the order "
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
  (`--pack-rounds`) and each keeps its median. Time is wall time. *Peak RSS, largest process* is the kernel's `ru_maxrss` from `wait4` (what
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
  *cold*: caches dropped, fresh mount; cold and walk-read epochs run in `--rounds` rounds (3 at
  medium and full size), every system in turn within a round, the order rotating between rounds,
  and each figure is the median of its rounds (all rounds are listed under the table). *first*: backing file (the `.lmdb`, `.sqsh`, `.tar` + index; for
  native, the files) read into the page cache, fresh mount. *steady*: the next epoch on that mount,
  in another order (median of `--repeat` epochs, 3 at medium size). *walk-read*: caches dropped,
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
```
Run as root so caches can be dropped (otherwise 'cold' numbers are marked not cold). Results go to
`docs/bench-<size>.png` and this file (raw numbers are embedded at its end) (`--out-dir` to write elsewhere);
the tree and artifacts stay in `--workdir` (default `/var/tmp/lmdbfs-bench`, or
`$LMDBFS_BENCH_WORKDIR`) and are reused by later runs."""


def _rss_panel(ax: Any, res: dict[str, Any], colors: dict[str, str]) -> None:
    """Daemon memory after the epochs (used when there is a single reader count)."""
    names, rss, anon = [], [], []
    for n, by_r in res.get("daemon_rss", {}).items():
        last = by_r[max(by_r, key=int)]
        after = last.get("after_steady") or last.get("after_first") or {}
        if after:
            names.append(n)
            rss.append(after.get("rss_mb", 0))
            anon.append(after.get("anon_mb", 0))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], rss, 0.4, label="VmRSS", color=[colors[n] for n in names])
    ax.bar([x + 0.2 for x in xs], anon, 0.4, label="RssAnon", color=[colors[n] for n in names], alpha=0.5)
    ax.set_xticks(list(xs), names)
    ax.set_title("daemon RSS after the epochs (MB; solid VmRSS, light anon)")


def make_chart(res: dict[str, Any], path: Path) -> bool:
    """bench-<size>.png: pack time, epoch files/s, walk+stat time, reader scaling."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no chart (pip install matplotlib)")
        return False
    colors = {
        "native": "#777777",
        "lmdbfs": "#1f77b4",
        "lmdbfs-devfuse": "#17becf",
        "lmdbfs-py": "#aec7e8",
        "squashfs": "#8c564b",
        "squashfuse": "#ff7f0e",
        "ratarmount": "#2ca02c",
        "tar": "#bcbd22",
        "seed": "#9467bd",
    }
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    fig.suptitle(
        f"lmdbfs benchmark, size {res['size']} ({res['tree']['files']:,} files, "
        f"{res['tree']['bytes'] / 1e9:.2f} GB)" + (", epochs on a sample" if res.get("sampled") else "")
    )
    ax = axes[0][0]
    pack = res.get("pack", {})
    names = [n for n in ALL_SYSTEMS if n in pack]
    ax.bar(names, [pack[n]["seconds"] for n in names], color=[colors[n] for n in names])
    ax.set_title("pack time (s, lower is better)")
    ax.set_xticks(range(len(names)), [f"{n}\n{pack[n]['tool']}" for n in names], fontsize=7)
    eps = res.get("epochs", [])
    readers = sorted({e["readers"] for e in eps})
    rsel = 2 if 2 in readers else (readers[-1] if readers else None)
    ax = axes[0][1]
    if rsel is not None:
        names = [n for n in ALL_SYSTEMS if any(e["system"] == n for e in eps)]
        width = 0.8 / max(1, len(names))
        for i, n in enumerate(names):
            vals = [epoch_rate(res, n, rsel, p) or 0 for p in PHASES]
            ax.bar([j + i * width for j in range(len(PHASES))], vals, width, label=n, color=colors[n])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(PHASES))], PHASES)
        ax.legend(fontsize=8)
        ax.set_yscale("log")
    ax.set_title(f"epoch files/s, {rsel} readers (log scale, higher is better)")
    ax = axes[1][0]
    walk = res.get("walk", {})
    names = [n for n in ALL_SYSTEMS if n in walk]
    width = 0.4
    ax.bar(
        [i for i in range(len(names))],
        [walk[n]["cold_s"] for n in names],
        width,
        label="cold",
        color=[colors[n] for n in names],
    )
    ax.bar(
        [i + width for i in range(len(names))],
        [walk[n]["warm_s"] for n in names],
        width,
        label="warm",
        color=[colors[n] for n in names],
        alpha=0.5,
    )
    ax.set_xticks([i + width / 2 for i in range(len(names))], names)
    ax.set_title("os.walk + stat of everything (s; solid cold, light warm)")
    ax = axes[1][1]
    if len(readers) < 2:
        _rss_panel(ax, res, colors)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return True
    for n in ALL_SYSTEMS:
        pts = [(r, epoch_rate(res, n, r, "steady")) for r in readers]
        pts = [(r, v) for r, v in pts if v]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=n, color=colors[n])
    ax.set_xticks(readers or [1])
    ax.set_xlabel("reader processes")
    if ax.get_lines():
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_title("steady epoch files/s vs readers (log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _union_run(mnt: Path, dbs: list[Path], files: dict[str, int], readers: int, timeout: float) -> dict[str, float]:
    """One fresh mount of ``dbs``: mount time, walk+stat, a first epoch, daemon memory."""
    warm_files(dbs)
    mnt.mkdir(exist_ok=True)
    t0 = now()
    run([sys.executable, "-m", "lmdbfs", "mount", *map(str, dbs), str(mnt)], timeout=timeout)
    mount_s = now() - t0
    try:
        walk_s, seen, _ = walk_stat(mnt)
        if seen != files:
            raise RuntimeError(f"{mnt}: the mount does not list the source's files")
        epoch = read_epoch("fs", mnt, sorted(files), readers, 0, timeout)
        daemon = find_daemon(mnt)
        status = proc_status(daemon) if daemon else {}
        cpu_s = _cpu_seconds(daemon) if daemon else 0.0
    finally:
        fuse_unmount(mnt)
    return {
        "daemon_cpu_ms_per_1k_files": 1e6 * cpu_s / max(1, len(files)),  # steadier than wall time when busy
        "mount_s": mount_s,
        "walk_s": walk_s,
        "files_per_s": epoch["files_per_s"],
        "rss_mb": status.get("VmRSS", 0) / 1024,
        "anon_mb": status.get("RssAnon", 0) / 1024,
    }


def union_scaling(
    workdir: Path, src: Path, nshards: int, readers: int, timeout: float, rounds: int = 3
) -> dict[str, Any]:
    """One mount of 1 DB vs one mount of the same files packed as ``nshards`` DBs
    (`lmdbfs pack --shard I/N`): mount time, walk+stat, a first epoch (fresh mount,
    DB files in the page cache) and the daemon's memory, side by side."""
    work = workdir / "union"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    lmdbfs = [sys.executable, "-m", "lmdbfs"]
    one = work / "one.lmdb"
    run([*lmdbfs, "pack", str(src), str(one), "--no-progress"], timeout=timeout)
    shards = [work / f"shard.{i}.lmdb" for i in range(nshards)]
    for i, db in enumerate(shards):
        run([*lmdbfs, "pack", "--shard", f"{i}/{nshards}", str(src), str(db), "--no-progress"], timeout=timeout)
    files = walk_stat(src)[1]
    out: dict[str, Any] = {"files": len(files), "bytes": sum(files.values()), "shards": nshards, "runs": {}}
    samples: dict[str, list[dict[str, float]]] = {}
    for _round in range(rounds):  # alternating, the median of each: shared machines are noisy
        for label, dbs in (("1 DB", [one]), (f"{nshards} DBs", shards)):
            samples.setdefault(label, []).append(_union_run(work / "mnt", dbs, files, readers, timeout))
    for label, runs in samples.items():
        out["runs"][label] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    a, b = out["runs"].values()
    print(f"{out['files']} files, {out['bytes'] / 1e6:.0f} MB; {readers} readers; fresh mounts; median of {rounds}")
    print(f"{'':24}{'1 DB':>12}{f'{nshards} DBs':>12}{'ratio':>8}")
    for key, name in (("mount_s", "mount (s)"), ("walk_s", "walk+stat (s)"), ("files_per_s", "files/s"),
                      ("daemon_cpu_ms_per_1k_files", "daemon CPU ms/1k files"),
                      ("rss_mb", "daemon VmRSS (MB)"), ("anon_mb", "daemon RssAnon (MB)")):  # fmt: skip
        print(f"{name:24}{a[key]:12.2f}{b[key]:12.2f}{b[key] / a[key] if a[key] else float('nan'):8.2f}")
    (workdir / "results-union.json").write_text(json.dumps(out, indent=2))
    return out


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
        help="run the warm walk and the steady epoch N times and keep the median (default: medium 3, else 1)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="run the cold and walk-read epochs N times, systems interleaved, and keep each median "
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


if __name__ == "__main__":
    sys.exit(main())
