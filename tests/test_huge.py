"""Files of any size pack, verify, unpack and serve in bounded memory: a sparse file of
8 GiB and a bit (twice LMDB's largest value, format.VALUE_MAX: stored as pieces of 1 GiB) in a
folder and a 2 GiB member of a zip (deflated zeros: a few MB on disk) are packed into one
DB, then go through verify, unpack and a FUSE mount byte-exact, while each
process's anonymous memory (RssAnon, sampled from /proc) stays under 256 MB.

The DB is packed once for the module. Its zeros are holes (the packer punches runs of
zeros out of a large value), so it takes a few MB of disk; bytes are compared with the
known pattern (zeros and a few marks, some across the pieces' edges), not by reading
the sources again. tests/test_split.py checks the same code (verify --against, cat,
damaged and missing pieces) with small pieces."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import xxhash

import lmdbfs
from lmdbfs.format.records import SPLIT_PIECE, SPLIT_VERSION, VALUE_MAX
from lmdbfs.pack.feed import LARGE_BYTES

ANON_BOUND = 256 << 20
GiB = 1 << 30
READ = 4 << 20  # the size of each read of a packed file's bytes
# The 8 GiB and a bit: eight pieces of 1 GiB and a short ninth. Bytes written
# into the sparse file (some across the pieces' edges), so exactness is tested off the zeros.
SPLIT_SIZE = 2 * (VALUE_MAX + 1) + (5 << 20) + 123
SPLIT_PIECES = 9
SPLIT_MARKS = {
    0: b"head",
    GiB - 3: b"across one",
    3 * GiB + 12345: b"middle",
    4 * GiB - 5: b"across four",
    8 * GiB - 5: b"across eight",
    SPLIT_SIZE - 4: b"tail",
}
MEMBER_SIZE = 2 * GiB + 3
MEMBER_MARKS = {GiB: b"one GiB in", MEMBER_SIZE - 3: b"end"}


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _Peak:
    """The highest RssAnon of a process, sampled every few ms on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_anon(self.pid))
            time.sleep(0.005)

    def stop(self, what: str) -> None:
        self._stop.set()
        self._thread.join()
        print(f"{what}: peak RssAnon {self.peak / 1e6:.0f} MB")  # shown with pytest -s
        assert 0 < self.peak <= ANON_BOUND, f"{what}: {self.peak / 1e6:.0f} MB anonymous memory"


def _bounded(*args: str | os.PathLike) -> str:
    """Run an lmdbfs command; fail if it fails or its anonymous memory passes the bound."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmdbfs", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    peak = _Peak(proc.pid)
    out, err = proc.communicate(timeout=900)
    peak.stop(f"lmdbfs {args[0]}")
    assert proc.returncode == 0, err.decode()
    return out.decode()


def _digest(pieces: Iterator[bytes | memoryview]) -> int:
    h = xxhash.xxh3_64()
    for piece in pieces:
        h.update(piece)
    return h.intdigest()


def _file_pieces(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while piece := fh.read(READ):
            yield piece


def _pattern(size: int, marks: dict[int, bytes]) -> Iterator[memoryview]:
    """The bytes of a file of zeros with ``marks``, in pieces (none of them held whole)."""
    zero, at = memoryview(bytes(READ)), 0
    for pos, data in sorted(marks.items()):
        while at < pos:
            step = min(READ, pos - at)
            yield zero[:step]
            at += step
        yield memoryview(data)
        at += len(data)
    while at < size:
        step = min(READ, size - at)
        yield zero[:step]
        at += step


def _slice(marks: dict[int, bytes], offset: int, n: int, size: int = 1 << 62) -> bytes:
    """``n`` bytes from ``offset`` of the pattern of a ``size``-byte file (fewer at its end)."""
    out = bytearray(max(0, min(n, size - offset)))
    for pos, data in marks.items():
        lo, hi = max(pos, offset), min(pos + len(data), offset + n)
        if lo < hi:
            out[lo - offset : hi - offset] = data[lo - pos : hi - pos]
    return bytes(out)


def _sparse(path: Path, size: int, marks: dict[int, bytes]) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size)
        for at, data in marks.items():
            fh.seek(at)
            fh.write(data)


@dataclass
class Packed:
    root: Path
    tree: Path
    zipped: Path
    db: Path
    split_digest: int
    member_digest: int

    @property
    def sources(self) -> tuple[Path, str]:
        return self.tree, f"z={self.zipped}"


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Packed]:
    """One DB of both sources, packed in bounded memory, shared by the checks below."""
    root = tmp_path_factory.mktemp("huge")
    tree = root / "tree"
    tree.mkdir()
    (tree / "small.txt").write_bytes(b"small\n")
    _sparse(tree / "huge.bin", SPLIT_SIZE, SPLIT_MARKS)
    zipped = root / "big.zip"
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("small.txt", b"small\n")
        with zf.open("data/zero.bin", "w", force_zip64=True) as member:
            for piece in _pattern(MEMBER_SIZE, MEMBER_MARKS):
                member.write(piece)
    db = root / "huge.db"
    _bounded("pack", "--no-progress", tree, f"z={zipped}", db)
    yield Packed(
        root, tree, zipped, db, _digest(_pattern(SPLIT_SIZE, SPLIT_MARKS)), _digest(_pattern(MEMBER_SIZE, MEMBER_MARKS))
    )
    for path in (db, tree / "huge.bin", zipped):
        path.unlink(missing_ok=True)


def test_a_file_over_one_value_is_stored_as_pieces_and_its_zeros_as_holes(packed: Packed) -> None:
    with lmdbfs.open(str(packed.db)) as fs:
        assert fs.meta.format_version == SPLIT_VERSION
        entry = fs.stat("huge.bin")
        assert entry.size == SPLIT_SIZE and entry.pieces is not None
        assert entry.pieces[0] == SPLIT_PIECE and len(entry.pieces) == 1 + SPLIT_PIECES and all(entry.pieces[1:])
        assert fs.stat("z/data/zero.bin").pieces is None  # under 4 GiB: one value
        for at in SPLIT_MARKS:
            assert fs.read("huge.bin", 64, at - 20) == _slice(SPLIT_MARKS, at - 20, 64, SPLIT_SIZE)
    # 10 GB of zeros, a few MB on the disk: they were never written there.
    assert os.stat(packed.db).st_blocks * 512 < 64 << 20 < os.path.getsize(packed.db)


def test_verify_in_bounded_memory(packed: Packed) -> None:
    """Every byte checksummed (tests/test_split.py compares split files with their
    sources too, at a small scale)."""
    out = _bounded("verify", packed.db)
    assert out.startswith("ok: 4 files"), out


def _matches(path: Path, size: int, marks: dict[int, bytes]) -> None:
    """A sparse file holds exactly the pattern: each data extent is compared, and each
    mark read where it lies; the rest is holes, which read as zeros, as the pattern does."""
    assert os.path.getsize(path) == size
    fd, at = os.open(path, os.O_RDONLY), 0
    try:
        while at < size:
            try:
                start = os.lseek(fd, at, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after at
                break
            at = os.lseek(fd, start, os.SEEK_HOLE)
            for off in range(start, at, READ):
                assert os.pread(fd, min(READ, at - off), off) == _slice(marks, off, min(READ, at - off)), off
        for pos, data in marks.items():
            assert os.pread(fd, len(data), pos) == data, pos
    finally:
        os.close(fd)


def test_unpack_in_bounded_memory(packed: Packed) -> None:
    out = packed.root / "unpacked"
    try:
        _bounded("unpack", packed.db, out)
        _matches(out / "huge.bin", SPLIT_SIZE, SPLIT_MARKS)
        _matches(out / "z" / "data" / "zero.bin", MEMBER_SIZE, MEMBER_MARKS)
    finally:
        for path in (out / "huge.bin", out / "z" / "data" / "zero.bin"):
            path.unlink(missing_ok=True)


def test_a_mount_serves_them_in_bounded_memory(packed: Packed, mount_db) -> None:
    mnt = mount_db(packed.db)
    peak = _Peak(mnt.daemon_pid())
    fd = os.open(mnt.mnt / "huge.bin", os.O_RDONLY)
    try:  # first, reads across the pieces' edges, before the page cache holds them
        for at in (GiB - 3, 4 * GiB - 5, 8 * GiB - 5):
            assert os.pread(fd, 1 << 20, at - 4000) == _slice(SPLIT_MARKS, at - 4000, 1 << 20)
    finally:
        os.close(fd)
    assert _digest(_file_pieces(mnt.mnt / "huge.bin")) == packed.split_digest
    assert _digest(_file_pieces(mnt.mnt / "z" / "data" / "zero.bin")) == packed.member_digest
    peak.stop("the mount's daemon")


def test_a_tar_streams_past_a_large_member(tmp_path: Path) -> None:
    """A tar member of LARGE_BYTES or more is handed over unread while the one pass over
    the tar waits for it; the members after it still arrive (pack, verify --against)."""
    src = tmp_path / "big.tar"
    big = bytes(range(256)) * ((LARGE_BYTES + 4096) // 256)
    with tarfile.open(src, "w") as tar:
        for name, data in (("a.txt", b"first\n"), ("big.bin", big), ("z.txt", b"last\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    db = tmp_path / "big.lmdb"
    _bounded("pack", "--no-progress", src, db)
    assert _bounded("verify", db, "--against", src).startswith("ok: 3 files")
    with lmdbfs.open(str(db)) as fs:
        assert fs.read_bytes("big.bin") == big
        assert fs.read_bytes("z.txt") == b"last\n"
