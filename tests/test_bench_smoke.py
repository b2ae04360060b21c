"""The benchmark harness must not rot: run `scripts/bench.py --size smoke` end to end.

This checks that the script runs and writes its table, not any number: the
smoke tree is a few dozen tiny files.  ratarmount is left out (it would need a
venv install); lmdbfs, mksquashfs and squashfuse are expected to be installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.mount  # the benchmarks mount lmdbfs and squashfuse

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench.py"
SYSTEMS = ("native", "lmdbfs", "squashfuse", "seed")


def _missing() -> list[str]:
    missing = [t for t in ("mksquashfs", "squashfuse", "fusermount3") if shutil.which(t) is None]
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse")
    return missing


def test_bench_smoke_runs_and_writes_table(tmp_path: Path) -> None:
    # Fail, never skip: scripts/setup.sh installs these, and CI has /dev/fuse.
    assert not _missing(), f"needs FUSE tools (run scripts/setup.sh): {_missing()}"
    out = tmp_path / "out"
    out.mkdir()
    # the sections bench_remote.py and bench_tiny.py wrote are kept as they are
    kept = [
        "<!-- remote:begin -->\n## Remote DBs (scripts/bench_remote.py)\n\nremote table\n<!-- remote:end -->",
        "<!-- tiny-files:begin -->\n## Tiny files: both layouts\n\ntiny table\n<!-- tiny-files:end -->",
    ]
    (out / "benchmarks.md").write_text("# Benchmarks\n\n" + "\n\n".join(kept) + "\n")
    cmd = [
        sys.executable,
        str(BENCH),
        "--size",
        "smoke",
        "--workdir",
        str(tmp_path / "work"),
        "--out-dir",
        str(out),
        "--systems",
        ",".join(SYSTEMS),
        "--readers",
        "1,2",
        "--no-drop-caches",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, f"bench failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"

    md = (out / "benchmarks.md").read_text()
    assert "## smoke" in md
    for block in kept:
        assert md.count(block) == 1 and md.index(block) < md.index("## How to reproduce"), block
    assert "| system |" in md
    for name in SYSTEMS:
        assert f"| {name} |" in md, f"{name} missing from the table"
    assert "ratios" in r.stdout

    res = json.loads((tmp_path / "work" / "results-smoke.json").read_text())
    assert not res["errors"]
    assert res["tree"]["files"] > 10
    assert {"lmdbfs", "squashfuse", "seed"} <= set(res["pack"])
    assert all(v["ok"] for v in res["verify"].values())
    assert all(w["listing_ok"] for w in res["walk"].values())
    systems_read = {e["system"] for e in res["epochs"]}
    assert systems_read == set(SYSTEMS)
    # every epoch reads every file once; the PIL phase decodes a sample of the JPEGs
    assert all(e["files"] == res["epoch_files"] for e in res["epochs"] if e["phase"] != "pil")
    assert {e["phase"] for e in res["epochs"]} >= {"cold", "first", "steady", "seq-cold", "seq-steady", "pil"}
    keys = [(e["system"], e["readers"], e["phase"]) for e in res["epochs"]]
    assert len(keys) == len(set(keys)), "an epoch was recorded twice (rounds and the per-system pass)"
    # bench_open.py reads the same tree and DB, opening files as CPython 3.11-3.13 and 3.14 do
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_open.py"), "--size", "smoke", "--workdir", str(tmp_path / "work"),
         "--readers", "2", "--rounds", "1"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0, f"bench_open failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 3.")]
    assert [row.split(" | ")[0] for row in rows] == ["| 3.11-3.13 open()", "| 3.14 open()", "| 3.11-3.13 open(), again"]
    # nothing is left mounted under the work dir
    mnt = tmp_path / "work" / "mnt"
    for d in mnt.rglob("*") if mnt.exists() else []:
        assert not os.path.ismount(d), f"{d} still mounted"


def test_bench_union_comparison_runs(tmp_path: Path) -> None:
    """`--union-dbs N`: one mount of 1 DB against one of the same files as N shard DBs."""
    cmd = [sys.executable, str(BENCH), "--size", "smoke", "--workdir", str(tmp_path / "work"), "--union-dbs", "3",
           "--readers", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 DBs" in proc.stdout and "files/s" in proc.stdout
    runs = json.loads((tmp_path / "work" / "results-union.json").read_text())["runs"]
    assert set(runs) == {"1 DB", "3 DBs"} and all(r["files_per_s"] > 0 for r in runs.values())


def test_bench_remote_quick_runs_every_kind_of_case(tmp_path: Path) -> None:
    """`scripts/bench_remote.py --quick`: local disk, lmdbfs over HTTP and S3 and httpdirfs +
    lmdbfs, on the smoke tree, each read through the fault proxy (which must count them), an
    RTT case, a capped case and two nodes; the doc gets its section, nothing stays mounted."""
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## How to reproduce\n\nkept\n")
    cmd = [sys.executable, str(REPO / "scripts" / "bench_remote.py"), "--quick", "--workdir", str(tmp_path / "work"),
           "--out", str(doc), "--systems", "local,http,s3,httpdirfs", "--no-drop-caches"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, f"bench_remote failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    res = json.loads((tmp_path / "work" / "results-remote-smoke.json").read_text())
    runs = {(x["system"], x.get("mbit")): x for x in res["runs"]}
    assert set(runs) == {("local", None), ("http", None), ("s3", None), ("httpdirfs", None), ("http", 100.0)}
    assert all("error" not in x and x["cold"]["files"] == res["epoch_files"] for x in runs.values())
    for system in ("http", "s3", "httpdirfs"):
        x = runs[(system, None)]
        # The proxy saw the mount's GETs and at least the DB's bytes over mount and epoch.
        assert x["mount_gets"] >= 1 and x["mount_bytes"] + x["cold"]["bytes_fetched"] >= res["db_bytes"] // 2
        assert x["warm"]["files"] == res["epoch_files"]
    assert runs[("http", None)]["warm"]["gets"] == 0  # a remount reads the cache
    shared, budgeted = res["nodes_runs"]  # the nodes sharing the machine's cores, then in CPU budgets of their own
    assert shared["cpus_per_node"] is None and budgeted["cpus_per_node"] == 0.35
    for nodes in (shared, budgeted):
        assert "error" not in nodes and set(nodes["per_node"]) == {"node0", "node1"}
        assert all(p["files"] == res["epoch_files"] for p in nodes["per_node"].values())
    # each budgeted node's daemon ran in its group, and the groups are gone after the run
    assert all(p["budget_procs"] == 1 for p in budgeted["per_node"].values())
    groups = ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup")  # cgroup v1's cpu hierarchy, or v2's
    assert not [g for root in groups if os.path.isdir(root) for g in os.listdir(root) if "lmdbfs-bench" in g]
    text = doc.read_text()
    assert "## Remote DBs" in text and text.index("## Remote DBs") < text.index("## How to reproduce")
    assert "| http | 2 | uniform |" in text and "readers per node, sharing the machine" in text
    assert "readers per node, 0.35 core each" in text
    # The run says the load it ran at: numbers compare only with others taken at a like load.
    start = text.index("## Remote DBs")
    section = text[start : text.index("### ", start)]
    assert f"Load average {res['load']['start']} at the start, {res['load']['end']} at the end" in section
    for line in open("/proc/self/mounts"):
        assert str(tmp_path) not in line, f"left mounted: {line}"


def test_bench_tiny_runs_and_writes_its_block(tmp_path: Path) -> None:
    """scripts/bench_tiny.py on a few dozen ~2 KB frames: every packer runs, both DBs are
    mounted, walked and read beside the tree, the bytes check passes, and the table lands
    in a benchmarks.md between its markers, once, when run twice (no timing is checked)."""
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## How to reproduce\n\nsteps\n")
    cmd = [sys.executable, str(REPO / "scripts" / "bench_tiny.py"), str(tmp_path / "work")]
    cmd += ["--seqs", "2", "--frames", "10", "--rounds", "1", "--read-rounds", "1", "--sample", "20", "--doc", str(doc)]
    for again in ([], ["--skip-pack"]):
        proc = subprocess.run(cmd + again, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
    text = doc.read_text()
    assert text.count("<!-- tiny-files:begin -->") == 1 and text.count("## Tiny files") == 1
    assert "| lmdbfs pack --layout compact |" in text and "| compact |" in text
    assert text.index("tiny-files:end") < text.index("## How to reproduce")
    res = json.loads((tmp_path / "work" / "bench_tiny.json").read_text())
    assert res["files"] == 2 * 10 + 2 * 5 + 1
    for layout in ("keyed", "compact"):
        assert res["reads"][layout]["verify"]["ok"] and res["reads"][layout]["listing_ok"]
        assert res["reads"][layout]["reads"]["files"] == 20
    for line in open("/proc/self/mounts"):
        assert str(tmp_path) not in line, f"left mounted: {line}"
