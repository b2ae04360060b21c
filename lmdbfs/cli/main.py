"""The `lmdbfs` command: what each command does, and `main`, which parses the words
(parser.py), runs the command and turns every error into one line on stderr and an
exit code (see lmdbfs/errors.py) — never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat as st
import sys
import time
from collections.abc import Sequence

from ..errors import EXIT_CORRUPT, EXIT_FAILURE, EXIT_INTERRUPTED, CorruptValue, LmdbfsError, UsageError, exit_code_of
from ..remote.url import is_url, redact
from .parser import build_parser

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
    if args.heads:
        _write_heads(result.db)
    for what, items in (
        ("skipped (special files, or past a limit)", result.skipped),
        ("unreadable, left out", result.errors),
    ):
        if items:
            print(f"{len(items)} {what}: " + ", ".join(items[:5]) + (" …" if len(items) > 5 else ""))
    return 0


def cmd_heads(args: argparse.Namespace) -> int:
    _write_heads(args.db, args.out)
    return 0


def _write_heads(db: str, out: str | None = None) -> None:
    """`lmdbfs heads`: the DB's heads sidecar, for a DB a remote mount can serve."""
    from ..read.reader import Archive
    from ..remote.heads import write

    if is_url(db):
        raise UsageError(f"{redact(db)}: heads are written from the DB on local disk", "run it where the DB was packed")
    with Archive(db) as archive:
        where = archive.locations()
        if where.adopted or not where.offsets_ok:
            raise UsageError(
                f"{db}: a remote mount serves only a DB as packed (its value offsets hold), not this one",
                "pack the tree with `lmdbfs pack`",
            )
        data_file = where.index.data_file
    start = time.monotonic()
    w = write(data_file, out)
    print(
        f"wrote {w.path}: {w.pages} index pages in {w.runs} runs, {w.size / 1e6:.1f} MB in "
        f"{time.monotonic() - start:.1f} s; upload it beside the DB, as its URL + .heads"
    )


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


# What each command runs; the parser (parser.py) declares the same names.
_COMMANDS = {
    "pack": cmd_pack,
    "adopt": cmd_adopt,
    "heads": cmd_heads,
    "info": cmd_info,
    "ls": cmd_ls,
    "cat": cmd_cat,
    "verify": cmd_verify,
    "unpack": cmd_unpack,
    "mount": cmd_mount,
    "umount": cmd_umount,
}


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    if argv is None and "lmdbfs.remote.client" in sys.modules:
        from ..remote import client

        if client.used():  # the process ends here, past obstore's runtime (client.exit_process)
            client.exit_process(code)
    return code


def _main(argv: Sequence[str] | None) -> int:
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
        return _COMMANDS[args.command](args)
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
