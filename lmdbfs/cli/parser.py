"""The `lmdbfs` command line: every command's arguments and options, as argparse reads
them. Parsing only: main.py runs the command that `args.command` names."""

from __future__ import annotations

import argparse

from .. import __version__

_DB_LIST_HELP = "DBs (NAME=DB puts one under folder NAME; several merge into one tree), then paths inside"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmdbfs", description="Pack a file tree into one LMDB file; read or mount it read-only."
    )
    parser.add_argument("--version", action="version", version=f"lmdbfs {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (library logging at INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_)

    p = add("pack", "store every file of SRC (exact bytes) and a path index in the DB file")
    p.add_argument(
        "sources",
        nargs="+",
        metavar="SRC",
        help="a folder, or a zip or tar archive (.tar, .tar.gz, .tar.bz2, .tar.xz); several merge into one "
        "tree; DIR=SRC places one under the folder DIR",
    )
    p.add_argument("db", metavar="DB")
    p.add_argument(
        "--strip",
        default="0",
        metavar="N|auto",
        help="drop N leading folders from archive members; 'auto' drops a single top folder that wraps everything",
    )
    p.add_argument(
        "--expand-zips",
        action="store_true",
        help="pack zips found inside a source as folders of the same name without '.zip'",
    )
    p.add_argument("-j", "--workers", type=_positive, default=8, help="threads reading files in parallel (default 8)")
    p.add_argument(
        "--exclude",
        action="append",
        metavar="GLOB",
        help="leave out names (or relative paths, if GLOB has '/') matching GLOB; repeatable",
    )
    p.add_argument("--force", action="store_true", help="replace an existing DB (kept until the new one is complete)")
    p.add_argument(
        "--resume", action="store_true", help="finish an interrupted pack (DB.partial) instead of starting over"
    )
    p.add_argument(
        "--skip-errors", action="store_true", help="leave out unreadable files and list them, instead of stopping"
    )
    p.add_argument(
        "--key-prefix",
        default="",
        metavar="P",
        help="prepend P to each path before hashing (reproduces other key naming)",
    )
    p.add_argument(
        "--key-sep", default="/", metavar="S", help="path separator used in keys (e.g. '\\' for keys made on Windows)"
    )
    p.add_argument(
        "--keys",
        choices=["md5", "path"],
        default="md5",
        help="main-database keys: md5 of the path (default, single-file DB), or the plain path "
        "in an LMDB directory, as STARK-style loaders read it",
    )
    p.add_argument(
        "--layout",
        choices=["keyed", "compact"],
        default="keyed",
        help="keyed (default): every file also under its key, for your own LMDB code; compact: files "
        "of at most 2 KiB stored once, in their directory's index record (a smaller DB that only "
        "lmdbfs reads)",
    )
    p.add_argument(
        "--shard",
        metavar="I/N",
        help="pack only shard I of N (0 <= I < N): whole sequences, balanced by bytes, the same share on every machine",
    )
    p.add_argument(
        "--shard-depth",
        type=_positive,
        metavar="D",
        help="split SRC at depth D (default: the first level with more than N entries)",
    )
    p.add_argument(
        "--heads",
        action="store_true",
        help="also write DB.heads, the index pages a remote mount fetches (upload it beside the DB)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--progress", action="store_true", help="progress bar even when stderr is not a terminal")

    p = add(
        "heads",
        "write DB.heads: the index pages a mount of the DB from a URL fetches, in one object to upload beside it",
    )
    p.add_argument("db", metavar="DB", help="a DB on local disk, as it is (or will be) uploaded")
    p.add_argument("--out", metavar="FILE", help="where to write it (default: the DB file's path + .heads)")

    p = add(
        "adopt",
        "serve an LMDB built by another tool: write its index beside it (DB.lmdbfs), never changing the DB",
    )
    p.add_argument("db", metavar="DB", help="the existing LMDB (directory or file); opened read-only")
    p.add_argument("index", nargs="?", metavar="INDEX", help="where to write the index (default: DB.lmdbfs)")
    p.add_argument(
        "--paths",
        metavar="LISTING|SRC",
        help="md5-keyed DB: a file listing its paths (one a line), or the tree they came from",
    )
    p.add_argument(
        "--key-prefix", default="", metavar="P", help="with --paths: text the converter put before each path"
    )
    p.add_argument("--key-sep", default="/", metavar="S", help="with --paths: path separator in the hashed text")
    p.add_argument("--checksum", action="store_true", help="read every value and record its xxh3 (default: none)")
    p.add_argument("--force", action="store_true", help="replace a file at INDEX that adopt did not write")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--progress", action="store_true", help="progress bar even when stderr is not a terminal")

    p = add("info", "show format, counts, sizes and key scheme of a DB")
    p.add_argument("db", metavar="DB")
    p.add_argument("--json", action="store_true")

    p = add("ls", "list a directory of the DB (or of several DBs as one tree)")
    p.add_argument("words", nargs="+", metavar="DB... [PATH]", help=_DB_LIST_HELP)
    p.add_argument("-l", "--long", action="store_true", help="mode, size, mtime, link target")
    p.add_argument("-R", "--recursive", action="store_true")

    p = add("cat", "write files' bytes to stdout")
    p.add_argument("words", nargs="+", metavar="DB... PATH...", help=_DB_LIST_HELP)

    p = add(
        "verify",
        "checksum every stored file; with --against, compare with the folders or archives it was packed from; "
        "several DBs are checked as one tree (shard sets: a missing or duplicated shard is named)",
    )
    p.add_argument("dbs", nargs="*", metavar="DB", help="a DB, or several (NAME=DB under folder NAME)")
    p.add_argument(
        "--against",
        nargs="+",
        metavar="SRC",
        help="the folders or archives it was packed from (same DIR=SRC syntax; --strip and --expand-zips as packed)",
    )

    p = add("unpack", "restore the tree (names, bytes, symlinks, modes, mtimes) under DST")
    p.add_argument("dbs", nargs="+", metavar="DB", help="a DB, or several as one tree (NAME=DB under folder NAME)")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--force", action="store_true", help="unpack into a non-empty directory (never overwrites)")
    p.add_argument(
        "--keep-special-bits",
        action="store_true",
        help="restore setuid, setgid and sticky bits too (dropped by default: the DB may not be trusted)",
    )

    p = add("mount", "serve the DB (or several DBs as one tree) read-only over FUSE at MOUNTPOINT")
    p.add_argument("dbs", nargs="+", metavar="DB", help="a DB at the root, or NAME=DB under folder NAME; repeatable")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-f", "--foreground", action="store_true", help="stay attached (Ctrl-C unmounts)")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="say what was mounted (silent otherwise)",
    )
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        metavar="OPTS",
        help="FUSE options, e.g. -o allow_other (needs user_allow_other in /etc/fuse.conf for non-root)",
    )
    p.add_argument("--log-file", metavar="FILE", help="daemon log (default: syslog-free, errors only to FILE if given)")
    p.add_argument("-d", "--debug", action="store_true", help="log every request")
    p.add_argument(
        "--threads",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve on several libfuse threads (default; --no-threads answers one request at a time)",
    )
    p.add_argument(
        "--io-uring",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="take requests through FUSE over io_uring where the kernel offers it (default; Linux 6.14+, "
        "as root: echo Y > /sys/module/fuse/parameters/enable_uring)",
    )
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)

    for name in ("info", "ls", "cat", "verify", "unpack", "mount"):  # remote DBs (s3://, http(s)://)
        sub.choices[name].add_argument(
            "--cache-dir", metavar="DIR", help="remote DBs: block cache folder (default $XDG_CACHE_HOME/lmdbfs)"
        )
        sub.choices[name].add_argument(
            "--cache-size", metavar="SIZE", help="remote DBs: bound of the cache on disk, e.g. 20G"
        )
    sub.choices["mount"].add_argument(
        "--fetch-all",
        dest="fetch_all",
        action="store_const",
        const="on",
        default="auto",
        help="remote DBs: stream the whole DB into the cache at mount (default: what the mount reads of it, "
        "once the reads show an epoch under way and the cache can hold it)",
    )
    sub.choices["mount"].add_argument(
        "--no-fetch-all",
        dest="fetch_all",
        action="store_const",
        const="off",
        help="remote DBs: never stream the whole DB, fetch only what is read",
    )

    p = add("umount", "unmount (also cleans up after a daemon that died)")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value
