"""Live mounts of damaged DBs, and a soak test of a healthy one.

Written against `lmdbfs mount` / `lmdbfs umount` only, so they test whichever serving
path is in place. Damaged entries may answer EIO or ENOENT; everything else must keep
being served with the right bytes, by a daemon that stays alive and small.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from . import hostile as H
from .conftest import Mount, is_mounted, one_error_line, run_cli
from .test_hostile_cli import CASES, _flip_pages, _flip_record

pytestmark = pytest.mark.mount  # every test here mounts a FUSE filesystem

# A program walking the whole mount in a child (a hang must not hang the tests):
# every directory listed, every entry stat'ed, every file read, every link read.
_WALKER = r"""
import errno, hashlib, json, os, sys
top = sys.argv[1]
seen = {}
def note(rel, exc=None):
    seen[rel] = "ok" if exc is None else errno.errorcode.get(exc.errno, str(exc.errno))
def walk(rel, depth=0):
    path = os.path.join(top, rel)
    try:
        names = os.listdir(path)
    except OSError as exc:
        return note(rel + "/", exc)
    note(rel + "/")
    for name in names:
        child = os.path.join(rel, name) if rel else name
        try:
            st = os.lstat(os.path.join(top, child))
            if os.path.islink(os.path.join(top, child)):
                os.readlink(os.path.join(top, child))
            elif os.path.isdir(os.path.join(top, child)):
                if depth < 50:
                    walk(child, depth + 1)
                continue
            else:
                with open(os.path.join(top, child), "rb") as fh:
                    data = fh.read()
                if len(data) != st.st_size:
                    raise OSError(errno.EBADMSG, "size differs from stat")
                seen[child] = "md5:" + hashlib.md5(data).hexdigest()
                continue
            note(child)
        except OSError as exc:
            note(child, exc)
walk("")
print(json.dumps(seen))
"""

DAEMON_RSS_KB = 160 * 1024  # a healthy daemon of this tree stays far below (amplified records cost 250+ MB)
MOUNT_CASES = [
    "empty_dir_name",
    "slash_in_name",
    "nul_in_name",
    "dotdot_dir_name",
    "name_outside_blob",
    "name_300_bytes",
    "kind_0",
    "kind_9",
    "unknown_flag",
    "size_beyond_file",
    "offset_beyond_file",
    "inline_beyond_blob",
    "inline_offset_beyond_tail",
    "symlink_target_nul",
    "repeated_64k_name",
    "shared_name_bytes",
    "unsorted_rows",
    "node_pgno_far",
    "node_size_overflow_record",
    "node_flags_bigdata",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    return H.base_db(tmp_path_factory.mktemp("hostile_mount"))


def _walk(mnt: Path) -> dict[str, str]:
    proc = subprocess.run([sys.executable, "-c", _WALKER, str(mnt)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _assert_served_right(seen: dict[str, str], files: dict[str, bytes]) -> None:
    """Only EIO/ENOENT as errors, and every file read whole has its original bytes."""
    odd = {rel: what for rel, what in seen.items() if what not in ("ok", "EIO", "ENOENT") and what[:4] != "md5:"}
    assert not odd, odd
    for rel, what in seen.items():
        if what.startswith("md5:") and rel in files:
            assert what[4:] == hashlib.md5(files[rel]).hexdigest(), f"{rel}: wrong bytes served"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("case", MOUNT_CASES)
def test_a_mount_of_a_damaged_db_serves_everything_else(case: str, base, mount_db, tmp_path: Path) -> None:
    base_db, files = base
    db = H.fresh_copy(base_db, tmp_path, case)
    CASES[case](db)
    m = mount_db(db)
    pid = m.daemon_pid()
    broken = "seq1" if case in ("node_flags_bigdata", "node_size_inline_record") else "many"
    if case.startswith("node_"):
        # The damaged record first: the daemon's read transaction must survive it.
        with pytest.raises(OSError) as err:
            os.listdir(m.mnt / broken)
        assert err.value.errno == errno.EIO
    seen = _walk(m.mnt)
    _assert_served_right(seen, files)
    assert seen.get("/") == "ok", "the root must list whatever one of its rows holds"
    assert _alive(pid), "the daemon died"
    # Files whose rows and directories were left alone read exactly, after the damage.
    if case.startswith("node_"):
        intact = [rel for rel in files if not rel.startswith(broken + "/")]
    elif case.startswith("repeated_"):
        intact = []  # the root record itself was replaced
    elif case == "shared_name_bytes":
        intact = [rel for rel in files if not rel.startswith("many/")]
        assert len(os.listdir(m.mnt / "many")) == 255
        assert (m.mnt / "many" / ("s" * 200)).stat().st_size == len(files["many/m07.txt"])
    elif case.startswith("unsorted_"):
        intact = [rel for rel in files if rel.startswith("seq2/")]  # seq2 sorts first, reversed
    else:
        intact = [rel for rel in files if rel.startswith("many/")]
    for rel in intact:
        assert (m.mnt / rel).read_bytes() == files[rel], rel
    assert _alive(pid)
    assert _rss_kb(pid) < DAEMON_RSS_KB, f"daemon RSS {_rss_kb(pid)} kB after serving a damaged DB"


@pytest.mark.parametrize("seed", range(int(os.environ.get("LMDBFS_FUZZ_MOUNTS", "4"))))  # raise for a deeper run
def test_a_mount_of_randomly_damaged_db_keeps_serving(seed: int, base, mount_db, tmp_path: Path) -> None:
    base_db, files = base
    db = H.fresh_copy(base_db, tmp_path, f"random{seed}")
    rng = random.Random(f"mount-{seed}")
    (_flip_record if seed % 2 else _flip_pages)(db, rng)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = run_cli("mount", db, mnt, check=False, timeout=60)
    if proc.returncode != 0:
        one_error_line(proc)  # a DB too damaged to open is refused with one line
        return
    try:
        pid = Mount.daemon_pid(SimpleNamespace(mnt=mnt))
        _assert_served_right(_walk(mnt), files)
        _assert_served_right(_walk(mnt), files)  # again, now partly from the kernel's caches
        assert _alive(pid), "the daemon died"
    finally:
        run_cli("umount", mnt, timeout=60)


@pytest.mark.parametrize("case", ["meta_root_mode_str", "meta_nested_deep", "meta_key_prefix_int"])
def test_a_damaged_meta_record_refuses_the_mount(case: str, base, tmp_path: Path) -> None:
    base_db, _files = base
    db = H.fresh_copy(base_db, tmp_path, case)
    CASES[case](db)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    line = one_error_line(run_cli("mount", db, mnt, check=False, timeout=60))
    assert "meta record" in line
    assert not is_mounted(mnt)


def test_a_db_name_with_commas_and_backslashes_mounts(base, mount_db, tmp_path: Path) -> None:
    base_db, files = base
    db = H.fresh_copy(base_db, tmp_path, "a,b=c\\d,allow_other")
    m = mount_db(db)
    assert (m.mnt / "a.txt").read_bytes() == files["a.txt"]
    with open("/proc/self/mountinfo") as fh:
        line = next(line for line in fh if line.split()[4] == str(m.mnt))
    source = line.split(" - ")[1].split()[1]
    assert source.replace("\\134", "\\") == "lmdbfs:a,b=c\\d,allow_other.lmdb"
    assert "allow_other" not in line.split(" - ")[1].split()[2]


# -- older formats ------------------------------------------------------------------------


def test_a_version_3_db_mounts_and_reads_the_same(base, mount_db, tmp_path: Path) -> None:
    """Format 4 moved inline bytes behind the names; DBs packed before keep working."""
    import lmdbfs

    base_db, files = base
    db = H.fresh_copy(base_db, tmp_path, "v3")
    H.to_version_3(db)
    with lmdbfs.open(db) as archive:
        assert archive.meta.format_version == 3
        assert {rel: archive.read_bytes(rel) for rel in files} == files
    m = mount_db(db)
    seen = _walk(m.mnt)
    assert all(seen[rel].startswith("md5:") for rel in files), seen
    _assert_served_right(seen, files)
    assert {rel: (m.mnt / rel).read_bytes() for rel in files} == files


# -- soak ---------------------------------------------------------------------------------


def _epochs(mnt: str, files: dict[str, bytes], epochs: int, seed: int) -> int:
    """Read every file ``epochs`` times in a shuffled order, comparing bytes."""
    import random

    rng = random.Random(seed)
    names = sorted(files)
    errors = 0
    for _ in range(epochs):
        rng.shuffle(names)
        for rel in names:
            with open(os.path.join(mnt, rel), "rb") as fh:
                if fh.read() != files[rel]:
                    errors += 1
        for dirpath, _dirs, _files in os.walk(mnt):
            os.stat(dirpath)
    return errors


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def test_soak_16_readers_and_mount_cycles(base, mount_db, tmp_path: Path) -> None:
    base_db, files = base
    m = mount_db(base_db, name="soak")
    pid = m.daemon_pid()
    with ProcessPoolExecutor(16) as pool:
        assert sum(pool.map(_epochs, [str(m.mnt)] * 16, [files] * 16, [1] * 16, range(16))) == 0  # warm-up
        before = _rss_kb(pid)
        errors = sum(pool.map(_epochs, [str(m.mnt)] * 16, [files] * 16, [8] * 16, range(16, 32)))
    after = _rss_kb(pid)
    assert errors == 0
    assert after - before < 8 * 1024, f"daemon RSS grew from {before} to {after} kB"
    m.close()
    for cycle in range(10):
        mnt = tmp_path / f"cycle{cycle % 2}"
        mnt.mkdir(exist_ok=True)
        run_cli("mount", base_db, mnt, timeout=60)
        try:
            assert (mnt / "big.bin").read_bytes() == files["big.bin"]
        finally:
            run_cli("umount", mnt, timeout=60)
        deadline = time.monotonic() + 10
        while is_mounted(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_mounted(mnt)
        assert os.listdir(mnt) == []
