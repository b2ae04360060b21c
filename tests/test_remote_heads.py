"""A remote DB's heads sidecar (`lmdbfs heads`, `lmdbfs pack --heads`): a mount fetches
the index in the sidecar's few GETs plus the identity check's, over a real nginx and a
real S3 server (SeaweedFS); a sidecar that is stale, foreign, truncated or damaged is
not believed (one log line, the index fetched without it, every byte right); and the
Python reader lists a remote tree of tiny files without fetching its records' tails."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

import lmdbfs
from lmdbfs.remote import source
from tests.conftest import load_script, one_error_line
from tests.servers import nginx
from tests.test_mount import _without_write_bits
from tests.test_remote import cli, make_tiny_tree, read_all, tree_bytes
from tests.test_remote_mount import mounts, walk_stat  # noqa: F401 - the fixture
from tests.treecmp import differences, snapshot

pytestmark = pytest.mark.slow  # real nginx and S3 servers, real mounts

DIRS, FILES = 40, 30


@pytest.fixture(scope="module")
def dbs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny-file tree packed with its sidecar; the same tree packed again (another
    pack: the first one's sidecar is stale for it); another tree with its sidecar."""
    base = tmp_path_factory.mktemp("heads")
    tree = make_tiny_tree(base / "src", dirs=DIRS, files=FILES)
    db = base / "tiny.lmdb"
    cli("pack", tree, db, "--no-progress", "--heads")
    again = base / "again.lmdb"
    cli("pack", tree, again, "--no-progress")
    other = make_tiny_tree(base / "other", dirs=8, files=FILES)
    other_db = base / "other.lmdb"
    cli("pack", other, other_db, "--no-progress")
    out = cli("heads", other_db).stdout
    assert f"wrote {other_db}.heads" in out
    return {"tree": tree, "db": db, "again": again, "other": other_db}


def heads_of(db: Path) -> Path:
    return Path(f"{db}.heads")


def close_sources() -> None:
    for src in list(source._SOURCES.values()):  # noqa: SLF001
        src.cache.close()
    source._SOURCES.clear()  # noqa: SLF001


@pytest.fixture
def fresh():
    saved = (source.SETTINGS.cache_dir, source.SETTINGS.cache_size)
    yield
    close_sources()
    source.SETTINGS.cache_dir, source.SETTINGS.cache_size = saved


def test_the_command_writes_what_pack_wrote_and_refuses_what_it_cannot(dbs, tmp_path: Path) -> None:
    out = tmp_path / "again.heads"
    cli("heads", dbs["db"], "--out", out)
    assert out.read_bytes() == heads_of(dbs["db"]).read_bytes()  # one walk, the same pages
    assert "upload it beside the DB" in cli("heads", dbs["again"], "--out", tmp_path / "x").stdout
    line = one_error_line(cli("heads", "http://127.0.0.1:9/x.lmdb", check=False))
    assert "local disk" in line
    (tmp_path / "junk").write_bytes(b"not a DB" * 100)
    assert "junk" in one_error_line(cli("heads", tmp_path / "junk", check=False))


@pytest.mark.mount
def test_http_mount_fetches_the_sidecar_not_the_heads(dbs, tmp_path: Path, mounts) -> None:  # noqa: F811
    tree, db = dbs["tree"], dbs["db"]
    with nginx(tmp_path / "www") as web:
        url = web.put(db, "with/tiny.lmdb")
        web.put(heads_of(db), "with/tiny.lmdb.heads")
        log = tmp_path / "daemon.log"
        mnt = mounts(url, "--cache-dir", tmp_path / "c1", "--log-file", log, tmp_path / "m1")
        side_gets = web.gets("with/tiny.lmdb.heads")
        db_gets = [h for h in web.hits("with/tiny.lmdb") if h.method == "GET"]
        # The sidecar in one GET (it is small), the DB only for the identity check: its meta
        # pages and the path to lmdbfs.meta, a few pages (no record's head).
        assert side_gets == 1
        assert 1 <= len(db_gets) <= 3 and sum(h.body_bytes for h in db_gets) <= 64 << 10, db_gets
        web.reset()
        assert walk_stat(mnt) == DIRS + DIRS * FILES
        assert web.gets() == 0, web.hits()
        assert differences(_without_write_bits(snapshot(tree)), snapshot(mnt)) == []
        assert "heads" not in log.read_text()
        # The same DB without a sidecar beside it: the heads come from the DB itself.
        plain = web.put(db, "without/tiny.lmdb")
        web.reset()
        mnt2 = mounts(plain, "--cache-dir", tmp_path / "c2", tmp_path / "m2")
        assert web.gets("without/tiny.lmdb.heads") == 0 and len(web.hits("without/tiny.lmdb.heads")) == 1  # a HEAD
        assert web.gets("without/tiny.lmdb") > len(db_gets)
        assert walk_stat(mnt2) == DIRS + DIRS * FILES
        # A stale sidecar (the same tree packed again): one line in the daemon's log, the
        # index fetched from the DB, every byte right.
        stale = web.put(dbs["again"], "stale/tiny.lmdb")
        web.put(heads_of(db), "stale/tiny.lmdb.heads")
        log3 = tmp_path / "stale.log"
        mnt3 = mounts(stale, "--cache-dir", tmp_path / "c3", "--log-file", log3, tmp_path / "m3")
        lines = [line for line in log3.read_text().splitlines() if "heads" in line]
        assert len(lines) == 1 and f"{stale}.heads" in lines[0] and "rerun `lmdbfs heads`" in lines[0], lines
        assert differences(_without_write_bits(snapshot(tree)), snapshot(mnt3)) == []


@pytest.mark.mount
def test_s3_mount_under_a_name_uses_the_sidecar(dbs, tmp_path: Path, s3_server, mounts) -> None:  # noqa: F811
    tree, db = dbs["tree"], dbs["db"]
    faultproxy = load_script("faultproxy")
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    with faultproxy.FaultProxy(("127.0.0.1", port)) as proxy:
        url = s3_server.put(db, "hs/tiny.lmdb")
        s3_server.put(heads_of(db), "hs/tiny.lmdb.heads")
        env = s3_server.env(proxy.url())
        mnt = mounts(f"got={url}", "--cache-dir", tmp_path / "c", tmp_path / "m", env=env)
        bucket = s3_server.bucket
        assert proxy.totals(path=f"/{bucket}/hs/tiny.lmdb.heads").gets == 1
        assert 1 <= proxy.totals(path=f"/{bucket}/hs/tiny.lmdb").gets <= 3
        proxy.reset_counters()
        assert walk_stat(mnt / "got") == DIRS + DIRS * FILES
        assert proxy.totals().gets == 0
        assert differences(_without_write_bits(snapshot(tree)), snapshot(mnt / "got")) == []


def _damaged(path: Path, at: int, fill: bytes) -> Path:
    data = bytearray(path.read_bytes())
    data[at : at + len(fill)] = fill
    out = path.with_name(path.name + f".{at}")
    out.write_bytes(data)
    return out


def test_a_sidecar_not_of_this_db_is_never_believed(dbs, tmp_path: Path, fresh, caplog) -> None:
    tree, db, again = dbs["tree"], dbs["db"], dbs["again"]
    good = heads_of(db)
    payload_at = len(good.read_bytes()) - 4096  # a byte of the last payload page
    truncated = tmp_path / "truncated.heads"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    cut = tmp_path / "cut.heads"
    cut.write_bytes(good.read_bytes()[:40])
    cases = {
        "stale": (again, good),  # the same tree packed again: another pack id
        "foreign": (db, heads_of(dbs["other"])),
        "truncated": (db, truncated),
        "cut": (db, cut),
        "header": (db, _damaged(good, 0, b"XXXX")),
        "payload": (db, _damaged(good, payload_at, b"\xff" * 8)),
        "table": (db, _damaged(good, 100, b"\x01\x02\x03")),
    }
    with nginx(tmp_path / "www") as web:
        for name, (which, side) in cases.items():
            url = web.put(which, f"{name}/t.lmdb")
            web.put(side, f"{name}/t.lmdb.heads")
            source.configure(cache_dir=str(tmp_path / "cache" / name))
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="lmdbfs.remote.heads"), lmdbfs.open(url) as archive:
                src = archive.locations().remote
                lines = [r.getMessage() for r in caplog.records if r.name == "lmdbfs.remote.heads"]
                assert len(lines) == 1, (name, lines)
                assert f"{url}.heads" in lines[0] and "rerun `lmdbfs heads`" in lines[0], lines[0]
                if name == "stale" and os.path.getsize(again) == os.path.getsize(db):
                    assert "another DB" in lines[0], lines[0]
                assert src.index_bytes > 0
                assert read_all(archive, tree) == DIRS * FILES, name
            close_sources()


def test_python_listing_of_a_remote_tiny_file_tree_fetches_no_tails(dbs, tmp_path: Path, fresh) -> None:
    tree, db = dbs["tree"], dbs["db"]
    with nginx(tmp_path / "www") as web:
        url = web.put(db, "t.lmdb")  # no sidecar: the heads come from the DB
        cli("info", url, "--cache-dir", tmp_path / "c0")  # opening it: the index prefetch alone
        opening = sorted((h.method, h.range) for h in web.hits("t.lmdb"))  # logged as they end: in any order
        web.reset()
        listing = cli("ls", "-R", "-l", url, "--cache-dir", tmp_path / "c1").stdout
        assert listing.count(".jpg") == DIRS * FILES
        # Listing and stat of every file take the records' heads the open pinned: not one
        # request more, no inline file's bytes (a record's tail) kept in the cache.
        assert sorted((h.method, h.range) for h in web.hits("t.lmdb")) == opening
        data = next((tmp_path / "c1").glob("*/data"))
        assert os.stat(data).st_blocks * 512 <= 0.3 * tree_bytes(tree)
        source.configure(cache_dir=str(tmp_path / "c2"))
        web.reset()
        with lmdbfs.open(url) as archive:
            web.reset()
            for dirpath, _dirs, files in archive.walk():
                for name in files:
                    assert archive.lstat(f"{dirpath}/{name}").size == 1900
            assert web.gets() == 0
            # The inline files read where they lie in the tails: exact bytes.
            assert read_all(archive, tree) == DIRS * FILES


def test_a_damaged_head_section_is_refused_never_a_crash(dbs) -> None:
    """Bytes changed anywhere in the head section (header, tables, digests, identity
    copies), or cut short: `parse_head` answers a checked Head or Refused, nothing else."""
    import random

    from lmdbfs.remote.heads import Head, Refused, parse_head

    good = heads_of(dbs["db"]).read_bytes()
    size = os.path.getsize(dbs["db"])
    head = parse_head(good, len(good), size)
    assert isinstance(head, Head) and head.size == size
    rng = random.Random(7)
    refused = 0
    for _ in range(400):
        bad = bytearray(good[: head.head_len])
        for _ in range(rng.choice((1, 2, 8))):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        if rng.random() < 0.2:
            bad = bad[: rng.randrange(len(bad))]
        try:
            got = parse_head(bytes(bad), len(good), size)
        except Refused:
            refused += 1
            continue
        assert isinstance(got, int) or bytes(bad) == good[: len(bad)]  # more bytes asked for, or unchanged
    assert refused > 300
