"""Packing, the on-disk format, and the commands that read a DB without FUSE."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest

import lmdbfs
from lmdbfs.db import store
from lmdbfs.format.records import (
    FORMAT_VERSION,
    INDEX_DB,
    META_DB,
    META_KEY,
    content_key,
    dir_key,
    encode_dir,
    new_rows,
    pack_names,
)

from .conftest import BIG_FILE_BYTES, kill_pack_at, one_error_line, run_cli
from .treecmp import differences, snapshot

pytestmark = pytest.mark.slow  # end-to-end packs (a 70 MB file among them), kills and resumes


def test_unpack_restores_the_tree_byte_for_byte(edge_tree: Path, edge_db: Path, tmp_path: Path) -> None:
    dst = tmp_path / "restored"
    run_cli("unpack", edge_db, dst)
    expected = snapshot(edge_tree)
    absent = {b"backup.bak", b"small/old.bak", b"a_fifo", b"a_socket"}
    for rel in absent:
        assert rel in expected, "the fixture must hold the excluded and special files"
    actual = snapshot(dst)
    assert not (set(actual) & absent), "excluded and special files must not be packed"
    assert differences(expected, actual, ignore=absent) == []
    assert (dst / "big" / "seventy_mb.bin").stat().st_size == BIG_FILE_BYTES
    assert os.readlink(dst / "link_dangling") == "does/not/exist"


def test_verify_against_source_passes(edge_tree: Path, edge_db: Path) -> None:
    proc = run_cli("verify", edge_db, "--against", edge_tree)
    assert proc.stdout.startswith("ok: ")


def test_md5_key_returns_the_original_bytes(edge_tree: Path, edge_db: Path) -> None:
    """The seed note's lookup snippet works on the DB with plain py-lmdb."""
    env = lmdb.open(str(edge_db), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        for rel in ("plain.txt", "données/日本語 ファイル.txt", "big/seventy_mb.bin", "empty.bin"):
            key = hashlib.md5(rel.encode()).digest()
            assert txn.get(key) == (edge_tree / rel).read_bytes()
        raw_name = b"raw/latin1-\xe9t\xe9.txt"
        assert txn.get(hashlib.md5(raw_name).digest()) == b"latin-1 name\n"
        assert txn.get(hashlib.md5(b"link_relative").digest()) is None, "symlinks are index entries, not values"
    env.close()


def test_key_prefix_and_separator_reproduce_other_naming(edge_tree: Path, tmp_path: Path) -> None:
    db = tmp_path / "prefixed.lmdb"
    run_cli("pack", edge_tree, db, "--key-prefix", "got10k\\", "--key-sep", "\\", "--no-progress")
    env = lmdb.open(str(db), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        key = hashlib.md5("got10k\\données\\日本語 ファイル.txt".encode()).digest()
        assert txn.get(key) == (edge_tree / "données" / "日本語 ファイル.txt").read_bytes()
    env.close()
    with lmdbfs.open(db) as archive:  # the reader applies the same scheme
        assert archive.read_bytes("données/日本語 ファイル.txt") == "unicode ✓\n".encode()


def test_reader_api(edge_tree: Path, edge_db: Path) -> None:
    with lmdbfs.open(edge_db) as archive:
        assert archive.read_bytes("/plain.txt") == b"hello\n"
        assert archive.stat("readonly.txt").mode == 0o444
        assert archive.stat("readonly.txt").mtime_ns == os.lstat(edge_tree / "readonly.txt").st_mtime_ns
        assert archive.readlink("link_to_dir") == "données"
        assert archive.read_bytes("link_relative") == b"hello\n", "symlinks inside the archive are followed"
        assert archive.read_bytes("small/link_up") == b"hello\n"
        assert archive.listdir("link_to_dir") == ["日本語 ファイル.txt"]
        assert sorted(archive.listdir("")) == sorted(
            os.fsdecode(n)
            for n in os.listdir(os.fsencode(edge_tree))
            if n not in (b"backup.bak", b"a_fifo", b"a_socket")
        )
        walked = {d: (sorted(ds), sorted(fs)) for d, ds, fs in archive.walk()}
        assert walked["empty_dir"] == (["nested_empty"], [])
        assert "d00/d01" in walked and len([d for d in walked if d.startswith("d00")]) == 40
        assert archive.stat("").nlink == 2 + sum(1 for e in archive.scandir("") if e.is_dir)
        with pytest.raises(lmdbfs.LmdbfsError) as err:
            archive.read_bytes("nope/missing.txt")
        assert err.value.errno == 2
        with pytest.raises(lmdbfs.LmdbfsError) as err:
            archive.listdir("plain.txt/x")
        assert err.value.errno == 20  # ENOTDIR
        from PIL import Image  # noqa: F401 - file objects work with decoders

        assert archive.open("plain.txt").read() == b"hello\n"


def _read_in_child(archive: lmdbfs.Archive, path: str, out: object) -> None:
    out.put(archive.read_bytes(path))


def test_archive_works_after_fork_and_pickling(edge_db: Path) -> None:
    import multiprocessing as mp

    archive = lmdbfs.open(edge_db)
    assert archive.read_bytes("plain.txt") == b"hello\n"  # opened in the parent first
    for method in ("fork", "spawn"):
        ctx = mp.get_context(method)
        queue = ctx.Queue()
        procs = [ctx.Process(target=_read_in_child, args=(archive, "small/many_005.txt", queue)) for _ in range(3)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        assert results == [b"5\n" * 5] * 3
    archive.close()


def test_info_reports_counts_and_scheme(edge_db: Path) -> None:
    data = json.loads(run_cli("info", edge_db, "--json").stdout)
    assert data["files"] == 300 + 11 and data["symlinks"] == 5
    assert data["format"] == f"lmdbfs v{FORMAT_VERSION}" and data["complete"] is True
    assert data["content_bytes"] > BIG_FILE_BYTES
    assert data["db_bytes"] < data["content_bytes"] * 1.2, "no sparse map-sized file, little overhead"


def test_ls_and_cat(edge_db: Path) -> None:
    listing = run_cli("ls", "-l", edge_db, "small").stdout.splitlines()
    assert len(listing) == 301 and any(line.endswith("link_up -> ../plain.txt") for line in listing)
    assert run_cli("cat", edge_db, "plain.txt").stdout == "hello\n"


def test_refuses_to_overwrite_without_force(edge_tree: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "f.txt").write_text("one")
    db = tmp_path / "x.lmdb"
    run_cli("pack", src, db, "--no-progress")
    (src / "a" / "f.txt").write_text("two")
    proc = run_cli("pack", src, db, "--no-progress", check=False)
    assert proc.returncode == 5 and "already exists" in proc.stderr and "--force" in proc.stderr
    assert run_cli("cat", db, "a/f.txt").stdout == "one"
    run_cli("pack", src, db, "--force", "--no-progress")
    assert run_cli("cat", db, "a/f.txt").stdout == "two"


def test_db_inside_the_source_is_not_packed_into_itself(tmp_path: Path) -> None:
    src = tmp_path / "tree"
    src.mkdir()
    (src / "f.txt").write_text("x")
    run_cli("pack", src, src / "self.lmdb", "--no-progress")
    assert run_cli("ls", src / "self.lmdb").stdout.split() == ["f.txt"]


def _bad_inputs(tmp_path: Path, good: Path) -> dict[str, Path]:
    bad = {}
    bad["missing"] = tmp_path / "missing.lmdb"
    bad["garbage"] = tmp_path / "garbage.lmdb"
    bad["garbage"].write_bytes(os.urandom(100_000))
    bad["empty"] = tmp_path / "empty.lmdb"
    bad["empty"].write_bytes(b"")
    bad["truncated"] = tmp_path / "truncated.lmdb"
    bad["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    bad["directory"] = tmp_path / "a_dir"
    bad["directory"].mkdir()
    bad["plain_lmdb"] = tmp_path / "plain.lmdb"
    env = lmdb.open(str(bad["plain_lmdb"]), subdir=False)
    with env.begin(write=True) as txn:
        txn.put(b"k", b"v")
    env.close()
    bad["future_version"] = tmp_path / "future.lmdb"
    shutil.copy(good, bad["future_version"])
    env = lmdb.open(str(bad["future_version"]), subdir=False, max_dbs=4, map_size=2 * good.stat().st_size)
    meta_db = env.open_db(META_DB)
    with env.begin(write=True, db=meta_db) as txn:
        meta = json.loads(txn.get(META_KEY))
        meta["format_version"] = 99
        txn.put(META_KEY, json.dumps(meta).encode())
    env.close()
    return bad


@pytest.mark.parametrize("command", ["info", "ls", "cat", "verify", "unpack"])
def test_bad_databases_give_one_clear_line(command: str, tmp_path: Path, edge_db: Path) -> None:
    for name, path in _bad_inputs(tmp_path, edge_db).items():
        args = {"cat": [path, "plain.txt"], "unpack": [path, tmp_path / f"out-{name}"]}.get(command, [path])
        line = one_error_line(run_cli(command, *args, check=False))
        expect = {
            "missing": "no such DB",
            "garbage": "not an LMDB",
            "empty": "LMDB",
            "truncated": "truncated",
            "directory": "without data.mdb",
            "plain_lmdb": "keyed by plain relative paths (STARK-style), 1 key, not an lmdbfs DB",
            "future_version": "format version 99",
        }[name]
        assert expect in line, (name, line)
        assert not (tmp_path / f"out-{name}").exists() or not any((tmp_path / f"out-{name}").iterdir())


def _slow_tree(root: Path, files: int = 400, size: int = 400_000) -> None:
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(files):
        sub = root / f"seq{i // 50:03d}"
        sub.mkdir(exist_ok=True)
        (sub / f"{i:08d}.jpg").write_bytes(rng.bytes(size))


def _start_pack(src: Path, db: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lmdbfs", "pack", str(src), str(db), "--no-progress", "-j", "1", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.mount
@pytest.mark.parametrize("kill_at_bytes", [1, 100 << 20, 180 << 20])
def test_a_killed_pack_is_refused_then_resumed(tmp_path: Path, kill_at_bytes: int) -> None:
    """kill -9 at several points: before the first commit, and after one or two."""
    src = tmp_path / "src"
    _slow_tree(src, files=600)  # 240 MB, committed in 64 MB batches
    db = tmp_path / "out.lmdb"
    partial = Path(str(db) + ".partial")
    proc = _start_pack(src, db)
    kill_pack_at(proc, partial, kill_at_bytes, "tree")
    for target in (db, partial):
        line = one_error_line(run_cli("info", target, check=False))
        assert "unfinished pack" in line or "interrupted" in line, line
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    line = one_error_line(run_cli("mount", partial, mnt, check=False))
    assert "unfinished pack" in line
    refused = run_cli("pack", src, db, "--no-progress", check=False)
    assert refused.returncode == 5 and "--resume" in refused.stderr
    done = run_cli("pack", src, db, "--resume", "--no-progress")
    assert "packed 600 files" in done.stdout
    if kill_at_bytes > 1:
        assert "kept from the interrupted run" in done.stdout
    run_cli("verify", db, "--against", src)
    assert not partial.exists()


def test_verify_finds_a_corrupted_value(edge_db: Path, tmp_path: Path) -> None:
    """Both copies of a small file (record and key) and a large value are checked."""
    broken = tmp_path / "broken.lmdb"
    shutil.copy(edge_db, broken)
    rels = ("small/many_123.txt", "big/seventy_mb.bin")
    with lmdbfs.open(broken) as archive:
        assert archive.lstat(rels[0]).inline is not None and archive.lstat(rels[1]).inline is None
        # The small file's copy under its key, and the large value at its recorded offset.
        small = archive.keyed_value(rels[0], archive.lstat(rels[0]))
        offsets = [
            store.map_offset(small, archive._h().map_base),
            archive.value_offset(rels[1], archive.lstat(rels[1])),
        ]
    with open(broken, "r+b") as fh:
        for offset in offsets:
            fh.seek(offset + 1)
            byte = fh.read(1)
            fh.seek(offset + 1)
            fh.write(bytes([byte[0] ^ 0xFF]))
    proc = run_cli("verify", broken, check=False)
    assert proc.returncode == 6
    for rel in rels:
        assert f"{rel}: checksum mismatch" in proc.stdout
    assert proc.stdout.count("mismatch") == 2
    line = one_error_line(run_cli("cat", broken, rels[1], check=False))
    assert "checksum mismatch" in line


def _crafted_db(tmp_path: Path, bad_name: bytes) -> Path:
    """A DB whose root lists an entry that would escape the destination."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.txt").write_text("fine")
    db = tmp_path / "crafted.lmdb"
    run_cli("pack", src, db, "--no-progress")
    env = lmdb.open(str(db), subdir=False, max_dbs=4)
    index = env.open_db(INDEX_DB)
    rows = new_rows(2)
    rows["kind"] = [1, 1]
    rows["mode"] = 0o644
    rows["size"] = [4, 4]
    names = [bad_name, b"ok.txt"]
    blob = pack_names(rows, names, [b"", b""])
    with env.begin(write=True) as txn:
        txn.put(dir_key(""), encode_dir("", rows, blob), db=index)
        txn.put(content_key(os.fsdecode(bad_name)), b"evil")
    env.close()
    return db


@pytest.mark.parametrize("bad_name", [b"..", b"../escape.txt", b"/etc/evil"])
def test_unpack_refuses_entries_outside_the_destination(tmp_path: Path, bad_name: bytes) -> None:
    db = _crafted_db(tmp_path, bad_name)
    dst = tmp_path / "out" / "dst"
    line = one_error_line(run_cli("unpack", db, dst, check=False))
    assert "outside the destination" in line
    assert not (tmp_path / "out" / "escape.txt").exists()
    assert not (tmp_path / "escape.txt").exists()


def test_unreadable_files_stop_the_pack_or_are_skipped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text("good")
    secret = src / "secret.txt"
    secret.write_text("no")
    secret.chmod(0)
    # Root reads everything; drop the capabilities that let it ignore permissions.
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    cmd = [*prefix, sys.executable, "-m", "lmdbfs", "pack", str(src)]
    out = tmp_path / "outdir"
    out.mkdir()
    proc = subprocess.run([*cmd, str(out / "a.lmdb"), "--no-progress"], capture_output=True, text=True)
    line = one_error_line(proc)
    assert "secret.txt" in line and "--skip-errors" in line
    assert not (out / "a.lmdb").exists()
    proc = subprocess.run([*cmd, str(out / "b.lmdb"), "--no-progress", "--skip-errors"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "1 unreadable, left out: secret.txt" in proc.stdout
    assert run_cli("ls", out / "b.lmdb").stdout.split() == ["good.txt"]


def test_map_grows_when_the_first_estimate_is_too_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The packer never needs a hard-coded map size: a full map grows and the batch is redone."""
    from lmdbfs.pack import packer, writer

    caplog.set_level("INFO", logger="lmdbfs.pack.writer")
    src = tmp_path / "src"
    _slow_tree(src, files=100, size=300_000)  # 30 MB
    monkeypatch.setattr(packer, "_map_size_for", lambda scan: 2 << 20)
    monkeypatch.setattr(writer, "BATCH_BYTES", 8 << 20)
    result = packer.pack(str(src), str(tmp_path / "grown.lmdb"), packer.PackOptions(progress=False))
    assert result.files == 100
    assert any("growing the map" in r.message for r in caplog.records)
    run_cli("verify", tmp_path / "grown.lmdb", "--against", src)
    assert result.db_bytes < 1.1 * 30_000_000, "the file holds data, not a sparse map"


def test_pack_memory_does_not_grow_with_the_data(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _slow_tree(src, files=1000, size=400_000)  # 400 MB of file contents
    # VmHWM belongs to the packer's own address space (ru_maxrss would also count the
    # forked test process before exec).
    code = (
        "import sys; from lmdbfs.cli.main import main; rc = main(sys.argv[1:]); "
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]); sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "pack", str(src), str(tmp_path / "m.lmdb"), "--no-progress"],
        capture_output=True,
        text=True,
        check=True,
    )
    peak_mb = int(proc.stdout.split("VmHWM:")[1].split()[0]) / 1024
    assert peak_mb < 250, f"peak RSS {peak_mb:.0f} MB for 400 MB of data"


def test_value_offsets_in_the_index_and_the_fallback_after_a_write(edge_db: Path, tmp_path: Path) -> None:
    """Reads use the offsets recorded at pack time; once anything writes to the file
    they are no longer trusted and values are found by key, still byte-exact."""
    with lmdbfs.open(edge_db) as archive:
        big = archive.lstat("big/seventy_mb.bin")
        assert archive._h().offsets_ok and big.data_off % 4096 == 16
        assert archive.value_offset("big/seventy_mb.bin", big) == big.data_off
    touched = tmp_path / "touched.lmdb"
    shutil.copy(edge_db, touched)
    env = lmdb.open(str(touched), subdir=False, map_size=2 * touched.stat().st_size)
    with env.begin(write=True) as txn:
        txn.put(b"an unrelated key", b"written after packing")
    env.close()
    with lmdbfs.open(touched) as archive:
        assert not archive._h().offsets_ok
        assert archive.read_bytes("plain.txt") == b"hello\n"
    run_cli("verify", touched)


def test_an_lmdb_directory_is_read_too(edge_db: Path, tmp_path: Path) -> None:
    """Readers accept the classic LMDB layout (a folder holding data.mdb) as well."""
    folder = tmp_path / "as_dir.lmdb"
    folder.mkdir()
    shutil.copy(edge_db, folder / "data.mdb")
    assert run_cli("cat", folder, "plain.txt").stdout == "hello\n"
    run_cli("verify", folder)


def _dirty_pages(fd: int) -> int:
    """Dirty page-cache pages of a file (cachestat(2), Linux 6.5+)."""
    import ctypes

    rng = (ctypes.c_uint64 * 2)(0, 0)  # offset 0, length 0: the whole file
    stat = (ctypes.c_uint64 * 5)()  # cache, dirty, writeback, evicted, recently evicted
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(451, fd, ctypes.byref(rng), ctypes.byref(stat), 0) != 0:
        raise OSError(ctypes.get_errno(), "cachestat")
    return int(stat[1])


def test_commits_start_their_writeback_instead_of_leaving_it_to_the_final_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The packer starts the writeback of each commit's pages (store.start_writeback):
    dirty pages do not pile up until the final fsync while the source is still being read."""
    path = tmp_path / "dirty.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, os.urandom(1 << 20) * 64)
        before = _dirty_pages(fd)
        assert before > 8000, "64 MiB just written should be dirty in the page cache"
        store.start_writeback(fd)
        assert _dirty_pages(fd) < before // 10
    finally:
        os.close(fd)
    # ... and the packer calls it as it commits, not only at the end.
    from lmdbfs.pack import packer, writer

    src = tmp_path / "src"
    src.mkdir()
    for n in range(60):
        (src / f"{n:08d}.jpg").write_bytes(os.urandom(200_000))
    calls: list[int] = []
    real = writer.start_writeback

    def counted(fd: int) -> None:
        calls.append(_dirty_pages(fd))
        real(fd)

    monkeypatch.setattr(writer, "start_writeback", counted)
    packer.pack(str(src), str(tmp_path / "frames.lmdb"), packer.PackOptions(progress=False))
    assert len(calls) >= 3 and max(calls) > 0, calls  # 12 MB of frames, committed every 4 MB
    run_cli("verify", tmp_path / "frames.lmdb")
