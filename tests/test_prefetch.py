"""Prefetch: a file looked up has its value read from the disk before its first READ.

The DB file's pages are evicted with POSIX_FADV_DONTNEED, then which of them the page
cache holds is asked with mincore(2): a real mount, real page-cache state.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import time
from pathlib import Path

import pytest

from lmdbfs import open as lmdbfs_open

from .conftest import TRANSPORTS, run_cli

pytestmark = pytest.mark.mount  # every test here mounts a FUSE filesystem

CREDIT = 128  # PREFETCH_CREDIT in csrc/read.c: lookups that may prefetch before a READ
PAGE = os.sysconf("SC_PAGE_SIZE")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)


class PageCache:
    """Which pages of one file the page cache holds (mincore on a map never touched)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        addr = _libc.mmap(None, self.size, mmap.PROT_READ, mmap.MAP_SHARED, self.fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap of the DB file failed")
        self.addr = addr

    def fraction(self, off: int, size: int) -> float:
        first, last = off // PAGE, (off + size - 1) // PAGE
        vec = ctypes.create_string_buffer(last - first + 1)
        if _libc.mincore(self.addr + first * PAGE, (last - first + 1) * PAGE, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return sum(b & 1 for b in vec.raw) / len(vec.raw)

    def evict(self) -> None:
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        _libc.munmap(self.addr, self.size)
        os.close(self.fd)


def _wait_cached(cache: PageCache, spans: list[tuple[int, int]], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(cache.fraction(off, size) == 1.0 for off, size in spans):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_lookups_prefetch_values_until_reads_stop_answering_them(tmp_path: Path, mount_db, transport: str) -> None:
    rng = random.Random(22)
    files = {f"seq{d}/{i:08d}.jpg": rng.randbytes(rng.randrange(90_000, 130_000)) for d in range(4) for i in range(100)}
    src = tmp_path / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    db = tmp_path / "frames.lmdb"
    run_cli("pack", src, db, "--no-progress")
    with lmdbfs_open(str(db)) as arch:
        span = {rel: (arch.lstat(rel).data_off, len(data)) for rel, data in files.items()}
    assert all(off for off, _ in span.values()), "frames this size live at recorded offsets"

    cache = PageCache(db)
    try:
        # Emptied before the mount: pages a process has mapped (LMDB maps the DB) stay.
        cache.evict()
        if any(cache.fraction(*span[rel]) for rel in files):
            pytest.fail(f"POSIX_FADV_DONTNEED did not empty the page cache of {db}: the test needs a disk-backed tmp")
        m = mount_db(db, *TRANSPORTS[transport])
        os.listdir(m.mnt)
        # (LMDB's first read, at offset 0, brings a few pages of the first value along.)
        assert not any(cache.fraction(*span[rel]) for rel in files if span[rel][0] > 1 << 20), "mounting read values"

        # A stat is a LOOKUP: the value is on its way before any read.
        looked = "seq0/00000050.jpg"
        os.stat(m.mnt / looked)
        assert _wait_cached(cache, [span[looked]]), "a looked-up file's value was not prefetched"
        assert cache.fraction(*span["seq3/00000050.jpg"]) == 0.0, "a file nobody asked for was read"

        # A sweep of stats with no reads spends the credit, then stops prefetching.
        sweep = [rel for rel in files if rel.startswith(("seq1/", "seq2/"))]
        rng.shuffle(sweep)
        for rel in sweep:
            os.stat(m.mnt / rel)
        assert _wait_cached(cache, [span[rel] for rel in sweep[: CREDIT - 1]])
        time.sleep(0.5)
        late = [rel for rel in sweep[CREDIT + 8 :] if cache.fraction(*span[rel]) > 0.5]
        assert not late, f"{len(late)} of {len(sweep) - CREDIT - 8} files stat()ed after the credit ran out were read"

        # An open is a promise to read: Python's open() (its isatty() IOCTL) prefetches without credit.
        opened = "seq3/00000010.jpg"
        fh = open(m.mnt / opened, "rb")  # noqa: SIM115 - closed unread on purpose
        fh.close()
        assert _wait_cached(cache, [span[opened]]), "an opened file's value was not prefetched"

        # First reads give the credit back, and lookups prefetch again.
        for rel in sweep[:150]:
            assert (m.mnt / rel).read_bytes() == files[rel]
        again = "seq3/00000090.jpg"
        assert cache.fraction(*span[again]) == 0.0
        os.stat(m.mnt / again)
        assert _wait_cached(cache, [span[again]]), "reads did not give the prefetch credit back"
    finally:
        cache.close()
