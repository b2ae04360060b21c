"""`mount -t fuse.lmdbfs SOURCE MOUNTPOINT -o OPTIONS`, and the matching /etc/fstab line.

mount(8) runs ``/sbin/mount.fuse.lmdbfs SOURCE MOUNTPOINT [-sfnv] -o OPTIONS`` (installed
by scripts/setup.sh as a link to the ``mount.lmdbfs`` command); without that link it
runs mount.fuse3, which runs ``lmdbfs SOURCE MOUNTPOINT -o OPTIONS`` — `lmdbfs` hands
that form here too. Both end in `lmdbfs.fuse.mount.mount`.

SOURCE names one DB or several, separated by ':' — each ``DB`` (at the root) or
``NAME=DB`` (under folder NAME), and a DB may be a glob (``/data/got10k.*.lmdb``, its
matches sorted) — so a shard set fits in one fstab field. A DB may also be a URL
(``s3://BUCKET/KEY``, ``https://HOST:PORT/PATH``): its own ':'s do not split it.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import sys
from collections.abc import Sequence

from ..errors import EXIT_MOUNT, LmdbfsError, MountError
from ..remote.url import is_url

log = logging.getLogger("lmdbfs")

# Options meant for mount(8), systemd or fstab bookkeeping, never for the filesystem.
_NOT_FOR_FUSE = {"defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group", "nofail", "_netdev", "rw"}
_NOT_FOR_FUSE_PREFIXES = ("x-", "comment=")


def parse_source(source: str) -> list[str]:
    """``A:B``, ``NAME=A``, globs -> the DB arguments of `lmdbfs mount`."""
    source = source.removeprefix("lmdbfs#")
    dbs: list[str] = []
    for item in filter(None, _split_source(source)):
        if is_url(item) or is_url(item.partition("=")[2]):
            dbs.append(item)
            continue
        plain = os.path.exists(item) or "=" not in item
        prefix, sep, path = ("", "", item) if plain else item.partition("=")
        if glob.has_magic(path):
            matches = sorted(glob.glob(path))
            if not matches:
                raise MountError(f"{path}: no DB matches this pattern", "check the source field of the mount")
            dbs += [f"{prefix}{sep}{m}" for m in matches]
        else:
            dbs.append(item)
    if not dbs:
        raise MountError(
            "no DB in the mount source", "give SOURCE as DB, DB1:DB2, NAME=DB or a glob such as /data/x.*.lmdb"
        )
    return dbs


_URL_START = re.compile(r"([^:=/]+=)?(s3|https?)://", re.IGNORECASE)


def _split_source(source: str) -> list[str]:
    """The items of SOURCE, split at ':' — except inside a URL, whose scheme and
    host:port hold ':' of their own: a URL item ends at the first ':' after its host."""
    items: list[str] = []
    at = 0
    while at <= len(source):
        m = _URL_START.match(source, at)
        if m:
            path_at = source.find("/", m.end())
            end = -1 if path_at < 0 else source.find(":", path_at)
        else:
            end = source.find(":", at)
        end = len(source) if end < 0 else end
        items.append(source[at:end])
        at = end + 1
    return items


def split_options(groups: Sequence[str]) -> tuple[list[str], dict[str, str | bool]]:
    """FUSE options to pass on, and lmdbfs's own (log_file=FILE, debug, no_threads,
    no_io_uring; threads and io_uring are accepted and are the default)."""
    fuse: list[str] = []
    own: dict[str, str | bool] = {}
    for group in groups:
        for opt in filter(None, (part.strip() for part in group.split(","))):
            key, sep, value = opt.partition("=")
            if key in (
                "log_file",
                "debug",
                "threads",
                "no_threads",
                "io_uring",
                "no_io_uring",
                "cache_dir",
                "cache_size",
                "fetch_all",
            ):
                own[key] = value if sep else True
            elif opt not in _NOT_FOR_FUSE and not opt.startswith(_NOT_FOR_FUSE_PREFIXES):
                fuse.append(opt)
    return fuse, own


def _fetch_all(value: str | bool) -> str:
    """fstab's `fetch_all` (= on) or `fetch_all=auto|on|off`."""
    if value is True:
        return "on"
    if value not in ("auto", "on", "off"):
        raise MountError(f"fetch_all={value}: not auto, on or off", "write fetch_all, fetch_all=auto or fetch_all=off")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """mount(8)'s calling convention: SOURCE MOUNTPOINT [-s] [-f] [-n] [-v] [-o OPTS] [-t TYPE]."""
    args = list(sys.argv[1:] if argv is None else argv)
    positional: list[str] = []
    groups: list[str] = []
    fake = verbose = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-o", "-t", "-N") and i + 1 < len(args):
            if arg == "-o":
                groups.append(args[i + 1])
            i += 2
            continue
        if arg.startswith("-o") and len(arg) > 2:
            groups.append(arg[2:])
        elif arg.startswith("-") and len(arg) > 1:
            fake |= "f" in arg
            verbose |= "v" in arg
        else:
            positional.append(arg)
        i += 1
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="lmdbfs: %(message)s")
    try:
        if len(positional) != 2:
            raise MountError(
                "usage: mount.lmdbfs SOURCE MOUNTPOINT [-o OPTIONS]", "SOURCE is DB, DB1:DB2, NAME=DB or a glob"
            )
        from .mount import MountOptions, mount

        dbs = parse_source(positional[0])
        fuse, own = split_options(groups)
        opts = MountOptions(
            fuse_options=[",".join(fuse)] if fuse else [],
            log_file=str(own["log_file"]) if "log_file" in own else None,
            debug=bool(own.get("debug")),
            threads=not own.get("no_threads"),
            io_uring=not own.get("no_io_uring"),
            cache_dir=str(own["cache_dir"]) if "cache_dir" in own else None,
            cache_size=str(own["cache_size"]) if "cache_size" in own else None,
            fetch_all=_fetch_all(own.get("fetch_all", "auto")),
        )
        if fake:
            return 0
        mount(dbs, positional[1], opts)
    except LmdbfsError as exc:
        print(f"lmdbfs: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code or EXIT_MOUNT
    except KeyboardInterrupt:
        return 130
    return 0
