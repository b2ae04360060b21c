"""The `lmdbfs` command. Parses arguments, calls the library, and turns every error
into one line on stderr and an exit code (see errors.py) — never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat as st
import sys
import time
from collections.abc import Callable, Sequence

from .. import __version__
from ..errors import EXIT_CORRUPT, EXIT_FAILURE, EXIT_INTERRUPTED, CorruptValue, LmdbfsError, UsageError, exit_code_of
from ..remote.url import is_url, redact

log = logging.getLogger("lmdbfs")


def _archive(args: argparse.Namespace):
    from ..read.reader import Archive

    return Archive(args.db)


def _tree(dbs: list[str]):
    """One DB, or several served as one tree (DB at the root, NAME=DB under a folder)."""
    from ..read.union import open_tree

    return open_tree(*dbs)


_LMDB_MAGIC = 0xBEEFC0DE


def _is_db_arg(arg: str) -> bool:
    """Whether a command-line word names a DB (rather than a path inside one): NAME=DB
    with an existing DB, an LMDB file, or an LMDB directory."""
    if not os.path.exists(arg) and "=" in arg and not is_url(arg):
        arg = arg.partition("=")[2]
    if is_url(arg):
        return True
    if os.path.isdir(arg):
        return os.path.isfile(os.path.join(arg, "data.mdb"))
    try:
        with open(arg, "rb") as fh:
            head = fh.read(20)
    except OSError:
        return False
    return len(head) == 20 and int.from_bytes(head[16:20], "little") == _LMDB_MAGIC


def _split_dbs(words: list[str]) -> tuple[list[str], list[str]]:
    """`DB... PATH...`: the first word is a DB, so is every following word that names
    one; the rest are paths inside the tree."""
    n = 1
    while n < len(words) and _is_db_arg(words[n]):
        n += 1
    return words[:n], words[n:]


def cmd_pack(args: argparse.Namespace) -> int:
    from ..pack.packer import PackOptions, pack

    shard = None
    if args.shard:
        from ..pack.shard import parse_shard

        shard = (*parse_shard(args.shard), args.shard_depth)
    elif args.shard_depth is not None:
        raise UsageError("--shard-depth only goes with --shard I/N", "add --shard I/N")

    opts = PackOptions(
        workers=args.workers,
        excludes=args.exclude or [],
        force=args.force,
        resume=args.resume,
        skip_errors=args.skip_errors,
        key_prefix=args.key_prefix,
        key_sep=args.key_sep,
        keys=args.keys,
        layout=args.layout,
        strip=args.strip,
        expand_zips=args.expand_zips,
        progress=not args.no_progress and sys.stderr.isatty() or args.progress,
        shard=shard,
    )
    result = pack(args.sources, args.db, opts)
    share = result.share
    rate = result.bytes / result.seconds / 1e6 if result.seconds else 0.0
    print(
        f"packed {result.files} files, {result.dirs} dirs, {result.symlinks} symlinks, "
        f"{result.bytes / 1e6:.1f} MB into {result.db} ({result.db_bytes / 1e6:.1f} MB) "
        f"in {result.seconds:.1f} s ({rate:.0f} MB/s)"
        + (f"; {result.resumed_files} files kept from the interrupted run" if result.resumed_files else "")
        + (f"; shard {share.index}/{share.count}: {share.units_text()}" if share else "")
    )
    for what, items in (
        ("skipped (special files, or past a limit)", result.skipped),
        ("unreadable, left out", result.errors),
    ):
        if items:
            print(f"{len(items)} {what}: " + ", ".join(items[:5]) + (" …" if len(items) > 5 else ""))
    return 0


def cmd_adopt(args: argparse.Namespace) -> int:
    from ..adopt.adopt import SHOW, AdoptOptions, adopt

    opts = AdoptOptions(
        index=args.index,
        paths=args.paths,
        key_prefix=args.key_prefix,
        key_sep=args.key_sep,
        checksum=args.checksum,
        force=args.force,
        progress=not args.no_progress and sys.stderr.isatty() or args.progress,
    )
    if not args.paths and (args.key_prefix or args.key_sep != "/"):
        raise UsageError("--key-prefix and --key-sep say how listed paths were hashed", "they go with --paths")
    r = adopt(args.db, opts)
    kind = "md5-keyed" if args.paths else "path-keyed"
    print(
        f"adopted {r.files} files, {r.dirs} dirs, {r.bytes / 1e6:.1f} MB of values from {r.db} ({kind}, "
        f"{r.keys} keys) in {r.seconds:.1f} s; index {r.index} ({r.index_bytes / 1e6:.1f} MB), the DB is unchanged"
    )
    if r.converted:
        print(f"{r.converted} values converted back to files (.txt/.label/.ini; stored inline in the index)")
    for what, items in (
        ("keys left out", r.skipped),
        ("listed paths not in the DB", r.missing),
    ):
        if items:
            print(f"{len(items)} {what}: " + ", ".join(items[:SHOW]) + (" …" if len(items) > SHOW else ""))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ..read.ops import info

    with _archive(args) as archive:
        data = info(archive)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        width = max(map(len, data))
        for key, value in data.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _long_line(entry, name: str) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.mtime_ns / 1e9))
    link = f" -> {entry.target}" if entry.is_symlink else ""
    return f"{st.filemode(entry.st_mode)} {entry.size:>12} {stamp} {name}{link}"


def cmd_ls(args: argparse.Namespace) -> int:
    dbs, paths = _split_dbs(args.words)
    if len(paths) > 1:
        raise UsageError(f"ls takes one PATH, got {len(paths)}: {' '.join(paths)}", "list one directory at a time")
    with _tree(dbs) as archive:
        top = paths[0] if paths else ""
        if args.recursive:
            # Like ls -R: a subdirectory that cannot be listed is reported, the rest listed.
            for dirpath, _dirs, _files in archive.walk(top, onerror=_warn):
                print(f"{dirpath or '.'}:")
                _list_dir(archive, dirpath, args.long)
            return 0
        entry = archive.stat(top)
        if not entry.is_dir:
            print(_long_line(archive.lstat(top), top) if args.long else top)
            return 0
        _list_dir(archive, archive.resolve(top), args.long)
    return 0


def _warn(exc: LmdbfsError) -> None:
    print(f"lmdbfs: warning: {exc.one_line()}", file=sys.stderr)


def _list_dir(archive, rel: str, long: bool) -> None:
    for child in archive.scandir(rel):
        print(_long_line(child, child.name) if long else child.name)
    bad = archive.dir_record(rel).bad
    if bad:
        names = ", ".join(repr(os.fsdecode(name)) for name in list(bad)[:3])
        _warn(LmdbfsError(f"{len(bad)} damaged entries of {rel or '/'} not listed ({names})"))


def cmd_cat(args: argparse.Namespace) -> int:
    dbs, paths = _split_dbs(args.words)
    if not paths:
        raise UsageError("cat needs a PATH inside the DB", "e.g. lmdbfs cat DB train/list.txt")
    with _tree(dbs) as archive:
        for path in paths:
            for piece in archive.read_pieces(path):
                sys.stdout.buffer.write(piece)
    sys.stdout.buffer.flush()
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ..read.union import shard_problems
    from ..read.verify import verify

    # `verify --against SRC DB...`: the DBs after the sources belong to the DB list.
    while args.against and _is_db_arg(args.against[-1]):
        args.dbs.insert(0, args.against.pop())
    if not args.dbs:
        raise UsageError("verify needs a DB", "lmdbfs verify DB... [--against SRC...]")
    problems = [line for _kind, line in shard_problems(args.dbs)]
    if problems:
        for line in problems:
            print(line)
        print(f"verify: {len(problems)} problems with the set of shards", file=sys.stderr)
        return EXIT_CORRUPT
    with _tree(args.dbs) as archive:
        report = verify(archive, args.against, progress=sys.stderr.isatty())
        how = "checksummed" if archive.checksummed else "checked (found by key, same size and offset; no checksums)"
    for problem in report.problems[:50]:
        print(problem)
    if report.problems:
        more = len(report.problems) - 50
        raise CorruptValue(
            f"verify found {len(report.problems)} problem{'s' if len(report.problems) > 1 else ''} in {' '.join(map(redact, args.dbs))}"
            + (f" ({more} not shown)" if more > 0 else ""),
            "restore the DB file or re-pack it",
        )
    where = f" and match {' '.join(args.against)}" if args.against else ""
    print(f"ok: {report.checked} files, {report.bytes / 1e6:.1f} MB {how}{where}")
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    from ..read.ops import unpack

    with _tree(args.dbs) as archive:
        result = unpack(
            archive, args.dst, force=args.force, progress=sys.stderr.isatty(), keep_special_bits=args.keep_special_bits
        )
    print(
        f"unpacked {result.files} files, {result.dirs} dirs, {result.symlinks} symlinks, {result.bytes / 1e6:.1f} MB into {args.dst}"
    )
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    from ..fuse.mount import MountOptions, mount

    opts = MountOptions(
        foreground=args.foreground,
        fuse_options=args.options or [],
        log_file=args.log_file,
        debug=args.debug,
        threads=args.threads,
        io_uring=args.io_uring,
        ready_fd=args.ready_fd,
        cache_dir=args.cache_dir,
        cache_size=args.cache_size,
        fetch_all=args.fetch_all,
    )
    mount(args.dbs, args.mountpoint, opts)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from ..fuse.mount import umount

    umount(args.mountpoint)
    return 0


_COMMANDS = ("pack", "adopt", "info", "ls", "cat", "verify", "unpack", "mount", "umount")
_DB_LIST_HELP = "DBs (NAME=DB puts one under folder NAME; several merge into one tree), then paths inside"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmdbfs", description="Pack a file tree into one LMDB file; read or mount it read-only."
    )
    parser.add_argument("--version", action="version", version=f"lmdbfs {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (library logging at INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    p = add("pack", cmd_pack, "store every file of SRC (exact bytes) and a path index in the DB file")
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--progress", action="store_true", help="progress bar even when stderr is not a terminal")

    p = add(
        "adopt",
        cmd_adopt,
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

    p = add("info", cmd_info, "show format, counts, sizes and key scheme of a DB")
    p.add_argument("db", metavar="DB")
    p.add_argument("--json", action="store_true")

    p = add("ls", cmd_ls, "list a directory of the DB (or of several DBs as one tree)")
    p.add_argument("words", nargs="+", metavar="DB... [PATH]", help=_DB_LIST_HELP)
    p.add_argument("-l", "--long", action="store_true", help="mode, size, mtime, link target")
    p.add_argument("-R", "--recursive", action="store_true")

    p = add("cat", cmd_cat, "write files' bytes to stdout")
    p.add_argument("words", nargs="+", metavar="DB... PATH...", help=_DB_LIST_HELP)

    p = add(
        "verify",
        cmd_verify,
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

    p = add("unpack", cmd_unpack, "restore the tree (names, bytes, symlinks, modes, mtimes) under DST")
    p.add_argument("dbs", nargs="+", metavar="DB", help="a DB, or several as one tree (NAME=DB under folder NAME)")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--force", action="store_true", help="unpack into a non-empty directory (never overwrites)")
    p.add_argument(
        "--keep-special-bits",
        action="store_true",
        help="restore setuid, setgid and sticky bits too (dropped by default: the DB may not be trusted)",
    )

    p = add("mount", cmd_mount, "serve the DB (or several DBs as one tree) read-only over FUSE at MOUNTPOINT")
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
        "--fetch-all", action="store_true", help="stream the whole remote DB into the cache after mount"
    )

    p = add("umount", cmd_umount, "unmount (also cleans up after a daemon that died)")
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    if "-o" in words and not words[0].startswith("-") and words[0] not in _COMMANDS:
        # `lmdbfs SOURCE MOUNTPOINT -o OPTS`: how mount.fuse3 runs us for `mount -t fuse.lmdbfs`.
        from ..fuse.mounthelper import main as mount_helper

        return mount_helper(words)
    args = parser.parse_args(words)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "debug", False) else logging.INFO if args.verbose else logging.WARNING,
        format="lmdbfs: %(levelname)s: %(message)s",
    )
    if args.command != "mount" and not args.verbose:
        logging.getLogger("lmdbfs.read.reader").setLevel(logging.ERROR)  # commands report damaged entries themselves
    try:
        if getattr(args, "cache_dir", None) or getattr(args, "cache_size", None):
            from ..remote.source import configure_text

            configure_text(args.cache_dir, args.cache_size)
        return args.func(args)
    except LmdbfsError as exc:
        print(f"lmdbfs: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lmdbfs: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `lmdbfs cat … | head`: the reader left; that is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"lmdbfs: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return exit_code_of(exc)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, no traceback
        log.debug("internal error", exc_info=True)
        print(f"lmdbfs: internal error: {type(exc).__name__}: {exc} (please report it; -v shows more)", file=sys.stderr)
        return EXIT_FAILURE
