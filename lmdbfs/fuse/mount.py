"""`lmdbfs mount` / `lmdbfs umount`: checks, the background daemon, clean unmounting.

`mount` checks the DB and the mount point in the calling process (so mistakes are
one clear line and nothing gets mounted), then starts the daemon as a fresh process
(`python -m lmdbfs mount -f …`). The daemon opens LMDB itself — never across a fork —
and reports through a pipe once the kernel has the mount; only then does `mount`
return.
"""

from __future__ import annotations

import errno
import grp
import importlib.util
import logging
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from ..errors import LmdbfsError, MountError
from ..remote.url import is_url, redact

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0
FUSE_DEVICE = "/dev/fuse"
FUSE_CONF = "/etc/fuse.conf"
FUSERMOUNT_DIR = "/usr/bin"  # where libfuse3 looks for fusermount3 before PATH
# Where FUSE cannot be used, the same DB is still readable in Python.
WITHOUT_FUSE = "without FUSE, read the DB with lmdbfs.open(DB) in Python or lmdbfs ls/cat/unpack"
SERVER_PACKAGES = (
    "apt: libfuse3-dev liblmdb-dev libxxhash-dev nettle-dev liburing-dev pkg-config; "
    "dnf: fuse3-devel lmdb-devel xxhash-devel nettle-devel liburing-devel pkgconf; "
    "conda: libfuse3 lmdb xxhash nettle liburing pkg-config"
)
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")  # mountinfo writes ' ' as \040


@dataclass
class MountOptions:
    foreground: bool = False
    fuse_options: list[str] = field(default_factory=list)
    log_file: str | None = None
    debug: bool = False
    threads: bool = True  # the C server answers on several libfuse threads
    io_uring: bool = True  # FUSE over io_uring where the kernel offers it
    ready_fd: int | None = None
    cache_dir: str | None = None  # remote DBs: the block cache's folder (default under XDG_CACHE_HOME)
    cache_size: str | None = None  # remote DBs: its bound on disk, as given (20G, 500M)
    fetch_all: str = "auto"  # remote DBs: stream the whole object into the cache (auto, on, off)


def _option_names(options: list[str]) -> set[str]:
    """The option names in -o a,b=c groups (repeatable)."""
    return {item.partition("=")[0].strip() for group in options for item in group.split(",") if item.strip()}


def check_mountpoint(mnt: str) -> None:
    """Refuse a missing, non-directory, non-empty, mounted or dead mount point."""
    try:
        info = os.stat(mnt)
    except FileNotFoundError:
        raise MountError(f"{mnt}: no such directory", f"create it first: mkdir -p {mnt}") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountError(f"{mnt}: a previous mount's daemon died", f"run `lmdbfs umount {mnt}` first") from None
        raise MountError(f"{mnt}: {exc.strerror}", "pick another mount point") from None
    if not os.path.isdir(mnt) or not (info.st_mode & 0o040000):
        raise MountError(f"{mnt}: not a directory", "mount on an empty directory")
    if os.path.ismount(mnt):
        if _is_dead(mnt):
            raise MountError(f"{mnt}: a previous mount's daemon died", f"run `lmdbfs umount {mnt}` first")
        raise MountError(f"{mnt}: already a mount point", f"run `lmdbfs umount {mnt}` first, or pick another directory")
    if os.listdir(mnt):
        raise MountError(f"{mnt}: directory is not empty", "mount on an empty directory so nothing is hidden")


def _is_dead(mnt: str) -> bool:
    """A FUSE mount whose daemon is gone: the kernel answers ENOTCONN."""
    try:
        os.listdir(mnt)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def _check_server_built() -> None:
    """A source install without libfuse3 and friends has no C server: say so before anything."""
    if importlib.util.find_spec("lmdbfs._serve") is None:
        raise MountError(
            "the FUSE server was not built: its libraries were missing (or too old) when lmdbfs was installed",
            f"install them, then reinstall lmdbfs ({SERVER_PACKAGES}), or install lmdbfs's binary wheel "
            f"(docs/install.md); {WITHOUT_FUSE}",
        )


def _fusermount3() -> str | None:
    """The fusermount3 libfuse3 will run for a non-root mount: its compiled-in one, else PATH's."""
    tool = os.path.join(FUSERMOUNT_DIR, "fusermount3")
    return tool if os.access(tool, os.X_OK) else shutil.which("fusermount3")


def _privileged(tool: str) -> bool:
    """Whether fusermount3 can mount for a user: setuid root, or given file capabilities."""
    info = os.stat(tool)
    if info.st_uid == 0 and info.st_mode & stat.S_ISUID:
        return True
    try:
        return bool(os.getxattr(tool, "security.capability"))
    except OSError:
        return False


def _check_fuse_available(opts: MountOptions, mnt: str) -> None:
    """What libfuse would only report as a bare status code, said before starting."""
    if not os.path.exists(FUSE_DEVICE):
        raise MountError(
            f"{FUSE_DEVICE} is missing: FUSE is not available here",
            f"load the fuse module (modprobe fuse); {WITHOUT_FUSE}",
        )
    if os.geteuid() == 0:
        return
    tool = _fusermount3()
    if tool is None:
        raise MountError(
            "fusermount3 not found: a non-root user mounts FUSE through it",
            f"ask the administrator to install FUSE 3 (apt-get install fuse3, dnf install fuse3); {WITHOUT_FUSE}",
        )
    if not _privileged(tool):
        raise MountError(
            f"{tool} is not setuid root, so non-root users may not mount FUSE here",
            f"as root: chown root {tool}; chmod u+s {tool}; {WITHOUT_FUSE}",
        )
    if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        info = os.stat(FUSE_DEVICE)
        group = _group_name(info.st_gid)
        raise MountError(
            f"{FUSE_DEVICE} is not readable and writable by user {_user_name()} "
            f"(mode {stat.S_IMODE(info.st_mode):04o}, group {group})",
            f"as root, add the user to the device's group (chgrp fuse {FUSE_DEVICE}; chmod 0660 {FUSE_DEVICE}; "
            f"usermod -aG fuse {_user_name()}; log in again) or open the device up (chmod 0666 {FUSE_DEVICE}); "
            f"{WITHOUT_FUSE}",
        )
    if not os.access(mnt, os.W_OK):  # fusermount3 mounts only where the user may write
        raise MountError(
            f"{mnt}: user {_user_name()} may not write to it, and a non-root user's FUSE mount needs that",
            "mount on a directory of your own (mkdir -p ~/mnt)",
        )
    wanted = {key for key in _option_names(opts.fuse_options) if key in ("allow_other", "allow_root")}
    if wanted and not _fuse_conf_allows_other():
        raise MountError(
            f"-o {sorted(wanted)[0]} is refused for non-root users: {FUSE_CONF} lacks the line user_allow_other",
            f"as root, add a line `user_allow_other` to {FUSE_CONF}, or mount without -o {sorted(wanted)[0]}",
        )


def _fuse_conf_allows_other(path: str = "") -> bool:
    """Whether /etc/fuse.conf has `user_allow_other` on a line of its own (as fusermount3 reads it)."""
    try:
        with open(path or FUSE_CONF) as conf:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in conf)
    except OSError:
        return False


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def mount(dbs: str | list[str], mnt: str, opts: MountOptions) -> None:
    """Check, then serve (foreground) or start the daemon and wait until it serves.

    ``dbs``: one DB, or several (``DB`` at the root, ``FOLDER=DB`` under a folder)
    served as one tree. The DBs are opened only by the process that serves them; their
    errors (a clash between two DBs included) come back through the readiness pipe, so
    the caller stays light (no numpy, no LMDB) and the mount is ready sooner.
    """
    dbs = [dbs] if isinstance(dbs, str) else list(dbs)
    _check_server_built()
    check_mountpoint(mnt)
    _check_fuse_available(opts, mnt)
    if opts.foreground:
        serve(dbs, mnt, opts)
    else:
        _spawn_daemon(dbs, mnt, opts)


def _absolute(spec: str) -> str:
    """A DB argument with its path made absolute (the daemon runs in /); URLs as given."""
    if is_url(spec) or is_url(spec.partition("=")[2]):
        return spec
    if os.path.exists(spec) or "=" not in spec:
        return os.path.abspath(spec)
    prefix, _, path = spec.partition("=")
    return f"{prefix}={os.path.abspath(path)}"


def _spawn_daemon(dbs: list[str], mnt: str, opts: MountOptions) -> None:
    if opts.debug and not opts.log_file:
        log.warning("--debug without --log-file: the background daemon's request log is discarded")
    read_end, write_end = os.pipe()
    cmd = [sys.executable, "-m", "lmdbfs", "mount", "-f", "--ready-fd", str(write_end)]
    for group in opts.fuse_options:
        cmd += ["-o", group]
    if opts.log_file:
        cmd += ["--log-file", os.path.abspath(opts.log_file)]
    if opts.debug:
        cmd.append("--debug")
    cmd.append("--threads" if opts.threads else "--no-threads")
    cmd.append("--io-uring" if opts.io_uring else "--no-io-uring")
    if opts.cache_dir:
        cmd += ["--cache-dir", os.path.abspath(opts.cache_dir)]
    if opts.cache_size:
        cmd += ["--cache-size", opts.cache_size]
    if opts.fetch_all != "auto":
        cmd.append("--fetch-all" if opts.fetch_all == "on" else "--no-fetch-all")
    cmd += [*map(_absolute, dbs), os.path.abspath(mnt)]
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            pass_fds=(write_end,),
            start_new_session=True,
            cwd="/",
        )
        os.close(write_end)
        answer = _wait_ready(read_end, proc)
        if answer.startswith("ok"):
            # "ok" may carry a warning (a shard missing from a set): worth a line even when silent.
            if answer[2:].strip():
                print(f"lmdbfs: warning: {answer[2:].strip()}", file=sys.stderr)
            answer = _answers(mnt)
        if answer == "ok":
            log.info("mounted %s at %s (daemon pid %d)", " ".join(map(redact, dbs)), mnt, proc.pid)
            return
        if os.path.ismount(mnt):
            _fusermount(mnt, lazy=True)
        _reap(proc)
        errors.seek(0)
        lines = [line for line in errors.read().decode(errors="replace").splitlines() if line.strip()]
    code, sep, text = answer.partition(" ")
    if answer.startswith("error") and sep:
        # The daemon's own error (a bad DB, say), with its exit code: pass it on as is.
        exit_code, _, message = text.partition(" ")
        reason = [line for line in lines if line.startswith("fusermount3:")]
        if reason:  # a non-root mount refused by fusermount3: its words say more than "could not mount"
            raise MountError(f"mounting {mnt} failed: {reason[-1]}", WITHOUT_FUSE)
        raise _DaemonError(message, exit_code=int(exit_code))
    detail = answer or (lines[-1] if lines else f"daemon exited with status {proc.returncode}")
    raise MountError(f"mounting {mnt} failed: {detail.removeprefix('lmdbfs: error: ')}", "see --log-file for details")


def _reap(proc: subprocess.Popen) -> None:
    """A daemon that failed is gone before `mount` returns: nothing holds the mount point."""
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _answers(mnt: str) -> str:
    """'ok' when the kernel has the mount and the daemon answers a request on it."""
    try:
        if os.stat(mnt).st_dev == os.stat(os.path.dirname(os.path.abspath(mnt))).st_dev:
            return "the daemon reported ready but nothing is mounted"
    except OSError as exc:
        return f"the mount does not answer ({exc.strerror})"
    return "ok"


class _DaemonError(LmdbfsError):
    """An error the daemon reported before serving; its line already names the fix."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _wait_ready(fd: int, proc: subprocess.Popen) -> str:
    """The daemon's first line on the pipe: 'ok', or its error; '' if it died silently."""
    deadline = time.monotonic() + READY_TIMEOUT
    chunks = b""
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        os.set_blocking(fd, False)
        while time.monotonic() < deadline:
            try:
                data = pipe.read(4096)
            except BlockingIOError:
                data = None
            if data:
                chunks += data
                if b"\n" in chunks:
                    return chunks.split(b"\n", 1)[0].decode(errors="replace")
            elif data == b"" or proc.poll() is not None:
                proc.wait()
                return chunks.decode(errors="replace").strip()
            time.sleep(0.005)
    proc.kill()
    return f"the daemon did not become ready within {READY_TIMEOUT:.0f} s"


def serve(dbs: list[str], mnt: str, opts: MountOptions) -> None:
    """Run the filesystem in this process until it is unmounted (or SIGTERM/SIGINT)."""
    _setup_daemon_logging(opts)
    ready_fd = opts.ready_fd
    _configure_cache(opts)

    def report(text: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            try:
                os.write(ready_fd, (text + "\n").encode())
                os.close(ready_fd)
            except OSError:
                pass
            ready_fd = None

    try:
        from .. import _serve  # noqa: F401 - loads libfuse3 and the other libraries now
        from . import serve as server
    except ImportError as exc:  # the C server is missing, or a library it links
        error = MountError(
            f"cannot load the FUSE server ({exc})",
            "install the libraries it was built against (apt: fuse3 libfuse3-3 liblmdb0 libxxhash0 libnettle8 "
            f"liburing2), or install the binary wheel, which carries them; {WITHOUT_FUSE}",
        )
        report(f"error {error.exit_code} {error.one_line()}")
        raise error from None

    ready = False

    def on_ready(warnings: list[str]) -> None:
        nonlocal ready
        ready = True
        detached = opts.ready_fd is not None
        log.info("serving %s at %s", " ".join(map(redact, dbs)), mnt)
        report(" ".join(["ok", *warnings[:1]]))
        for line in warnings:
            log.warning("%s", line)
        if detached and not opts.log_file:
            # Nobody reads a background daemon's stderr once it is up: without
            # --log-file its messages go nowhere rather than into an unseen file.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)

    try:
        # The DB list goes down once: serve opens and checks the DBs (their errors come
        # back typed, as one line for the parent), mounts and serves; the one way back
        # up is on_ready, because only this process holds the parent's pipe.
        status = server.serve_dbs(
            dbs, mnt, opts.fuse_options, opts.debug, on_ready, threads=opts.threads, io_uring=opts.io_uring
        )
    except LmdbfsError as exc:
        report(f"error {exc.exit_code} {exc.one_line()}")
        raise
    finally:
        report("the daemon stopped before the mount was ready")
    if not ready:
        raise MountError(f"libfuse refused to mount {mnt} (status {status})", "see the messages above, or --log-file")
    log.info("unmounted %s", mnt)


def _configure_cache(opts: MountOptions) -> None:
    """Where a remote DB's block cache lives and how large it may grow, for this process."""
    if opts.cache_dir or opts.cache_size or opts.fetch_all != "auto":
        from ..remote.source import configure_text

        configure_text(opts.cache_dir, opts.cache_size, opts.fetch_all)


def _setup_daemon_logging(opts: MountOptions) -> None:
    root = logging.getLogger()
    if opts.log_file:
        handler = logging.FileHandler(opts.log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.handlers[:] = [handler]
        os.dup2(handler.stream.fileno(), 2)  # libfuse's own messages land there too
    root.setLevel(logging.DEBUG if opts.debug else logging.INFO)


def _fusermount(mnt: str, lazy: bool = False) -> subprocess.CompletedProcess:
    tool = _fusermount3() or shutil.which("fusermount")
    if tool is None:
        cmd = ["umount"] + (["-l"] if lazy else []) + [mnt]
    else:
        cmd = [tool, "-u"] + (["-z"] if lazy else []) + [mnt]
    return subprocess.run(cmd, capture_output=True, text=True)


def _daemon_pids(mnt: str) -> list[int]:
    """Daemons serving ``mnt`` (ours run as `python -m lmdbfs mount -f … MNT`)."""
    target = os.path.abspath(mnt).encode()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
        except OSError:
            continue
        if b"lmdbfs" in args and b"mount" in args and args[-2:-1] == [target]:
            pids.append(int(name))
    return pids


def _in_mount_table(mnt: str) -> bool:
    """Whether the kernel lists ``mnt`` as a mount point. Unlike stat, this works
    however broken the filesystem behind it is."""
    target = os.path.realpath(mnt)
    try:
        with open("/proc/self/mountinfo") as table:
            for line in table:
                fields = line.split()
                if len(fields) > 4 and _OCTAL_ESCAPE.sub(lambda m: chr(int(m[1], 8)), fields[4]) == target:
                    return True
    except OSError:
        return os.path.ismount(mnt)
    return False


def umount(mnt: str) -> None:
    """Unmount cleanly; also recover a mount point whose daemon died (ENOTCONN) or
    that answers with errors."""
    if not _in_mount_table(mnt):
        if not os.path.lexists(mnt):
            raise MountError(f"{mnt}: no such directory", "check the mount point")
        raise MountError(f"{mnt}: not mounted", "nothing to do")
    try:
        os.stat(mnt)
        dead = _is_dead(mnt)
    except OSError:
        dead = True  # ENOTCONN, or a daemon answering EIO: detach it lazily
    pids = _daemon_pids(mnt)
    result = _fusermount(mnt, lazy=dead)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        reason = message[-1] if message else f"exit status {result.returncode}"
        if "busy" in reason.lower():
            raise MountError(f"{mnt} is busy", f"close the programs using it (fuser -vm {mnt}), then retry")
        raise MountError(f"cannot unmount {mnt}: {reason}", "retry as root, or `umount -l`")
    _wait_gone(pids, 10.0)


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)
