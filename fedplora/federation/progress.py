"""The live display of a run: one line per round (round, clients and ranks, loss, metric, bytes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..measure import noise_of


def noise_line(entry: dict[str, Any]) -> str:
    """Both noise families, compactly: function level (fn) and the paper's parameter-level definitions (paper)."""
    def fig(key: str) -> str:
        if key in entry and entry[key] is None:  # not measurable this round (secure aggregation)
            return "n/a"
        return f"{noise_of(entry, key):.2e}"

    return (f"noise fn init {fig('fn_init_noise')} agg {fig('fn_agg_noise')} | "
            f"paper init {fig('paper_init_noise')} agg {fig('paper_agg_noise')}")


class Progress:
    def __init__(self, console) -> None:
        self.console = console

    @classmethod
    def console(cls) -> "Progress":
        from rich.console import Console

        return cls(Console(stderr=True, soft_wrap=True))

    def status(self, text: str) -> None:
        if self.console is not None:
            self.console.print(f"[dim]{text}...[/dim]")

    def round(self, entry: dict[str, Any], metric: str, rounds: int) -> None:
        if self.console is None:
            return
        m = entry["metrics"]
        value = f"{metric} {m[metric]:.4f}" if metric in m else ""
        if entry["round"] == 0:
            self.console.print(f"[bold]round 0/{rounds}[/bold]  initial global model: {value}")
            return
        ranks = " ".join(f"{c['cid']}:r{c['rank']}" for c in entry["clients"])
        loss = f"loss {entry['train_loss']:.4f}" if entry.get("train_loss") is not None else ""
        fails = f"  [red]{len(entry['failures'])} failed[/red]" if entry.get("failures") else ""
        eps = f"  epsilon {entry['dp_epsilon']:.3g}" if "dp_epsilon" in entry else ""  # DP runs only
        self.console.print(
            f"[bold]round {entry['round']}/{rounds}[/bold]  clients {ranks}  {loss}  [green]{value}[/green]  "
            f"up {entry['bytes_up'] / 1e6:.2f} MB  down {entry['bytes_down'] / 1e6:.2f} MB  "
            f"{noise_line(entry)}{eps}  {entry['wall_s']:.1f}s{fails}")

    def done(self, summary: dict[str, Any], out: Path) -> None:
        if self.console is None:
            return
        final = ", ".join(f"{k} {v:.4f}" for k, v in summary["final"].items())
        self.console.print(f"[bold green]done[/bold green] in {summary['wall_s']:.0f}s: {final}. "
                           f"Outputs in {out}/ (summary.json, metrics.png, adapter/)")
