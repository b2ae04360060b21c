"""The fake GOT-10k tree and walk+stat, the mount-point helpers, and Ctx (what a run shares)."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import SIZES, log
from .proc import load_script, now, run

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


# --------------------------------------------------------------------------- mounts


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
