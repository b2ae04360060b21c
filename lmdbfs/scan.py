"""Walking the source tree into compact directory records, before any file is read.

The scan keeps ~60 bytes per file (a numpy row plus the name), never the contents, so
a 1.44M-file tree scans in ~100 MB. Knowing every path up front lets the packer check keys, size the map and show an ETA
before reading a byte; the packer then reads files in this walk order.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat as st
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from .errors import SourceError
from .format import KIND_DIR, KIND_FILE, KIND_SYMLINK, decode_path, new_rows, pack_names

log = logging.getLogger(__name__)


@dataclass
class ScannedDir:
    path: str  # archive-relative, '' for the root
    rows: np.ndarray  # ENTRY_DTYPE, sorted by name bytes
    blob: bytes  # names and symlink targets, see format.pack_names

    def name_and_target(self, r: int) -> tuple[bytes, bytes]:
        row = self.rows[r]
        off, n, t = int(row["name_off"]), int(row["name_len"]), int(row["target_len"])
        return self.blob[off : off + n], self.blob[off + n : off + n + t]

    def without(self, drop: set[int]) -> ScannedDir:
        keep = [r for r in range(len(self.rows)) if r not in drop]
        pairs = [self.name_and_target(r) for r in keep]
        rows = self.rows[keep].copy()
        return ScannedDir(self.path, rows, pack_names(rows, [n for n, _ in pairs], [t for _, t in pairs]))


@dataclass
class Scan:
    """Everything known about the tree before reading: the future index, and the files."""

    root: bytes
    dirs: list[ScannedDir] = field(default_factory=list)
    file_dir: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    file_row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    file_size: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    files: int = 0
    symlinks: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    root_mode: int = 0o755
    root_mtime_ns: int = 0

    def file_relpath(self, i: int) -> str:
        d = self.dirs[int(self.file_dir[i])]
        name = decode_path(d.name_and_target(int(self.file_row[i]))[0])
        return f"{d.path}/{name}" if d.path else name

    def drop_files(self, indices: list[int]) -> None:
        """Leave out files that could not be read (--skip-errors). Call after copying:
        file indices no longer point at the right rows afterwards."""
        by_dir: dict[int, set[int]] = {}
        for i in indices:
            by_dir.setdefault(int(self.file_dir[i]), set()).add(int(self.file_row[i]))
        for d_idx, drop in by_dir.items():
            d = self.dirs[d_idx]
            self.bytes -= int(sum(int(d.rows[r]["size"]) for r in drop))
            self.dirs[d_idx] = d.without(drop)
        self.files -= len(indices)


class _Excluder:
    """--exclude GLOB: a pattern with '/' matches the relative path, otherwise the name."""

    def __init__(self, patterns: list[str], skip_abs: list[bytes]) -> None:
        self.path_pats = [p.strip("/") for p in patterns if "/" in p.strip("/")]
        self.name_pats = [p for p in patterns if "/" not in p.strip("/")]
        self.skip_abs = set(skip_abs)

    def __call__(self, name: str, rel: str, abspath: bytes) -> bool:
        if abspath in self.skip_abs:
            return True
        if any(fnmatch.fnmatchcase(name, p) for p in self.name_pats):
            return True
        return any(fnmatch.fnmatchcase(rel, p) for p in self.path_pats)


def scan_tree(
    src: str,
    excludes: list[str] | None = None,
    skip_abs: list[bytes] | None = None,
    skip_errors: bool = False,
    progress: bool = False,
) -> Scan:
    """lstat every entry below ``src`` (symlinks are recorded, never followed)."""
    root = os.fsencode(os.path.abspath(src))
    try:
        top = os.stat(root)
    except OSError as exc:
        raise SourceError(f"{src}: {exc.strerror}", "pass an existing directory to pack") from None
    if not st.S_ISDIR(top.st_mode):
        raise SourceError(f"{src}: not a directory", "pass the top folder of the tree to pack")
    scan = Scan(root=root, root_mode=st.S_IMODE(top.st_mode), root_mtime_ns=top.st_mtime_ns)
    excluded = _Excluder(excludes or [], skip_abs or [])
    file_dirs: list[np.ndarray] = []
    file_rows: list[np.ndarray] = []
    file_sizes: list[np.ndarray] = []
    # (relpath, index of the parent's ScannedDir, row of this dir in the parent)
    stack: list[tuple[str, int, int]] = [("", -1, -1)]
    bar = tqdm(desc="scan", unit=" entries", disable=not progress, smoothing=0.1)
    while stack:
        rel, parent, parent_row = stack.pop()
        listing = _list_dir(root, rel, scan, skip_errors, excluded)
        if listing is None:
            continue
        names, targets, rows, subdirs = listing
        dir_index = len(scan.dirs)
        scan.dirs.append(ScannedDir(rel, rows, pack_names(rows, names, targets)))
        if parent >= 0:
            # A directory row's checksum field holds its subdirectory count (st_nlink - 2),
            # so stat never has to open the child's own record.
            scan.dirs[parent].rows[parent_row]["checksum"] = len(subdirs)
        file_idx = np.flatnonzero(rows["kind"] == KIND_FILE).astype(np.uint32)
        file_rows.append(file_idx)
        file_sizes.append(rows["size"][file_idx])
        file_dirs.append(np.full(len(file_idx), dir_index, np.uint32))
        scan.files += len(file_idx)
        scan.bytes += int(rows["size"][file_idx].sum())
        scan.symlinks += int(np.count_nonzero(rows["kind"] == KIND_SYMLINK))
        stack.extend((child, dir_index, row) for child, row in reversed(subdirs))
        bar.update(len(rows))
    bar.close()
    if file_rows:
        scan.file_dir = np.concatenate(file_dirs)
        scan.file_row = np.concatenate(file_rows)
        scan.file_size = np.concatenate(file_sizes)
    return scan


def _list_dir(
    root: bytes, rel: str, scan: Scan, skip_errors: bool, excluded: _Excluder
) -> tuple[list[bytes], list[bytes], np.ndarray, list[tuple[str, int]]] | None:
    """One directory's entries, sorted by name bytes, with their lstat fields."""
    abs_dir = os.path.join(root, os.fsencode(rel)) if rel else root
    try:
        with os.scandir(abs_dir) as it:
            found = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        return _source_problem(scan, rel or ".", exc, skip_errors)
    kept: list[tuple[bytes, int, os.stat_result, bytes]] = []
    subdirs: list[tuple[str, int]] = []
    for entry in found:
        name = entry.name
        child = f"{rel}/{decode_path(name)}" if rel else decode_path(name)
        if excluded(decode_path(name), child, entry.path):
            log.debug("excluded %s", child)
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            kind, target = _kind_of(info.st_mode, entry.path)
        except OSError as exc:
            _source_problem(scan, child, exc, skip_errors)
            continue
        if kind == 0:
            log.warning("skipping %s: not a regular file, directory or symlink", child)
            scan.skipped.append(child)
            continue
        if kind == KIND_DIR:
            subdirs.append((child, len(kept)))
        kept.append((name, kind, info, target))
    rows = new_rows(len(kept))
    if kept:
        rows["kind"] = [k for _, k, _, _ in kept]
        rows["mode"] = [st.S_IMODE(i.st_mode) for _, _, i, _ in kept]
        rows["size"] = [i.st_size if k == KIND_FILE else len(t) for _, k, i, t in kept]
        rows["mtime_ns"] = [i.st_mtime_ns for _, _, i, _ in kept]
    return [n for n, _, _, _ in kept], [t for _, _, _, t in kept], rows, subdirs


def _kind_of(mode: int, path: bytes) -> tuple[int, bytes]:
    if st.S_ISREG(mode):
        return KIND_FILE, b""
    if st.S_ISDIR(mode):
        return KIND_DIR, b""
    if st.S_ISLNK(mode):
        return KIND_SYMLINK, os.readlink(path)
    return 0, b""


def _source_problem(scan: Scan, rel: str, exc: OSError, skip_errors: bool) -> None:
    reason = exc.strerror or str(exc)
    if not skip_errors:
        raise SourceError(f"cannot read {rel}: {reason}", "fix its permissions, or pass --skip-errors to leave it out")
    log.warning("skipping %s: %s", rel, reason)
    scan.errors.append(f"{rel}: {reason}")
    return None
