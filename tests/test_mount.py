"""Real FUSE mounts: the mount must serve exactly what the source tree holds.

CI has /dev/fuse; these tests fail (never skip) when a mount is impossible.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import lmdbfs

from .conftest import TRANSPORTS, is_mounted, one_error_line, run_cli
from .treecmp import differences, snapshot

pytestmark = pytest.mark.mount  # every test here mounts a FUSE filesystem

ABSENT = {b"backup.bak", b"small/old.bak", b"a_fifo", b"a_socket"}


def _without_write_bits(snap: dict) -> dict:
    out = {}
    for rel, (kind, mode, mtime, size, body) in snap.items():
        out[rel] = (kind, None if mode is None else mode & ~0o222, mtime, size, body)
    return out


def test_mount_serves_the_edge_tree_exactly(edge_tree: Path, edge_db: Path, mount_db) -> None:
    m = mount_db(edge_db)
    expected = _without_write_bits(snapshot(edge_tree))
    actual = snapshot(m.mnt)
    assert differences(expected, actual, ignore=ABSENT) == []
    assert not (set(actual) & ABSENT)
    # nlink of directories counts subdirectories, as on local filesystems
    assert os.stat(m.mnt / "empty_dir").st_nlink == 3
    assert os.stat(m.mnt / "small").st_nlink == 2
    assert os.stat(m.mnt / "link_to_dir" / "日本語 ファイル.txt").st_size == len("unicode ✓\n".encode())
    assert (m.mnt / "link_relative").read_bytes() == b"hello\n"
    vfs = os.statvfs(m.mnt)
    assert vfs.f_files == 300 + 11 + 5 + len([d for d in expected if expected[d][0] == stat.S_IFDIR]) + 1


def test_mount_serves_the_got10k_tree_exactly(got10k_tree: Path, got10k_db: Path, mount_db) -> None:
    m = mount_db(got10k_db)
    assert differences(_without_write_bits(snapshot(got10k_tree)), snapshot(m.mnt)) == []


def test_reads_at_any_offset_and_size(edge_tree: Path, edge_db: Path, mount_db) -> None:
    m = mount_db(edge_db)
    src = (edge_tree / "big" / "seventy_mb.bin").read_bytes()
    rng = np.random.default_rng(3)
    with open(m.mnt / "big" / "seventy_mb.bin", "rb", buffering=0) as fh:
        for _ in range(200):
            offset = int(rng.integers(0, len(src) + 10))
            size = int(rng.integers(0, 3 << 20))
            assert os.pread(fh.fileno(), size, offset) == src[offset : offset + size]


def test_got10k_toolkit_sees_the_same_dataset(got10k_tree: Path, got10k_db: Path, mount_db) -> None:
    from got10k.datasets import GOT10k

    m = mount_db(got10k_db)
    for subset in ("train", "val", "test"):
        src = GOT10k(str(got10k_tree), subset=subset, return_meta=True)
        mnt = GOT10k(str(m.mnt), subset=subset, return_meta=True)
        assert len(src) == len(mnt) == 3
        for i in range(len(src)):
            a, b = src[i], mnt[i]
            assert [os.path.relpath(p, got10k_tree) for p in a[0]] == [os.path.relpath(p, m.mnt) for p in b[0]]
            assert np.array_equal(a[1], b[1])
            if subset != "test":
                assert a[2].keys() == b[2].keys()
                for key in a[2]:
                    assert (
                        np.array_equal(a[2][key], b[2][key])
                        if isinstance(a[2][key], np.ndarray)
                        else a[2][key] == b[2][key]
                    )
            for p, q in zip(a[0], b[0]):
                assert Path(p).read_bytes() == Path(q).read_bytes()


class _FrameDataset:
    """A pytracking-style dataset: frames decoded with PIL or OpenCV, boxes with pandas."""

    def __init__(self, root: str, decoder: str) -> None:
        self.root, self.decoder = root, decoder
        train = os.path.join(root, "train")
        seqs = open(os.path.join(train, "list.txt")).read().split()
        self.items = [
            (os.path.join(train, s, f), s)
            for s in seqs
            for f in sorted(os.listdir(os.path.join(train, s)))
            if f.endswith(".jpg")
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        import pandas

        path, seq = self.items[i]
        if self.decoder == "pil":
            from PIL import Image

            image = np.asarray(Image.open(path).convert("RGB"))
        else:
            import cv2

            image = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        gt = pandas.read_csv(
            os.path.join(self.root, "train", seq, "groundtruth.txt"),
            delimiter=",",
            header=None,
            dtype=np.float32,
            na_filter=False,
            low_memory=False,
        ).values
        frame = int(os.path.basename(path)[:8]) - 1
        return os.path.relpath(path, self.root), int(image.astype(np.int64).sum()), image.shape, gt[frame]


def _load_all(root: str, decoder: str) -> dict:
    import torch

    loader = torch.utils.data.DataLoader(
        _FrameDataset(root, decoder), batch_size=4, num_workers=4, collate_fn=lambda batch: batch
    )
    return {rel: (total, shape, box.tolist()) for batch in loader for rel, total, shape, box in batch}


@pytest.mark.parametrize("decoder", ["pil", "cv2"])
def test_dataloader_with_4_workers_decodes_the_same_frames(
    got10k_tree: Path, got10k_db: Path, mount_db, decoder: str
) -> None:
    m = mount_db(got10k_db)
    from_mount = _load_all(str(m.mnt), decoder)
    from_source = _load_all(str(got10k_tree), decoder)
    assert len(from_mount) == 3 * 6
    assert from_mount == from_source


def _read_all(args: tuple[str, list[str]]) -> dict[str, int]:
    import zlib

    root, rels = args
    return {rel: zlib.crc32(Path(root, rel).read_bytes()) for rel in rels}


@pytest.mark.parametrize("mode", ["--no-threads", "--threads"])
def test_many_reader_processes_at_once(got10k_tree: Path, got10k_db: Path, mount_db, mode: str) -> None:
    m = mount_db(got10k_db, mode)
    rels = sorted(str(p.relative_to(got10k_tree)) for p in got10k_tree.rglob("*") if p.is_file())
    chunks = [rels[i::8] for i in range(8)] * 2  # 16 jobs on 8 processes, every file read twice
    with ProcessPoolExecutor(8) as pool:
        mounted = [r for r in pool.map(_read_all, [(str(m.mnt), c) for c in chunks])]
    expected = _read_all((str(got10k_tree), rels))
    for part in mounted:
        assert part == {rel: expected[rel] for rel in part}


def test_every_write_fails_with_erofs(edge_db: Path, mount_db) -> None:
    m = mount_db(edge_db)
    attempts = {
        "create": lambda: open(m.mnt / "new.txt", "w"),
        "write existing": lambda: open(m.mnt / "plain.txt", "r+b"),
        "truncate": lambda: os.truncate(m.mnt / "plain.txt", 0),
        "mkdir": lambda: os.mkdir(m.mnt / "newdir"),
        "rmdir": lambda: os.rmdir(m.mnt / "empty_dir" / "nested_empty"),
        "unlink": lambda: os.unlink(m.mnt / "plain.txt"),
        "rename": lambda: os.rename(m.mnt / "plain.txt", m.mnt / "moved.txt"),
        "symlink": lambda: os.symlink("x", m.mnt / "newlink"),
        "link": lambda: os.link(m.mnt / "plain.txt", m.mnt / "hard"),
        "chmod": lambda: os.chmod(m.mnt / "plain.txt", 0o777),
        "chown": lambda: os.chown(m.mnt / "plain.txt", 1, 1),
        "utime": lambda: os.utime(m.mnt / "plain.txt", (0, 0)),
        "setxattr": lambda: os.setxattr(m.mnt / "plain.txt", "user.x", b"1"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(OSError) as err:
            attempt()
        assert err.value.errno == errno.EROFS, what
    assert (m.mnt / "plain.txt").read_bytes() == b"hello\n"


def test_missing_paths_are_enoent(edge_db: Path, mount_db) -> None:
    m = mount_db(edge_db)
    for rel in ("nope", "small/nope.txt", "nope/deeper"):
        with pytest.raises(FileNotFoundError):
            os.stat(m.mnt / rel)
    with pytest.raises(NotADirectoryError):
        os.stat(m.mnt / "plain.txt" / "x")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_kill_9_then_umount_leaves_a_usable_directory(edge_db: Path, mount_db, tmp_path: Path, transport: str) -> None:
    m = mount_db(edge_db, *TRANSPORTS[transport])
    assert (m.mnt / "plain.txt").read_bytes() == b"hello\n"
    os.kill(m.daemon_pid(), signal.SIGKILL)
    time.sleep(0.2)
    with pytest.raises(OSError) as err:
        os.listdir(m.mnt)
    assert err.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    proc = run_cli("mount", edge_db, m.mnt, check=False)
    assert proc.returncode != 0 and "daemon died" in proc.stderr and "umount" in proc.stderr
    run_cli("umount", m.mnt)
    assert not is_mounted(m.mnt)
    assert os.listdir(m.mnt) == []
    (m.mnt / "scratch").write_text("usable")  # an ordinary directory again
    (m.mnt / "scratch").unlink()
    m2 = mount_db(edge_db, name="mnt")  # and mountable again
    assert (m2.mnt / "plain.txt").read_bytes() == b"hello\n"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_unmount_cleanly(edge_db: Path, mount_db, sig: int, transport: str) -> None:
    m = mount_db(edge_db, *TRANSPORTS[transport])
    pid = m.daemon_pid()
    os.kill(pid, sig)
    deadline = time.monotonic() + 10
    while is_mounted(m.mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_mounted(m.mnt)
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert os.listdir(m.mnt) == []


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_corrupted_value_is_eio_for_that_file_only(
    edge_tree: Path, edge_db: Path, mount_db, tmp_path: Path, transport: str
) -> None:
    broken = tmp_path / "broken.lmdb"
    shutil.copy(edge_db, broken)
    victim = "big/seventy_mb.bin"  # small files are served from their inline copy
    with lmdbfs.open(broken) as archive:
        offset = archive.value_offset(victim, archive.lstat(victim))
    with open(broken, "r+b") as fh:
        fh.seek(offset)
        first = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([first[0] ^ 0x01]))
    log = tmp_path / "daemon.log"
    m = mount_db(broken, "--log-file", str(log), *TRANSPORTS[transport])
    with pytest.raises(OSError) as err:
        (m.mnt / victim).read_bytes()
    assert err.value.errno == errno.EIO
    assert (m.mnt / "small" / "many_201.txt").read_bytes() == (edge_tree / "small" / "many_201.txt").read_bytes()
    assert (m.mnt / "plain.txt").read_bytes() == b"hello\n"
    assert victim in log.read_text() and "checksum" in log.read_text()


def test_mount_refuses_bad_mountpoints_and_dbs(edge_db: Path, mount_db, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    assert "no such directory" in one_error_line(run_cli("mount", edge_db, missing, check=False))
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert "not empty" in one_error_line(run_cli("mount", edge_db, full, check=False))
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "not a directory" in one_error_line(run_cli("mount", edge_db, afile, check=False))
    garbage = tmp_path / "garbage.lmdb"
    garbage.write_bytes(os.urandom(50_000))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not an LMDB" in one_error_line(run_cli("mount", garbage, empty, check=False))
    assert not is_mounted(empty)
    m = mount_db(edge_db)
    assert "already a mount point" in one_error_line(run_cli("mount", edge_db, m.mnt, check=False))
    assert "not mounted" in one_error_line(run_cli("umount", empty, check=False))


def test_foreground_mount_stays_attached_and_unmounts_on_ctrl_c(edge_db: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "fg"
    mnt.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmdbfs", "mount", "-f", str(edge_db), str(mnt)], stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mnt) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        assert (mnt / "plain.txt").read_bytes() == b"hello\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert not is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
        if is_mounted(mnt):
            run_cli("umount", mnt, check=False)
