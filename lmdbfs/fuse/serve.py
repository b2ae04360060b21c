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
from typing import TYPE_CHECKING

from ..errors import BadDatabase, MountError
from ..format.records import KEYS_PATH, encode_path
from ..remote.url import is_url, redact

if TYPE_CHECKING:
    from ..read.tree import Tree

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
class ServedLayer:
    """One DB of the mounted tree as the C server reads it: `csrc/module.c` (load_layer)
    reads these fields by these names, nothing renames them on the way, so a new field
    is one line here, the line that fills it in `served_layers`, and its use in C.

    The C server (csrc/tree.c) serves the layers with the rules `union.Union` uses:
    union folder D comes from every layer where D lies under its prefix and is a folder
    there, in layer order; a name in several layers is a folder, its attributes from the
    first (real before made up); a file is read from the layer listing it. Two
    attributes differ from `Union`'s, as docs/serving.md says: a folder on the way to a
    prefix is made up with mode 0555 (`Union`: 0755) and the placing layer's root mtime
    (the prefix folder itself has its layer's root_mode and root_mtime_ns), and a folder
    merged from several layers has st_nlink 1 ("unknown", as union filesystems do) where
    `Union` counts 2 + its distinct subfolders over all layers."""

    prefix: bytes  # the folder the DB appears under, b"" = the root
    index_path: str  # the LMDB holding the index and meta record
    index_subdir: bool  # ... as an LMDB directory (data.mdb inside), not a file
    data_path: str  # the file the values (and rows' data_off offsets) are in
    offsets_ok: bool  # the rows' data_off offsets hold for data_path
    checksummed: bool  # first reads are checked against xxh3 (not a DB adopted without --checksum)
    keys_path: bool  # main-database keys are plain paths (else md5 digests)
    key_prefix: bytes
    key_sep: bytes
    root_mode: int
    root_mtime_ns: int
    values_path: str | None = None  # an adopted DB: key lookups go to this foreign LMDB
    values_subdir: bool = False
    remote: dict | None = None  # a remote DB: its block cache (lmdbfs.remote.fetcher.Fetcher.describe)


def served_layers(tree: Tree) -> tuple[list[ServedLayer], list]:
    """The tree's DBs as the C server's layers, and the fetchers of its remote DBs
    (not started: `run` starts them beside the C server)."""
    layers, fetchers = [], []
    for prefix, archive in tree.layers():
        where, meta = archive.locations(), archive.meta
        layer = ServedLayer(
            prefix=encode_path(prefix.strip("/")),
            index_path=os.path.abspath(where.index.path),
            index_subdir=where.index.subdir,
            data_path=os.path.abspath(where.values.data_file),
            offsets_ok=where.offsets_ok,
            checksummed=archive.checksummed,
            keys_path=meta.keys == KEYS_PATH,
            key_prefix=encode_path(meta.key_prefix),
            key_sep=encode_path(meta.key_sep),
            root_mode=meta.root_mode,
            root_mtime_ns=meta.root_mtime_ns,
        )
        if where.adopted:  # values (and key lookups) in the foreign DB, not the index's
            layer.values_path, layer.values_subdir = os.path.abspath(where.values.path), where.values.subdir
        if where.remote is not None:  # reads go through its block cache (its index pinned there)
            fetchers.append(_fetcher(where.remote))
            layer.remote = fetchers[-1].describe()
        layers.append(layer)
    return layers, fetchers


@dataclass
class Served:
    """What the C server needs: the layers, statfs totals, and any warnings about the
    set (a missing shard) to pass on once the mount is up."""

    layers: list[ServedLayer]
    blocks: int
    files: int
    warnings: list[str]
    fetchers: list = field(default_factory=list)  # one per remote layer (lmdbfs.remote.fetcher)


def describe(dbs: list[str]) -> Served:
    """Open the DBs as one tree with the reader (which refuses a bad DB, a clash between
    DBs or a shard given twice, with its typed errors) and describe its layers.

    Each DB is opened twice, on purpose: Python checks what C does not (the meta
    record's JSON, the format version, truncation, clashes and shard sets) and says what
    is wrong in one typed line; then its environments are closed before C opens its own,
    because LMDB forbids one process to hold an environment open twice at once, and
    py-lmdb's handle cannot be passed to the C server's liblmdb."""
    from ..read.union import open_tree

    with open_tree(*dbs) as tree:
        warnings = [line for _kind, line in getattr(tree, "shard_problems", list)()]
        layers, fetchers = served_layers(tree)
        meta = tree.meta
        files = meta.files + meta.dirs + meta.symlinks
    blocks = sum((os.path.getsize(layer.data_path) + 4095) // 4096 for layer in layers)
    return Served(layers, blocks, files, warnings, fetchers)


def _fetcher(src):
    """The fetcher that fills the blocks C claims in a remote layer (started by `run`)."""
    from ..remote.fetcher import Fetcher

    return Fetcher(src)


def fuse_args(fsname: str, options: list[str], debug: bool) -> list[str]:
    """libfuse's command line: read-only, kernel-checked permissions, the user's -o.
    ``fsname`` comes escaped for an option list (`fuse_option_value`)."""
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

    # C reports INIT on a pipe of its own, not on the parent's ready pipe: "ready" may be
    # said only after the steps that need the mount to exist (its readahead, the set's
    # warnings, letting go of stderr), which live in Python and which C knows nothing of.
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


READAHEAD_KB = 1024  # matches libfuse3's largest READ (max_pages = 256)


def serve_dbs(
    dbs: list[str],
    mnt: str,
    options: list[str],
    debug: bool,
    on_ready: Callable[[list[str]], None],
    threads: bool = True,
    io_uring: bool = True,
) -> int:
    """The daemon's way in, in one place: open and check the DBs (`describe`), mount them
    at ``mnt`` and serve until unmounted; ``on_ready(warnings)`` runs once the kernel has
    the mount (its readahead raised). Returns libfuse's status (see `run`)."""
    from .. import _serve

    _serve.malloc_policy()  # before a remote DB's client starts its threads (module.c)
    served = describe(dbs)

    def ready() -> None:
        _raise_readahead(mnt)
        on_ready(served.warnings)

    return run(mnt, served, fuse_args(fsname(dbs), options, debug), ready, threads=threads, io_uring=io_uring)


def fsname(dbs: list[str]) -> str:
    """The mount's name in /proc/mounts (fsname=), escaped for libfuse's option list."""
    return fuse_option_value("lmdbfs:" + "+".join(map(shown_name, dbs)))


def fuse_option_value(text: str) -> str:
    """``text`` escaped for a libfuse -o option list, where ',' separates options and
    '\\' escapes the next character (lib/fuse_opt.c): a DB named `a,b=c.lmdb` must not
    smuggle in an option. `fsname` builds fsname= with this."""
    return text.replace("\\", "\\\\").replace(",", "\\,")


def shown_name(spec: str) -> str:
    """A DB's name in /proc/mounts: a file's base name, a URL without its secrets."""
    if is_url(spec):
        return redact(spec)
    prefix, sep, rest = spec.partition("=")
    if sep and is_url(rest):
        return f"{prefix}={redact(rest)}"
    return os.path.basename(spec)


def _raise_readahead(mnt: str) -> None:
    """Let the kernel ask for up to 1 MiB per READ instead of 128 KiB.

    FUSE can only lower the kernel's offer at INIT, but root may raise the mount's
    own readahead in sysfs: a 300 KB frame then arrives in one request, not three.
    Files are clamped to their size, so small files cost nothing extra.
    """
    try:
        dev = os.stat(mnt).st_dev
        with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as fh:
            fh.write(str(READAHEAD_KB))
        log.debug("readahead of %s set to %d KiB", mnt, READAHEAD_KB)
    except OSError as exc:
        log.debug("readahead of %s left as it is: %s", mnt, exc)
