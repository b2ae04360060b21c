"""Typed errors, and the single place that maps them to errno values and exit codes.

Library code raises these; the CLI turns them into one line on stderr plus an exit
code, and the FUSE adapter turns them into an errno. Keeping the mapping here means a
new failure mode is classified once and behaves the same everywhere.
"""

from __future__ import annotations

import errno as _errno

# Exit codes of the `lmdbfs` command. 2 is argparse's own code for bad usage.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_BAD_DB = 4
EXIT_EXISTS = 5
EXIT_CORRUPT = 6
EXIT_SOURCE = 7
EXIT_MOUNT = 8
EXIT_REMOTE = 9
EXIT_INTERRUPTED = 130


class LmdbfsError(Exception):
    """Base of every error lmdbfs reports on purpose.

    ``message`` names the problem, ``hint`` names the fix; both are short enough to
    print on one line together.
    """

    errno: int = _errno.EIO
    exit_code: int = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The text the CLI prints: problem, then fix, never a traceback."""
        text = self.message if not self.hint else f"{self.message} — {self.hint}"
        return " ".join(text.split())


class PathNotFound(LmdbfsError):
    """A path that is not in the archive's index."""

    errno = _errno.ENOENT
    exit_code = EXIT_NOT_FOUND


class NotADirectory(LmdbfsError):
    errno = _errno.ENOTDIR
    exit_code = EXIT_NOT_FOUND


class IsADirectory(LmdbfsError):
    errno = _errno.EISDIR
    exit_code = EXIT_NOT_FOUND


class NotASymlink(LmdbfsError):
    errno = _errno.EINVAL
    exit_code = EXIT_NOT_FOUND


class BadDatabase(LmdbfsError):
    """The DB file is missing, not LMDB, not lmdbfs, truncated or of another version."""

    errno = _errno.EIO
    exit_code = EXIT_BAD_DB


class IncompleteDatabase(BadDatabase):
    """A pack that never reached its final commit (interrupted or still running)."""


class FormatVersionError(BadDatabase):
    """A DB written by a format this version cannot read."""


class CorruptValue(LmdbfsError):
    """Stored bytes whose checksum or size no longer matches the index."""

    errno = _errno.EIO
    exit_code = EXIT_CORRUPT


class DestinationExists(LmdbfsError):
    """Refusing to overwrite: the user must say --force."""

    errno = _errno.EEXIST
    exit_code = EXIT_EXISTS


class SourceError(LmdbfsError):
    """The tree being packed cannot be read as asked."""

    errno = _errno.EIO
    exit_code = EXIT_SOURCE


class UnsafePath(LmdbfsError):
    """An index entry that would escape the destination (crafted or corrupt DB)."""

    errno = _errno.EPERM
    exit_code = EXIT_CORRUPT


class MountError(LmdbfsError):
    """Mounting or unmounting failed; nothing is left mounted."""

    errno = _errno.EIO
    exit_code = EXIT_MOUNT


class ReadOnly(LmdbfsError):
    """Any attempt to change an archive."""

    errno = _errno.EROFS
    exit_code = EXIT_FAILURE


def errno_of(exc: BaseException) -> int:
    """The errno a FUSE callback should report for ``exc``."""
    if isinstance(exc, LmdbfsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return _errno.EIO


def exit_code_of(exc: BaseException) -> int:
    """The process exit code the CLI should use for ``exc``."""
    if isinstance(exc, LmdbfsError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_FAILURE


class LayerConflict(LmdbfsError):
    """Two DBs of one tree both claim a path (a file in one, anything in the other)."""

    errno = _errno.EEXIST
    exit_code = EXIT_BAD_DB


class UsageError(LmdbfsError):
    """Arguments that do not fit together."""

    errno = _errno.EINVAL
    exit_code = EXIT_USAGE


class RemoteError(LmdbfsError):
    """A remote DB (s3://, http(s)://) that cannot be opened or read: unreachable,
    denied, missing, or failing past the retries. Its message names the URL without
    secrets."""

    errno = _errno.EIO
    exit_code = EXIT_REMOTE


class RemoteChanged(RemoteError):
    """The remote object was replaced since it was opened (its ETag changed)."""


class CacheError(LmdbfsError):
    """A remote DB's cache folder cannot hold what it must (unwritable, or --cache-size
    smaller than the pinned index)."""

    errno = _errno.ENOSPC
    exit_code = EXIT_REMOTE
