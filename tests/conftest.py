"""Shared fixtures: real trees on disk, packed DBs, and real FUSE mounts.

FUSE fixtures never skip: where a mount is impossible the tests fail, so a machine
that cannot mount is noticed instead of passing quietly.

Markers (pyproject.toml): a test that mounts is marked ``mount`` (module-wide with
``pytestmark = pytest.mark.mount``, or per test; using ``mount_db`` marks it), and every
``mount`` test is ``slow`` too, as is every hypothesis test, so ``pytest -m "not slow"``
is the quick loop. A test
that mounts without the marker fails, so the selection stays honest.

Where the kernel has FUSE over io_uring, the run turns it on (root), so every
real-mount test runs on the rings, the daemon's default transport there; the tests
that matter for both transports also run with --no-io-uring.

The README's test command runs the suite in several processes (pytest-xdist,
``--dist loadfile``: a file's tests run in one process, in order, so a module's
fixtures are built once). What is the machine's, not a test's, is set up once by the
controlling process (enable_uring) or changed under a lock the processes take in turn
(``machine_lock``: /dev/fuse's mode, users added and removed).
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import nginx_server, s3_server  # noqa: F401 - fixtures for every test module

ROOT = Path(__file__).resolve().parent.parent
BIG_FILE_BYTES = 70 * 1000 * 1000
URING_PARAM = Path("/sys/module/fuse/parameters/enable_uring")
# Mount arguments for each transport: the rings (where the kernel offers them), /dev/fuse.
TRANSPORTS = {"io_uring": (), "dev_fuse": ("--no-io-uring",)}
FIXED_MTIME_NS = 1_600_000_000_123_456_789


# The longest files, started first: pytest -n hands each file to one process, so a
# long file begun last would hold up the end of the run.
LONGEST_FIRST = ("test_huge.py", "test_install.py", "test_bench_smoke.py", "test_hostile_cli.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file stays
    for item in items:
        if "mount_db" in getattr(item, "fixturenames", ()) and item.get_closest_marker("mount") is None:
            item.add_marker(pytest.mark.mount)
        if item.get_closest_marker("mount") is not None or getattr(item.obj, "is_hypothesis_test", False):
            item.add_marker(pytest.mark.slow)  # mounts, and property tests drawing 150 examples each


_RUNNING: list[pytest.Item] = []  # the test being run


@pytest.fixture(autouse=True)
def _running_test(request: pytest.FixtureRequest) -> Iterator[None]:
    _RUNNING.append(request.node)
    yield
    _RUNNING.pop()


def require_mount_marker() -> None:
    """Fail a test that mounts without the `mount` marker (it would run under -m 'not slow')."""
    if _RUNNING and _RUNNING[-1].get_closest_marker("mount") is None:
        pytest.fail(f"{_RUNNING[-1].nodeid} mounts: mark it with @pytest.mark.mount (see tests/conftest.py)")


def run_cli(*args: str | os.PathLike, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `lmdbfs` command (as users do), capturing its output."""
    if args and args[0] == "mount":
        require_mount_marker()
    cmd = [sys.executable, "-m", "lmdbfs", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, errors="surrogateescape")
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """A failed command must say one line, `lmdbfs: error: …`, and no traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lmdbfs: error: "), lines[0]
    return lines[0]


def load_script(name: str):
    """Import a file from scripts/ (they are standalone, not part of the package)."""
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _write(path: Path, data: bytes, mode: int = 0o644, mtime_ns: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def build_edge_tree(root: Path) -> dict[str, object]:
    """Every awkward thing a real tree can hold. Returns what should be absent after packing."""
    root.mkdir(parents=True)
    _write(root / "plain.txt", b"hello\n")
    _write(root / "données" / "日本語 ファイル.txt", "unicode ✓\n".encode())
    _write(root / "with space" / "a file with spaces.txt", b"spaces\n")
    _write(root / ("n" * 250), b"long name\n")
    deep = root.joinpath(*[f"d{i:02d}" for i in range(40)])
    _write(deep / "bottom.bin", os.urandom(1000))
    _write(root / "empty.bin", b"")
    (root / "empty_dir").mkdir()
    (root / "empty_dir" / "nested_empty").mkdir()
    _write(root / "exec.sh", b"#!/bin/sh\necho hi\n", mode=0o755)
    _write(root / "private.key", b"secret\n", mode=0o600)
    _write(root / "readonly.txt", b"ro\n", mode=0o444, mtime_ns=FIXED_MTIME_NS)
    _write(root / "big" / "seventy_mb.bin", os.urandom(BIG_FILE_BYTES))
    _write(root / "small" / "many_000.txt", b"0")
    for i in range(1, 300):
        _write(root / "small" / f"many_{i:03d}.txt", f"{i}\n".encode() * (i % 7))
    # Names that are not valid UTF-8 must round-trip byte for byte.
    raw_dir = os.fsencode(root / "raw")
    os.mkdir(raw_dir)
    with open(os.path.join(raw_dir, b"latin1-\xe9t\xe9.txt"), "wb") as fh:
        fh.write(b"latin-1 name\n")
    os.symlink("plain.txt", root / "link_relative")
    os.symlink("/etc/hostname", root / "link_absolute")
    os.symlink("does/not/exist", root / "link_dangling")
    os.symlink("données", root / "link_to_dir")
    os.symlink("../plain.txt", root / "small" / "link_up")
    # Excluded and special files: none of them may appear in the DB.
    _write(root / "backup.bak", b"excluded\n")
    _write(root / "small" / "old.bak", b"excluded\n")
    os.mkfifo(root / "a_fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "a_socket"))
    sock.close()
    os.utime(root / "données", ns=(FIXED_MTIME_NS, FIXED_MTIME_NS))
    return {"absent": ["backup.bak", "small/old.bak", "a_fifo", "a_socket"]}


@pytest.fixture(scope="session")
def edge_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("edge") / "src"
    build_edge_tree(root)
    return root


@pytest.fixture(scope="session")
def edge_db(edge_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("edgedb") / "edge.lmdb"
    run_cli("pack", edge_tree, db, "--exclude", "*.bak", "--no-progress")
    return db


@pytest.fixture(scope="session")
def got10k_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small GOT-10k-shaped tree: train, val and test splits with real JPEGs."""
    root = tmp_path_factory.mktemp("got10k") / "GOT-10k"
    make = load_script("make_fake_got10k")
    make.make_tree(str(root), seqs=3, frames=6, splits=("train", "val", "test"), seed=7)
    return root


@pytest.fixture(scope="session")
def got10k_db(got10k_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("gotdb") / "got10k.lmdb"
    run_cli("pack", got10k_tree, db, "--no-progress")
    return db


_URING = pytest.StashKey[tuple[bool, "str | None"]]()  # (on for the run, the value to put back)


def _uring_on() -> tuple[bool, str | None]:
    """Turn the fuse module's enable_uring on where the kernel has it (it is off by
    default, and only root may turn it on): (on now, the value to put back)."""
    if not URING_PARAM.exists():
        return False, None
    before = URING_PARAM.read_text().strip()
    try:
        URING_PARAM.write_text("Y")
    except OSError:
        return before == "Y", None
    return True, before


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # a worker of pytest -n: the controller has set it
        return
    config.stash[_URING] = _uring_on()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # pytest-xdist's hook: tell each worker the state
    node.workerinput["lmdbfs_uring"] = node.config.stash[_URING][0]


def pytest_unconfigure(config: pytest.Config) -> None:
    on_before = config.stash.get(_URING, None)
    if on_before is not None and on_before[1] is not None:
        URING_PARAM.write_text(on_before[1])


@pytest.fixture(scope="session")
def fuse_io_uring(pytestconfig: pytest.Config) -> bool:
    """Whether the run turned FUSE over io_uring on (pytest_configure, above)."""
    workerinput = getattr(pytestconfig, "workerinput", None)
    if workerinput is not None:
        return workerinput["lmdbfs_uring"]
    return pytestconfig.stash[_URING][0]


@pytest.fixture
def machine_lock() -> Iterator[None]:
    """Held by a test that changes what every process of the run shares (/dev/fuse's
    mode, /etc/passwd): tests running in parallel take turns."""
    with open(Path(tempfile.gettempdir()) / "lmdbfs-tests-machine.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ring_completions(pid: int) -> int | None:
    """Requests the daemon ``pid`` has taken from io_uring rings (the CqHead of each of
    its rings, added up), or None when it has no ring."""
    total = None
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[io_uring]":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        heads = [int(line.split()[1]) for line in info.splitlines() if line.startswith("CqHead:")]
        total = (total or 0) + sum(heads)
    return total


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4] == str(path) for line in fh)


def kill_pack_at(proc: subprocess.Popen, partial: Path, at_bytes: int, what: str) -> None:
    """kill -9 a running pack once its ``partial`` file holds ``at_bytes`` (or it has
    run 60 s); fail if the pack finished first (``what`` should then be bigger)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.exists() and partial.stat().st_size >= at_bytes:
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if Path(str(partial).removesuffix(".partial")).exists():
        pytest.fail(f"the pack finished before it could be killed; make the {what} bigger")


def daemon_pids(mnt: Path, *words: bytes) -> list[int]:
    """Processes whose command line names lmdbfs, ``mnt`` and each of ``words``."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                args = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"lmdbfs" in args and str(mnt).encode() in args and all(w in args for w in words):
                pids.append(int(name))
    return pids


class Mount:
    """A real `lmdbfs mount` (of one DB, or of a list of DBs as one tree); unmounted (and
    checked gone) at exit."""

    def __init__(self, db: Path | list, mnt: Path, *extra: str) -> None:
        self.db, self.mnt = db, mnt
        mnt.mkdir(parents=True, exist_ok=True)
        dbs = db if isinstance(db, list) else [db]
        proc = run_cli("mount", *dbs, mnt, *extra, check=False, timeout=60)
        if proc.returncode != 0:
            pytest.fail(f"lmdbfs mount failed (CI must be able to mount /dev/fuse): {proc.stderr.strip()}")
        assert is_mounted(mnt), "mount returned but the kernel has no such mount"

    def daemon_pid(self) -> int:
        pids = daemon_pids(self.mnt, b"-f")
        if not pids:
            raise AssertionError("no daemon process found for the mount")
        return pids[0]

    def close(self) -> None:
        if is_mounted(self.mnt):
            run_cli("umount", self.mnt, check=False)
            deadline = time.monotonic() + 10
            while is_mounted(self.mnt) and time.monotonic() < deadline:
                time.sleep(0.05)
        assert not is_mounted(self.mnt), f"{self.mnt} still mounted"


@pytest.fixture
def mount_db(tmp_path: Path) -> Iterator:
    mounts: list[Mount] = []

    def _mount(db: Path, *extra: str, name: str = "mnt") -> Mount:
        m = Mount(db, tmp_path / name, *extra)
        mounts.append(m)
        return m

    yield _mount
    for m in reversed(mounts):
        m.close()
