"""Zip and tar archives as pack sources: packed without extracting, they give the same
tree as the extracted files — names, bytes, modes, mtimes, symlinks."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import lmdbfs

from .conftest import kill_pack_at, one_error_line, run_cli
from .treecmp import differences, snapshot

pytestmark = pytest.mark.slow  # packs and verifies archives of real trees

EVEN_MTIME = 1_600_000_000  # zips keep 2-second steps: every time in the tree is even


def _tree(root: Path) -> Path:
    """Files, folders, an empty folder and file, modes, a symlink, non-ASCII names."""
    rng = np.random.default_rng(11)
    files = {
        "seq1/00000001.jpg": rng.bytes(300_000),
        "seq1/00000002.jpg": rng.bytes(2048),
        "seq1/groundtruth.txt": b"1,2,3,4\n" * 50,
        "seq2/données.txt": "é\n".encode(),
        "seq2/empty.bin": b"",
        "run.sh": b"#!/bin/sh\n",
        "big.bin": bytes(3_000_000),  # compresses: a deflated member spans many reads
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "empty_dir").mkdir()
    os.chmod(root / "run.sh", 0o755)
    os.chmod(root / "seq1" / "groundtruth.txt", 0o600)
    os.symlink("seq1/groundtruth.txt", root / "gt_link")
    for n, (dirpath, dirnames, filenames) in enumerate(sorted(os.walk(root), reverse=True)):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (EVEN_MTIME + 2 * n, EVEN_MTIME + 2 * n), follow_symlinks=False)
    return root


def _zip(src: Path, out: Path, prefix: str = "", compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A zip made by the stdlib, with Unix modes and symlinks as Info-ZIP stores them."""
    with zipfile.ZipFile(out, "w", compression) as zf:
        for dirpath, dirnames, filenames in os.walk(src):
            for name in sorted(dirnames) + sorted(filenames):
                path = Path(dirpath) / name
                arc = prefix + path.relative_to(src).as_posix()
                if path.is_symlink():
                    info = zipfile.ZipInfo(arc, time.localtime(path.lstat().st_mtime)[:6])
                    info.create_system = 3
                    info.external_attr = (stat.S_IFLNK | 0o777) << 16
                    zf.writestr(info, os.readlink(path))
                else:
                    zf.write(path, arc)
    return out


def _tar(src: Path, out: Path, mode: str, prefix: str = "") -> Path:
    with tarfile.open(out, mode) as tf:
        for dirpath, dirnames, filenames in os.walk(src):
            for name in sorted(dirnames) + sorted(filenames):
                path = Path(dirpath) / name
                tf.add(path, prefix + path.relative_to(src).as_posix(), recursive=False)
    return out


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tree(tmp_path_factory.mktemp("arch") / "src")


def _unpacked(db: Path, tmp_path: Path) -> Path:
    dst = tmp_path / f"out-{db.name}"
    run_cli("unpack", db, dst)
    return dst


def test_archives_pack_to_the_same_tree_as_the_files(src: Path, tmp_path: Path) -> None:
    """Every archive kind, several at once, each placed under its own folder."""
    archives = {
        "zip": _zip(src, tmp_path / "a.zip"),
        "stored": _zip(src, tmp_path / "s.zip", compression=zipfile.ZIP_STORED),
        "tar": _tar(src, tmp_path / "a.tar", "w"),
        "gz": _tar(src, tmp_path / "a.tar.gz", "w:gz"),
        "bz2": _tar(src, tmp_path / "a.tar.bz2", "w:bz2"),
        "xz": _tar(src, tmp_path / "a.tar.xz", "w:xz"),
    }
    specs = [f"{name}={path}" for name, path in archives.items()]
    db = tmp_path / "all.lmdb"
    proc = run_cli("pack", *specs, db, "-j", "3", "--no-progress")
    assert "packed 42 files" in proc.stdout
    out = _unpacked(db, tmp_path)
    assert sorted(os.listdir(out)) == sorted(archives)
    expected = snapshot(src)
    for name in archives:
        assert differences(expected, snapshot(out / name)) == [], name
    run_cli("verify", db, "--against", *specs)
    with lmdbfs.open(db) as archive:
        assert archive.readlink("gz/gt_link") == "seq1/groundtruth.txt"
        assert archive.stat("xz/run.sh").mode == 0o755


def test_a_folder_and_archives_merge_and_zips_inside_expand(src: Path, tmp_path: Path) -> None:
    """A folder of per-video zips (TrackingNet) and a zip holding zips become folders."""
    videos = tmp_path / "TRAIN_0"
    (videos / "zips").mkdir(parents=True)
    _zip(src / "seq1", videos / "zips" / "vid_a.zip")
    _zip(src / "seq2", videos / "zips" / "vid_b.zip", compression=zipfile.ZIP_STORED)
    outer = tmp_path / "outer.zip"
    with zipfile.ZipFile(outer, "w", zipfile.ZIP_STORED) as zf:
        zf.write(videos / "zips" / "vid_a.zip", "inner/vid_a.zip")
        zf.write(videos / "zips" / "vid_b.zip", "inner/vid_b.zip")
    db = tmp_path / "tn.lmdb"
    run_cli("pack", f"TRAIN_0={videos}", f"more={outer}", db, "--expand-zips", "--no-progress")
    out = _unpacked(db, tmp_path)
    for top in (out / "TRAIN_0" / "zips", out / "more" / "inner"):
        assert sorted(os.listdir(top)) == ["vid_a", "vid_b"]
        assert differences(snapshot(src / "seq1"), snapshot(top / "vid_a")) == []
        assert differences(snapshot(src / "seq2"), snapshot(top / "vid_b")) == []
    run_cli("verify", db, "--against", f"TRAIN_0={videos}", f"more={outer}")


@pytest.mark.parametrize("strip", ["1", "auto"])
def test_strip_drops_the_folder_an_archive_wraps_everything_in(src: Path, tmp_path: Path, strip: str) -> None:
    wrapped = _zip(src, tmp_path / "w.zip", prefix="GOT-10k/")
    db = tmp_path / "w.lmdb"
    run_cli("pack", wrapped, db, "--strip", strip, "--no-progress")
    assert differences(snapshot(src), snapshot(_unpacked(db, tmp_path))) == []


def test_strip_leaves_folders_alone(src: Path, tmp_path: Path) -> None:
    """Annotations in a folder beside wrapped split zips: --strip applies to the zips."""
    wrapped = _zip(src / "seq1", tmp_path / "split.zip", prefix="wrap/")
    db = tmp_path / "mix.lmdb"
    run_cli("pack", f"train={wrapped}", f"anno={src / 'seq2'}", db, "--strip", "1", "--no-progress")
    out = _unpacked(db, tmp_path)
    assert differences(snapshot(src / "seq1"), snapshot(out / "train")) == []
    assert differences(snapshot(src / "seq2"), snapshot(out / "anno")) == []


def test_strip_auto_keeps_archives_without_a_single_top_folder(src: Path, tmp_path: Path) -> None:
    db = tmp_path / "n.lmdb"
    run_cli("pack", _tar(src, tmp_path / "n.tar.gz", "w:gz"), db, "--strip", "auto", "--no-progress")
    assert differences(snapshot(src), snapshot(_unpacked(db, tmp_path))) == []


def test_a_path_two_sources_provide_is_named(src: Path, tmp_path: Path) -> None:
    a = _zip(src, tmp_path / "one.zip")
    b = _tar(src / "seq1", tmp_path / "two.tar", "w", prefix="seq1/")
    db = tmp_path / "dup.lmdb"
    line = one_error_line(run_cli("pack", a, b, db, "--no-progress", check=False))
    assert "seq1/00000001.jpg" in line and "one.zip" in line and "two.tar" in line
    assert not db.exists() and not Path(f"{db}.partial").exists()


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "tar.xz", "tar"])
def test_a_truncated_archive_fails_with_one_line_and_no_db(src: Path, tmp_path: Path, kind: str) -> None:
    whole = _zip(src, tmp_path / "t.zip") if kind == "zip" else _tar(src, tmp_path / f"t.{kind}", f"w:{kind[4:]}")
    cut = tmp_path / f"cut.{kind}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    db = tmp_path / "cut.lmdb"
    line = one_error_line(run_cli("pack", cut, db, "--no-progress", check=False))
    assert cut.name in line and ("damaged or truncated" in line)
    assert not db.exists() and not Path(f"{db}.partial").exists()


def test_a_corrupt_member_names_the_archive_and_the_member(src: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    data = bytearray(_zip(src, tmp_path / "good.zip", compression=zipfile.ZIP_STORED).read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = zf.getinfo("seq1/00000001.jpg")
    data[info.header_offset + 30 + len(info.filename) + 1000] ^= 0xFF  # in the member's bytes
    bad.write_bytes(bytes(data))
    db = tmp_path / "bad.lmdb"
    line = one_error_line(run_cli("pack", bad, db, "--no-progress", check=False))
    assert "bad.zip" in line and "seq1/00000001.jpg" in line
    assert not db.exists()


def test_exclude_applies_to_archive_members(src: Path, tmp_path: Path) -> None:
    db = tmp_path / "x.lmdb"
    run_cli("pack", _zip(src, tmp_path / "x.zip"), db, "--exclude", "seq2", "--exclude", "*.txt", "--no-progress")
    with lmdbfs.open(db) as archive:
        assert not archive.exists("seq2") and not archive.exists("seq1/groundtruth.txt")
        assert archive.exists("seq1/00000001.jpg")
    run_cli("verify", db, "--against", tmp_path / "x.zip")


def test_a_killed_pack_from_a_zip_resumes(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    big = tmp_path / "big"
    for i in range(300):
        (big / f"seq{i // 50}").mkdir(parents=True, exist_ok=True)
        (big / f"seq{i // 50}" / f"{i:08d}.jpg").write_bytes(rng.bytes(400_000))
    archive = _zip(big, tmp_path / "big.zip", compression=zipfile.ZIP_STORED)
    db = tmp_path / "r.lmdb"
    partial = Path(f"{db}.partial")
    cmd = [sys.executable, "-m", "lmdbfs", "pack", str(archive), str(db), "--no-progress", "-j", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kill_pack_at(proc, partial, 40 << 20, "archive")
    done = run_cli("pack", archive, db, "--resume", "--no-progress")
    assert "packed 300 files" in done.stdout and "kept from the interrupted run" in done.stdout
    run_cli("verify", db, "--against", archive)
    unpacked = _unpacked(db, tmp_path)
    assert {rel: value[4] for rel, value in snapshot(big).items()} == {
        rel: value[4] for rel, value in snapshot(unpacked).items()
    }, "same names and bytes (this tree's mtimes are not in zip's 2-second steps)"
