"""Remote DBs mounted over FUSE: `lmdbfs mount URL MNT` over a real nginx and a real S3
server (SeaweedFS), through the block cache, with the faults of a real network injected
by the project's fault proxy on a live mount."""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import is_mounted, load_script, one_error_line
from tests.servers import nginx
from tests.test_mount import _without_write_bits
from tests.test_remote import cli, make_tree
from tests.treecmp import differences, snapshot

pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def tree_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("rmount")
    tree = make_tree(base / "src", dirs=5, files=20, seed=11)
    db = base / "tree.lmdb"
    cli("pack", tree, db, "--no-progress")
    return tree, db


@pytest.fixture
def mounts():
    """mount(URL..., MNT, *options, env=...) -> MNT; every mount undone at the end."""
    made: list[Path] = []

    def mount(*args, env: dict | None = None) -> Path:
        mnt = Path(args[-1])
        mnt.mkdir(parents=True, exist_ok=True)
        proc = cli("mount", *args, env=env, check=False)
        if proc.returncode:
            pytest.fail(f"lmdbfs mount failed: {proc.stderr.strip()}")
        assert is_mounted(mnt)
        made.append(mnt)
        return mnt

    yield mount
    for mnt in reversed(made):
        if is_mounted(mnt):
            cli("umount", mnt, check=False)
        assert not is_mounted(mnt)


def proc_mounts_line(mnt: Path) -> str:
    return next(line for line in Path("/proc/mounts").read_text().splitlines() if f" {mnt} " in line)


def walk_stat(root: Path) -> int:
    n = 0
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return n


def test_http_mount_is_exact_and_a_remount_reads_the_cache(tree_db, tmp_path: Path, mounts) -> None:
    tree, db = tree_db
    with nginx(tmp_path / "www") as web:
        url = web.put(db, "sets/tree.lmdb")
        cache = tmp_path / "cache"
        log = tmp_path / "daemon.log"
        mnt = mounts(url, "--cache-dir", cache, "--log-file", log, tmp_path / "mnt")
        assert f"lmdbfs:{url} " in proc_mounts_line(mnt)
        at_mount = web.gets()
        web.reset()
        assert walk_stat(mnt) == 5 + 5 * 21 + 1  # metadata is local: no request
        assert web.gets() == 0, web.hits()
        assert differences(_without_write_bits(snapshot(tree)), snapshot(mnt)) == []
        assert web.bytes_sent() <= 1.2 * os.path.getsize(db)
        cli("umount", mnt)
        # The same cache again: the HEAD only, every byte from the cache.
        web.reset()
        mnt = mounts(url, "--cache-dir", cache, tmp_path / "mnt")
        assert differences(_without_write_bits(snapshot(tree)), snapshot(mnt)) == []
        assert web.gets() == 0 and at_mount > 0


def test_s3_mounts_share_a_cache_and_keep_secrets_out(tree_db, tmp_path: Path, s3_server, mounts) -> None:
    tree, db = tree_db
    faultproxy = load_script("faultproxy")
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    with faultproxy.FaultProxy(("127.0.0.1", port)) as proxy:
        url = s3_server.put(db, "sets/tree.lmdb")
        env = s3_server.env(proxy.url())
        cache = tmp_path / "cache"
        log = tmp_path / "daemon.log"
        a = mounts(url, "--cache-dir", cache, "--log-file", log, tmp_path / "a", env=env)
        b = mounts(f"got={url}", "--cache-dir", cache, tmp_path / "b", env=env)
        assert differences(_without_write_bits(snapshot(tree)), snapshot(a)) == []
        assert differences(_without_write_bits(snapshot(tree)), snapshot(b / "got")) == []
        # Two mounts, one cache: the object's bytes came once.
        assert proxy.totals().bytes <= 1.2 * os.path.getsize(db)
        secret = env["AWS_SECRET_ACCESS_KEY"]
        for text in (Path("/proc/mounts").read_text(), log.read_text()):
            assert secret not in text and env["AWS_ACCESS_KEY_ID"] not in text
        assert f"lmdbfs:{url} " in proc_mounts_line(a)


def test_faults_on_a_live_mount_never_give_a_wrong_byte(tree_db, tmp_path: Path, mounts) -> None:
    tree, db = tree_db
    faultproxy = load_script("faultproxy")
    with nginx(tmp_path / "www") as web, faultproxy.FaultProxy(("127.0.0.1", web.port)) as proxy:
        web.put(db, "tree.lmdb")
        url = proxy.url() + "/tree.lmdb"
        log = tmp_path / "daemon.log"
        env = {"LMDBFS_REMOTE_TIMEOUT": "2"}
        mnt = mounts(url, "--cache-dir", tmp_path / "cache", "--log-file", log, tmp_path / "mnt", env=env)
        for rule in (
            {"fault": "status", "status": 503, "count": 3},
            {"fault": "status", "status": 429, "count": 1},
            {"fault": "slowdown", "count": 2},
            {"fault": "reset", "count": 2, "after": 0.3},
            {"fault": "truncate", "count": 2, "after": 0.5},
            {"fault": "stall", "count": 1, "stall_s": 5},
        ):
            proxy.add_rule(**rule)
        assert differences(_without_write_bits(snapshot(tree)), snapshot(mnt)) == []
        assert proxy.totals().faults >= 5
        # Failures past the retries: EIO for those reads, the mount keeps serving.
        big = max((tree / "seq004").iterdir(), key=lambda p: p.stat().st_size)  # not in the index's blocks
        cli("umount", mnt)
        shutil.rmtree(tmp_path / "cache")
        mnt = mounts(url, "--cache-dir", tmp_path / "cache", "--log-file", log, tmp_path / "mnt", env=env)
        proxy.add_rule(fault="status", status=503, fraction=1.0)
        with pytest.raises(OSError) as failed:
            (mnt / "seq004" / big.name).read_bytes()
        assert failed.value.errno == errno.EIO
        proxy.set_rules([])
        assert (mnt / "seq004" / big.name).read_bytes() == big.read_bytes()  # FAILED blocks: fetched anew
        # The object replaced while mounted: reads of what is not cached fail, never mix.
        web.replace_damaged(db, "tree.lmdb", b"\x5a" * 65536)
        eio = 0
        for path in sorted(tree.rglob("*")):
            if path.is_file() and not path.is_symlink():
                try:
                    assert (mnt / path.relative_to(tree)).read_bytes() == path.read_bytes()
                except OSError as exc:
                    assert exc.errno == errno.EIO
                    eio += 1
        assert eio > 0
        assert sorted(os.listdir(mnt)) == sorted(os.listdir(tree))  # alive
        time.sleep(0.2)
        changed_lines = [line for line in log.read_text().splitlines() if "changed since it was opened" in line]
        assert len(changed_lines) == 1 and url in changed_lines[0]


def test_bad_urls_mount_nothing_and_say_one_line(tmp_path: Path, s3_server) -> None:
    from tests.servers import free_port

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with nginx(tmp_path / "www") as web:
        cases = [
            (web.url("missing.lmdb"), {}, "no such object (404)"),
            (f"http://127.0.0.1:{free_port()}/x.lmdb", {}, "cannot reach"),
            (s3_server.url("nope/x.lmdb"), {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}, "denied"),
        ]
        for url, env, what in cases:
            proc = cli("mount", url, mnt, "--cache-dir", tmp_path / "c", env=env, check=False)
            line = one_error_line(proc)
            assert what in line and url in line and "not-the-secret" not in proc.stderr
            assert not is_mounted(mnt) and proc.returncode == 9


def test_fstab_source_with_urls_and_a_bounded_cache(tree_db, tmp_path: Path, mounts) -> None:
    tree, db = tree_db
    with nginx(tmp_path / "www") as web:
        url = web.put(db, "tree.lmdb")
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        cache = tmp_path / "cache"
        limit = 3 << 19
        # mount(8)'s form: SOURCE with ':'-separated DBs (a URL's own ':'s do not split it).
        proc = cli(f"a={url}:b={url}", mnt, "-o", f"cache_dir={cache},cache_size={limit}", check=False)
        assert proc.returncode == 0, proc.stderr
        try:
            for part in ("a", "b"):
                for path in sorted(tree.rglob("*")):
                    if path.is_file() and not path.is_symlink():
                        assert (mnt / part / path.relative_to(tree)).read_bytes() == path.read_bytes()
                        used = sum(f.stat().st_blocks * 512 for f in cache.rglob("*") if f.is_file())
                        assert used <= limit
        finally:
            cli("umount", mnt)
        assert os.path.getsize(db) > 1.5 * limit


def test_fetch_all_streams_the_whole_db_into_the_cache(tree_db, tmp_path: Path, mounts) -> None:
    import mmap

    from lmdbfs import _blocks

    tree, db = tree_db
    faultproxy = load_script("faultproxy")
    with nginx(tmp_path / "www") as web, faultproxy.FaultProxy(("127.0.0.1", web.port)) as proxy:
        web.put(db, "tree.lmdb")
        cache = tmp_path / "cache"
        mnt = mounts(proxy.url() + "/tree.lmdb", "--cache-dir", cache, "--fetch-all", tmp_path / "mnt")
        (state,) = cache.glob("*/state")
        with open(state, "r+b") as f, mmap.mmap(f.fileno(), 0) as words:
            blocks = (len(words) - 4096) // 4
            deadline = time.monotonic() + 120
            while _blocks.tally(words, blocks)[0] < blocks:  # every block present, nothing read
                assert time.monotonic() < deadline, "the stream never finished"
                time.sleep(0.1)
        assert proxy.totals().bytes <= 1.05 * os.path.getsize(db)
        # The server now fails every request: every byte comes from the cache.
        proxy.add_rule(fault="status", status=503, fraction=1.0)
        assert differences(_without_write_bits(snapshot(tree)), snapshot(mnt)) == []


def cache_used(cache: Path) -> int:
    """Bytes the cache folder holds on disk, as --cache-size counts them."""
    return sum(
        p.stat().st_blocks * 512
        for p in cache.rglob("*")
        if p.is_file() and p.name in ("data", "state", "pins", "info.json")
    )


def test_a_tiny_file_tree_mounts_with_its_heads_and_a_cache_just_above_them(tmp_path: Path, mounts) -> None:
    from tests.test_remote import make_tiny_tree, tree_bytes

    tree = make_tiny_tree(tmp_path / "src")
    db = tmp_path / "tiny.lmdb"
    cli("pack", tree, db, "--no-progress")
    with nginx(tmp_path / "www") as web:
        url = web.put(db, "tiny.lmdb")
        cache = tmp_path / "cache"
        mnt = mounts(url, "--cache-dir", cache, tmp_path / "mnt")
        index = cache_used(cache)
        assert index <= 0.25 * tree_bytes(tree)  # heads only: the inline files' bytes are not kept
        web.reset()
        assert walk_stat(mnt) == 60 + 60 * 40  # the records' heads are enough: no request
        assert web.gets() == 0, web.hits()
        assert differences(_without_write_bits(snapshot(tree)), snapshot(mnt)) == []
        cli("umount", mnt)
        # A --cache-size just above the index (and one block) opens, walks without a
        # request and reads every byte right, evicting as it goes.
        small = tmp_path / "small"
        limit = index + (1 << 20)
        assert limit < 0.5 * tree_bytes(tree)
        web.reset()
        mnt = mounts(url, "--cache-dir", small, "--cache-size", str(limit), tmp_path / "mnt2")
        at_mount = web.gets()
        assert walk_stat(mnt) == 60 + 60 * 40
        assert web.gets() == at_mount
        assert differences(_without_write_bits(snapshot(tree)), snapshot(mnt)) == []
        assert cache_used(small) <= limit
