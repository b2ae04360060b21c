"""LMDBs built by other tools: recognising them, checking their keys, finding their index.

Trackers already keep datasets in LMDBs of two kinds, and `lmdbfs adopt` serves both
without copying their values (see lmdbfs/adopt/adopt.py):

* **path-keyed** (STARK's ``lmdb_utils``, copied into many tracker repos): an LMDB
  directory whose keys are plain relative paths (``b"train/list.txt"``) and whose
  values are the files' bytes;
* **md5-keyed** (the original GOT-10k converter): keys are ``md5(path)`` digests, so
  names can only come from a listing of the paths.

An adopted DB's index lives beside it, in its own file (``DB.lmdbfs``): the user's DB
is never written to. This module holds what the reader and the CLI need to know about
such DBs; it does not import the store, so the store can call it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import lmdb

from ..errors import BadDatabase
from ..format.records import NAME_MAX  # the one limit, also the packer's and the readers'

SIDECAR_SUFFIX = ".lmdbfs"  # DB -> DB.lmdbfs, the index `lmdbfs adopt` writes beside it
CHECKSUM_NONE = "none"  # meta "checksum" of an adopted DB whose values were never hashed
KIND_PATH = "path"  # meta data["kind"]: keys are the plain relative paths
KIND_MD5 = "md5-converter"  # keys are md5 digests of the paths; values were converted
SAMPLE_KEYS = 1000  # keys looked at to tell what an unknown LMDB is


def sidecar_of(db: str) -> str:
    """Where `lmdbfs adopt DB` puts DB's index by default (beside DB, never inside)."""
    return os.fspath(db).rstrip("/") + SIDECAR_SUFFIX


def index_for(path: str) -> str:
    """The file to read an archive's index from: ``path`` itself, unless ``path`` is an
    adopted DB whose index sits beside it."""
    side = sidecar_of(path)
    return side if os.path.isfile(side) and not path.endswith(SIDECAR_SUFFIX) else path


def bad_path_reason(raw: bytes) -> str | None:
    """Why ``raw`` cannot be served as a relative path (None: it can)."""
    # Most keys are clean (millions of them): a few substring tests clear them; a key
    # with a dot-led component or a long name gets the full check below.
    if (
        raw
        and raw[:1] != b"/"
        and raw[-1:] != b"/"
        and b"//" not in raw
        and b"\0" not in raw
        and raw[:1] != b"."
        and b"/." not in raw
        and len(raw) <= NAME_MAX
    ):
        try:
            raw.decode("utf-8")
            return None
        except UnicodeDecodeError:
            return "not UTF-8"
    if not raw:
        return "empty"
    if b"\0" in raw:
        return "contains NUL"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    if raw.startswith(b"/"):
        return "absolute path"
    for part in raw.split(b"/"):
        if not part:
            return "empty path component"
        if part in (b".", b".."):
            return f"'{part.decode()}' component"
        if len(part) > NAME_MAX:
            return f"a name longer than {NAME_MAX} bytes"
    return None


@dataclass(frozen=True)
class ForeignInfo:
    """What an LMDB without an lmdbfs index holds, judged from a sample of its keys."""

    kind: str  # KIND_PATH, KIND_MD5 or "unknown"
    keys: int
    sample: int

    def describe(self) -> str:
        count = f"{self.keys} key{'' if self.keys == 1 else 's'}"
        if self.kind == KIND_PATH:
            return f"an LMDB keyed by plain relative paths (STARK-style), {count}"
        if self.kind == KIND_MD5:
            return f"an md5-keyed converter DB (keys are md5 digests of paths), {count}"
        return f"an LMDB of {count} that are neither relative paths nor md5 digests"

    def how_to_adopt(self, shown: str) -> str:
        if self.kind == KIND_PATH:
            return f"adopt it: `lmdbfs adopt {shown}` (writes an index beside it; the DB is not changed)"
        if self.kind == KIND_MD5:
            return (
                f"adopt it with a listing of its paths: `lmdbfs adopt {shown} --paths LISTING.txt|SRC_TREE "
                "[--key-prefix P]`"
            )
        return "lmdbfs cannot serve it; pack the original files with `lmdbfs pack SRC DB`"


def inspect(env: lmdb.Environment) -> ForeignInfo:
    """Classify an LMDB that has no lmdbfs meta from its first keys (cheap: one cursor)."""
    with env.begin(buffers=True) as txn:
        entries = txn.stat(env.open_db())["entries"]
        keys: list[bytes] = []
        for key in txn.cursor().iternext(keys=True, values=False):
            keys.append(bytes(key))
            if len(keys) >= SAMPLE_KEYS:
                break
    # A few odd keys (reported and left out by adopt) do not change what the DB is.
    paths = sum(bad_path_reason(k) is None for k in keys)
    digests = sum(len(k) == 16 for k in keys)
    if keys and paths >= 0.5 * len(keys):
        kind = KIND_PATH
    elif keys and digests >= 0.5 * len(keys):
        kind = KIND_MD5
    else:
        kind = "unknown"
    return ForeignInfo(kind, entries, len(keys))


class ForeignDatabase(BadDatabase):
    """An LMDB made by another tool, with no lmdbfs index (yet)."""

    def __init__(self, shown: str, info: ForeignInfo) -> None:
        super().__init__(f"{shown}: {info.describe()}, not an lmdbfs DB", info.how_to_adopt(shown))
        self.info = info
        self.shown = shown
