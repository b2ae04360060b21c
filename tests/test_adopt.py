"""`lmdbfs adopt`: LMDBs that trackers already use, served without copying their values."""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
import subprocess
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

import lmdbfs
from lmdbfs.db import btree
from tests.conftest import load_script, one_error_line, run_cli

pytestmark = pytest.mark.slow  # builds foreign DBs and adopts them end to end


def stark_build(src: Path, db: Path, extra: dict[bytes, bytes] | None = None) -> None:
    """A DB as STARK-style builders write it: an LMDB directory, one put per file, keys
    the plain relative paths, values the raw bytes, a commit every 100k, a 1 TiB map."""
    env = lmdb.open(str(db), map_size=1 << 40)
    txn = env.begin(write=True)
    n = 0
    for dirpath, _dirs, files in os.walk(src):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                txn.put(os.path.relpath(path, src).encode(), fh.read())
            n += 1
            if n % 100_000 == 0:
                txn.commit()
                txn = env.begin(write=True)
    for key, value in (extra or {}).items():
        txn.put(key, value)
    txn.commit()
    env.close()


def files_of(root: Path) -> tuple[dict[str, bytes], set[str]]:
    """Relative file paths -> bytes, and the relative directory paths, of a real tree."""
    files, dirs = {}, set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for d in dirnames:
            dirs.add(os.path.normpath(os.path.join(rel, d)))
        for f in filenames:
            files[os.path.normpath(os.path.join(rel, f))] = Path(dirpath, f).read_bytes()
    return files, dirs


def state_of(db: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of an LMDB directory: digest and mtime (to prove adopt wrote nothing)."""
    return {p.name: (hashlib.sha256(p.read_bytes()).digest(), p.stat().st_mtime_ns) for p in sorted(db.iterdir())}


@pytest.fixture(scope="module")
def stark_db(got10k_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("stark") / "got10k_lmdb"
    stark_build(got10k_tree, db)
    return db


@pytest.mark.mount
def test_stark_db_adopted_and_mounted_matches_source(
    stark_db: Path, got10k_tree: Path, tmp_path: Path, mount_db
) -> None:
    before = state_of(stark_db)
    out = run_cli("adopt", stark_db, "--no-progress").stdout
    assert "the DB is unchanged" in out and Path(str(stark_db) + ".lmdbfs").is_file()
    assert state_of(stark_db) == before  # byte-identical, same mtimes, no lock file added
    info = run_cli("info", stark_db).stdout
    assert "adopted" in info and "keyed by plain paths" in info and "checksum       none" in info
    mnt = mount_db(stark_db).mnt
    assert files_of(mnt) == files_of(got10k_tree)
    assert oct(os.stat(mnt / "train" / "list.txt").st_mode & 0o777) == oct(0o444)  # 0644, read-only mount
    assert os.stat(mnt / "train").st_mtime_ns == os.stat(stark_db / "data.mdb").st_mtime_ns
    assert state_of(stark_db) == before
    run_cli("verify", stark_db, "--against", got10k_tree)
    # The Python API takes the DB path (the index beside it is found) or the index.
    with lmdbfs.open(stark_db) as archive, lmdbfs.open(str(stark_db) + ".lmdbfs") as by_index:
        rel = "val/GOT-10k_Val_000001/00000001.jpg"
        assert archive.read_bytes(rel) == by_index.read_bytes(rel) == (got10k_tree / rel).read_bytes()


@pytest.mark.mount
def test_adopt_of_a_read_only_db_directory(stark_db: Path, got10k_tree: Path, tmp_path: Path) -> None:
    """A DB on a read-only filesystem (a read-only bind mount, enforced even for root)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(stark_db), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
        with pytest.raises(OSError):
            (ro / "probe").write_bytes(b"x")
        index = tmp_path / "ro.lmdbfs"  # beside the mount point
        run_cli("adopt", ro, "--no-progress")
        assert index.is_file()
        assert run_cli("cat", ro, "train/list.txt").stdout == (got10k_tree / "train" / "list.txt").read_text()
    finally:
        subprocess.run(["umount", str(ro)], check=True)


@pytest.mark.mount
def test_a_changed_db_gives_one_line_until_adopted_again(got10k_tree: Path, tmp_path: Path) -> None:
    db = tmp_path / "db"
    stark_build(got10k_tree / "val", db)
    index = tmp_path / "elsewhere" / "val.idx"
    index.parent.mkdir()
    run_cli("adopt", db, index, "--no-progress")
    assert run_cli("ls", index).stdout.split() == sorted(os.listdir(got10k_tree / "val"))
    env = lmdb.open(str(db))
    with env.begin(write=True) as txn:
        txn.put(b"added.txt", b"new\n")
    env.close()
    for args in (["ls", index], ["cat", index, "list.txt"], ["mount", index, tmp_path / "mnt"]):
        (tmp_path / "mnt").mkdir(exist_ok=True)
        line = one_error_line(run_cli(*args, check=False))
        assert "the adopted DB changed since `lmdbfs adopt`; run it again" in line
    run_cli("adopt", db, index, "--no-progress")
    assert run_cli("cat", index, "added.txt").stdout == "new\n"


def test_garbage_keys_are_reported_and_left_out(got10k_tree: Path, tmp_path: Path) -> None:
    db = tmp_path / "db"
    bad = {
        b"/etc/passwd": b"abs",
        b"../escape": b"up",
        b"a//b": b"empty",
        b"nul\0name": b"nul",
        b"latin-\xe9": b"not utf-8",
        b"long/" + b"n" * 256: b"long",
        b"GOT-10k_Test_000001": b"a file where a directory is",
    }
    stark_build(got10k_tree / "test", db, bad)
    # `info` before adopting says what the DB is and how to adopt it.
    line = one_error_line(run_cli("info", db, check=False))
    assert "keyed by plain relative paths" in line and "lmdbfs adopt" in line
    out = run_cli("adopt", db, "--no-progress").stdout
    assert "7 keys left out" in out and "absolute path" in out and "not UTF-8" in out
    listing = run_cli("ls", db, "-R").stdout
    assert "passwd" not in listing and "escape" not in listing and "latin" not in listing
    assert run_cli("ls", db, "GOT-10k_Test_000001").stdout.split()[0] == "00000001.jpg"  # the directory won
    assert run_cli("cat", db, "list.txt").stdout == (got10k_tree / "test" / "list.txt").read_text()


def test_checksum_option_records_and_verifies(got10k_tree: Path, tmp_path: Path) -> None:
    db = tmp_path / "db"
    stark_build(got10k_tree / "val", db)
    run_cli("adopt", db, "--checksum", "--no-progress")
    assert "xxh3_64" in run_cli("info", db).stdout
    assert "checksummed" in run_cli("verify", db).stdout


def test_hostile_commands_give_one_line(stark_db: Path, seed_db: Path, got10k_db: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty_keys"
    stark_build(tmp_path / "nothing", empty, {b"/only/bad": b"x"})
    cases = [
        (["adopt", tmp_path / "missing"], "no such DB"),
        (["adopt", got10k_db], "already an lmdbfs DB"),
        (["adopt", empty], "none of its 1 keys could be adopted"),
        (["adopt", seed_db, "--paths", tmp_path / "no-listing.txt"], "no-listing.txt"),
        (["adopt", stark_db, "--paths", tmp_path], "not every key is a 16-byte md5 digest"),
        (["adopt", stark_db, "--key-prefix", "x/"], "go with --paths"),
        (["adopt", stark_db, stark_db / "data.mdb"], "is the DB itself"),
        (["adopt", stark_db, got10k_db], "not an index written by `lmdbfs adopt`"),
    ]
    for args, expect in cases:
        line = one_error_line(run_cli(*args, "--no-progress", check=False))
        assert expect in line, (args, line)


# -- md5-keyed converter DBs ----------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_db(got10k_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("seed") / "lmdb_got10k"
    load_script("seed_convert").convert(got10k_tree, db, workers=1, progress=False)
    return db


@pytest.mark.mount
def test_md5_converter_db_through_the_got10k_toolkit(
    seed_db: Path, got10k_tree: Path, got10k_db: Path, tmp_path: Path, mount_db
) -> None:
    line = one_error_line(run_cli("info", seed_db, check=False))
    assert "md5-keyed converter DB" in line and "--paths" in line
    files, _dirs = files_of(got10k_tree)
    listing = tmp_path / "listing.txt"
    listing.write_text("\n".join(sorted(files) + ["train/GOT-10k_Train_000099/00000001.jpg"]) + "\n")
    before = state_of(seed_db)
    out = run_cli("adopt", seed_db, "--paths", listing, "--no-progress").stdout
    assert "1 listed paths not in the DB: train/GOT-10k_Train_000099/00000001.jpg" in out
    assert "converted back to files" in out
    assert state_of(seed_db) == before
    assert "converted back to files" in run_cli("info", seed_db).stdout
    assert "checked (found by key, same size and offset" in run_cli("verify", seed_db).stdout
    # Beside a packed DB in one tree: each layer's inline files are checked as that DB keeps them.
    assert run_cli("verify", f"seed={seed_db}", f"packed={got10k_db}").stdout.startswith("ok: ")
    mnt = mount_db(seed_db).mnt
    datasets = importlib.import_module("got10k.datasets")
    for subset in ("train", "val", "test"):
        mine = datasets.GOT10k(str(mnt), subset=subset, return_meta=True)
        theirs = datasets.GOT10k(str(got10k_tree), subset=subset, return_meta=True)
        assert len(mine) == len(theirs) == 3
        for a, b in zip(mine, theirs):
            assert [os.path.relpath(p, mnt) for p in a[0]] == [os.path.relpath(p, got10k_tree) for p in b[0]]
            np.testing.assert_allclose(a[1], b[1], rtol=1e-6)  # float32 precision
            assert (a[1].astype(np.float32) == b[1].astype(np.float32)).all()
            if subset != "test":
                assert a[2].keys() == b[2].keys()
                for key in a[2]:
                    np.testing.assert_array_equal(a[2][key], b[2][key])
            for frame in a[0][:2]:  # re-encoded by the converter: still JPEG, same size
                with Image.open(frame) as im, Image.open(got10k_tree / os.path.relpath(frame, mnt)) as orig:
                    assert im.format == "JPEG" and im.size == orig.size


def _md5_db(path: Path, values: dict[str, bytes], prefix: str = "") -> None:
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for rel, value in values.items():
            txn.put(hashlib.md5((prefix + rel).encode()).digest(), value)
    env.close()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_md5_db_with_key_prefix_and_a_hostile_pickle(tmp_path: Path) -> None:
    """Keys hashed as the original converter did ('GOT10K_train/<seq>/<file>'); one
    meta_info.ini holds a pickle that would run a command if it were unpickled."""
    seq = "GOT-10k_Train_000001"
    gt = np.array([[347, 443, 429, 272], [1.5, 2.25, 3.125, 4.0625]], dtype=np.float32)
    values = {
        f"{seq}/groundtruth.txt": gt.tobytes(),
        f"{seq}/absence.label": np.array([0, 1], np.uint8).tobytes(),
        f"{seq}/meta_info.ini": pickle.dumps(["[METAINFO]\n", "object_class: ant\n"]),
        f"{seq}/00000001.jpg": b"\xff\xd8" + os.urandom(5000),
        "GOT-10k_Train_000002/meta_info.ini": pickle.dumps(["[METAINFO]\n", _Evil()]),
    }
    db = tmp_path / "lmdb_got10k"
    _md5_db(db, values, prefix="GOT10K_train/")
    listing = tmp_path / "paths.txt"
    listing.write_text("\n".join(values) + "\n")
    proc = run_cli("adopt", db, "--paths", listing, "--key-prefix", "GOT10K_train/", "--no-progress", check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "GOT-10k_Train_000002/meta_info.ini: the pickle holds" in proc.stdout
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()
    assert run_cli("cat", db, f"{seq}/groundtruth.txt").stdout == (
        "347.0000,443.0000,429.0000,272.0000\n1.5000,2.2500,3.1250,4.0625\n"
    )
    assert run_cli("cat", db, f"{seq}/absence.label").stdout == "0\n1\n"
    assert run_cli("cat", db, f"{seq}/meta_info.ini").stdout == "[METAINFO]\nobject_class: ant\n"
    assert run_cli("ls", db, "GOT-10k_Train_000002", check=False).returncode != 0  # left out entirely
    # Without the prefix nothing matches: every listed path is reported missing.
    line = one_error_line(run_cli("adopt", db, tmp_path / "i2", "--paths", listing, "--no-progress", check=False))
    assert "none of its 5 keys could be adopted" in line


def test_a_damaged_tree_gives_one_line(tmp_path: Path) -> None:
    """The B-tree is read by lmdbfs before LMDB walks it: a damaged page is refused."""
    src = tmp_path / "src"
    for i in range(3000):
        sub = src / f"seq{i // 500}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:06d}.txt").write_bytes(b"x" * (i % 50))
    db = tmp_path / "db"
    stark_build(src, db)
    env = lmdb.open(str(db), readonly=True, lock=False)
    info, psize = env.info(), env.stat()["psize"]
    assert env.stat()["depth"] >= 2
    env.close()
    data = db / "data.mdb"
    fd = os.open(data, os.O_RDONLY)
    try:
        root, _depth, _entries = btree._main_root(fd, str(db), psize, info["last_txnid"])
    finally:
        os.close(fd)
    with open(data, "r+b") as fh:  # the root's node pointers now point past its end
        fh.seek(root * psize + 16)
        fh.write(b"\xfe\xff" * 8)
    line = one_error_line(run_cli("adopt", db, "--no-progress", check=False))
    assert "cannot read its B-tree" in line and "node outside its free space" in line
    assert not Path(str(db) + ".lmdbfs").exists()


def _reference_clean(raw: bytes) -> bool:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    parts = text.split("/")
    return (
        bool(raw)
        and "\0" not in text
        and all(p not in ("", ".", "..") for p in parts)
        and all(len(p.encode()) <= 255 for p in parts)
    )


def test_key_check_agrees_with_a_plain_reference() -> None:
    """The fast substring tests in bad_path_reason clear exactly the clean keys."""
    import random

    from lmdbfs.db.foreign import bad_path_reason

    rnd = random.Random(5)
    atoms = [b"a", b"b.jpg", b".", b"..", b"/", b"\0", b"\xff", b"\xc3\xa9", b".hidden", b"x" * 200, b"y" * 56]
    for _ in range(20_000):
        raw = b"".join(rnd.choice(atoms) for _ in range(rnd.randint(0, 6)))
        assert (bad_path_reason(raw) is None) == _reference_clean(raw), raw
