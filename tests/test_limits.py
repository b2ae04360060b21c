"""Whatever `lmdbfs pack` accepts, every reader serves: names, folder depth, symlink
targets, entries per folder and record sizes past what the readers take are refused at
pack time with one line naming the member (or, with --skip-errors, left out and listed),
from folders and archives alike; and the C server's limits are the Python ones."""

from __future__ import annotations

import io
import os
import re
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

import lmdbfs
from lmdbfs import _serve
from lmdbfs.errors import SourceError
from lmdbfs.format import records as format
from lmdbfs.pack import scan, writer
from lmdbfs.pack.packer import PackOptions, pack

from .conftest import ROOT, one_error_line, run_cli

LONG = "n" * 300  # a folder name no reader serves
DEEP = "/".join(["d"] * (format.DEPTH_MAX + 1))  # a folder one level too deep


def test_c_server_limits_are_the_python_ones() -> None:
    header = "\n".join(p.read_text() for p in sorted((ROOT / "csrc").glob("*.h")))

    def define(name: str) -> str:
        return re.search(rf"^#define {name} (.+?)(\s*/\*.*)?$", header, re.M).group(1)

    assert int(define("NAME_MAX_LEN")) == format.NAME_MAX
    assert (1 << int(define("ROW_BITS"))) - 1 == format.ROWS_MAX == _serve.ROW_MAX
    assert define("RECORD_MAX") == "(256u << 20)" and format.RECORD_MAX == 256 << 20


def _tar(path: Path, members: list[tuple[str, bytes | str]]) -> Path:
    """A real tar: bytes are files, str are symlink targets."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _zip(path: Path, members: list[tuple[str, bytes | str]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0))
            info.create_system = 3
            if isinstance(data, str):
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, data)
            else:
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                zf.writestr(info, data)
    return path


def _refused_then_skipped(tmp_path: Path, src: Path, member: str, limit: str, ls: bool = True) -> None:
    """Refused with one line naming the member and the limit; with --skip-errors packed
    without it, listed, and every reader serves the rest (``ls``: `ls -R` too, which
    resolves every path from the root: slow down a 1,024-level tree)."""
    db = tmp_path / "out.db"
    line = one_error_line(run_cli("pack", src, db, check=False))
    assert member in line and limit in line, line
    assert not db.exists()
    out = run_cli("pack", "--skip-errors", src, db)
    assert "1 skipped" in out.stdout and member in out.stdout, out.stdout
    if ls:
        listing = run_cli("ls", "-R", db)
        assert "damaged" not in listing.stderr and "a.txt" in listing.stdout, listing.stderr
    run_cli("verify", db)
    with lmdbfs.open(str(db)) as fs:
        assert fs.read_bytes("keep/a.txt") == b"kept"
        assert [rel for rel, _dirs, _files in fs.walk()]  # walks without error


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_names_over_255_bytes_in_archives(tmp_path: Path, kind: str) -> None:
    make = _tar if kind == "tar" else _zip
    src = make(tmp_path / f"long.{kind}", [("keep/a.txt", b"kept"), (f"{LONG}/f.txt", b"x"), (f"{LONG}/g.txt", b"y")])
    _refused_then_skipped(tmp_path, src, f"{LONG}/f.txt", "255 bytes")


def test_names_over_255_bytes_in_an_expanded_zip_of_a_folder(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "keep").mkdir(parents=True)
    (tree / "keep" / "a.txt").write_bytes(b"kept")
    _zip(tree / "inner.zip", [(f"{LONG}.txt", b"x")])
    db = tmp_path / "out.db"
    line = one_error_line(run_cli("pack", "--expand-zips", tree, db, check=False))
    assert f"{LONG}.txt" in line and "255 bytes" in line, line


@pytest.mark.parametrize("kind", ["folder", "tar", "zip"])
def test_folders_nested_too_deep(tmp_path: Path, kind: str) -> None:
    if kind == "folder":
        src = tmp_path / "tree"
        (src / "keep").mkdir(parents=True)
        (src / "keep" / "a.txt").write_bytes(b"kept")
        for k in range(1, format.DEPTH_MAX + 2):
            os.mkdir(src / "/".join(["d"] * k))
        (src / DEEP / "f.txt").write_bytes(b"deep")
        member = DEEP
    else:
        src = (_tar if kind == "tar" else _zip)(
            tmp_path / f"deep.{kind}", [("keep/a.txt", b"kept"), (f"{DEEP}/f.txt", b"x")]
        )
        member = f"{DEEP}/f.txt"
    try:
        _refused_then_skipped(tmp_path, src, member, f"{format.DEPTH_MAX} levels", ls=False)
    finally:
        if kind == "folder":  # bottom up: too deep for a recursive removal
            os.unlink(src / DEEP / "f.txt")
            for k in range(format.DEPTH_MAX + 1, 0, -1):
                os.rmdir(src / "/".join(["d"] * k))
    # One level less is served, to the bottom.
    ok = (_zip if kind == "zip" else _tar)(
        tmp_path / f"ok.{'zip' if kind == 'zip' else 'tar'}", [("keep/a.txt", b"kept"), (f"{DEEP[2:]}/f.txt", b"x")]
    )
    run_cli("pack", ok, tmp_path / "ok.db")
    with lmdbfs.open(str(tmp_path / "ok.db")) as fs:
        assert fs.read_bytes(f"{DEEP[2:]}/f.txt") == b"x"
        assert sum(1 for _ in fs.walk()) == format.DEPTH_MAX + 2


@pytest.mark.parametrize("target", ["", "t" * (format.TARGET_MAX + 1)], ids=["empty", "over-4095"])
@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_symlink_targets_no_reader_serves(tmp_path: Path, kind: str, target: str) -> None:
    src = (_tar if kind == "tar" else _zip)(tmp_path / f"link.{kind}", [("keep/a.txt", b"kept"), ("keep/bad", target)])
    _refused_then_skipped(tmp_path, src, "keep/bad", "symlink target")


def test_folder_over_the_entries_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ROWS_MAX (2^24 - 1) entries cannot be made here; the same check with a small limit."""
    tree = tmp_path / "tree"
    (tree / "many").mkdir(parents=True)
    for i in range(5):
        (tree / "many" / f"{i}.txt").write_bytes(b"x")
    monkeypatch.setattr(scan, "ROWS_MAX", 4)
    with pytest.raises(SourceError, match=r"many: 5 entries, over the 4"):
        pack(str(tree), str(tmp_path / "out.db"), PackOptions(progress=False))
    monkeypatch.setattr(scan, "ROWS_MAX", 5)
    pack(str(tree), str(tmp_path / "out.db"), PackOptions(progress=False))


def test_records_stay_within_record_max(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder whose index record alone would pass RECORD_MAX is refused; one whose
    inline bytes would is packed with fewer files inline, and reads whole."""
    tree = tmp_path / "tree"
    tree.mkdir()
    files = {f"{i:04d}.bin": os.urandom(1500) for i in range(40)}
    for name, data in files.items():
        (tree / name).write_bytes(data)
    monkeypatch.setattr(scan, "RECORD_MAX", 1000)
    with pytest.raises(SourceError, match="index record would be"):
        pack(str(tree), str(tmp_path / "out.db"), PackOptions(progress=False))
    monkeypatch.setattr(scan, "RECORD_MAX", 40_000)
    monkeypatch.setattr(writer, "RECORD_MAX", 40_000)
    for layout in ("keyed", "compact"):  # compact: the files past the room are stored by key
        db = tmp_path / f"{layout}.db"
        pack(str(tree), str(db), PackOptions(progress=False, layout=layout))
        with lmdbfs.open(str(db)) as fs:
            assert fs.dir_record("").nbytes <= 40_000
            inline = [e for e in fs.scandir("") if e.inline is not None]
            assert 0 < len(inline) < len(files)
            assert {name: fs.read_bytes(name) for name in files} == files
        run_cli("verify", db)


def _tar_of_zeros(path: Path, name: str, size: int) -> Path:
    """A valid tar holding one member of ``size`` zero bytes, written as a hole."""
    info = tarfile.TarInfo(name)
    info.size = size
    header = info.tobuf(tarfile.GNU_FORMAT)
    with open(path, "wb") as fh:
        fh.write(header)
        fh.truncate(len(header) + -(-size // 512) * 512 + 1024)
    return path


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_files_over_the_largest_file(tmp_path: Path, kind: str) -> None:
    """A file over FILE_MAX bytes (8,190 pieces of 1 GiB: a piece table's most) is refused
    (sparse sources: no disk used; a file over one LMDB value is split, tests/test_huge.py)."""
    size = format.FILE_MAX + 1
    if kind == "folder":
        src = tmp_path / "tree"
        (src / "keep").mkdir(parents=True)
        (src / "keep" / "a.txt").write_bytes(b"kept")
        with open(src / "huge.bin", "wb") as fh:
            fh.truncate(size)
        line = one_error_line(run_cli("pack", src, tmp_path / "out.db", check=False))
        assert "huge.bin" in line and str(format.FILE_MAX) in line, line
        out = run_cli("pack", "--skip-errors", src, tmp_path / "out.db")
        assert "1 skipped" in out.stdout and "huge.bin" in out.stdout
        with lmdbfs.open(str(tmp_path / "out.db")) as fs:
            assert fs.listdir("") == ["keep"]
    else:
        src = _tar_of_zeros(tmp_path / "huge.tar", "huge.bin", size)
        line = one_error_line(run_cli("pack", src, tmp_path / "out.db", check=False))
        assert "huge.bin" in line and str(format.FILE_MAX) in line, line
