"""docs/bench-<size>.png: pack time, epoch files/s, walk+stat time, reader scaling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ALL_SYSTEMS, PHASES, log
from .report import epoch_rate


def _rss_panel(ax: Any, res: dict[str, Any], colors: dict[str, str]) -> None:
    """Daemon memory after the epochs (used when there is a single reader count)."""
    names, rss, anon = [], [], []
    for n, by_r in res.get("daemon_rss", {}).items():
        last = by_r[max(by_r, key=int)]
        after = last.get("after_steady") or last.get("after_first") or {}
        if after:
            names.append(n)
            rss.append(after.get("rss_mb", 0))
            anon.append(after.get("anon_mb", 0))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], rss, 0.4, label="VmRSS", color=[colors[n] for n in names])
    ax.bar([x + 0.2 for x in xs], anon, 0.4, label="RssAnon", color=[colors[n] for n in names], alpha=0.5)
    ax.set_xticks(list(xs), names)
    ax.set_title("daemon RSS after the epochs (MB; solid VmRSS, light anon)")


def make_chart(res: dict[str, Any], path: Path) -> bool:
    """bench-<size>.png: pack time, epoch files/s, walk+stat time, reader scaling."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no chart (pip install matplotlib)")
        return False
    colors = {
        "native": "#777777",
        "lmdbfs": "#1f77b4",
        "lmdbfs-devfuse": "#17becf",
        "lmdbfs-py": "#aec7e8",
        "squashfs": "#8c564b",
        "squashfuse": "#ff7f0e",
        "ratarmount": "#2ca02c",
        "tar": "#bcbd22",
        "seed": "#9467bd",
    }
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    fig.suptitle(
        f"lmdbfs benchmark, size {res['size']} ({res['tree']['files']:,} files, "
        f"{res['tree']['bytes'] / 1e9:.2f} GB)" + (", epochs on a sample" if res.get("sampled") else "")
    )
    ax = axes[0][0]
    pack = res.get("pack", {})
    names = [n for n in ALL_SYSTEMS if n in pack]
    ax.bar(names, [pack[n]["seconds"] for n in names], color=[colors[n] for n in names])
    ax.set_title("pack time (s, lower is better)")
    ax.set_xticks(range(len(names)), [f"{n}\n{pack[n]['tool']}" for n in names], fontsize=7)
    eps = res.get("epochs", [])
    readers = sorted({e["readers"] for e in eps})
    rsel = 2 if 2 in readers else (readers[-1] if readers else None)
    ax = axes[0][1]
    if rsel is not None:
        names = [n for n in ALL_SYSTEMS if any(e["system"] == n for e in eps)]
        width = 0.8 / max(1, len(names))
        for i, n in enumerate(names):
            vals = [epoch_rate(res, n, rsel, p) or 0 for p in PHASES]
            ax.bar([j + i * width for j in range(len(PHASES))], vals, width, label=n, color=colors[n])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(PHASES))], PHASES)
        ax.legend(fontsize=8)
        ax.set_yscale("log")
    ax.set_title(f"epoch files/s, {rsel} readers (log scale, higher is better)")
    ax = axes[1][0]
    walk = res.get("walk", {})
    names = [n for n in ALL_SYSTEMS if n in walk]
    width = 0.4
    ax.bar(
        [i for i in range(len(names))],
        [walk[n]["cold_s"] for n in names],
        width,
        label="cold",
        color=[colors[n] for n in names],
    )
    ax.bar(
        [i + width for i in range(len(names))],
        [walk[n]["warm_s"] for n in names],
        width,
        label="warm",
        color=[colors[n] for n in names],
        alpha=0.5,
    )
    ax.set_xticks([i + width / 2 for i in range(len(names))], names)
    ax.set_title("os.walk + stat of everything (s; solid cold, light warm)")
    ax = axes[1][1]
    if len(readers) < 2:
        _rss_panel(ax, res, colors)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return True
    for n in ALL_SYSTEMS:
        pts = [(r, epoch_rate(res, n, r, "steady")) for r in readers]
        pts = [(r, v) for r, v in pts if v]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=n, color=colors[n])
    ax.set_xticks(readers or [1])
    ax.set_xlabel("reader processes")
    if ax.get_lines():
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_title("steady epoch files/s vs readers (log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
