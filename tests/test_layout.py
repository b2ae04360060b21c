"""The compact layout (`pack --layout compact`): files of at most INLINE_MAX bytes are
stored once, in their directory's record, and every lmdbfs reader serves the DB byte
for byte — the CLI, `lmdbfs.open`, unpack, verify and a FUSE mount; `info` names the
layout. The default (keyed) layout keeps every file under its key."""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

import lmdb
import pytest

import lmdbfs
from lmdbfs.format.records import COMPACT_VERSION, FORMAT_VERSION, INLINE_MAX

from .conftest import load_script, run_cli
from .treecmp import differences, snapshot

ABSENT = {b"backup.bak", b"small/old.bak", b"a_fifo", b"a_socket"}


@pytest.fixture(scope="module")
def compact_db(edge_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("compact") / "edge.lmdb"
    run_cli("pack", "--layout", "compact", edge_tree, db, "--exclude", "*.bak", "--no-progress")
    return db


def _files(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path) and not name.endswith(".bak"):
                out[os.path.relpath(path, root)] = Path(path).read_bytes()
    return out


def test_small_files_are_stored_once(edge_tree: Path, edge_db: Path, compact_db: Path) -> None:
    files = _files(edge_tree)
    small = {rel for rel, data in files.items() if len(data) <= INLINE_MAX}
    assert len(small) > 300
    env = lmdb.open(str(compact_db), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        for rel, data in files.items():
            got = txn.get(hashlib.md5(os.fsencode(rel)).digest())
            assert got == (None if rel in small else data), rel
    env.close()
    env = lmdb.open(str(edge_db), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:  # the default keeps the seed's lookup for every file
        for rel, data in files.items():
            assert txn.get(hashlib.md5(os.fsencode(rel)).digest()) == data, rel
    env.close()
    info = run_cli("info", compact_db).stdout
    assert f"lmdbfs v{COMPACT_VERSION}" in info and "compact" in info
    keyed_info = run_cli("info", edge_db).stdout
    assert f"lmdbfs v{FORMAT_VERSION}" in keyed_info and "keyed" in keyed_info


def test_every_reader_serves_the_compact_layout(edge_tree: Path, compact_db: Path, tmp_path: Path, mount_db) -> None:
    expected = snapshot(edge_tree)
    assert run_cli("verify", compact_db).stdout.startswith("ok: ")
    assert run_cli("verify", compact_db, "--against", edge_tree).stdout.startswith("ok: ")
    run_cli("unpack", compact_db, tmp_path / "out")
    assert differences(expected, snapshot(tmp_path / "out"), ignore=ABSENT) == []
    with lmdbfs.open(str(compact_db)) as fs:
        for rel, data in _files(edge_tree).items():
            assert fs.read_bytes(rel) == data, rel
            assert fs.open(rel).read() == data
    assert run_cli("cat", compact_db, "small/many_006.txt").stdout == "6\n" * 6
    mnt = mount_db(compact_db)  # read-only: write bits are not served
    assert differences(snapshot(edge_tree, mode_mask=0o7555), snapshot(mnt.mnt), ignore=ABSENT) == []
    for rel, data in _files(edge_tree).items():
        assert (mnt.mnt / rel).read_bytes() == data, rel


def test_a_union_of_both_layouts(edge_tree: Path, edge_db: Path, compact_db: Path, mount_db) -> None:
    mnt = mount_db([f"keyed={edge_db}", f"compact={compact_db}"])
    for rel, data in _files(edge_tree).items():
        assert (mnt.mnt / "keyed" / rel).read_bytes() == data
        assert (mnt.mnt / "compact" / rel).read_bytes() == data


def test_sizes_against_a_tar_on_tiny_files(tmp_path: Path) -> None:
    """A GOT-10k-shaped tree of ~2 KB frames (make_fake_got10k --thumbs): the compact DB
    is at most 1.1x a tar of the tree; the keyed one, which holds most bytes twice, at
    most 1.8x (1.54x on the 1.45M-file tree of docs/benchmarks.md)."""
    tree = tmp_path / "tree"
    load_script("make_fake_got10k").make_tree(tree, seqs=8, frames=100, splits=("train",), thumbs=True)
    frames = [f.stat().st_size for f in tree.rglob("*.jpg")]
    assert 1500 < sum(frames) / len(frames) < 2200
    with tarfile.open(tmp_path / "tree.tar", "w") as tar:
        tar.add(tree, arcname=".")
    tar_bytes = (tmp_path / "tree.tar").stat().st_size
    sizes = {}
    for layout in ("keyed", "compact"):
        db = tmp_path / f"{layout}.lmdb"
        run_cli("pack", "--layout", layout, tree, db, "--no-progress")
        run_cli("verify", db, "--against", tree)
        sizes[layout] = db.stat().st_size / tar_bytes
    assert sizes["compact"] <= 1.1 and sizes["keyed"] <= 1.8, sizes


def test_keyed_small_values_fill_their_leaf_pages(tmp_path: Path) -> None:
    """The keyed layout's ~2 KB values, put in key order, sit two to a 4 KiB leaf page
    (LMDB alone would split each full page so that one value a page remains); the main
    database holds exactly the files' keys, and `txn.get(md5(path))` returns each file."""
    import random

    rng = random.Random(7)
    files = {}
    for seq in range(6):
        for n in range(150):
            rel = f"seq{seq:02d}/{n:08d}.jpg"
            files[rel] = rng.randbytes(rng.randint(1600, 2000))
    for rel, data in files.items():
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / rel).write_bytes(data)
    db = tmp_path / "k.lmdb"
    run_cli("pack", tmp_path / "src", db, "--no-progress")
    env = lmdb.open(str(db), subdir=False, readonly=True, lock=False, max_dbs=4)
    with env.begin() as txn:
        stat = txn.stat(env.open_db(None, txn=txn))
        keys = [k for k in txn.cursor().iternext(values=False)]
        for rel, data in files.items():
            assert txn.get(hashlib.md5(rel.encode()).digest()) == data, rel
    env.close()
    assert sorted(k for k in keys if len(k) == 16) == sorted(hashlib.md5(r.encode()).digest() for r in files)
    assert len(keys) == len(files) + 2, "the file keys and the two named databases, nothing else"
    assert stat["leaf_pages"] <= len(files) / 1.9, stat  # without the fences: ~1 a page
