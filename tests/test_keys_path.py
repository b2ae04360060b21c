"""`--keys path`: a DB that STARK-style loaders read unmodified, which lmdbfs still
lists, verifies and mounts."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest

from .conftest import one_error_line, run_cli
from .test_mount import _without_write_bits
from .treecmp import differences, snapshot

pytestmark = pytest.mark.slow  # packs real trees

# A STARK-style reader (lib/utils/lmdb_utils.py of that project), as loaders use it.
_ENVS: dict[str, lmdb.Environment] = {}


def _env(lmdb_fname: str) -> lmdb.Environment:
    if lmdb_fname not in _ENVS:
        _ENVS[lmdb_fname] = lmdb.open(lmdb_fname, readonly=True, lock=False, readahead=False, meminit=False)
    return _ENVS[lmdb_fname]


def decode_img(lmdb_fname: str, key_name: str) -> np.ndarray:
    binfile = _env(lmdb_fname).begin(write=False).get(key_name.encode())
    s = np.frombuffer(binfile, np.uint8)
    return cv2.cvtColor(cv2.imdecode(s, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def decode_str(lmdb_fname: str, key_name: str) -> str:
    return _env(lmdb_fname).begin(write=False).get(key_name.encode()).decode()


@pytest.mark.mount
def test_stark_reader_gets_the_source_files(got10k_tree: Path, tmp_path: Path, mount_db) -> None:
    db = tmp_path / "got10k_lmdb"
    run_cli("pack", "--keys", "path", got10k_tree, db, "--no-progress")
    assert sorted(os.listdir(db)) == ["data.mdb"], "an LMDB directory, nothing else in it"
    checked = 0
    for dirpath, _dirs, files in os.walk(got10k_tree):
        for name in files:
            path = Path(dirpath) / name
            key = path.relative_to(got10k_tree).as_posix()
            if name.endswith(".jpg"):
                expected = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                assert np.array_equal(decode_img(str(db), key), expected), key
            else:
                assert decode_str(str(db), key) == path.read_text(), key
            checked += 1
    assert checked > 50
    assert '"keys": "path"' in run_cli("info", db, "--json").stdout
    assert "GOT-10k_Train_000001" in run_cli("ls", db, "train").stdout.split()
    run_cli("verify", db, "--against", got10k_tree)
    m = mount_db(db)
    assert differences(_without_write_bits(snapshot(got10k_tree)), snapshot(m.mnt)) == []


def test_path_keys_refuse_long_paths_and_reserved_names(tmp_path: Path) -> None:
    src = tmp_path / "long"
    deep = src / ("a" * 200) / ("b" * 200)
    deep.mkdir(parents=True)
    (deep / ("c" * 120)).write_bytes(b"x")
    line = one_error_line(run_cli("pack", "--keys", "path", src, tmp_path / "l.lmdb", "--no-progress", check=False))
    assert "at most 511" in line and "md5 keys" in line
    assert not (tmp_path / "l.lmdb").exists()
    run_cli("pack", src, tmp_path / "md5.lmdb", "--no-progress")  # md5 keys have no such limit

    src = tmp_path / "reserved"
    src.mkdir()
    (src / "lmdbfs.index").write_bytes(b"x")
    line = one_error_line(run_cli("pack", "--keys", "path", src, tmp_path / "r.lmdb", "--no-progress", check=False))
    assert "lmdbfs.index" in line and "database" in line
    assert not (tmp_path / "r.lmdb").exists()
