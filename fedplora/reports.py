"""Run outputs a person reads: summary.json, config.toml, a plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any) -> None:
    """Atomic write: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def plot_run(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = summary["metric"]
    evals = [(h["round"], h["metrics"][metric]) for h in summary["history"] if metric in h.get("metrics", {})]
    rounds = [h["round"] for h in summary["history"] if h["round"] > 0]
    up = [h["bytes_up"] / 1e6 for h in summary["history"] if h["round"] > 0]
    down = [h["bytes_down"] / 1e6 for h in summary["history"] if h["round"] > 0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(*zip(*evals), marker="o")
    ax1.set(xlabel="round", ylabel=metric, title=f"{summary['method']} on {summary['task']}: test {metric}")
    ax1.grid(alpha=0.3)
    ax2.bar([r - 0.2 for r in rounds], down, width=0.4, label="down (server to clients)")
    ax2.bar([r + 0.2 for r in rounds], up, width=0.4, label="up (clients to server)")
    ax2.set(xlabel="round", ylabel="MB", title="traffic per round")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
