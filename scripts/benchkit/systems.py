"""The ways of storing the tree (System and a subclass each): pack, mount, unmount, read root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .config import SCRIPTS, URING_PARAM, log
from .proc import Measured, drop_caches, now, path_bytes, run, run_measured, tree_rss_kb
from .trees import Ctx, find_daemon, fuse_unmount, is_mounted, wait_mounted

# --------------------------------------------------------------------------- systems


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
        m = run_measured(cmd, timeout=self.ctx.args.timeout, durable=[self.db])
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
        m = run_measured(cmd, timeout=self.ctx.args.timeout, durable=[self.img])
        return {"tool": "mksquashfs", "cold": cold, **measured_dict(m), "out_bytes": path_bytes(self.img)}

    def mount_cmd(self) -> list[str]:
        return [self.ctx.args.squashfuse_bin, str(self.img), str(self.mnt)]


def tar_cf(ctx: Ctx, out: Path) -> Measured:
    """``tar cf`` of the tree, measured (the tar half of ratarmount's pack, and the tar yardstick)."""
    return run_measured(["tar", "cf", str(out), "-C", str(ctx.tree.root), "."], timeout=ctx.args.timeout, durable=[out])


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
        m = run_measured(cmd, timeout=self.ctx.args.timeout, durable=[self.dbdir])
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
        "returned_seconds": sum(m.returned_seconds if m.returned_seconds is not None else m.seconds for m in ms),
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
