"""Compare two real trees entry by entry (names as bytes, never followed symlinks)."""

from __future__ import annotations

import os
import stat


def snapshot(root: str | os.PathLike, mode_mask: int = 0o7777, dir_mtimes: bool = True) -> dict[bytes, tuple]:
    """Every entry below root: kind, permission bits, mtime, size, link target, bytes."""
    root_b = os.fsencode(root)
    out: dict[bytes, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root_b):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root_b)
            info = os.lstat(path)
            kind = stat.S_IFMT(info.st_mode)
            if stat.S_ISREG(info.st_mode):
                with open(path, "rb") as fh:
                    body: object = fh.read()
            elif stat.S_ISLNK(info.st_mode):
                body = os.readlink(path)
            elif stat.S_ISDIR(info.st_mode):
                body = None
            else:
                body = "special"
            mtime = info.st_mtime_ns if (dir_mtimes or not stat.S_ISDIR(info.st_mode)) else None
            mode = stat.S_IMODE(info.st_mode) & mode_mask if not stat.S_ISLNK(info.st_mode) else None
            size = info.st_size if not stat.S_ISDIR(info.st_mode) else None
            out[rel] = (kind, mode, mtime, size, body)
    return out


def differences(expected: dict, actual: dict, ignore: set[bytes] = frozenset()) -> list[str]:
    problems = []
    for rel in sorted(set(expected) | set(actual)):
        if rel in ignore:
            continue
        if rel not in actual:
            problems.append(f"missing: {rel!r}")
        elif rel not in expected:
            problems.append(f"unexpected: {rel!r}")
        elif expected[rel] != actual[rel]:
            e, a = expected[rel], actual[rel]
            fields = [n for n, x, y in zip(("kind", "mode", "mtime", "size", "bytes"), e, a) if x != y]
            problems.append(f"differs in {fields}: {rel!r}")
    return problems
