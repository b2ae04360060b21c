"""Files of any size LMDB holds pack, verify, unpack and serve in bounded memory: a sparse
file of 4 GiB - 1 bytes (LMDB's largest value: records.VALUE_MAX) in a folder and a
2.5 GiB member of a zip (deflated zeros: a few MB on disk) go through pack, verify,
verify --against, unpack, cat and a FUSE mount byte-exact, while each process's
anonymous memory (RssAnon, sampled from /proc) stays under 256 MB. The values are
written for real, one DB at a time (up to 4.3 GB of disk), removed at the end."""

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
from pathlib import Path

import pytest
import xxhash

import lmdbfs
from lmdbfs.format.records import VALUE_MAX
from lmdbfs.pack.feed import LARGE_BYTES

ANON_BOUND = 256 << 20
GiB = 1 << 30
# Bytes written into the sparse file, so byte-exactness is tested off the zeros too.
MARKS = {0: b"head", 3 * GiB + 12345: b"middle", VALUE_MAX - 4: b"tail"}


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

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _bounded(*args: str | os.PathLike) -> str:
    """Run an lmdbfs command; fail if it fails or its anonymous memory passes the bound."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmdbfs", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    peak = _Peak(proc.pid)
    out, err = proc.communicate(timeout=600)
    top = peak.stop()
    assert proc.returncode == 0, err.decode()
    print(f"lmdbfs {args[0]}: peak RssAnon {top / 1e6:.0f} MB")  # shown with pytest -s
    assert 0 < top <= ANON_BOUND, f"lmdbfs {args[0]}: {top / 1e6:.0f} MB anonymous memory"
    return out.decode()


def _digest(pieces: Iterator[bytes]) -> int:
    h = xxhash.xxh3_64()
    for piece in pieces:
        h.update(piece)
    return h.intdigest()


def _file_pieces(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while piece := fh.read(4 << 20):
            yield piece


def _sparse(path: Path, size: int, marks: dict[int, bytes]) -> int:
    with open(path, "wb") as fh:
        fh.truncate(size)
        for at, data in marks.items():
            fh.seek(at)
            fh.write(data)
    return _digest(_file_pieces(path))


def _through_everything(tmp_path: Path, src: Path, name: str, want: int, mount_db) -> None:
    db, out = tmp_path / "huge.db", tmp_path / "unpacked"
    try:
        _bounded("pack", "--no-progress", src, db)
        _bounded("verify", db)
        _bounded("verify", db, "--against", src)
        _bounded("unpack", db, out)
        assert _digest(_file_pieces(out / name)) == want
        (out / name).unlink()
        cat = subprocess.Popen([sys.executable, "-m", "lmdbfs", "cat", db, name], stdout=subprocess.PIPE)
        peak = _Peak(cat.pid)
        assert _digest(iter(lambda: cat.stdout.read(4 << 20), b"")) == want
        top = peak.stop()
        print(f"lmdbfs cat: peak RssAnon {top / 1e6:.0f} MB")
        assert cat.wait() == 0 and top <= ANON_BOUND
        mnt = mount_db(db)
        peak = _Peak(mnt.daemon_pid())
        assert _digest(_file_pieces(mnt.mnt / name)) == want
        top = peak.stop()
        print(f"the mount's daemon: peak RssAnon {top / 1e6:.0f} MB")
        assert top <= ANON_BOUND
        mnt.close()
    finally:
        for path in (db, out / name):
            if path.exists():
                path.unlink()


def test_a_sparse_4_gib_file_in_a_folder(tmp_path: Path, mount_db) -> None:
    src = tmp_path / "tree"
    src.mkdir()
    (src / "small.txt").write_bytes(b"small\n")
    want = _sparse(src / "huge.bin", VALUE_MAX, MARKS)
    _through_everything(tmp_path, src, "huge.bin", want, mount_db)


def test_a_2_5_gib_member_of_a_zip(tmp_path: Path, mount_db) -> None:
    zero = tmp_path / "zero.bin"
    want = _sparse(zero, 5 * GiB // 2, {GiB: b"one GiB in", 5 * GiB // 2 - 3: b"end"})
    src = tmp_path / "big.zip"
    with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("small.txt", b"small\n")
        zf.write(zero, "data/zero.bin")
    zero.unlink()
    _through_everything(tmp_path, src, "data/zero.bin", want, mount_db)


@pytest.fixture(autouse=True)
def _enough_disk(tmp_path: Path) -> None:
    free = os.statvfs(tmp_path)
    assert free.f_bavail * free.f_frsize > 10 * GiB, "these tests write ~4.3 GB DBs: 10 GB free needed"


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
