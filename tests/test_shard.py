"""The shard deal: whole sequences, balanced by bytes, the same on every machine."""

from __future__ import annotations

import random

import pytest

from lmdbfs.errors import UsageError
from lmdbfs.pack.shard import deal, parse_shard, plan, set_problems, split_depth, units_at

DIR, FILE = 2, 1


def got10k_like(seqs: int = 40) -> list[tuple[str, int, int]]:
    rng = random.Random(1)
    entries = [("train", DIR, 0), ("val", DIR, 0), ("train/list.txt", FILE, 100), ("val/list.txt", FILE, 20)]
    for split, count in (("train", seqs), ("val", 4)):
        for s in range(count):
            seq = f"{split}/GOT-10k_{split}_{s:06d}"
            entries.append((seq, DIR, 0))
            entries += [(f"{seq}/{f:08d}.jpg", FILE, rng.randint(1000, 90_000)) for f in range(rng.randint(5, 30))]
            entries.append((f"{seq}/groundtruth.txt", FILE, 300))
    return entries


def lasot_like() -> list[tuple[str, int, int]]:
    entries = []
    for c in ("airplane", "bear", "cat", "dog", "zebra", "bike", "car", "cup", "deer", "fox"):
        entries.append((c, DIR, 0))
        for n in range(1, 4):
            seq = f"{c}/{c}-{n}"
            entries += [(seq, DIR, 0), (f"{seq}/img", DIR, 0), (f"{seq}/img/00000001.jpg", FILE, 5000 * n)]
    return entries


def test_split_level_is_the_first_with_more_than_n_entries() -> None:
    assert split_depth(got10k_like(), 8) == 2  # train/<sequence>
    assert split_depth(lasot_like(), 8) == 1  # <class>
    assert split_depth(lasot_like(), 20) == 2  # <class>/<class>-N


@pytest.mark.parametrize("n", [1, 3, 8])
def test_every_unit_in_exactly_one_shard_and_sequences_whole(n: int) -> None:
    entries = got10k_like()
    plans = [plan(entries, i, n) for i in range(n)]
    units = units_at(entries, plans[0].depth)
    assert sorted(u for p in plans for u in p.units) == sorted(units)
    assert len({p.checksum for p in plans}) == 1

    def kept(p, rel: str) -> bool:  # the scan descends only into folders it keeps
        parts = rel.split("/")
        return all(p.include("/".join(parts[: d + 1])) for d in range(len(parts)))

    for rel, _kind, _size in entries:  # each entry is kept by exactly one shard, or is a shared folder above units
        keepers = [p.index for p in plans if kept(p, rel)]
        assert len(keepers) == 1 or rel in ("train", "val"), (rel, keepers)


def test_deal_is_balanced_and_independent_of_input_order() -> None:
    entries = got10k_like(200)
    units = units_at(entries, 2)
    shuffled = dict(random.Random(5).sample(sorted(units.items()), len(units)))
    assert deal(units, 8) == deal(shuffled, 8)
    loads = [sum(units[u] for u in share) for share in deal(units, 8)]
    assert max(loads) - min(loads) <= max(units.values())  # greedy largest-first bound


def test_empty_folders_and_top_files_are_units() -> None:
    entries = [("a", DIR, 0), ("a/x", DIR, 0), ("a/x/f", FILE, 5), ("empty", DIR, 0), ("top.txt", FILE, 3)]
    assert units_at(entries, 2) == {"a/x": 5, "empty": 0, "top.txt": 3}


def test_parse_and_set_problems() -> None:
    assert parse_shard("3/8") == (3, 8)
    for bad in ("8/8", "-1/8", "x/2", "3", "1/0"):
        with pytest.raises(UsageError):
            parse_shard(bad)
    extra = {"shard_units_checksum": "c"}
    members = [("a", "", {**extra, "shard": "0/3"}), ("b", "", {**extra, "shard": "0/3"}), ("x", "", {})]
    assert [k for k, _ in set_problems(members)] == ["twice", "missing", "missing"]
    other = [("a", "", {**extra, "shard": "0/2"}), ("b", "", {"shard_units_checksum": "d", "shard": "1/2"})]
    assert [k for k, _ in set_problems(other)] == ["mismatch"]
    assert set_problems([("a", "g", {**extra, "shard": "0/1"}), ("b", "h", {**extra, "shard": "0/1"})]) == []
