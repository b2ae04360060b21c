"""FUSE over io_uring: where the kernel offers it, the daemon takes its requests from
per-CPU rings instead of reading /dev/fuse, and serves exactly what it serves there;
where it does not (the module's enable_uring off, or --no-io-uring), /dev/fuse serves.

Every test really mounts. The session fixture has turned enable_uring on (root) where
the kernel has it.
"""

from __future__ import annotations

import errno
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import URING_PARAM, ring_completions
from .treecmp import differences, snapshot

pytestmark = pytest.mark.mount  # every test here mounts a FUSE filesystem

# A kernel older than 6.14 has no FUSE over io_uring: there these tests check that the
# mount serves through /dev/fuse instead (no test skips).
HAS_URING = URING_PARAM.exists()


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def test_rings_take_the_requests_and_serve_the_tree_byte_for_byte(
    got10k_tree: Path, got10k_db: Path, mount_db, tmp_path: Path, fuse_io_uring: bool
) -> None:
    assert fuse_io_uring or not HAS_URING, "enable_uring could not be turned on (run the tests as root)"
    log = tmp_path / "daemon.log"
    m = mount_db(got10k_db, "--log-file", str(log))
    pid = m.daemon_pid()
    before = ring_completions(pid)
    if HAS_URING:
        assert before is not None, "the daemon has no io_uring ring"
        assert "FUSE over io_uring" in log.read_text()
    else:
        assert before is None and "FUSE over io_uring" not in log.read_text()
    files = _files(got10k_tree)
    jobs = files * 2
    random.Random(3).shuffle(jobs)

    def same(rel: Path) -> bool:
        with open(m.mnt / rel, "rb") as fh:  # buffered, as loaders open: an ioctl per open
            return fh.read() == (got10k_tree / rel).read_bytes()

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(same, jobs))
    no_write = 0o7555  # the mount is read-only: it shows no write bits
    assert differences(snapshot(got10k_tree, no_write), snapshot(m.mnt, no_write)) == []
    if HAS_URING:  # every file took at least one request (lookup, ioctl, read), by ring
        assert ring_completions(pid) - before >= len(files)
    with pytest.raises(FileNotFoundError):
        os.stat(m.mnt / "no such file")
    with pytest.raises(OSError) as err:
        (m.mnt / "new.txt").write_text("x")
    assert err.value.errno == errno.EROFS


def _ring_threads(pid: int) -> dict[int, str]:
    """The daemon's ring threads and the CPUs each may run on."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "comm").read_text().strip() == "lmdbfs-ring":
            status = (task / "status").read_text()
            out[int(task.name)] = next(
                ln.split(":", 1)[1].strip() for ln in status.splitlines() if ln.startswith("Cpus_allowed_list")
            )
    return out


def test_each_ring_thread_runs_on_its_queues_cpu_at_idle_priority(edge_db: Path, mount_db, fuse_io_uring: bool) -> None:
    # The kernel queues a reader's request on the ring of the CPU the reader runs on; the
    # thread serving that ring is pinned there, so the wake-ups stay on one CPU.
    m = mount_db(edge_db)
    rings = _ring_threads(m.daemon_pid())
    if not HAS_URING:
        assert rings == {}
        return
    assert fuse_io_uring
    assert len(rings) >= 16
    allowed = {str(c) for c in os.sched_getaffinity(m.daemon_pid())}
    pinned = [cpus for cpus in rings.values() if cpus in allowed]  # one CPU each
    # a queue whose CPU the daemon may not use (offline, outside its cpuset) stays unpinned
    assert len(pinned) >= len(rings) / 2 or len(allowed) == 1, rings
    assert set(pinned) == allowed, rings  # every CPU the daemon may use has its ring threads
    # and they yield their CPU to the reader they wake
    assert all(os.sched_getscheduler(tid) == os.SCHED_IDLE for tid in rings)


def test_no_io_uring_and_a_kernel_that_does_not_offer_it_serve_through_dev_fuse(
    edge_tree: Path, edge_db: Path, mount_db, fuse_io_uring: bool
) -> None:
    assert fuse_io_uring or not HAS_URING
    m = mount_db(edge_db, "--no-io-uring", name="asked")
    assert ring_completions(m.daemon_pid()) is None
    assert (m.mnt / "plain.txt").read_bytes() == (edge_tree / "plain.txt").read_bytes()
    if HAS_URING:
        URING_PARAM.write_text("N")
    try:
        m2 = mount_db(edge_db, name="off")
    finally:
        if HAS_URING:
            URING_PARAM.write_text("Y")
    assert ring_completions(m2.daemon_pid()) is None
    for rel in ("plain.txt", "small/many_007.txt", "big/seventy_mb.bin"):
        assert (m2.mnt / rel).read_bytes() == (edge_tree / rel).read_bytes()


def test_a_reply_as_large_as_a_ring_buffer_allows(edge_tree: Path, edge_db: Path, mount_db) -> None:
    """Reads of up to 1 MiB in one request (max_pages) fill a ring entry's reply buffer."""
    m = mount_db(edge_db)
    data = (edge_tree / "big" / "seventy_mb.bin").read_bytes()
    rng = random.Random(11)
    with open(m.mnt / "big" / "seventy_mb.bin", "rb", buffering=0) as fh:
        for _ in range(40):
            off = rng.randrange(len(data))
            size = rng.choice([1, 4096, 1 << 20, (1 << 20) + 4097, 3 << 20])
            assert os.pread(fh.fileno(), size, off) == data[off : off + size]
        assert os.pread(fh.fileno(), 1 << 20, len(data) - 10) == data[-10:]
        assert os.pread(fh.fileno(), 1 << 20, len(data) + 5) == b""
