"""The meta record: the DB-wide JSON under ``lmdbfs.meta`` / ``b"meta"``, written in a
pack's final commit (its presence with ``complete`` marks a finished DB), and its checks
as untrusted input (sizes, JSON, version, every field's type and range)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import BadDatabase, FormatVersionError, IncompleteDatabase
from .jsoncheck import INT64_MAX, field_problem
from .records import (
    CHECKSUM_ALGO,
    FORMAT_NAME,
    FORMAT_VERSION,
    KEYS_MD5,
    KEYS_PATH,
    LAYOUT_COMPACT,
    LAYOUT_KEYED,
    META_MAX_BYTES,
    META_MAX_DEPTH,
    READABLE_VERSIONS,
)


@dataclass
class Meta:
    """The archive-wide record; its presence with ``complete`` marks a finished pack."""

    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    key_scheme: str = "md5(key_prefix + relpath with '/' replaced by key_sep)"
    key_prefix: str = ""
    key_sep: str = "/"
    keys: str = KEYS_MD5  # KEYS_MD5 or KEYS_PATH
    layout: str = LAYOUT_KEYED  # LAYOUT_KEYED or LAYOUT_COMPACT (version 5)
    checksum: str = CHECKSUM_ALGO
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    tool_version: str = ""
    created: str = ""
    # Random at each pack: tells two packs of one tree apart (a remote DB's heads sidecar
    # is checked against it). Older DBs have none ("").
    pack_id: str = ""
    source: str = ""
    root_mode: int = 0o755
    root_mtime_ns: int = 0
    # The rows' data_off fields hold for the file as committed in this transaction; a
    # later write (or a compacting copy) changes last_txnid and readers fall back to
    # looking values up by key.
    offsets_txnid: int = 0
    complete: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # None: values live in this environment. An adopted DB's index lives beside a DB
    # someone else built; then this names that DB ({"path", "subdir", "size",
    # "last_txnid", "kind"}) and data_off is an offset into its data file.
    data: dict[str, Any] | None = None

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes | memoryview, where: str) -> Meta:
        if len(raw) > META_MAX_BYTES:
            raise BadDatabase(f"{where}: meta record is {len(raw)} bytes, not an lmdbfs DB", "re-pack the DB")
        try:
            data = json.loads(bytes(raw))
        except (ValueError, RecursionError):
            raise BadDatabase(f"{where}: meta record is not valid JSON", "re-pack the DB") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise BadDatabase(f"{where}: not an lmdbfs DB", "pack one with `lmdbfs pack SRC DB`")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise FormatVersionError(
                f"{where}: lmdbfs format version {version}, this lmdbfs reads versions {', '.join(map(str, READABLE_VERSIONS))}",
                "use the lmdbfs release that wrote it, or re-pack the source",
            )
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        problem = _meta_problem(known)
        if problem:
            raise BadDatabase(f"{where}: meta record is damaged ({problem})", "re-pack the DB")
        meta = cls(**known)
        if not meta.complete:
            raise IncompleteDatabase(f"{where}: the pack that wrote this DB never finished", "re-run `lmdbfs pack`")
        return meta


# What each meta field may hold (checked by jsoncheck, which knows no lmdbfs fields).
_META_TYPES = {
    f.name: (dict,) if f.name == "extra" else (dict, type(None)) if f.name == "data" else (type(f.default),)
    for f in fields(Meta)
}
_META_RANGES = {"root_mode": (0, 0o7777), "root_mtime_ns": (-INT64_MAX - 1, INT64_MAX)}
_META_CHOICES = {"keys": (KEYS_MD5, KEYS_PATH), "layout": (LAYOUT_KEYED, LAYOUT_COMPACT)}


def _meta_problem(data: dict[str, Any]) -> str | None:
    """What is wrong with the meta record's fields (types, ranges, nesting), or None."""
    problem = field_problem(data, _META_TYPES, _META_RANGES, _META_CHOICES, META_MAX_DEPTH)
    excludes = data.get("extra", {}).get("excludes", []) if problem is None else []
    if not (isinstance(excludes, list) and all(isinstance(p, str) for p in excludes)):
        return "extra.excludes is not a list of patterns"
    return problem
