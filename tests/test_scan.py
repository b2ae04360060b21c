"""lmdbfs/scan.py (and sources.build_scan): a real small tree becomes sorted directory
records and numbered files before a byte is read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmdbfs.errors import SourceError
from lmdbfs.format.records import KIND_DIR, KIND_FILE, KIND_SYMLINK
from lmdbfs.pack.scan import Excluder
from lmdbfs.pack.sources import build_scan


def _tree(root: Path) -> Path:
    for rel, data in {"b/2.txt": b"22", "b/1.txt": b"1", "a.txt": b"aaa", "b/c/deep.bin": b"", "x.bak": b"x"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "empty").mkdir()
    os.symlink("a.txt", root / "link")
    os.utime(root / "b", ns=(5, 5))
    return root


def test_excluder_matches_names_or_paths_and_covers_what_lies_below() -> None:
    ex = Excluder(["*.bak", "/b/c/"])
    assert ex("x.bak", "deep/x.bak") and not ex("x.txt", "x.txt")
    assert ex("c", "b/c") and not ex("c", "a/c")
    assert ex.covers("b/c/deep.bin") and not ex.covers("b/deep.bin")
    only_a = Excluder([], include=lambda rel: rel.startswith("a"))
    assert only_a("b", "b") and not only_a("a", "a")


def test_a_folder_scans_to_sorted_records_and_numbered_files(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    scan = build_scan([str(src)], excludes=["*.bak"])
    assert [d.path for d in scan.dirs] == ["", "b", "empty", "b/c"]  # in the order the folder was walked
    root = scan.dirs[0]
    assert [root.name(r) for r in range(len(root.rows))] == [b"a.txt", b"b", b"empty", b"link"]
    assert root.rows["kind"].tolist() == [KIND_FILE, KIND_DIR, KIND_DIR, KIND_SYMLINK]
    assert root.rows["checksum"][1] == 1  # b holds one folder: its st_nlink is 3
    assert root.name_and_target(3) == (b"link", b"a.txt")
    b = scan.dirs[1]
    assert int(root.rows["mtime_ns"][1]) == 5 and b.rows["size"].tolist() == [1, 2, 0]
    assert (scan.files, scan.symlinks, scan.bytes) == (4, 1, 6)
    rels = sorted(scan.file_relpath(i) for i in range(scan.files))
    assert rels == ["a.txt", "b/1.txt", "b/2.txt", "b/c/deep.bin"]
    for i in range(scan.files):
        assert int(scan.row(i)["size"]) == (src / scan.file_relpath(i)).stat().st_size


def test_dropped_files_leave_the_records(tmp_path: Path) -> None:
    scan = build_scan([str(_tree(tmp_path / "src"))], excludes=["*.bak"])
    two = next(i for i in range(scan.files) if scan.file_relpath(i) == "b/2.txt")
    scan.drop_files([two])
    assert scan.files == 3 and scan.bytes == 4
    b = next(d for d in scan.dirs if d.path == "b")
    assert [b.name(r) for r in range(len(b.rows))] == [b"1.txt", b"c"]


def test_sources_merge_under_folders_and_refuse_a_path_given_twice(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    scan = build_scan([str(src), f"copy={src}"], excludes=["*.bak"])
    assert scan.files == 8 and "copy/b/c" in [d.path for d in scan.dirs]
    with pytest.raises(SourceError, match="a.txt"):
        build_scan([str(src), str(src)])
