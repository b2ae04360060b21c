"""lmdbfs/pack/scan.py (and sources.build_scan): a real small tree becomes sorted directory
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


def _same_scan(a, b) -> None:
    assert [d.path for d in a.dirs] == [d.path for d in b.dirs]
    for x, y in zip(a.dirs, b.dirs):
        assert x.rows.tobytes() == y.rows.tobytes() and x.blob == y.blob, x.path
    assert [a.file_relpath(i) for i in range(a.files)] == [b.file_relpath(i) for i in range(b.files)]
    assert a.file_size.tolist() == b.file_size.tolist() and a.file_src.tolist() == b.file_src.tolist()
    assert a.file_ref == b.file_ref
    assert (a.files, a.symlinks, a.bytes, a.skipped, a.errors) == (b.files, b.symlinks, b.bytes, b.skipped, b.errors)


@pytest.mark.parametrize("wanted", [{"b", "b/c"}, {"a.txt", "empty", "link"}, {"b", "b/1.txt", "empty"}, set()])
def test_a_share_of_a_scan_is_the_scan_of_that_share(tmp_path: Path, wanted: set[str]) -> None:
    """A shard lists the tree once and keeps its share (Scan.share): the same records,
    file numbers and left-out entries as a listing that only descended into the share."""
    src = _tree(tmp_path / "src")
    os.mkfifo(src / "b" / "pipe")  # left out (not a file): reported only by the share holding it
    os.mkfifo(src / "empty" / "pipe")

    def include(rel: str) -> bool:
        return rel in wanted or rel.startswith("b/c/")

    whole = build_scan([str(src)], excludes=["*.bak"], skip_errors=True, quiet=True)
    alone = build_scan([str(src)], excludes=["*.bak"], include=include)
    _same_scan(whole.share(include, skip_errors=False), alone)


def test_a_share_stops_only_at_what_was_left_out_inside_it(tmp_path: Path) -> None:
    whole = build_scan([str(_tree(tmp_path / "src"))], excludes=["*.bak"], skip_errors=True)
    whole.errors.append("b/c: Permission denied")
    whole.placed["b/c: Permission denied"] = ("b/c", "cannot read b/c: Permission denied", "fix its permissions")
    only_top = whole.share(lambda rel: "/" not in rel and rel != "b", skip_errors=False)
    assert only_top.errors == [] and [d.path for d in only_top.dirs] == ["", "empty"]
    with pytest.raises(SourceError, match="cannot read b/c: Permission denied"):
        whole.share(lambda rel: True, skip_errors=False)
    assert whole.share(lambda rel: True, skip_errors=True).errors == ["b/c: Permission denied"]


def test_a_shard_pack_lists_its_sources_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmdbfs.pack import packer, sources
    from lmdbfs.read.reader import Archive

    src = _tree(tmp_path / "src")
    listed = []
    members = sources.FolderSource.members
    monkeypatch.setattr(
        sources.FolderSource, "members", lambda self, listing: listed.append(1) or members(self, listing)
    )
    result = packer.pack(str(src), str(tmp_path / "s.lmdb"), packer.PackOptions(progress=False, shard=(0, 2, 1)))
    assert listed == [1] and result.share is not None and result.share.index == 0
    with Archive(str(tmp_path / "s.lmdb")) as db:
        assert db.meta.extra["shard"] == "0/2" and db.meta.files == result.files


def test_shards_of_sources_placed_under_folders_split_them(tmp_path: Path) -> None:
    """Each shard keeps a path only when every folder above it is in its share, the
    folders a source is placed under too (a listing that checked only each entry's own
    path put the deeper entries of DIR=SRC sources into every shard, which then clashed)."""
    from lmdbfs.pack import packer
    from lmdbfs.read.union import open_tree

    for name, rel in (("s1", "x/f"), ("s2", "y/g")):
        (tmp_path / name / rel).parent.mkdir(parents=True)
        (tmp_path / name / rel).write_bytes(name.encode())
    specs = [f"a={tmp_path / 's1'}", f"b={tmp_path / 's2'}"]
    dbs = [str(tmp_path / f"{i}.lmdb") for i in range(2)]
    for i, db in enumerate(dbs):
        result = packer.pack(specs, db, packer.PackOptions(progress=False, shard=(i, 2, 1)))
        assert result.files == 1
    with open_tree(*dbs) as tree:
        assert tree.read_bytes("a/x/f") == b"s1" and tree.read_bytes("b/y/g") == b"s2" and tree.shard_problems() == []
