"""The mount daemon's serving loop: describe each DB as a layer, then let C serve.

A remote DB's layer (s3://, http(s)://) is served from its block cache: this module
starts its fetcher (lmdbfs.remote.fetcher) beside the C server and stops it after.

Python checks the DB with the reader (meta record, index, truncation) and turns it into
a layer description; `lmdbfs._serve` (libfuse3 low-level API, multithreaded, in C)
answers every request without taking the GIL. A layer is one DB shown under a folder
(`prefix`, "" = the root) of the mounted tree; directories present in several layers
merge, and for any other name the first layer holding it wins (docs/serving.md).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import BadDatabase, MountError
from ..format.records import KEYS_PATH, encode_path

log = logging.getLogger(__name__)

# Measured on 2 cores (docs/serving.md): 8, 16 or 32 threads, clone_fd, and
# max_background 12 or 64 differed by less than the machine's noise; 64 lets the
# readahead of 16 readers be in flight at once (the kernel's default, 12, does not).
THREADS = 16  # libfuse worker threads
MAX_BACKGROUND = 64  # kernel readahead requests in flight
CLONE_FD = False  # one /dev/fuse descriptor per worker thread
CACHE_BYTES = 32 << 20  # decoded directory records kept, by size
# Files up to this size go into the kernel's page cache at the isatty() ioctl Python's
# open() sends, which saves the READ round trip (docs/serving.md; measured on tiny files).
PUSH_BYTES = 64 << 10


@dataclass
class Served:
    """What the C server needs: the layers, statfs totals, and any warnings about the
    set (a missing shard) to pass on once the mount is up."""

    layers: list[dict]
    blocks: int
    files: int
    warnings: list[str]
    fetchers: list = field(default_factory=list)  # one per remote layer (lmdbfs.remote.fetcher)


def c_layer(layer: dict) -> dict:
    """A layer of `union.layer_descriptions` in the C server's terms (bytes, ints)."""
    out = {
        "prefix": encode_path(layer["prefix"].strip("/")),
        "index_path": layer["index_path"],
        "index_subdir": int(layer["index_subdir"]),
        "data_path": layer["data_path"],
        "offsets_ok": int(layer["offsets_ok"]),
        "keys_path": int(layer["keys"] == KEYS_PATH),
        "key_prefix": encode_path(layer["key_prefix"]),
        "key_sep": encode_path(layer["key_sep"]),
        "root_mode": layer["root_mode"],
        "root_mtime_ns": layer["root_mtime_ns"],
        # A DB adopted without --checksum has no checksums to check first reads against.
        "checksummed": int(layer["checksummed"]),
    }
    if layer.get("remote") is not None:  # a remote DB: reads go through its block cache
        out["remote"] = layer["remote"]
    if layer.get("values_path"):  # an adopted DB: key lookups go to the foreign DB
        out["values_path"] = layer["values_path"]
        out["values_subdir"] = int(layer["values_subdir"])
    return out


def describe(dbs: list[str]) -> Served:
    """Open the DBs as one tree with the reader (which refuses a bad DB, a clash between
    DBs or a shard given twice, with its typed errors) and describe its layers. The
    Python environments are closed again: C opens its own."""
    from ..read.union import layer_descriptions, open_tree

    fetchers = []
    with open_tree(*dbs) as tree:
        warnings = [line for _kind, line in getattr(tree, "shard_problems", list)()]
        described = layer_descriptions(tree)
        for layer in described:
            if layer.get("remote") is not None:
                fetchers.append(_fetcher(layer["remote"]))
                layer["remote"] = fetchers[-1].describe()
        layers = [c_layer(layer) for layer in described]
        meta = tree.meta
        files = meta.files + meta.dirs + meta.symlinks
    blocks = sum((os.path.getsize(layer["data_path"]) + 4095) // 4096 for layer in layers)
    return Served(layers, blocks, files, warnings, fetchers)


def _fetcher(src):
    """The fetcher that fills the blocks C claims in a remote layer (started by `run`)."""
    from ..remote.fetcher import Fetcher

    return Fetcher(src)


def fuse_args(fsname: str, options: list[str], debug: bool) -> list[str]:
    """libfuse's command line: read-only, kernel-checked permissions, the user's -o.
    ``fsname`` comes escaped for an option list (mount.fuse_option_value)."""
    args = ["-o", f"ro,default_permissions,fsname={fsname},subtype=lmdbfs"]
    for group in options:
        args += ["-o", group]
    return args + (["-d"] if debug else [])


def run(
    mnt: str,
    served: Served,
    args: list[str],
    on_ready: Callable[[], None],
    threads: bool = True,
    io_uring: bool = True,
) -> int:
    """Mount and serve until unmounted or signalled; ``on_ready`` runs (in a thread) once
    the kernel has the mount. Returns libfuse's status (the signal that ended it, or 0).
    With ``io_uring`` (and threads), requests come through FUSE over io_uring where the
    kernel offers it (Linux 6.14+ with the fuse module's enable_uring on), through
    /dev/fuse otherwise."""
    from .. import _serve

    read_end, write_end = os.pipe()

    def wait_init() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            if pipe.read(1):
                on_ready()

    waiter = threading.Thread(target=wait_init, name="lmdbfs-ready", daemon=True)
    waiter.start()
    for fetcher in served.fetchers:
        fetcher.start()
    try:
        return _serve.serve(
            mnt,
            served.layers,
            args,
            notify_fd=write_end,  # C writes a byte at INIT, then closes it
            threads=THREADS if threads else 0,
            clone_fd=CLONE_FD,
            max_background=MAX_BACKGROUND,
            cache_bytes=CACHE_BYTES,
            statfs_blocks=served.blocks,
            statfs_files=served.files,
            uring=io_uring,
            push_bytes=PUSH_BYTES,
        )
    except _serve.LayerError as exc:
        raise BadDatabase(str(exc), "re-pack the DB") from None
    except _serve.FuseError as exc:
        if str(exc) == "options":
            given = " ".join(a for a in args if a not in ("-o", "-d"))
            raise MountError(f"libfuse refused the FUSE options ({given})", "drop the unknown -o option") from None
        raise MountError(f"libfuse could not mount {mnt}", "see --log-file for libfuse's reason") from None
    finally:
        waiter.join(timeout=5)
        for fetcher in served.fetchers:
            fetcher.stop()
