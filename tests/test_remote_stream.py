"""The whole-DB stream of a remote mount (`--fetch-all=auto`, the default; `on`; `off`):
when it starts, that it fills the cache byte-exact, that it stays off for a few reads and
for a cache too small, and that faults during it cost no byte and no daemon. Real nginx,
the project's fault proxy, real mounts."""

from __future__ import annotations

import mmap
import os
import random
import time
from pathlib import Path

import pytest

from tests.conftest import load_script
from tests.servers import nginx
from tests.test_mount import _without_write_bits
from tests.test_remote import cli, fresh_sources, tiny_tree  # noqa: F401 - fixtures
from tests.test_remote_mount import mounts  # noqa: F401 - the fixture
from tests.treecmp import differences, snapshot

pytestmark = pytest.mark.mount

FILES = 160  # of 250 KB: a 40 MB DB, 150-odd blocks of 256 KiB


def make_db(base: Path, files: int) -> tuple[Path, Path, list[str]]:
    tree = base / "src"
    rng = random.Random(5)
    names = []
    for i in range(files):
        seq = tree / f"seq{i // 20:02d}"
        seq.mkdir(parents=True, exist_ok=True)
        (seq / f"{i:05d}.jpg").write_bytes(rng.randbytes(250_000))
        names.append(f"seq{i // 20:02d}/{i:05d}.jpg")
    db = base / "tree.lmdb"
    cli("pack", tree, db, "--no-progress")
    return tree, db, names


@pytest.fixture(scope="module")
def big_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    return make_db(tmp_path_factory.mktemp("stream"), FILES)


@pytest.fixture(scope="module")
def bigger_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """120 MB: the stream's first GETs in flight (12 of 4 MiB in a bounded cache) do not reach its end."""
    return make_db(tmp_path_factory.mktemp("stream3"), 3 * FILES)


def present(cache: Path) -> tuple[int, int]:
    """(present blocks, all blocks) of the one object in ``cache``."""
    from lmdbfs import _blocks

    (state,) = cache.glob("*/state")
    with open(state, "r+b") as f, mmap.mmap(f.fileno(), 0) as words:
        blocks = (len(words) - 4096) // 4
        return _blocks.tally(words, blocks)[0], blocks


def wait_all_present(cache: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        have, blocks = present(cache)
        if have == blocks:
            return
        assert time.monotonic() < deadline, f"the stream stopped at {have} of {blocks} blocks"
        time.sleep(0.1)


STREAMING = ": streaming "  # the daemon's line when its stream starts


def wait_streamed(log: Path) -> None:
    """Until the daemon logs that its stream is over."""
    deadline = time.monotonic() + 120
    while "the stream is over" not in log.read_text():
        assert time.monotonic() < deadline, "the stream never ended"
        time.sleep(0.1)


def read(mnt: Path, tree: Path, names: list[str]) -> None:
    for name in names:
        assert (mnt / name).read_bytes() == (tree / name).read_bytes(), name


def test_auto_streams_once_the_reads_show_an_epoch(big_db, tmp_path: Path, mounts) -> None:  # noqa: F811
    tree, db, names = big_db
    with nginx(tmp_path / "www") as web:
        url = web.put(db, "tree.lmdb")
        cache, log = tmp_path / "cache", tmp_path / "daemon.log"
        mnt = mounts(url, "--cache-dir", cache, "--log-file", log, tmp_path / "mnt")
        # An epoch in random order: its first files, spread over the DB, start the stream.
        sample = random.Random(1).sample(names, FILES // 3)
        read(mnt, tree, sample)
        wait_streamed(log)  # the blocks of files never read came too
        assert "streaming what the mount reads of the DB" in log.read_text()
        assert web.bytes_sent() <= 1.1 * os.path.getsize(db)  # no block twice
        web.reset()
        assert differences(_without_write_bits(snapshot(tree)), snapshot(mnt)) == []
        assert web.gets() == 0  # the rest of the epoch: all from the cache


def test_auto_does_not_stream_for_a_few_files_or_one_sequence(big_db, tmp_path: Path, mounts) -> None:  # noqa: F811
    tree, db, names = big_db
    with nginx(tmp_path / "www") as web:
        url = web.put(db, "tree.lmdb")
        cache, log = tmp_path / "cache", tmp_path / "daemon.log"
        mnt = mounts(url, "--cache-dir", cache, "--log-file", log, tmp_path / "mnt")
        at_mount = web.bytes_sent()
        os.listdir(mnt / "seq03")
        read(mnt, tree, names[::40])  # a cat of a few files, spread over the DB
        read(mnt, tree, [n for n in names if n.startswith("seq05/")])  # one whole sequence
        assert STREAMING not in log.read_text()
        # what was read (6 MB) and its sequence's readahead, not the DB (40 MB)
        assert web.bytes_sent() - at_mount < 0.5 * os.path.getsize(db)
        have, blocks = present(cache)
        assert have < blocks // 2


def test_auto_does_not_stream_into_a_cache_too_small(big_db, tmp_path: Path, mounts) -> None:  # noqa: F811
    tree, db, names = big_db
    with nginx(tmp_path / "www") as web:
        url = web.put(db, "tree.lmdb")
        cache, log = tmp_path / "cache", tmp_path / "daemon.log"
        limit = os.path.getsize(db) * 3 // 2  # holds the DB, not twice it
        mnt = mounts(url, "--cache-dir", cache, "--cache-size", str(limit), "--log-file", log, tmp_path / "mnt")
        read(mnt, tree, random.Random(2).sample(names, FILES // 3))
        text = log.read_text()
        assert "not streaming the DB into the cache: --cache-size is below twice the DB" in text
        assert STREAMING not in text


@pytest.mark.parametrize("form", ["--no-fetch-all", "fstab fetch_all=off"])
def test_off_never_streams(big_db, tmp_path: Path, mounts, form: str) -> None:  # noqa: F811
    tree, db, names = big_db
    with nginx(tmp_path / "www") as web:
        url = web.put(db, "tree.lmdb")
        cache, log, mnt = tmp_path / "cache", tmp_path / "daemon.log", tmp_path / "mnt"
        if form == "--no-fetch-all":
            mounts(url, "--cache-dir", cache, "--no-fetch-all", "--log-file", log, mnt)
        else:  # mount(8)'s form, as an fstab line gives it
            mnt.mkdir()
            proc = cli(url, mnt, "-o", f"ro,cache_dir={cache},fetch_all=off,log_file={log}", check=False)
            assert proc.returncode == 0, proc.stderr
        try:
            read(mnt, tree, random.Random(3).sample(names, FILES // 2))
        finally:
            if form != "--no-fetch-all":
                cli("umount", mnt)
        assert STREAMING not in log.read_text()
        have, blocks = present(cache)
        assert have < blocks


def test_faults_during_the_stream_cost_no_byte_and_no_daemon(big_db, tmp_path: Path, mounts) -> None:  # noqa: F811
    tree, db, names = big_db
    faultproxy = load_script("faultproxy")
    with nginx(tmp_path / "www") as web, faultproxy.FaultProxy(("127.0.0.1", web.port)) as proxy:
        web.put(db, "tree.lmdb")
        proxy.add_rule(fault="status", status=503, fraction=0.2, path="/tree.lmdb")
        proxy.add_rule(fault="reset", fraction=0.1, path="/tree.lmdb", after=0.4)
        proxy.add_rule(fault="truncate", fraction=0.1, path="/tree.lmdb", after=0.7)
        cache, log = tmp_path / "cache", tmp_path / "daemon.log"
        mnt = mounts(
            proxy.url() + "/tree.lmdb", "--cache-dir", cache, "--fetch-all", "--log-file", log, tmp_path / "mnt"
        )
        # Readers beside the faulty stream: every byte right (a read may retry a failed block).
        assert differences(_without_write_bits(snapshot(tree)), snapshot(mnt)) == []
        assert proxy.totals().faults > 0
        proxy.set_rules([])
        read(mnt, tree, names)  # the daemon still serves, every byte
        assert "Traceback" not in log.read_text()


def test_a_read_goes_before_the_stream_and_no_block_comes_twice(bigger_db, tmp_path: Path, mounts) -> None:  # noqa: F811
    tree, db, names = bigger_db
    faultproxy = load_script("faultproxy")
    # A file past the middle, well before the records at the end (the stream brings those first)
    last = names[len(names) * 3 // 5]
    content = (tree / last).read_bytes()
    # A byte in the middle of the file (its first page is pinned at mount, with the index)
    at = db.read_bytes().find(content[:4096]) + 150_000
    assert at > os.path.getsize(db) // 2
    # 200 Mbit/s: the stream needs 4 s or more to reach the end of the DB.
    with nginx(tmp_path / "www") as web, faultproxy.FaultProxy(("127.0.0.1", web.port), mbit=200) as proxy:
        web.put(db, "tree.lmdb")
        cache = tmp_path / "cache"
        size = str(3 * os.path.getsize(db))  # a bounded cache: the stream's GETs of 4 MiB
        mnt = mounts(
            proxy.url() + "/tree.lmdb", "--cache-dir", cache, "--cache-size", size, "--fetch-all", tmp_path / "mnt"
        )
        assert (mnt / last).read_bytes() == content
        wait_all_present(cache)
        hits = [h for h in web.hits("tree.lmdb") if h.method == "GET" and h.range]
        spans = [tuple(int(x) for x in h.range.removeprefix("bytes=").split("-")) for h in hits]
        # The read's own GET (at most the 1 MiB an open claims), not one of the stream's
        # 4 MiB GETs, brought the file's bytes: the stream skipped them.
        first = [(lo, hi) for lo, hi in spans if lo <= at <= hi]
        assert len(first) == 1 and first[0][1] - first[0][0] < 1 << 20, first
        assert web.bytes_sent() <= 1.05 * os.path.getsize(db)  # no block fetched twice


def test_the_object_replaced_during_the_stream_answers_eio_with_one_line(
    bigger_db,
    tmp_path: Path,
    mounts,  # noqa: F811
) -> None:
    import errno

    tree, db, names = bigger_db
    faultproxy = load_script("faultproxy")
    # 80 Mbit/s: the stream's first 48 MB take 5 s or more; the object is replaced long
    # before its later GETs go out (those in flight still get the old bytes, rightly).
    with nginx(tmp_path / "www") as web, faultproxy.FaultProxy(("127.0.0.1", web.port), mbit=80) as proxy:
        web.put(db, "tree.lmdb")
        url = proxy.url() + "/tree.lmdb"
        cache, log = tmp_path / "cache", tmp_path / "daemon.log"
        size = str(3 * os.path.getsize(db))  # a bounded cache: the stream's GETs of 4 MiB
        mnt = mounts(
            url, "--cache-dir", cache, "--cache-size", size, "--fetch-all", "--log-file", log, tmp_path / "mnt"
        )
        web.replace_damaged(db, "tree.lmdb", b"\x5a" * 65536)
        eio = 0
        for name in names:
            try:
                assert (mnt / name).read_bytes() == (tree / name).read_bytes(), name
            except OSError as exc:
                assert exc.errno == errno.EIO
                eio += 1
        assert eio > 0
        assert sorted(os.listdir(mnt)) == sorted(os.listdir(tree))  # alive
        have, blocks = present(cache)
        assert have < blocks  # the stream stopped at the change, nothing of the new object taken
        time.sleep(0.2)
        changed = [line for line in log.read_text().splitlines() if "changed since it was opened" in line]
        assert len(changed) == 1 and url in changed[0], changed


def test_an_epoch_of_tiny_files_streams_the_records_not_the_md5_copies(tiny_tree, tmp_path: Path, mounts) -> None:  # noqa: F811
    """auto on a tree of tiny files: the reads lie in the records alone (under half of
    the DB), yet they start the stream, and it brings what the mount reads (the records,
    where every file is inline), not the md5(path) copies beside them: after it, the
    whole tree reads with no GET."""
    tree, db = tiny_tree
    names = sorted(str(p.relative_to(tree)) for p in tree.rglob("*.jpg"))
    with nginx(tmp_path / "www") as web:
        url = web.put(db, "tiny.lmdb")
        cache, log = tmp_path / "cache", tmp_path / "daemon.log"
        mnt = mounts(url, "--cache-dir", cache, "--log-file", log, tmp_path / "mnt")
        at_mount = web.bytes_sent()  # the records' heads (their tails crossed the wire, not kept)
        read(mnt, tree, random.Random(4).sample(names, len(names) // 4))
        wait_streamed(log)
        assert "streaming what the mount reads of the DB" in log.read_text()
        assert web.bytes_sent() - at_mount < 0.7 * os.path.getsize(db)  # the whole DB: about 1.0
        web.reset()
        assert differences(_without_write_bits(snapshot(tree)), snapshot(mnt)) == []
        assert web.gets() == 0


def test_the_stream_brings_the_records_first(tiny_tree, tmp_path: Path, fresh_sources) -> None:  # noqa: F811
    """A tiny-file tree holds each file twice: inline in its directory's record, which
    the mount reads, and under its md5(path) key, which only other LMDB code reads. The
    stream's first GETs are the records' blocks: every file's inline copy lies in them,
    its md5 copy in a block that comes later."""
    from lmdbfs.remote import source
    from lmdbfs.remote.fetcher import Fetcher

    tree, db = tiny_tree
    data = db.read_bytes()
    with nginx(tmp_path / "www") as web:
        url = web.put(db, "tiny.lmdb")
        source.configure(cache_dir=str(tmp_path / "cache"))
        src = source.open_source(url)
        fetcher = Fetcher(src)
        try:
            order = [first for first, _end in fetcher.order(1)]
            bsize, blocks = src.block_size, src.cache.blocks
        finally:
            fetcher.stop()
    first = {b for lo, hi in src.record_runs for b in range(lo, hi)}
    assert order[: len(first)] == sorted(first)
    assert sorted(order) == sorted([*first, *range(blocks)])  # then every block, in order
    assert len(first) < 0.6 * blocks
    files = sorted(p for p in tree.rglob("*.jpg"))
    assert len(files) == 60 * 40
    both = 0
    for path in files[::7]:
        body = path.read_bytes()
        at = _find_all(data, body)
        assert len(at) >= 2, (path, at)  # the record's copy and the md5 copy (and free pages' stale ones)
        early = [a // bsize in first and (a + len(body) - 1) // bsize in first for a in at]
        assert any(early), path  # its record's copy comes with the first GETs
        both += all(early)
    # The md5 copies come after, but for those sharing a block with a record written
    # among them (the root's, lmdbfs.meta's: one block in this DB of 38)
    assert both <= 0.1 * len(files[::7]), both


def _find_all(data: bytes, needle: bytes) -> list[int]:
    out, i = [], data.find(needle)
    while i >= 0:
        out.append(i)
        i = data.find(needle, i + 1)
    return out
