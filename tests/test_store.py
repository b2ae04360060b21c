"""lmdbfs/db/store.py: opening a DB safely — what is not a finished lmdbfs DB is refused
with a typed error naming it, before a byte of it is served."""

from __future__ import annotations

import os
from pathlib import Path

import lmdb
import pytest

from lmdbfs.db import store
from lmdbfs.errors import BadDatabase, IncompleteDatabase
from lmdbfs.pack.packer import PackOptions, pack


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("store") / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(50_000))
    out = src.parent / "s.lmdb"
    pack(str(src), str(out), PackOptions(progress=False))
    return out


def test_a_db_is_a_file_or_an_lmdb_directory(db: Path, tmp_path: Path) -> None:
    assert store.locate(str(db)) == store.Location(str(db), False)
    lmdb_dir = tmp_path / "dir"
    lmdb_dir.mkdir()
    (lmdb_dir / "data.mdb").write_bytes(db.read_bytes())
    assert store.locate(str(lmdb_dir)).data_file == str(lmdb_dir / "data.mdb")
    with pytest.raises(BadDatabase, match="without data.mdb"):
        store.locate(str(tmp_path))
    with pytest.raises(BadDatabase, match="no such DB"):
        store.locate(str(tmp_path / "missing.lmdb"))
    (tmp_path / "half.lmdb.partial").write_bytes(b"")
    with pytest.raises(IncompleteDatabase, match="unfinished pack"):
        store.locate(str(tmp_path / "half.lmdb"))


def test_one_environment_per_file_is_shared_and_released(db: Path) -> None:
    env, loc = store.acquire_readonly(str(db))
    again, _ = store.acquire_readonly(str(db))
    assert again is env and loc.path == str(db)
    assert store.read_meta(env, str(db)).complete
    store.release_readonly(again)
    store.release_readonly(env)
    fresh, _ = store.acquire_readonly(str(db))  # the last release closed it: a new one opens
    try:
        assert fresh is not env
    finally:
        store.release_readonly(fresh)


def test_what_is_not_a_finished_lmdbfs_db_is_refused(db: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.lmdb"
    garbage.write_bytes(os.urandom(8192))
    truncated = tmp_path / "truncated.lmdb"
    truncated.write_bytes(db.read_bytes()[:12288])
    other = tmp_path / "other.lmdb"
    with lmdb.open(str(other), subdir=False) as env, env.begin(write=True) as txn:
        txn.put(b"some key", b"some value")
    for path, words in [(garbage, "garbage.lmdb"), (truncated, "truncated"), (other, "LMDB")]:
        with pytest.raises(BadDatabase, match=words):
            env, _loc = store.acquire_readonly(str(path))
            try:
                store.read_meta(env, str(path))
            finally:
                store.release_readonly(env)
