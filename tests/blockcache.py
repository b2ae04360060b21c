"""A remote DB's block cache built from a packed DB, a fetcher that fills it, and the C
server serving it as a remote layer (docs/remote.md).

The cache is what the mount daemon keeps for a remote object: ``data``, a sparse copy of
the DB, and ``state``, a 4096-byte header and one u32 word per block. ``build`` marks
every block present except those lying wholly inside an LMDB value (directory records,
file values): those hold no page LMDB itself touches, exactly the blocks the daemon
leaves to be fetched. ``Fetcher`` plays the daemon's fetcher in another process than the
server: it reads the claimed block numbers from the request pipe, copies each block from
the DB file and publishes it (or marks it failed, damages it, or ignores it, on demand).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import lmdb

from lmdbfs.db import store
from lmdbfs.format.records import INDEX_DB

from .conftest import is_mounted

ABSENT, FILLING, PRESENT, FAILED = 0, 1, 2, 3  # csrc/blocks/blockstate.h
STATE_MASK, GEN_ONE = 3, 8
HEADER = 4096
SYS_FUTEX, FUTEX_WAKE = 202, 1  # x86_64
_libc = ctypes.CDLL(None, use_errno=True)


def value_spans(db: Path) -> list[tuple[int, int]]:
    """(offset, size) in the DB file of every LMDB value: records and file values."""
    env = lmdb.open(str(db), subdir=False, readonly=True, lock=False, max_dbs=4)
    spans = []
    try:
        base = store.map_base(str(db))
        with env.begin(buffers=True) as txn:
            for dbi in (env.open_db(None, txn=txn, create=False), env.open_db(INDEX_DB, txn=txn, create=False)):
                for _key, view in txn.cursor(db=dbi):
                    if len(view):
                        spans.append((store.map_offset(view, base), len(view)))
    finally:
        env.close()
    return spans


def covered_blocks(spans: list[tuple[int, int]], block: int) -> set[int]:
    """Blocks lying wholly inside one of spans."""
    out: set[int] = set()
    for off, size in spans:
        first, end = -(-off // block), (off + size) // block
        out.update(range(first, end))
    return out


def build(db: Path, folder: Path, block: int, absent: set[int]) -> tuple[Path, Path]:
    """``data`` and ``state`` for db in folder: every block present but those in absent."""
    folder.mkdir(parents=True, exist_ok=True)
    size = db.stat().st_size
    blocks = -(-size // block)
    data, state = folder / "data", folder / "state"
    src = db.read_bytes()
    with open(data, "wb") as fh:
        fh.truncate(size)
        for b in range(blocks):
            if b not in absent:
                fh.seek(b * block)
                fh.write(src[b * block : (b + 1) * block])
    words = [ABSENT if b in absent else PRESENT for b in range(blocks)]
    header = b"LMDBFSB1" + struct.pack("<IIQQ", 1, block, size, blocks)
    state.write_bytes(header.ljust(HEADER, b"\0") + struct.pack(f"<{blocks}I", *words))
    return data, state


class Fetcher:
    """Fills claimed blocks from the DB file, from a thread of the test process."""

    def __init__(self, db: Path, data: Path, state: Path, block: int) -> None:
        self.src, self.block = db.read_bytes(), block
        self.read_fd, self.write_fd = os.pipe()
        self.wake_r, self.wake_w = os.pipe()  # stop(): the thread closes its end and leaves
        self.data_fd = os.open(data, os.O_WRONLY)
        self.state_fd = os.open(state, os.O_RDWR)
        self.map = mmap.mmap(self.state_fd, 0)
        self.blocks = (len(self.map) - HEADER) // 4
        self.words = (ctypes.c_uint32 * self.blocks).from_buffer(self.map, HEADER)
        self.fail: set[int] = set()  # answered FAILED
        self.damage: set[int] = set()  # filled with one byte wrong
        self.ignore: set[int] = set()  # never answered (a filler that died)
        self.requests: list[int] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="fetcher", daemon=True)
        self.thread.start()

    def word(self, b: int) -> int:
        return self.words[b]

    def _publish(self, b: int, state: int) -> None:
        self.words[b] = (self.words[b] & ~STATE_MASK) | state
        _libc.syscall(
            SYS_FUTEX, ctypes.c_void_p(ctypes.addressof(self.words) + 4 * b), FUTEX_WAKE, 0x7FFFFFFF, None, None, 0
        )

    def _fill(self, b: int) -> None:
        with self.lock:
            self.requests.append(b)
            if b in self.ignore:
                return
            if b in self.fail:
                self._publish(b, FAILED)
                return
            chunk = bytearray(self.src[b * self.block : (b + 1) * self.block])
            if b in self.damage:
                chunk[len(chunk) // 2] ^= 0xFF
        os.pwrite(self.data_fd, chunk, b * self.block)
        self._publish(b, PRESENT)

    def _run(self) -> None:
        pending = b""
        while True:
            ready, _, _ = select.select([self.read_fd, self.wake_r], [], [])
            if self.wake_r in ready:
                os.close(self.read_fd)
                return
            chunk = os.read(self.read_fd, 4096)
            if not chunk:
                os.close(self.read_fd)
                return
            pending += chunk
            while len(pending) >= 8:
                self._fill(int.from_bytes(pending[:8], "little"))
                pending = pending[8:]

    def requested(self) -> list[int]:
        with self.lock:
            return list(self.requests)

    def stop(self) -> None:
        """The fetcher is gone: its end of the pipe closes."""
        if self.thread.is_alive():
            os.write(self.wake_w, b"x")
            self.thread.join(timeout=10)

    def close(self) -> None:
        self.stop()
        del self.words
        self.map.close()
        for fd in (self.state_fd, self.data_fd, self.write_fd, self.wake_r, self.wake_w):
            if fd >= 0:
                os.close(fd)
        self.write_fd = -1


_SERVER = """
import sys
from lmdbfs.fuse import serve
db, data, state, block, fd, mnt, url, stuck, uring = sys.argv[1:]
served = serve.describe([db])
layer = served.layers[0]
layer.index_path, layer.data_path = data, data
layer.remote = {"state_path": state, "block_size": int(block), "request_fd": int(fd), "url": url,
                "stuck_ms": int(stuck)}
sys.exit(serve.run(mnt, served, serve.fuse_args("remote-test", [], False), lambda: print("ready", flush=True),
                   io_uring=uring == "1"))
"""


class RemoteMount:
    """The C server serving db's block cache as a remote layer, in its own process."""

    def __init__(
        self,
        db: Path,
        data: Path,
        state: Path,
        block: int,
        fetcher: Fetcher,
        mnt: Path,
        log: Path,
        url: str = "https://example.test/got.lmdb",
        stuck_ms: int = 60000,
        io_uring: bool = True,
    ) -> None:
        self.mnt, self.log = mnt, log
        mnt.mkdir(parents=True, exist_ok=True)
        args = [db, data, state, block, fetcher.write_fd, mnt, url, stuck_ms, int(io_uring)]
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _SERVER, *map(str, args)],
                stdout=subprocess.PIPE,
                stderr=err,
                pass_fds=[fetcher.write_fd],
            )
        os.close(fetcher.write_fd)  # the server holds the write end now
        fetcher.write_fd = -1
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        if not ready or self.proc.stdout.readline().strip() != b"ready" or not is_mounted(mnt):
            self.close()
            raise AssertionError(f"the remote layer did not mount: {log.read_text()}")

    def log_lines(self, word: str) -> list[str]:
        return [line for line in self.log.read_text(errors="replace").splitlines() if word in line]

    def close(self) -> None:
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        deadline = time.monotonic() + 10
        while is_mounted(self.mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_mounted(self.mnt), f"{self.mnt} still mounted"
