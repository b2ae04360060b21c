"""What the numbers were measured on: CPU, RAM, kernel, OS, tool versions, lmdbfs commit."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import REPO

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
