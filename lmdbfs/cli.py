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

from . import __version__
from .errors import EXIT_FAILURE, EXIT_INTERRUPTED, LmdbfsError, exit_code_of

log = logging.getLogger("lmdbfs")


def _archive(args: argparse.Namespace):
    from .reader import Archive

    return Archive(args.db)


def cmd_pack(args: argparse.Namespace) -> int:
    from .packer import PackOptions, pack

    opts = PackOptions(
        workers=args.workers,
        excludes=args.exclude or [],
        force=args.force,
        resume=args.resume,
        skip_errors=args.skip_errors,
        key_prefix=args.key_prefix,
        key_sep=args.key_sep,
        progress=not args.no_progress and sys.stderr.isatty() or args.progress,
    )
    result = pack(args.src, args.db, opts)
    rate = result.bytes / result.seconds / 1e6 if result.seconds else 0.0
    print(
        f"packed {result.files} files, {result.dirs} dirs, {result.symlinks} symlinks, "
        f"{result.bytes / 1e6:.1f} MB into {result.db} ({result.db_bytes / 1e6:.1f} MB) "
        f"in {result.seconds:.1f} s ({rate:.0f} MB/s)"
        + (f"; {result.resumed_files} files kept from the interrupted run" if result.resumed_files else "")
    )
    for what, items in (("skipped (special files)", result.skipped), ("unreadable, left out", result.errors)):
        if items:
            print(f"{len(items)} {what}: " + ", ".join(items[:5]) + (" …" if len(items) > 5 else ""))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .ops import info

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
    with _archive(args) as archive:
        top = args.path
        if args.recursive:
            for dirpath, _dirs, _files in archive.walk(top):
                print(f"{dirpath or '.'}:")
                for entry in archive.scandir(dirpath):
                    print(_long_line(entry, entry.name) if args.long else entry.name)
            return 0
        entry = archive.stat(top)
        if not entry.is_dir:
            print(_long_line(archive.lstat(top), top) if args.long else top)
            return 0
        for child in archive.scandir(top):
            print(_long_line(child, child.name) if args.long else child.name)
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    with _archive(args) as archive:
        for path in args.paths:
            sys.stdout.buffer.write(archive.read_bytes(path))
    sys.stdout.buffer.flush()
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .ops import verify

    with _archive(args) as archive:
        report = verify(archive, args.against, progress=sys.stderr.isatty())
    for problem in report.problems[:50]:
        print(problem)
    if report.problems:
        more = len(report.problems) - 50
        print(
            f"verify: {len(report.problems)} problems" + (f" ({more} not shown)" if more > 0 else ""), file=sys.stderr
        )
        return 6
    where = f" and match {args.against}" if args.against else ""
    print(f"ok: {report.checked} files, {report.bytes / 1e6:.1f} MB checksummed{where}")
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    from .ops import unpack

    with _archive(args) as archive:
        result = unpack(archive, args.dst, force=args.force, progress=sys.stderr.isatty())
    print(
        f"unpacked {result.files} files, {result.dirs} dirs, {result.symlinks} symlinks, {result.bytes / 1e6:.1f} MB into {args.dst}"
    )
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    from .mount import MountOptions, mount

    opts = MountOptions(
        foreground=args.foreground,
        fuse_options=args.options or [],
        log_file=args.log_file,
        debug=args.debug,
        threads=args.threads,
        ready_fd=args.ready_fd,
    )
    mount(args.db, args.mountpoint, opts)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from .mount import umount

    umount(args.mountpoint)
    return 0


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
    p.add_argument("src", metavar="SRC")
    p.add_argument("db", metavar="DB")
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--progress", action="store_true", help="progress bar even when stderr is not a terminal")

    p = add("info", cmd_info, "show format, counts, sizes and key scheme of a DB")
    p.add_argument("db", metavar="DB")
    p.add_argument("--json", action="store_true")

    p = add("ls", cmd_ls, "list a directory of the DB")
    p.add_argument("db", metavar="DB")
    p.add_argument("path", nargs="?", default="", metavar="PATH")
    p.add_argument("-l", "--long", action="store_true", help="mode, size, mtime, link target")
    p.add_argument("-R", "--recursive", action="store_true")

    p = add("cat", cmd_cat, "write files' bytes to stdout")
    p.add_argument("db", metavar="DB")
    p.add_argument("paths", nargs="+", metavar="PATH")

    p = add("verify", cmd_verify, "checksum every stored file; with --against, compare with a source tree")
    p.add_argument("db", metavar="DB")
    p.add_argument("--against", metavar="SRC")

    p = add("unpack", cmd_unpack, "restore the tree (names, bytes, symlinks, modes, mtimes) under DST")
    p.add_argument("db", metavar="DB")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--force", action="store_true", help="unpack into a non-empty directory (never overwrites)")

    p = add("mount", cmd_mount, "serve the DB read-only over FUSE at MOUNTPOINT")
    p.add_argument("db", metavar="DB")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-f", "--foreground", action="store_true", help="stay attached (Ctrl-C unmounts)")
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
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)

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
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "debug", False) else logging.INFO if args.verbose else logging.WARNING,
        format="lmdbfs: %(levelname)s: %(message)s",
    )
    try:
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
