"""Remote DBs read without FUSE: URLs in every command and in `lmdbfs.open`, over a
real nginx and a real S3 server (SeaweedFS), through the block cache; the faults of a
real network injected by the project's fault proxy (scripts/faultproxy.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lmdbfs
from lmdbfs.errors import RemoteChanged
from lmdbfs.remote import cache as rcache
from lmdbfs.remote import source
from lmdbfs.remote.url import parse, redact
from tests.conftest import load_script, one_error_line, run_cli
from tests.servers import nginx
from tests.treecmp import differences, snapshot

pytestmark = pytest.mark.slow  # real nginx and S3 servers


def make_tree(root: Path, dirs: int = 6, files: int = 25, seed: int = 3) -> Path:
    """Sequences of frames: tiny files (inline in their records) and larger ones."""
    import random

    rng = random.Random(seed)
    for d in range(dirs):
        seq = root / f"seq{d:03d}"
        seq.mkdir(parents=True)
        for f in range(files):
            size = rng.choice([0, 7, 900, 2500, 30_000, 140_000])
            (seq / f"{f:05d}.jpg").write_bytes(rng.randbytes(size))
        (seq / "groundtruth.txt").write_text("1,2,3,4\n" * 30)
    os.symlink("seq000", root / "first")
    return root


@pytest.fixture(scope="module")
def remote_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("remote")
    tree = make_tree(base / "src")
    db = base / "tree.lmdb"
    run_cli("pack", tree, db, "--no-progress")
    return tree, db


def cli(*args, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`lmdbfs …` with extra environment (credentials, the endpoint; None unsets)."""
    full = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "lmdbfs", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in full.items() if v is not None},  # None: unset
    )
    if check and proc.returncode:
        raise AssertionError(f"lmdbfs {' '.join(map(str, args))}: {proc.returncode}\n{proc.stderr}")
    return proc


@pytest.fixture
def fresh_sources():
    """Each test opens its URLs anew, with the cache folder it configures."""
    saved = (source.SETTINGS.cache_dir, source.SETTINGS.cache_size)
    yield
    for src in list(source._SOURCES.values()):  # noqa: SLF001
        src.cache.close()
    source._SOURCES.clear()  # noqa: SLF001
    source.SETTINGS.cache_dir, source.SETTINGS.cache_size = saved


def read_all(archive, tree: Path) -> int:
    """Every regular file through the archive, compared with the source; how many."""
    n = 0
    for dirpath, _dirs, files in archive.walk():
        for name in files:
            rel = f"{dirpath}/{name}" if dirpath else name
            if (tree / rel).is_symlink():
                continue
            assert archive.read_bytes(rel) == (tree / rel).read_bytes(), rel
            n += 1
    return n


def test_urls_parse_and_never_show_secrets() -> None:
    url = parse("https://user:pw@example.org:8443/data/x.lmdb?X-Amz-Signature=abc#frag")
    assert url.shown == "https://example.org:8443/data/x.lmdb"
    assert "pw" not in repr(url) and "Signature" not in str(url)
    assert redact("http://u:secret@h/x.lmdb?token=1") == "http://h/x.lmdb"
    assert redact("/plain/path.lmdb") == "/plain/path.lmdb"
    assert parse("s3://bucket/a/b.lmdb").path == "a/b.lmdb"
    for bad in ("s3://bucket", "s3:///key", "http://host/", "ftp://h/x"):
        with pytest.raises(lmdbfs.errors.BadDatabase):
            parse(bad)


def test_http_reader_commands_and_a_shared_cache(remote_tree, tmp_path: Path, fresh_sources) -> None:
    tree, db = remote_tree
    with nginx(tmp_path / "www") as web:
        url = web.put(db, "data/tree.lmdb")
        cache = tmp_path / "cache"
        source.configure(cache_dir=str(cache))
        with lmdbfs.open(url) as archive:
            src = archive.locations().remote
            gets_at_open = web.gets()
            assert gets_at_open == src.gets and src.gets < 20  # the index: a few large ranges
            web.reset()
            # Metadata is local after open: a walk and a stat of everything sends no GET.
            for dirpath, _dirs, files in archive.walk():
                for name in files:
                    archive.lstat(f"{dirpath}/{name}")
            assert web.gets() == 0
            assert read_all(archive, tree) == 6 * 26
            assert web.bytes_sent() <= 1.2 * os.path.getsize(db)
        # The commands, in other processes sharing the cache: nothing fetched again.
        web.reset()
        assert "files" in cli("info", url, "--cache-dir", cache).stdout
        assert "00000.jpg" in cli("ls", url, "seq001", "--cache-dir", cache).stdout.split()
        assert cli("cat", url, "seq002/groundtruth.txt", "--cache-dir", cache).stdout == "1,2,3,4\n" * 30
        assert "ok: 156 files" in cli("verify", url, "--cache-dir", cache).stdout
        cli("unpack", f"x={url}", tmp_path / "out", "--cache-dir", cache)
        assert differences(snapshot(tree), snapshot(tmp_path / "out" / "x")) == []
        assert web.gets() == 0, web.hits()
        # Another cache folder fetches on its own; `ls` needs the index only.
        web.reset()
        cli("ls", "-R", url, "--cache-dir", tmp_path / "cache2")
        data_gets = [h for h in web.hits() if h.method == "GET"]
        assert sum(h.body_bytes for h in data_gets) < os.path.getsize(db) / 2


def test_s3_reader_with_credentials_the_aws_way(remote_tree, tmp_path: Path, s3_server, fresh_sources) -> None:
    tree, db = remote_tree
    url = s3_server.put(db, "sets/tree.lmdb")
    env = s3_server.env()
    out = cli("ls", url, "--cache-dir", tmp_path / "c", env=env)
    assert out.stdout.split() == sorted(["first", *(f"seq{d:03d}" for d in range(6))])
    # Through a profile in ~/.aws instead of variables.
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(
        f"[lab]\naws_access_key_id = {env['AWS_ACCESS_KEY_ID']}\naws_secret_access_key = {env['AWS_SECRET_ACCESS_KEY']}\n"
    )
    (home / ".aws" / "config").write_text(
        f"[profile lab]\nregion = us-east-1\nendpoint_url = {env['AWS_ENDPOINT_URL']}\n"
    )
    unset = dict.fromkeys(env)  # no AWS_* variables: the profile alone
    cli(
        "unpack",
        url,
        tmp_path / "out",
        "--cache-dir",
        tmp_path / "c2",
        env={**unset, "HOME": str(home), "AWS_PROFILE": "lab"},
    )
    assert differences(snapshot(tree), snapshot(tmp_path / "out")) == []
    # Wrong secret, no credentials (anonymous is refused by this server), a missing key.
    for extra, what in (
        ({"AWS_SECRET_ACCESS_KEY": "wrong-secret-value"}, "access denied"),
        ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, "access denied"),
    ):
        nohome = {"HOME": str(tmp_path), "AWS_PROFILE": None}
        proc = cli("ls", url, "--cache-dir", tmp_path / "c3", env={**env, **nohome, **extra}, check=False)
        line = one_error_line(proc)
        assert what in line and url in line and "wrong-secret-value" not in proc.stderr
        assert env["AWS_SECRET_ACCESS_KEY"] not in proc.stderr
        assert proc.returncode == 9
    line = one_error_line(cli("ls", url + ".missing", env=env, check=False))
    assert "no such object" in line or "access denied" in line


def test_unreachable_and_missing_urls_are_one_line(tmp_path: Path) -> None:
    from tests.servers import free_port

    for url, what in (
        (f"http://127.0.0.1:{free_port()}/x.lmdb", "cannot reach"),
        ("http://user:hunter2@127.0.0.1:9/x.lmdb?sig=hunter2", "not supported"),
    ):
        proc = cli("info", url, "--cache-dir", tmp_path, check=False)
        line = one_error_line(proc)
        assert what in line and "hunter2" not in proc.stderr
    with nginx(tmp_path / "www") as web:
        line = one_error_line(cli("info", web.url("nope.lmdb"), "--cache-dir", tmp_path, check=False))
        assert "no such object (404)" in line


def test_bad_cache_files_are_rebuilt_and_damaged_blocks_refetched(remote_tree, tmp_path: Path, fresh_sources) -> None:
    tree, db = remote_tree
    with nginx(tmp_path / "www") as web:
        url = web.put(db, "tree.lmdb")
        cache = tmp_path / "cache"
        source.configure(cache_dir=str(cache))
        with lmdbfs.open(url) as archive:
            read_all(archive, tree)
            src = archive.locations().remote
            folder = Path(src.cache.folder)
            name = next(f"seq003/{n}" for n in archive.listdir("seq003") if archive.lstat(f"seq003/{n}").size > 10_000)
            entry = archive.lstat(name)
            off = archive.value_offset(name, entry)
            # Damage a cached block behind the reader's back: the checksum catches it,
            # the file's blocks are fetched again, and the bytes are right.
            with open(folder / "data", "r+b") as f:
                f.seek(off + 100)
                f.write(b"\xff" * 64)
            web.reset()
            assert archive.read_bytes(name) == (tree / name).read_bytes()
            assert web.gets() >= 1
        fresh = source._SOURCES.copy()  # noqa: SLF001
        for s in fresh.values():
            s.cache.close()
        source._SOURCES.clear()  # noqa: SLF001
        # A state file of another shape and a lying info.json: rebuilt, never believed.
        (folder / "state").write_bytes(b"garbage" * 10)
        info = json.loads((folder / "info.json").read_text())
        (folder / "info.json").write_text(json.dumps({**info, "size": 1}))
        web.reset()
        with lmdbfs.open(url) as archive:
            assert read_all(archive, tree) == 156
        assert web.gets() > 0
        assert json.loads((folder / "info.json").read_text()) == info


def test_a_fill_publishes_exactly_its_blocks_or_none(tmp_path: Path) -> None:
    """_blocks.fill writes a GET's bytes and publishes its claimed words; bytes of another
    length than the blocks, or blocks outside the state file, write and publish nothing."""
    bs = rcache.BLOCK_SIZE
    size = 3 * bs + 1000
    cache = rcache.BlockCache(str(tmp_path / "c"), parse("http://127.0.0.1:9/x.lmdb"), '"e1"', size)
    try:
        claimed = cache.claim(1, 3)  # blocks 1, 2 and the short last one
        assert [i for i, _w in claimed] == [1, 2, 3]
        words = [w for _i, w in claimed]
        data = os.urandom(2 * bs + 1000)
        with pytest.raises(ValueError, match="not 3 blocks"):
            cache.fill(1, words, data[:-1] + data[:bs])
        with pytest.raises(IndexError):
            rcache.bs.fill(cache.map, cache.fd, cache.blocks, bs, words, data, False)
        assert all(cache.state(i) == rcache.bs.FILLING for i in (1, 2, 3))
        assert os.pread(cache.fd, size, 0) == bytes(size)  # nothing written
        cache.fill(1, words, memoryview(data), pin=True)
        assert [cache.state(i) for i in range(4)] == [rcache.bs.ABSENT] + [rcache.bs.PRESENT] * 3
        assert all(cache.word(i) & rcache.bs.PINNED for i in (1, 2, 3))
        assert os.pread(cache.fd, size, 0) == bytes(bs) + data
    finally:
        cache.close()


def test_cache_size_is_never_exceeded(remote_tree, tmp_path: Path, fresh_sources) -> None:
    tree, db = remote_tree
    limit = 3 << 20
    with nginx(tmp_path / "www") as web:
        url = web.put(db, "tree.lmdb")
        cache = tmp_path / "cache"
        source.configure(cache_dir=str(cache), cache_size=limit)
        # An unused object already in the folder is removed first to make room.
        other = cache / ("0" * 32)
        other.mkdir(parents=True)
        (other / "data").write_bytes(os.urandom(1 << 20))
        with lmdbfs.open(url) as archive:
            budget = archive.locations().remote.cache.budget
            for dirpath, _dirs, files in archive.walk():
                for name in files:
                    rel = f"{dirpath}/{name}" if dirpath else name
                    if not (tree / rel).is_symlink():
                        assert archive.read_bytes(rel) == (tree / rel).read_bytes()
                        assert budget.used() <= limit
        assert not other.exists()
        assert os.path.getsize(db) > 1.5 * limit  # so eviction happened
    with pytest.raises(lmdbfs.errors.LmdbfsError, match="cache-size"):
        rcache.parse_size("lots")


def test_faults_are_retried_and_a_replaced_object_never_gives_wrong_bytes(
    remote_tree, tmp_path: Path, fresh_sources, monkeypatch
) -> None:
    tree, db = remote_tree
    faultproxy = load_script("faultproxy")
    with nginx(tmp_path / "www") as web, faultproxy.FaultProxy(("127.0.0.1", web.port)) as proxy:
        web.put(db, "tree.lmdb")
        url = proxy.url() + "/tree.lmdb"
        source.configure(cache_dir=str(tmp_path / "cache"))
        proxy.add_rule(fault="status", status=503, count=2)
        proxy.add_rule(fault="slowdown", count=2)
        proxy.add_rule(fault="reset", count=2, after=0.3)
        proxy.add_rule(fault="truncate", count=2, after=0.5)
        with lmdbfs.open(url) as archive:
            assert read_all(archive, tree) == 156
        assert proxy.totals().faults == 8
        # The object is replaced while open: reads fail (412), never mix in new bytes.
        source._SOURCES.clear()  # noqa: SLF001
        source.configure(cache_dir=str(tmp_path / "cache2"))  # nothing cached yet
        archive = lmdbfs.open(url)
        web.replace_damaged(db, "tree.lmdb", b"\0" * 4096)
        failures = 0
        for dirpath, _dirs, files in archive.walk():
            for name in files:
                rel = f"{dirpath}/{name}" if dirpath else name
                if (tree / rel).is_symlink():
                    continue
                try:
                    assert archive.read_bytes(rel) == (tree / rel).read_bytes()
                except RemoteChanged:
                    failures += 1
        assert failures > 0
        archive.close()


def test_threads_reading_one_remote_db_at_once(remote_tree, tmp_path: Path, fresh_sources) -> None:
    import random
    import threading

    tree, db = remote_tree
    with nginx(tmp_path / "www") as web:
        source.configure(cache_dir=str(tmp_path / "cache"))
        archive = lmdbfs.open(web.put(db, "tree.lmdb"))
        files = [p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file() and not p.is_symlink()]
        wrong: list[str] = []

        def reader(seed: int) -> None:
            order = files[:]
            random.Random(seed).shuffle(order)
            wrong.extend(rel for rel in order if archive.read_bytes(rel) != (tree / rel).read_bytes())

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        archive.close()
        assert wrong == [] and len(files) == 156
        assert web.bytes_sent() <= 1.2 * os.path.getsize(db)  # each block fetched about once


def make_tiny_tree(root: Path, dirs: int = 60, files: int = 40, size: int = 1900) -> Path:
    """Directories of tiny files, every one inline in its directory's record: records
    lie closer than a cache block, their tails as large as the data."""
    import random

    rng = random.Random(5)
    for d in range(dirs):
        seq = root / f"seq{d:04d}"
        seq.mkdir(parents=True)
        for f in range(files):
            (seq / f"{f:08d}.jpg").write_bytes(rng.randbytes(size))
    return root


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("tiny")
    tree = make_tiny_tree(base / "src")
    db = base / "tiny.lmdb"
    run_cli("pack", tree, db, "--no-progress")
    return tree, db


def tree_bytes(tree: Path) -> int:
    return sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())


def test_a_tiny_file_trees_index_is_its_heads_not_its_tails(tiny_tree, tmp_path: Path, fresh_sources) -> None:
    tree, db = tiny_tree
    with nginx(tmp_path / "www") as web:
        url = web.put(db, "tiny.lmdb")
        cache = tmp_path / "cache"
        source.configure(cache_dir=str(cache))
        with lmdbfs.open(url) as archive:
            src = archive.locations().remote
            # The pages of the B-tree and of the records' heads, not the inline files after them.
            assert src.index_bytes == src.cache.pinned_bytes() <= 0.2 * tree_bytes(tree)
            assert os.stat(src.data_path).st_blocks * 512 <= 0.25 * tree_bytes(tree)  # the tails are not kept
            assert src.cache.tally()[0] == 0  # no block was fetched whole
            web.reset()
            assert read_all(archive, tree) == 60 * 40
            assert web.gets() > 0
            folder = Path(src.cache.folder)
        for s in source._SOURCES.values():  # noqa: SLF001
            s.cache.close()
        source._SOURCES.clear()  # noqa: SLF001
        # A cache whose pins lie (every page "pinned" over a data file of holes, every
        # block absent) is checked at open: the index is fetched again, the bytes are right.
        pins = bytearray((folder / "pins").read_bytes())
        pins[rcache.PIN_HEADER :] = b"\1" * (len(pins) - rcache.PIN_HEADER)
        (folder / "pins").write_bytes(pins)
        with open(folder / "data", "r+b") as f:
            f.truncate(0)
            f.truncate(os.path.getsize(db))
        state = bytearray((folder / "state").read_bytes())
        state[4096:] = bytes(len(state) - 4096)
        (folder / "state").write_bytes(state)
        web.reset()
        with lmdbfs.open(url) as archive:
            src = archive.locations().remote
            assert web.gets() > 0 and src.cache.pinned_bytes() <= 0.2 * tree_bytes(tree)
            assert read_all(archive, tree) == 60 * 40
        for s in source._SOURCES.values():  # noqa: SLF001
            s.cache.close()
        source._SOURCES.clear()  # noqa: SLF001
        # A pins file with a byte that is neither 0 nor 1: not believed, rebuilt empty.
        with open(folder / "pins", "r+b") as f:
            f.seek(rcache.PIN_HEADER + 3)
            f.write(b"\2")
        web.reset()
        with lmdbfs.open(url) as archive:
            assert archive.locations().remote.index_bytes <= 0.2 * tree_bytes(tree)
            assert web.gets() > 0


def test_a_finished_body_stream_is_freed_at_once(remote_tree, tmp_path: Path) -> None:
    """Each GET written piece by piece ends its body stream with StopAsyncIteration; the
    stream (and its connection's buffers, ~200 KB each) must go when the GET is done, not
    at the next full garbage collection, which a mount daemon may not run for minutes."""
    import gc

    from lmdbfs.remote.client import Client, run

    _tree, db = remote_tree
    with nginx(tmp_path / "www") as server:
        client = Client(parse(server.put(db, "tree.lmdb")))
        info = client.head()
        got = bytearray(info.size)

        def sink(pos: int, piece: memoryview) -> None:
            got[pos : pos + len(piece)] = piece

        def streams_alive() -> int:
            return sum(type(o).__name__ == "BytesStream" for o in gc.get_objects())

        gc.collect()
        gc.disable()
        try:
            before = streams_alive()
            for start in range(0, info.size, 64 << 10):
                run(client.get_into(start, min(info.size, start + (64 << 10)), info, sink, 16 << 10))
            # A reference obstore's Rust threads drop without the GIL is let go later, when
            # pyo3 next takes it (its pending-decref pool): more calls, as a mount's next
            # GETs would be, for a few seconds at most. A stream held by a reference cycle
            # stays whatever is called (the collector is off).
            deadline = time.monotonic() + 5
            while (left := streams_alive() - before) and time.monotonic() < deadline:
                client.head()
                time.sleep(0.05)
        finally:
            gc.enable()
    assert bytes(got) == db.read_bytes()
    assert info.size > 4 * (64 << 10)
    assert left == 0, f"{left} finished body streams still held"
