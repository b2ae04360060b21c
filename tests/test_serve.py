"""The C server (lmdbfs._serve) under load, on damaged records, and with several layers.

Every test really mounts; the damaged-DB tests edit copies of a packed DB in place.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lmdb
import pytest

from lmdbfs import open as lmdbfs_open
from lmdbfs.db import store
from lmdbfs.format.recordcheck import decode_dir
from lmdbfs.format.records import INDEX_DB, dir_key

from .conftest import TRANSPORTS, is_mounted, one_error_line, run_cli
from .treecmp import differences, snapshot

pytestmark = pytest.mark.mount  # every test here mounts a FUSE filesystem


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_many_threads_read_the_same_bytes_at_once(
    edge_tree: Path, edge_db: Path, got10k_tree: Path, got10k_db: Path, mount_db, transport: str
) -> None:
    edge = mount_db(edge_db, *TRANSPORTS[transport], name="edge")
    got = mount_db(got10k_db, *TRANSPORTS[transport], name="got")
    jobs = [(edge_tree, edge.mnt, rel) for rel in _files(edge_tree) if rel.suffix != ".bak"]
    jobs += [(got10k_tree, got.mnt, rel) for rel in _files(got10k_tree)]
    jobs *= 3  # the first reads verify checksums while later ones are served from the page cache
    random.Random(5).shuffle(jobs)

    def same(job: tuple[Path, Path, Path]) -> bool:
        src, mnt, rel = job
        with open(mnt / rel, "rb") as fh:
            assert not os.isatty(fh.fileno())  # answered by the server's ioctl
            return fh.read() == (src / rel).read_bytes()

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(same, jobs))
    assert len(results) == len(jobs) and all(results)
    big = edge_tree / "big" / "seventy_mb.bin"
    data = big.read_bytes()

    def slice_ok(seed: int) -> bool:
        rng = random.Random(seed)
        with open(edge.mnt / "big" / "seventy_mb.bin", "rb", buffering=0) as fh:
            for _ in range(20):
                off, size = rng.randrange(len(data)), rng.randrange(1, 2 << 20)
                if os.pread(fh.fileno(), size, off) != data[off : off + size]:
                    return False
        return True

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(slice_ok, range(16)))


def _record_at(db: Path, rel: str) -> tuple[int, bytes]:
    """File offset and bytes of the directory record of ``rel``."""
    env = lmdb.open(str(db), subdir=False, readonly=True, lock=False, max_dbs=4)
    try:
        base = store.map_base(str(db))
        with env.begin(buffers=True) as txn:
            view = txn.get(dir_key(rel), db=env.open_db(INDEX_DB, txn=txn, create=False))
            return store.map_offset(view, base), bytes(view)
    finally:
        env.close()


def _patch(db: Path, offset: int, data: bytes) -> None:
    with open(db, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_damaged_records_are_eio_and_everything_else_still_reads(
    edge_tree: Path, edge_db: Path, mount_db, tmp_path: Path, transport: str
) -> None:
    broken = tmp_path / "broken.lmdb"
    shutil.copy(edge_db, broken)
    # One row of small/ gets an unknown kind: only that entry disappears.
    at, raw = _record_at(broken, "small")
    rec = decode_dir(raw, "small")
    row = rec.index_of("many_005.txt")
    rows_at = 16 + len(b"small")
    _patch(broken, at + rows_at + row * 44 + 8, bytes([9]))
    # The record of données/ loses its magic: that directory answers EIO.
    at, raw = _record_at(broken, "données")
    _patch(broken, at, b"XXXX")
    # The record of with space/ claims another directory's path.
    at, raw = _record_at(broken, "with space")
    _patch(broken, at + 16, b"W")
    log = tmp_path / "daemon.log"
    m = mount_db(broken, "--log-file", str(log), *TRANSPORTS[transport])

    names = os.listdir(m.mnt / "small")
    assert "many_005.txt" not in names and "many_004.txt" in names and len(names) == 300 - 1 + 1
    with pytest.raises(OSError) as err:
        os.stat(m.mnt / "small" / "many_005.txt")
    assert err.value.errno == errno.EIO
    for bad_dir in ("données", "with space"):
        with pytest.raises(OSError) as err:
            os.listdir(m.mnt / bad_dir)
        assert err.value.errno == errno.EIO
    with pytest.raises(OSError) as err:
        (m.mnt / "données" / "日本語 ファイル.txt").read_bytes()
    assert err.value.errno == errno.EIO
    # the daemon still serves everything else, byte for byte
    for rel in ("plain.txt", "small/many_004.txt", "small/many_299.txt", "big/seventy_mb.bin"):
        assert (m.mnt / rel).read_bytes() == (edge_tree / rel).read_bytes()
    text = log.read_text()
    assert "données" in text and "with space" in text and "unknown kind" in text


def _serve_layers(mnt: Path, layers: list[tuple[Path, str]], log: Path) -> subprocess.Popen:
    """A daemon serving several DBs in one tree, driven through the serving module itself."""
    script = (
        "import sys\n"
        "from lmdbfs.fuse import serve\n"
        "mnt, pairs = sys.argv[1], sys.argv[2:]\n"
        "specs = [f'{pairs[i + 1]}={pairs[i]}' if pairs[i + 1] else pairs[i] for i in range(0, len(pairs), 2)]\n"
        "served = serve.describe(specs)\n"
        "sys.exit(0 if serve.run(mnt, served, serve.fuse_args('union', [], False), lambda: None) >= 0 else 1)\n"
    )
    args = [str(x) for pair in layers for x in pair]
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", script, str(mnt), *args], stderr=open(log, "wb"), cwd="/")
    deadline = time.monotonic() + 30
    while not is_mounted(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the union daemon did not mount: {log.read_text()}")
        time.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen, mnt: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    if is_mounted(mnt):
        run_cli("umount", mnt, check=False)
    assert not is_mounted(mnt)


def _pack(tmp_path: Path, name: str, files: dict[str, bytes]) -> Path:
    src = tmp_path / f"{name}-src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    db = tmp_path / f"{name}.lmdb"
    run_cli("pack", src, db, "--no-progress")
    return db


def test_layers_merge_directories_and_sit_under_prefixes(
    edge_tree: Path, edge_db: Path, got10k_tree: Path, got10k_db: Path, tmp_path: Path
) -> None:
    one = _pack(tmp_path, "one", {"common/a.txt": b"a\n", "common/same.txt": b"from one\n", "only1/x": b"x"})
    two = _pack(tmp_path, "two", {"common/b.txt": b"b\n", "only2/y": b"y"})
    mnt = tmp_path / "union"
    proc = _serve_layers(
        mnt, [(one, ""), (two, ""), (got10k_db, "datasets/got10k"), (edge_db, "datasets/edge")], tmp_path / "u.log"
    )
    try:
        assert sorted(os.listdir(mnt)) == ["common", "datasets", "only1", "only2"]
        assert sorted(os.listdir(mnt / "common")) == ["a.txt", "b.txt", "same.txt"]
        assert (mnt / "common" / "same.txt").read_bytes() == b"from one\n"
        assert (mnt / "common" / "b.txt").read_bytes() == b"b\n"
        assert (mnt / "only2" / "y").read_bytes() == b"y"
        assert sorted(os.listdir(mnt / "datasets")) == ["edge", "got10k"]
        assert os.stat(mnt / "common").st_nlink == 1  # merged: "unknown", as union filesystems say
        assert os.stat(mnt / "only1").st_nlink == 2
        got = snapshot(got10k_tree)
        expected = {rel: (k, None if mode is None else mode & ~0o222, *rest) for rel, (k, mode, *rest) in got.items()}
        actual = snapshot(mnt / "datasets" / "got10k")
        # the layer's own root takes the meta record's mtime; the rest must match exactly
        assert differences(expected, actual) == []
        assert (mnt / "datasets" / "edge" / "link_relative").read_bytes() == b"hello\n"
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / "datasets" / "nope")
    finally:
        _stop(proc, mnt)


def test_key_lookups_with_prefix_and_separator_once_offsets_are_stale(
    got10k_tree: Path, tmp_path: Path, mount_db
) -> None:
    db = tmp_path / "keyed.lmdb"
    run_cli("pack", got10k_tree, db, "--key-prefix", "got10k\\", "--key-sep", "\\", "--no-progress")
    # Any later write makes the recorded offsets stale: every value is then found by its key.
    env = lmdb.open(str(db), subdir=False, max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(b"an unrelated key", b"x")
    env.close()
    with lmdbfs_open(db) as archive:
        assert not archive._h().offsets_ok
    m = mount_db(db)
    got = snapshot(got10k_tree)
    expected = {rel: (k, None if mode is None else mode & ~0o222, *rest) for rel, (k, mode, *rest) in got.items()}
    assert differences(expected, snapshot(m.mnt)) == []


def test_rows_pointing_outside_the_file_or_with_bad_names_are_left_out(
    got10k_tree: Path, got10k_db: Path, mount_db, tmp_path: Path
) -> None:
    broken = tmp_path / "rows.lmdb"
    shutil.copy(got10k_db, broken)
    seq = "train/GOT-10k_Train_000001"
    at, raw = _record_at(broken, seq)
    rec = decode_dir(raw, seq)
    names = rec.names
    rows_at = at + 16 + len(seq.encode())
    far = rec.index_of("00000002.jpg")
    assert int(rec.rows[far]["data_off"]) != 0  # a frame read by offset
    _patch(broken, rows_at + far * 44 + 36, (1 << 60).to_bytes(8, "little"))
    slash = rec.index_of("00000003.jpg")
    name_at = rows_at + len(rec) * 44 + int(rec.rows[slash]["name_off"])
    _patch(broken, name_at + 8, b"/")  # "00000003/jpg" still sorts in place
    m = mount_db(broken)
    listed = sorted(os.listdir(m.mnt / seq))
    assert listed == sorted(set(names) - {"00000002.jpg", "00000003.jpg"})
    for gone in ("00000002.jpg", "00000003.jpg"):
        with pytest.raises(OSError) as err:
            os.stat(m.mnt / seq / gone)
        assert err.value.errno in (errno.EIO, errno.ENOENT)
    for name in listed:
        assert (m.mnt / seq / name).read_bytes() == (got10k_tree / seq / name).read_bytes()


def test_an_unknown_fuse_option_is_one_clear_line(edge_db: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    line = one_error_line(run_cli("mount", "-o", "no_such_option", edge_db, mnt, check=False))
    assert "refused the FUSE options" in line and "no_such_option" in line
    assert not is_mounted(mnt)


def test_a_directory_larger_than_the_kept_record_buffer_reads_right(tmp_path: Path, mount_db) -> None:
    """A record over 1 MiB (the buffer a serving thread keeps) goes through a one-off
    buffer; its files, inline and not, read back exactly, many threads at once."""
    src = tmp_path / "src" / "wide"
    src.mkdir(parents=True)
    rng = random.Random(11)
    files = {f"f{n:06d}.txt": rng.randbytes(rng.choice((0, 9, 700, 3000))) for n in range(30_000)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    run_cli("pack", tmp_path / "src", tmp_path / "wide.lmdb", "--no-progress")
    with lmdb.open(str(tmp_path / "wide.lmdb"), subdir=False, readonly=True, lock=False, max_dbs=4) as env:
        with env.begin() as txn:
            record = txn.get(dir_key("wide"), db=env.open_db(INDEX_DB, txn=txn, create=False))
    assert len(record) > 1 << 20, "the test needs a record larger than the kept buffer"
    m = mount_db(tmp_path / "wide.lmdb")
    assert sorted(os.listdir(m.mnt / "wide")) == sorted(files)
    sample = rng.sample(sorted(files), 3000)
    with ThreadPoolExecutor(16) as pool:
        same = list(pool.map(lambda name: (m.mnt / "wide" / name).read_bytes() == files[name], sample))
    assert all(same)


def _opcodes(log: Path, start: int) -> list[str]:
    """The requests libfuse logged (-d) past byte ``start`` of the daemon's log."""
    with open(log, "rb") as fh:
        fh.seek(start)
        text = fh.read().decode(errors="replace")
    return [line.split("opcode: ")[1].split()[0] for line in text.splitlines() if "opcode: " in line]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_open_pushes_small_files_so_their_reads_send_no_read_request(tmp_path: Path, mount_db, transport: str) -> None:
    rng = random.Random(8)
    files = {f"seq/{i:08d}.jpg": rng.randbytes(rng.randrange(1, 60_000)) for i in range(1, 41)}
    files["seq/groundtruth.txt"] = b"347.0000,443.0000,429.0000,272.0000\n" * 50
    files["seq/big.bin"] = rng.randbytes(300_000)
    db = _pack(tmp_path, "push", files)
    log = tmp_path / "daemon.log"
    m = mount_db(db, "-d", "--log-file", str(log), *TRANSPORTS[transport])
    small = [rel for rel in files if rel.endswith(".jpg")][:30] + ["seq/groundtruth.txt"]
    start = log.stat().st_size
    for rel in small:  # buffered, as loaders open: the isatty() ioctl brings the bytes
        with open(m.mnt / rel, "rb") as fh:
            assert fh.read() == files[rel]
    seen = _opcodes(log, start)
    assert seen.count("IOCTL") == len(small) and "READ" not in seen
    start = log.stat().st_size
    with open(m.mnt / "seq/big.bin", "rb") as fh:  # larger files are read on demand
        assert fh.read() == files["seq/big.bin"]
    assert "READ" in _opcodes(log, start)
    start = log.stat().st_size
    rest = [rel for rel in files if rel.endswith(".jpg")][30:]
    for rel in rest:  # no ioctl, no push: each file is a READ
        with open(m.mnt / rel, "rb", buffering=0) as fh:
            assert fh.read() == files[rel]
    assert _opcodes(log, start).count("READ") >= len(rest)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_damaged_small_file_is_not_pushed_and_reads_eio(tmp_path: Path, mount_db, transport: str) -> None:
    marker = b"GROUNDTRUTH-THAT-WILL-BE-DAMAGED " * 20
    db = _pack(tmp_path, "bad", {"seq/groundtruth.txt": marker, "seq/absence.label": b"0\n" * 100})
    raw = db.read_bytes()
    spots = [i for i in range(len(raw)) if raw.startswith(marker, i)]
    assert spots, "the small file's bytes are not in the DB as they are"
    for at in spots:  # its inline copy and its copy under the md5 key
        _patch(db, at + 5, b"X")
    log = tmp_path / "daemon.log"
    m = mount_db(db, "--log-file", str(log), *TRANSPORTS[transport])
    for _ in range(2):
        with pytest.raises(OSError) as err, open(m.mnt / "seq/groundtruth.txt", "rb") as fh:
            fh.read()
        assert err.value.errno == errno.EIO
    assert (m.mnt / "seq/absence.label").read_bytes() == b"0\n" * 100
    assert "groundtruth.txt" in log.read_text() and "checksum" in log.read_text()
