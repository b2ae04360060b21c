"""Several DBs as one tree: the reader, the CLI, real mounts, and shard packs."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import lmdbfs
from lmdbfs.errors import LayerConflict
from lmdbfs.fuse.serve import served_layers
from lmdbfs.read.union import Union

from .conftest import is_mounted, one_error_line, run_cli
from .test_mount import _without_write_bits
from .treecmp import differences, snapshot

pytestmark = pytest.mark.slow  # packs several DBs and serves them as one tree


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _pack(src: Path, db: Path, *extra: str) -> Path:
    run_cli("pack", src, db, "--no-progress", *extra)
    return db


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three DBs whose trees overlap in folders only, one clashing with them, and the
    tree their union must show."""
    base = tmp_path_factory.mktemp("parts")
    a = _tree(base / "a", {"train/s1/f1.jpg": os.urandom(50_000), "train/list.txt": b"s1\ns2\n", "top.txt": b"top"})
    b = _tree(base / "b", {"train/s2/f1.jpg": os.urandom(3000), "val/v1/g.txt": b"g", "val/empty": b""})
    os.symlink("../train/s1/f1.jpg", b / "val" / "link.jpg")
    clash = _tree(base / "clash", {"train/list.txt": b"other"})
    dir_clash = _tree(base / "dirclash", {"top.txt/inner": b"x"})
    dbs = {name: _pack(src, base / f"{name}.lmdb") for name, src in [("a", a), ("b", b), ("clash", clash)]}
    dbs["dirclash"] = _pack(dir_clash, base / "dirclash.lmdb")
    # What the union of a and b looks like: a copy of both trees in one folder.
    both = base / "both"
    subprocess.run(["cp", "-a", f"{a}/.", str(both)], check=True)
    subprocess.run(["cp", "-a", f"{b}/.", str(both)], check=True)
    os.utime(both, ns=(os.stat(a).st_mtime_ns,) * 2)
    os.utime(both / "train", ns=(os.stat(a / "train").st_mtime_ns,) * 2)
    dbs.update(a_src=a, b_src=b, both=both)
    return dbs


def test_union_reader_merges_folders_and_reads_from_each_db(parts: dict[str, Path]) -> None:
    tree = lmdbfs.open(parts["a"], parts["b"])
    assert isinstance(tree, Union)
    assert tree.listdir("") == ["top.txt", "train", "val"]
    assert tree.listdir("train") == ["list.txt", "s1", "s2"]
    assert tree.read_bytes("train/s1/f1.jpg") == (parts["a_src"] / "train/s1/f1.jpg").read_bytes()
    assert tree.read_bytes("train/s2/f1.jpg") == (parts["b_src"] / "train/s2/f1.jpg").read_bytes()
    assert tree.read("train/s1/f1.jpg", 10, 100) == (parts["a_src"] / "train/s1/f1.jpg").read_bytes()[100:110]
    assert tree.open("val/v1/g.txt").read() == b"g"
    assert tree.readlink("val/link.jpg") == "../train/s1/f1.jpg"
    assert tree.read_bytes("val/link.jpg") == tree.read_bytes("train/s1/f1.jpg")  # a link across DBs
    assert tree.stat("train").nlink == 4 and tree.stat("").nlink == 4
    assert tree.exists("val/empty") and not tree.exists("train/s3")
    assert [e.name for e in tree.scandir("val")] == ["empty", "link.jpg", "v1"]
    walked = {d: (sorted(ds), sorted(fs)) for d, ds, fs in tree.walk()}
    expected = {}
    for d, ds, fs in os.walk(parts["both"]):
        rel = os.path.relpath(d, parts["both"])
        expected["" if rel == "." else rel] = (sorted(ds), sorted(fs))
    assert walked == expected
    # The same call, a list instead of arguments; and a single DB stays an Archive.
    assert lmdbfs.open([parts["a"], parts["b"]]).listdir("train") == ["list.txt", "s1", "s2"]
    assert type(lmdbfs.open(parts["a"])).__name__ == "Archive"


def test_union_under_folders(parts: dict[str, Path]) -> None:
    tree = lmdbfs.open(f"x={parts['a']}", f"deep/er/y={parts['b']}", parts["clash"])
    assert tree.listdir("") == ["deep", "train", "x"]
    assert tree.listdir("deep/er") == ["y"]
    assert tree.read_bytes("x/train/list.txt") == b"s1\ns2\n"
    assert tree.read_bytes("train/list.txt") == b"other"
    assert tree.read_bytes("deep/er/y/train/s2/f1.jpg") == (parts["b_src"] / "train/s2/f1.jpg").read_bytes()
    assert tree.stat("x").mode == os.stat(parts["a_src"]).st_mode & 0o7777
    layers, fetchers = served_layers(tree)
    assert [(layer.prefix, layer.data_path) for layer in layers] == [
        (b"x", str(parts["a"])),
        (b"deep/er/y", str(parts["b"])),
        (b"", str(parts["clash"])),
    ]
    assert not fetchers and layers[0].offsets_ok is True and layers[0].keys_path is False
    assert layers[0].index_path == layers[0].data_path and layers[0].values_path is None and layers[0].remote is None
    assert layers[0].root_mode == tree.stat("x").mode and layers[0].checksummed is True


@pytest.mark.parametrize(
    ("specs", "path"),
    [
        (("a", "clash"), "train/list.txt"),  # a file in both
        (("a", "dirclash"), "top.txt"),  # a file in one, a folder in the other
        (("a", "top.txt=b"), "top.txt"),  # a file where another DB is placed
    ],
)
def test_clashing_paths_are_refused_naming_both_dbs(parts: dict[str, Path], specs: tuple, path: str) -> None:
    args = [f"{s.partition('=')[0]}={parts[s.partition('=')[2]]}" if "=" in s else str(parts[s]) for s in specs]
    with pytest.raises(LayerConflict) as info:
        lmdbfs.open(*args)
    line = info.value.one_line()
    assert line.startswith(f"{path}: ")
    for s in specs:
        assert str(parts[s.partition("=")[2] or s]) in line


def _child_reads(tree: Union, q) -> None:
    q.put(tree.read_bytes("train/s2/f1.jpg"))


def test_union_pickles_and_survives_fork(parts: dict[str, Path]) -> None:
    tree = lmdbfs.open(parts["a"], parts["b"])
    tree.read_bytes("train/s1/f1.jpg")  # open everything in the parent first
    again = pickle.loads(pickle.dumps(tree))
    assert again.specs == tree.specs and again.read_bytes("top.txt") == b"top"
    q = mp.get_context("fork").Queue()
    child = mp.get_context("fork").Process(target=_child_reads, args=(tree, q))
    child.start()
    data = q.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0 and data == tree.read_bytes("train/s2/f1.jpg")


def test_cli_ls_cat_verify_take_db_lists(parts: dict[str, Path]) -> None:
    a, b = parts["a"], parts["b"]
    assert run_cli("ls", a, b).stdout.split() == ["top.txt", "train", "val"]
    assert run_cli("ls", a, b, "train").stdout.split() == ["list.txt", "s1", "s2"]
    assert run_cli("ls", f"got={a}", b, "got/train/s1").stdout.split() == ["f1.jpg"]
    assert run_cli("cat", a, b, "train/list.txt", "val/v1/g.txt").stdout == "s1\ns2\ng"
    out = run_cli("verify", a, b, "--against", parts["both"]).stdout
    assert out.startswith("ok: 6 files")
    line = one_error_line(run_cli("ls", a, parts["clash"], check=False))
    assert "train/list.txt" in line and str(parts["clash"]) in line
    out = parts["a"].parent / "unpacked"
    run_cli("unpack", a, b, out)
    assert differences(snapshot(parts["both"]), snapshot(out)) == []


@pytest.mark.mount
def test_mount_serves_several_dbs_as_one_tree(parts: dict[str, Path], mount_db) -> None:
    m = mount_db([parts["a"], parts["b"]])
    expected = _without_write_bits(snapshot(parts["both"]))
    assert differences(expected, snapshot(m.mnt)) == []
    # A folder merged from several DBs reports st_nlink 1 over the mount ("unknown", as
    # union filesystems do: find(1) then does not rely on it), its own count in the reader.
    assert os.stat(m.mnt / "train").st_nlink == 1
    assert lmdbfs.open(parts["a"], parts["b"]).stat("train").nlink == 4


@pytest.mark.mount
def test_mount_under_folders(parts: dict[str, Path], mount_db) -> None:
    m = mount_db([f"x={parts['a']}", f"y={parts['b']}"])
    assert sorted(os.listdir(m.mnt)) == ["x", "y"]
    assert differences(_without_write_bits(snapshot(parts["a_src"])), snapshot(m.mnt / "x")) == []
    assert differences(_without_write_bits(snapshot(parts["b_src"])), snapshot(m.mnt / "y")) == []


@pytest.mark.mount
def test_clashing_mount_fails_and_leaves_the_directory_alone(parts: dict[str, Path], tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = run_cli("mount", parts["a"], parts["clash"], mnt, check=False)
    line = one_error_line(proc)
    assert "train/list.txt" in line and str(parts["a"]) in line and str(parts["clash"]) in line
    assert proc.stdout == ""
    assert not is_mounted(mnt) and os.listdir(mnt) == []


@pytest.mark.mount
def test_parallel_shard_packs_mount_as_the_source(got10k_tree: Path, tmp_path: Path, mount_db) -> None:
    n = 3
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lmdbfs",
                "pack",
                "--shard",
                f"{i}/{n}",
                got10k_tree,
                tmp_path / f"g.{i}.lmdb",
                "--no-progress",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    shards = [tmp_path / f"g.{i}.lmdb" for i in range(n)]
    metas = [lmdbfs.open(s).meta.extra for s in shards]
    assert [m["shard"] for m in metas] == ["0/3", "1/3", "2/3"]
    assert len({m["shard_units_checksum"] for m in metas}) == 1
    files = [lmdbfs.open(s).meta.files for s in shards]
    assert all(files) and sum(files) == sum(len(f) for _, _, f in os.walk(got10k_tree))
    # Never a sequence split between shards: each sequence folder lives in one shard.
    for split in ("train", "val", "test"):
        owners = {}
        for i, s in enumerate(shards):
            for name in lmdbfs.open(s).listdir(split) if lmdbfs.open(s).exists(split) else []:
                if name.startswith("GOT-10k"):
                    assert name not in owners, f"{split}/{name} in shards {owners.get(name)} and {i}"
                    owners[name] = i
    m = mount_db(shards)
    assert differences(_without_write_bits(snapshot(got10k_tree)), snapshot(m.mnt)) == []
    assert run_cli("verify", "--against", got10k_tree, *shards).stdout.startswith("ok: ")
    missing = run_cli("verify", "--against", got10k_tree, shards[0], shards[2], check=False)
    assert missing.returncode == 6 and "shard 1/3 is missing" in missing.stdout
    twice = run_cli("verify", *shards, shards[1], check=False)
    assert twice.returncode == 6 and "shard 1/3 is given twice" in twice.stdout
    line = one_error_line(run_cli("ls", *shards, shards[2], check=False))
    assert "shard 2/3 is given twice" in line
    m.close()
    partial = run_cli("mount", shards[0], shards[1], m.mnt)  # serves what is there, but says so
    try:
        assert partial.stderr.startswith("lmdbfs: warning: shard 2/3 is missing")
        assert sorted(os.listdir(m.mnt)) == ["test", "train", "val"]
    finally:
        run_cli("umount", m.mnt)


def test_the_c_server_reads_every_declared_layer_field(parts: dict[str, Path], tmp_path: Path) -> None:
    """ServedLayer is the one declaration of a layer: the C server reads each of its
    required fields by that very name (a missing one is refused, named), and takes no
    dict with other names."""
    from dataclasses import MISSING, asdict, fields
    from types import SimpleNamespace

    from lmdbfs import _serve

    with lmdbfs.open(parts["a"]) as tree:
        (layer,), _ = served_layers(tree)
    required = [f.name for f in fields(layer) if f.default is MISSING]
    assert "prefix" in required and "checksummed" in required
    for name in required:
        partial = SimpleNamespace(**{k: v for k, v in asdict(layer).items() if k != name})
        with pytest.raises(KeyError, match=name):
            _serve.serve(str(tmp_path / "nowhere"), [partial], [])
    with pytest.raises(TypeError, match="ServedLayer"):
        _serve.serve(str(tmp_path / "nowhere"), [asdict(layer)], [])


def test_a_union_is_made_of_its_layers_archives(parts: dict[str, Path]) -> None:
    """Union is a Tree holding one Archive per layer, not an Archive: a file's reads and
    checks are its owning layer's, asked through the Archive's public calls."""
    from lmdbfs.read.reader import Archive
    from lmdbfs.read.tree import Tree

    with lmdbfs.open(f"x={parts['a']}", parts["b"]) as tree:
        assert isinstance(tree, Tree) and not isinstance(tree, Archive)
        layers = tree.layers()
        assert [prefix for prefix, _ in layers] == ["x", ""] and all(isinstance(a, Archive) for _, a in layers)
        layer, sub = tree.owner("x/train/list.txt")
        assert layer is layers[0][1] and sub == "train/list.txt"
        entry = tree.lstat("x/train/list.txt")
        assert tree.read_range("x/train/list.txt", entry, 1, 3) == layer.read_range(sub, entry, 1, 3) == b"1\ns"
        assert tree.check("x/train/list.txt") and tree.record("x") is layer.record("")
        assert tree.key_of("x/train/list.txt") == layer.key_of("train/list.txt")
