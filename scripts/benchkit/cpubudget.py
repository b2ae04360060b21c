"""A simulated node's CPU: a cgroup with a CPU quota that its mount daemon and its
reader processes join, so that N nodes on this one machine each get the share of a
core that a machine of their own would give them, and one node alone gets no more.

cgroup v2 (``cpu.max``) or v1 (``cpu.cfs_quota_us``), whichever this machine mounts;
as root only. The quota caps a node; it does not reserve the CPU for it: the budgets
of all nodes together, plus the server's and the proxy's share, must fit the machine.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

V2 = Path("/sys/fs/cgroup")
V1 = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000


def available() -> str | None:
    """Why CPU budgets cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "not root"
    if (V2 / "cgroup.controllers").exists():
        if "cpu" not in (V2 / "cgroup.controllers").read_text().split():
            return "cgroup v2 without the cpu controller"
        return None
    if (V1 / "cpu.cfs_quota_us").exists():
        return None
    return "no cpu cgroup controller mounted"


class CpuBudget:
    """One cgroup capped at ``cpus`` cores (0.35: 35 ms of CPU per 100 ms)."""

    def __init__(self, name: str, cpus: float):
        why = available()
        if why:
            raise RuntimeError(f"cannot give a node a CPU budget: {why}")
        self.cpus = cpus
        self.v2 = (V2 / "cgroup.controllers").exists()
        quota = max(1000, int(cpus * PERIOD_US))
        if self.v2:
            control = V2 / "cgroup.subtree_control"
            if "cpu" not in control.read_text().split():
                control.write_text("+cpu")
            self.path = V2 / name
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        else:
            self.path = V1 / name
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))

    @property
    def procs(self) -> str:
        """The file a process writes its pid to, to join (every thread of it moves)."""
        return str(self.path / "cgroup.procs")

    def add(self, pid: int) -> None:
        with open(self.procs, "w") as f:
            f.write(str(pid))

    def members(self) -> list[int]:
        """The processes in the group now."""
        return [int(pid) for pid in (self.path / "cgroup.procs").read_text().split()]

    def close(self) -> None:
        """Move what is left back to the root group, then remove the group."""
        root = V2 if self.v2 else V1
        for _ in range(50):
            try:
                pids = (self.path / "cgroup.procs").read_text().split()
            except OSError:
                return
            for pid in pids:
                try:
                    (root / "cgroup.procs").write_text(pid)
                except OSError:
                    pass  # gone meanwhile
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def join(procs: str | None) -> None:
    """In a reader process: join the node's group (None: stay where it is)."""
    if procs:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
