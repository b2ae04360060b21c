"""Directory records built from hypothesis-drawn listings, for the codec's property
tests and the comparison of the Python and C record parsers."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from lmdbfs.format.records import (
    INLINE_MAX,
    KIND_DIR,
    KIND_FILE,
    KIND_SYMLINK,
    NAME_MAX,
    encode_dir,
    new_rows,
    pack_inline,
    pack_names,
)

from .hostile import encode_dir_v3

# LMDBFS_FUZZ_EXAMPLES raises the count for a deeper run than CI's.
FAST = settings(
    max_examples=int(os.environ.get("LMDBFS_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


names = st.binary(min_size=1, max_size=NAME_MAX).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)
targets = st.binary(min_size=1, max_size=300).filter(lambda b: b"\0" not in b)
entries = st.tuples(
    st.sampled_from([KIND_FILE, KIND_DIR, KIND_SYMLINK]),
    st.integers(0, 0o7777),
    st.integers(-(2**63), 2**63 - 1),
    targets,
    st.one_of(st.none(), st.binary(max_size=INLINE_MAX)),
    st.integers(0, 10_000),
)


def _rows_of(listing: dict[bytes, tuple]) -> tuple[list[bytes], np.ndarray, list[bytes], list[bytes | None]]:
    ordered = sorted(listing)
    rows = new_rows(len(ordered))
    tlist, ilist = [], []
    for i, name in enumerate(ordered):
        kind, mode, mtime, target, inline, size = listing[name]
        rows[i]["kind"], rows[i]["mode"], rows[i]["mtime_ns"] = kind, mode, mtime
        target = target if kind == KIND_SYMLINK else b""
        is_inline = kind == KIND_FILE and inline is not None
        if kind == KIND_SYMLINK:
            rows[i]["size"] = len(target)
        elif kind == KIND_FILE:
            rows[i]["size"] = len(inline) if is_inline else size
            rows[i]["data_off"] = size  # a stored file's offset; pack_inline sets an inline one's
        tlist.append(target)
        ilist.append(inline if is_inline else None)
    return ordered, rows, tlist, ilist


def record_of(listing: dict[bytes, tuple], own: str = "some/dir") -> tuple[bytes, dict[bytes, tuple]]:
    """A version-4 record of ``listing`` (name -> an `entries` tuple)."""
    ordered, rows, tlist, ilist = _rows_of(listing)
    blob = pack_names(rows, ordered, tlist)
    tail = pack_inline(rows, ilist)
    return encode_dir(own, rows, blob, tail), listing


def record_v3(listing: dict[bytes, tuple], own: bytes = b"some/dir") -> bytes:
    """The same directory as a version 2-3 ("LDR1") record."""
    ordered, rows, tlist, ilist = _rows_of(listing)
    return encode_dir_v3(own, rows, ordered, tlist, ilist)
