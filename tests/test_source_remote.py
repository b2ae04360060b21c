"""The C server's remote byte source: a layer read through a block cache that another
process fills (docs/remote.md, csrc/source.c).

The cache is built from a packed DB with every block inside an LMDB value left absent;
a fetcher in this process answers the blocks the server claims, across processes as the
mount daemon's fetcher does. Every test really mounts.
"""

from __future__ import annotations

import errno
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lmdbfs import _serve
from lmdbfs.fuse import serve

from .blockcache import (
    ABSENT,
    FAILED,
    GEN_ONE,
    PRESENT,
    STATE_MASK,
    Fetcher,
    RemoteMount,
    build,
    covered_blocks,
    value_spans,
)
from .conftest import TRANSPORTS, run_cli

pytestmark = pytest.mark.mount

BLOCK = 4096
URL = "https://example.test/data/tree.lmdb"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("remote") / "src"
    rng = random.Random(20)
    sizes = [0, 1, 90, 700, 3000, 5000, 9000, 40_000, 70_000, 130_000, 300_000]
    for d in range(4):
        for i, size in enumerate(sizes):
            path = root / f"seq{d}" / f"{i:03d}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.randbytes(size))
    (root / "big").mkdir()
    (root / "big" / "two_and_a_half_mb.bin").write_bytes(rng.randbytes(2_500_000))
    return root


@pytest.fixture(scope="module")
def db(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("remotedb") / "tree.lmdb"
    run_cli("pack", tree, out, "--no-progress")
    return out


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _span(db: Path, tree: Path, rel: str) -> tuple[int, int]:
    """Where rel's bytes lie in the DB file (the test's files are random, so unique)."""
    data = (tree / rel).read_bytes()
    off = db.read_bytes().find(data)
    assert off > 0 and len(data) > 2 * BLOCK
    return off, len(data)


def _blocks(span: tuple[int, int]) -> range:
    off, size = span
    return range(off // BLOCK, (off + size - 1) // BLOCK + 1)


class Setup:
    def __init__(self, db: Path, tmp: Path, absent: set[int] | None = None) -> None:
        self.absent = covered_blocks(value_spans(db), BLOCK) if absent is None else absent
        self.data, self.state = build(db, tmp / "cache", BLOCK, self.absent)
        self.fetcher = Fetcher(db, self.data, self.state, BLOCK)
        self.db, self.tmp = db, tmp
        self.mount: RemoteMount | None = None

    def mount_it(self, **kw) -> RemoteMount:
        self.mount = RemoteMount(
            self.db,
            self.data,
            self.state,
            BLOCK,
            self.fetcher,
            self.tmp / "mnt",
            self.tmp / "daemon.log",
            url=URL,
            **kw,
        )
        return self.mount

    def close(self) -> None:
        if self.mount:
            self.mount.close()
        self.fetcher.close()


@pytest.fixture
def setup(db: Path, tmp_path: Path):
    made: list[Setup] = []

    def _make(absent: set[int] | None = None) -> Setup:
        made.append(Setup(db, tmp_path, absent))
        return made[-1]

    yield _make
    for s in made:
        s.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_file_reads_byte_exact_through_claims_and_fills(tree: Path, db: Path, setup, transport: str) -> None:
    s = setup()
    assert len(s.absent) > 200  # the test means something only if most bytes must be fetched
    m = s.mount_it(io_uring=transport == "io_uring")
    files = _files(tree)
    jobs = files * 3
    random.Random(3).shuffle(jobs)

    def same(rel: str) -> bool:
        with open(m.mnt / rel, "rb") as fh:  # buffered: isatty() pushes small files
            return fh.read() == (tree / rel).read_bytes()

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(same, jobs))
    big = (tree / "big" / "two_and_a_half_mb.bin").read_bytes()
    with open(m.mnt / "big" / "two_and_a_half_mb.bin", "rb", buffering=0) as fh:
        for off in (0, 4095, 1 << 20, len(big) - 10):
            assert os.pread(fh.fileno(), 300_000, off) == big[off : off + 300_000]
    asked = s.fetcher.requested()
    assert asked and set(asked) <= s.absent
    assert len(asked) == len(set(asked)), "a block was claimed twice: concurrent readers must share one fetch"
    for b in set(asked):
        assert s.fetcher.word(b) & STATE_MASK == PRESENT
    assert not m.log_lines("ERROR")


def test_open_claims_a_files_first_blocks_without_reading_and_a_stat_claims_none(tree: Path, db: Path, setup) -> None:
    s = setup()
    m = s.mount_it()
    rel = "seq2/009.bin"
    first = _blocks(_span(db, tree, rel))[1]  # [0] shares its block with LMDB pages: present
    assert first in s.absent and first not in s.fetcher.requested()
    os.stat(m.mnt / rel)  # LOOKUP only: a walk or a stat fetches nothing
    time.sleep(0.5)
    assert s.fetcher.requested() == []
    with open(m.mnt / rel, "rb") as fh:  # the IOCTL of Python's open(): a promise to read
        deadline = time.monotonic() + 30
        while first not in s.fetcher.requested() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first in s.fetcher.requested()
        assert fh.read() == (tree / rel).read_bytes()


def test_a_failed_fetch_is_eio_for_that_file_and_the_mount_keeps_serving(tree: Path, db: Path, setup) -> None:
    s = setup()
    bad, good = "seq1/008.bin", "seq1/010.bin"
    s.fetcher.fail.update(_blocks(_span(db, tree, bad)))
    m = s.mount_it()
    with pytest.raises(OSError) as caught:
        (m.mnt / bad).read_bytes()
    assert caught.value.errno == errno.EIO
    assert any(s.fetcher.word(b) & STATE_MASK == FAILED for b in _blocks(_span(db, tree, bad)))
    assert (m.mnt / good).read_bytes() == (tree / good).read_bytes()
    lines = m.log_lines(bad)
    assert lines and all(URL in line and "EIO" in line for line in lines)
    s.fetcher.fail.clear()  # the server answers again: a new read fetches the block anew
    assert (m.mnt / bad).read_bytes() == (tree / bad).read_bytes()


def test_a_damaged_cache_block_is_caught_refetched_and_read_right(tree: Path, db: Path, setup) -> None:
    rel, worse = "seq3/010.bin", "seq0/008.bin"
    span, worse_span = _span(db, tree, rel), _span(db, tree, worse)
    absent = covered_blocks(value_spans(db), BLOCK) - set(_blocks(span)) - set(_blocks(worse_span))
    s = setup(absent)
    damaged = _blocks(span)[1]
    with open(s.data, "r+b") as fh:  # the cached copy of a present block goes bad
        fh.seek(damaged * BLOCK + 100)
        byte = fh.read(1)
        fh.seek(damaged * BLOCK + 100)
        fh.write(bytes([byte[0] ^ 0x55]))
    for b in _blocks(worse_span):
        with open(s.data, "r+b") as fh:
            fh.seek(b * BLOCK + 7)
            fh.write(b"\xee")
    s.fetcher.damage.add(_blocks(worse_span)[0])  # ... and the server sends bad bytes again
    m = s.mount_it()
    assert (m.mnt / rel).read_bytes() == (tree / rel).read_bytes()
    assert damaged in s.fetcher.requested()
    assert s.fetcher.word(damaged) >= GEN_ONE and s.fetcher.word(damaged) & STATE_MASK == PRESENT
    for _ in range(3):
        with pytest.raises(OSError) as caught:
            (m.mnt / worse).read_bytes()
        assert caught.value.errno == errno.EIO
    lines = m.log_lines("checksum mismatch")
    assert len(lines) == 1 and worse in lines[0] and URL in lines[0], lines


def test_every_wait_is_bounded(tree: Path, db: Path, setup) -> None:
    s = setup()
    stuck, later = "seq0/009.bin", "seq2/010.bin"
    blocks = _blocks(_span(db, tree, stuck))
    s.fetcher.ignore.update(blocks)  # claimed, never filled: its filler died
    m = s.mount_it(stuck_ms=1500)
    with pytest.raises(OSError) as caught:
        (m.mnt / stuck).read_bytes()
    assert caught.value.errno == errno.EIO
    assert any(s.fetcher.word(b) & STATE_MASK == ABSENT for b in blocks), "a stuck claim must be given back"
    assert any("no block arrived" in line and URL in line for line in m.log_lines(stuck))
    s.fetcher.ignore.clear()
    assert (m.mnt / stuck).read_bytes() == (tree / stuck).read_bytes()
    s.fetcher.stop()  # the fetcher is gone: reads of missing blocks fail at once, the rest serve
    with pytest.raises(OSError) as caught:
        (m.mnt / later).read_bytes()
    assert caught.value.errno == errno.EIO
    assert any("is gone" in line for line in m.log_lines(later))
    assert (m.mnt / stuck).read_bytes() == (tree / stuck).read_bytes()


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda h: b"LMDBFSB2" + h[8:], "version-1"),
        (lambda h: h[:12] + (8192).to_bytes(4, "little") + h[16:], "block size 8192"),
        (lambda h: h[:16] + (12345).to_bytes(8, "little") + h[24:], "describes 12345 bytes"),
        (lambda h: h[:100], "shorter than its header"),
    ],
)
def test_a_state_file_that_does_not_match_refuses_the_layer(db: Path, tmp_path: Path, damage, words: str) -> None:
    data, state = build(db, tmp_path / "cache", BLOCK, set())
    raw = state.read_bytes()
    state.write_bytes(damage(raw[:4096]) + raw[4096:] if len(damage(raw[:4096])) == 4096 else damage(raw))
    layer = serve.describe([str(db)]).layers[0]
    read_end, write_end = os.pipe()
    layer.index_path = layer.data_path = str(data)
    layer.remote = {"state_path": str(state), "block_size": BLOCK, "request_fd": write_end, "url": URL}
    try:
        with pytest.raises(_serve.LayerError) as caught:
            _serve.serve(str(tmp_path / "no-such-mountpoint"), [layer], [])
    finally:
        os.close(read_end)
        os.close(write_end)
    assert words in str(caught.value) and URL in str(caught.value) and str(state) in str(caught.value)
