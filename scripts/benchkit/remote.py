"""The remote section of the benchmark: the same DB read from local disk, through
`lmdbfs mount URL` over HTTP (nginx) and S3 (SeaweedFS), through httpdirfs under a
local `lmdbfs mount`, and a tar of the tree through ratarmount over HTTP.

Every remote system reads through scripts/faultproxy.py (a subprocess), which adds
the case's round-trip time and bandwidth cap and counts GETs and bytes per system
(one labelled listener each). Servers come from tests/servers.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from .config import REPO, SCRIPTS, log
from .proc import drop_caches, now, run, tree_rss_kb
from .readers import read_epoch
from .trees import find_daemon, fuse_unmount, is_mounted, wait_mounted

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests/servers.py: the same servers the tests start

REMOTE_SYSTEMS = ("local", "http", "http-heads", "http-demand", "s3", "httpdirfs", "ratarmount")
LMDBFS = [sys.executable, "-m", "lmdbfs"]


class Proxy:
    """scripts/faultproxy.py as a child process, one listener per label."""

    def __init__(self, upstream_port: int, labels: list[str], rtt_ms: float, mbit: float | None):
        cmd = [sys.executable, str(SCRIPTS / "faultproxy.py"), f"127.0.0.1:{upstream_port}", "--rtt-ms", str(rtt_ms)]
        if mbit:
            cmd += ["--mbit", str(mbit)]
        for label in labels:
            cmd += ["--label", label]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("fault proxy did not start")
        self.ports: dict[str, int] = json.loads(line)["ports"]

    def url(self, label: str) -> str:
        return f"http://127.0.0.1:{self.ports[label]}"

    def _control(self, what: str, post: bool = False) -> Any:
        req = urllib.request.Request(
            f"{self.url(next(iter(self.ports)))}/__faultproxy__/{what}",
            data=b"" if post else None,
            method="POST" if post else "GET",
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def totals(self, label: str) -> dict[str, int]:
        paths = self._control("counters").get(label, {})
        return {
            "requests": sum(c["requests"] for c in paths.values()),
            "gets": sum(c["gets"] for c in paths.values()),
            "bytes_fetched": sum(c["bytes"] for c in paths.values()),
        }

    def count_into(self, epoch: dict[str, Any], label: str) -> dict[str, Any]:
        """Add the proxy's counts to an epoch's result: GETs per file, bytes fetched / read."""
        epoch.update(self.totals(label))
        epoch["gets_per_file"] = epoch["gets"] / max(1, epoch["files"])
        epoch["fetch_ratio"] = epoch["bytes_fetched"] / max(1, epoch["bytes"])
        return epoch

    def reset(self) -> None:
        self._control("reset", post=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def disk_bytes(path: Path) -> int:
    """Bytes a folder really holds on disk (sparse files count their blocks only)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


def start_foreground(cmd: list[str], mnt: Path, log_path: Path, cwd: Path, limit: float = 7200) -> subprocess.Popen:
    """Start a FUSE daemon in the foreground (-f), in its own process group, and wait
    until it has mounted; its output goes to log_path."""
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
        )
    t0 = now()
    while not is_mounted(mnt):
        if proc.poll() is not None:
            raise RuntimeError(
                f"{Path(cmd[0]).name} exited {proc.returncode}: {log_path.read_text(errors='replace')[-800:]}"
            )
        if now() - t0 > limit:
            stop_foreground(proc)
            raise RuntimeError(f"{Path(cmd[0]).name} did not mount within {limit:.0f} s")
        time.sleep(0.05)
    wait_mounted(mnt)
    return proc


def stop_foreground(proc: subprocess.Popen | None) -> None:
    if proc is None:
        return
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class RemoteSystem:
    """One way of reading the DB (or tar) from where it lives."""

    name = "?"
    remote = True

    def __init__(self, env: RemoteEnv, label: str | None = None):
        self.env = env
        self.label = label or self.name
        self.mnt = env.work / "mnt" / self.label
        self.cache = env.work / "cache" / self.label
        self.pids: list[int] = []

    def fresh_cache(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)
        self.cache.mkdir(parents=True)

    def mount(self, proxy: Proxy | None) -> None:
        raise NotImplementedError

    options: tuple[str, ...] = ()  # of `lmdbfs mount`

    def _mount_lmdbfs(self, source: str, extra_env: dict[str, str] | None = None, cache: bool = True) -> None:
        self.mnt.mkdir(parents=True, exist_ok=True)
        fuse_unmount(self.mnt)
        cmd = [*LMDBFS, "mount", *self.options, source, str(self.mnt)]
        cmd += ["--cache-dir", str(self.cache)] if cache else []
        if cache and self.env.cache_size:
            cmd += ["--cache-size", self.env.cache_size]
        run(cmd, timeout=3600, env={**os.environ, **(extra_env or {})}, cwd=self.env.work)
        wait_mounted(self.mnt)
        pid = find_daemon(self.mnt)
        self.pids = [pid] if pid else []

    def umount(self) -> None:
        fuse_unmount(self.mnt)

    def root(self) -> Path:
        return self.mnt

    def memory(self) -> dict[str, float]:
        rss = anon = 0
        for pid in self.pids:
            r, a = tree_rss_kb(pid)
            rss, anon = rss + r, anon + a
        return {"rss_mb": rss / 1024, "anon_mb": anon / 1024}

    def cache_bytes(self) -> int:
        return disk_bytes(self.cache) if self.cache.exists() else 0


class Local(RemoteSystem):
    name = "local"
    remote = False

    def mount(self, proxy):
        self._mount_lmdbfs(str(self.env.db), cache=False)


class Http(RemoteSystem):
    name = "http"

    def mount(self, proxy):
        self._mount_lmdbfs(f"{proxy.url(self.label)}/{self.env.db.name}")


class HttpHeads(RemoteSystem):
    """lmdbfs over HTTP with the DB's heads sidecar (`lmdbfs heads`) published beside it."""

    name = "http-heads"

    def mount(self, proxy):
        self._mount_lmdbfs(f"{proxy.url(self.label)}/heads/{self.env.db.name}")


class HttpDemand(Http):
    """lmdbfs over HTTP fetching only what is read (`--no-fetch-all`): the epoch bound by
    round trips that the whole-DB stream (the default, in "http") avoids."""

    name = "http-demand"
    options = ("--no-fetch-all",)


class S3(RemoteSystem):
    name = "s3"

    def mount(self, proxy):
        self._mount_lmdbfs(self.env.s3.url(self.env.db.name), extra_env=self.env.s3.env(proxy.url(self.label)))


class HttpDirFs(RemoteSystem):
    """httpdirfs (its own block cache on) exposes the DB file; a plain `lmdbfs mount` of it."""

    name = "httpdirfs"

    def mount(self, proxy):
        self.http_mnt = self.env.work / "mnt" / f"{self.label}-http"
        self.http_mnt.mkdir(parents=True, exist_ok=True)
        fuse_unmount(self.http_mnt)
        # --no-range-check: Debian's 1.2.5 wants "Accept-Ranges: bytes" on a 206, which nginx
        # (rightly) does not send; the ranges themselves work. 1.2.5's --single-file-mode
        # takes the URL as its argument. -f: daemonized, its curl threads do not survive the fork.
        self.proc = start_foreground(
            [
                "httpdirfs",
                "-f",
                "--cache",
                "--cache-location",
                str(self.cache),
                "--no-range-check",
                "--single-file-mode",
                f"{proxy.url(self.label)}/{self.env.db.name}",
                str(self.http_mnt),
            ],
            self.http_mnt,
            self.env.work / "httpdirfs.log",
            self.env.work,
            limit=600,
        )
        self._mount_lmdbfs(str(self.http_mnt / self.env.db.name), cache=False)
        self.pids.append(self.proc.pid)

    def umount(self):
        fuse_unmount(self.mnt)
        fuse_unmount(self.http_mnt)
        stop_foreground(getattr(self, "proc", None))
        self.proc = None


class Ratarmount(RemoteSystem):
    """ratarmount reads the tar through fsspec's HTTP file; its index is kept in the
    work dir, so only the first mount of a run builds it (reading the whole tar)."""

    name = "ratarmount"

    def mount(self, proxy):
        self.mnt.mkdir(parents=True, exist_ok=True)
        fuse_unmount(self.mnt)
        exe = shutil.which("ratarmount", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
        if not exe:
            raise RuntimeError("ratarmount is not installed: pip install -e '.[bench]'")
        index = self.env.work / "tree.tar.index.sqlite"
        # In the foreground: it refuses to daemonize with fsspec's threads running. The
        # first mount of a run builds the index, reading the whole tar over HTTP.
        self.proc = start_foreground(
            [exe, "-f", "--index-file", str(index), f"{proxy.url(self.label)}/{self.env.tar.name}", str(self.mnt)],
            self.mnt,
            self.env.work / "ratarmount.log",
            self.env.work,
        )
        self.pids = [self.proc.pid]

    def umount(self):
        fuse_unmount(self.mnt)
        stop_foreground(getattr(self, "proc", None))
        self.proc = None

    def root(self) -> Path:
        return self.mnt / self.env.tar_prefix if self.env.tar_prefix else self.mnt


SYSTEMS = {cls.name: cls for cls in (Local, Http, HttpHeads, HttpDemand, S3, HttpDirFs, Ratarmount)}


class RemoteEnv:
    """The run's servers and artifacts: the DB and tar published by nginx, the DB in S3."""

    def __init__(
        self,
        work: Path,
        db: Path,
        tar: Path | None,
        tar_prefix: str,
        want_s3: bool,
        drop: bool = True,
        cache_size: str | None = None,
        heads: Path | None = None,
    ):
        from tests.servers import nginx, s3

        self.cache_size = cache_size  # --cache-size of the lmdbfs mounts (None: unbounded)
        self.work, self.db, self.tar, self.tar_prefix, self.drop = work, db, tar, tar_prefix, drop
        www = work / "www"
        shutil.rmtree(www, ignore_errors=True)
        www.mkdir(parents=True)
        for art in (db, tar):
            if art is not None:
                os.link(art, www / art.name)  # a hard link: no copy of gigabytes
        if heads is not None:  # http-heads: the DB and its sidecar in a folder of their own
            (www / "heads").mkdir()
            os.link(db, www / "heads" / db.name)
            shutil.copyfile(heads, www / "heads" / (db.name + ".heads"))
        self._nginx_cm = nginx(www)
        self.nginx = self._nginx_cm.__enter__()
        self._s3_cm = self.s3 = None
        if want_s3:
            self._s3_cm = s3(bucket="lmdbfs-bench")
            self.s3 = self._s3_cm.__enter__()
            t0 = now()
            self.s3.put(db, db.name)
            log.info("uploaded %s to S3 in %.1f s", db.name, now() - t0)

    def upstream_port(self, system: str) -> int:
        if system == "s3":
            return int(self.s3.endpoint.rsplit(":", 1)[1])
        return self.nginx.port

    def close(self) -> None:
        for cm in (self._s3_cm, self._nginx_cm):
            if cm is not None:
                cm.__exit__(None, None, None)


def cold_mount(sysobj, env: RemoteEnv, proxy: Proxy | None, out: dict[str, Any]) -> None:
    """Mount on an empty cache and a dropped page cache: its time and the GETs and bytes
    it took go into ``out`` (the proxy's counts then start again)."""
    sysobj.fresh_cache()
    out["cold_ok"] = drop_caches(env.drop)
    t0 = now()
    sysobj.mount(proxy)
    out["mount_s"] = now() - t0
    if proxy:
        counts = proxy.totals(sysobj.label)
        out["mount_gets"], out["mount_bytes"] = counts["gets"], counts["bytes_fetched"]
        proxy.reset()


def one_run(
    env: RemoteEnv,
    system: str,
    files: list[str],
    readers: int,
    pattern: str,
    rtt_ms: float,
    mbit: float | None,
    seed: int,
    timeout: float,
    warm: bool = True,
) -> dict[str, Any]:
    """A cold epoch on a fresh mount (empty cache, dropped page cache), then, for systems
    with a persistent cache, a warm one on a remount of the same cache."""
    sysobj = SYSTEMS[system](env)
    out: dict[str, Any] = {"system": system, "readers": readers, "pattern": pattern, "rtt_ms": rtt_ms, "mbit": mbit}
    proxy = Proxy(env.upstream_port(system), [sysobj.label], rtt_ms, mbit) if sysobj.remote else None
    try:
        cold_mount(sysobj, env, proxy, out)
        try:
            out["cold"] = read_epoch("fs", sysobj.root(), files, readers, seed, timeout, pattern)
            if proxy:
                proxy.count_into(out["cold"], sysobj.label)
            out.update(sysobj.memory())
            out["cache_bytes"] = sysobj.cache_bytes()
        finally:
            sysobj.umount()
        if warm and system in ("http", "http-demand", "s3", "httpdirfs"):
            if proxy:
                proxy.reset()
            drop_caches(env.drop)
            sysobj.mount(proxy)
            try:
                out["warm"] = read_epoch("fs", sysobj.root(), files, readers, seed + 1, timeout, pattern)
                if proxy:
                    proxy.count_into(out["warm"], sysobj.label)
            finally:
                sysobj.umount()
    except Exception as e:  # a failing system is a result, not the end of the run
        log.exception("%s: failed", system)
        out["error"] = f"{type(e).__name__}: {e}"[:500]
        for mnt in (sysobj.mnt, getattr(sysobj, "http_mnt", None)):
            if mnt is not None and is_mounted(mnt):
                fuse_unmount(mnt)
    finally:
        if proxy:
            proxy.stop()
        shutil.rmtree(sysobj.cache, ignore_errors=True)
    return out
