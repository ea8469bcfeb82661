"""The study's plots, drawn from table.json alone (so they can be re-drawn without the cell folders).

Per task x partition: the metric per round per method, the noise figures per round and the traffic; per
task run in several partitions (attacks, privacy levels, ...): each method's final metric across them.
Kept apart from report.py because matplotlib is slow to import and ``write_report(plots=False)`` skips it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_table(table: dict[str, Any], out: Path) -> list[Path]:
    """Per task x partition: the metric per round per method (mean over seeds), noise per round, traffic; per
    task with several partitions: each method's final metric across them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110, metadata={"Software": None})
        plt.close(fig)
        written.append(out / name)
    for t in table["tables"]:
        rows = [r for r in t["rows"] if r["n"]]
        if not rows:
            continue
        stem, title = f"{t['task']}-{t['partition']}", f"{t['task_label']}, {t['partition_label']}"

        def series(r, key):
            pts = [(x, y) for x, y in zip(r["per_round"]["round"], r["per_round"][key]) if y is not None]
            return zip(*pts) if pts else ((), ())

        fig, ax = plt.subplots(figsize=(6.5, 4))
        for r in rows:
            ax.plot(*series(r, t["metric"]), marker="o", markersize=3, label=r["label"])
        ax.set(xlabel="round", ylabel=t["metric"], title=f"{title}: {t['metric']} per round (mean over seeds)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, f"{stem}-metric.png")

        keys = sorted({k for r in rows for k in r["noise"]})
        if keys:
            fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
            for key, ax in zip(keys, axes[0]):
                for r in rows:
                    if key in r["per_round"]:
                        xs, ys = series(r, key)
                        pts = [(x, max(y, 1e-12)) for x, y in zip(xs, ys) if x > 0]
                        if pts:
                            ax.plot(*zip(*pts), marker="o", markersize=3, label=r["label"])
                ax.set(xlabel="round", ylabel=key.replace("_", " "), yscale="log",
                       title=f"{key.replace('_', ' ')} (0 shown at 1e-12)")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.grid(alpha=0.3)
            axes[0][0].legend(fontsize=8)
            fig.suptitle(title)
            save(fig, f"{stem}-noise.png")

        fig, ax = plt.subplots(figsize=(6.5, 4))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["down_mb"] for r in rows], width=0.4, label="down (server to clients)")
        ax.bar([x + 0.2 for x in xs], [r["up_mb"] for r in rows], width=0.4, label="up (clients to server)")
        ax.set_xticks(list(xs), [r["label"] for r in rows], rotation=20, ha="right", fontsize=8)
        ax.set(ylabel="MB per run (all rounds)", yscale="log", title=f"{title}: traffic")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        save(fig, f"{stem}-traffic.png")
    tasks = list(dict.fromkeys(t["task"] for t in table["tables"]))
    for task in tasks:  # each method's final metric across the partitions (attacks, privacy levels, ...)
        parts = [t for t in table["tables"] if t["task"] == task]
        if len(parts) < 2 or not any(r["n"] for t in parts for r in t["rows"]):
            continue
        fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * len(parts) + 2), 4))
        for i, first in enumerate(parts[0]["rows"]):
            pts = [(x, t["rows"][i]["mean"], t["rows"][i]["std"] or 0.0) for x, t in enumerate(parts)
                   if t["rows"][i]["n"]]
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, marker="o", markersize=4, capsize=3, label=first["label"])
        ax.set_xticks(range(len(parts)), [t["partition_label"] for t in parts], rotation=20, ha="right", fontsize=8)
        metric = next(t["metric"] for t in parts if t["metric"])
        ax.set(ylabel=metric, title=f"{parts[0]['task_label']}: final {metric} per partition (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, f"{task}-by-partition.png")
    return written
