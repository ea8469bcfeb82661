"""The Flower ServerApp: discovers the clients, runs the rounds, evaluates centrally, writes outputs.

``run_federation`` is the whole server loop in one readable function; the
``ServerApp`` below is its entry point under ``flwr run`` (settings from the
run config), and ``fedplora run`` calls it through the Simulation Engine.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from ..adapters import get_plora_model
from ..config import RunConfig
from ..methods import make_method
from ..reports import plot_run, write_json
from ..tasks import make_task
from .client_app import method_options, plora_config
from .progress import Progress
from .strategy import HeteroLoRAStrategy

log = logging.getLogger("fedplora")


def evaluation_set(task, test, cfg: RunConfig):
    """A fixed, seeded held-out sample (the same every round and every run with the seed)."""
    n = min(cfg.eval_max_examples, len(test))
    idx = np.random.default_rng([cfg.seed, 31337]).choice(len(test), size=n, replace=False)
    return task.encode(test.select(sorted(int(i) for i in idx)))


def run_federation(grid: Grid, cfg: RunConfig, out: Path, progress: Progress | None = None) -> dict[str, Any]:
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(cfg.to_toml())
    progress = progress or Progress(None)

    task = make_task(cfg)
    _, test = task.load_splits()
    eval_data = evaluation_set(task, test, cfg)
    model = get_plora_model(task.build_model(), plora_config(cfg))
    method = make_method(cfg.method, plora_config(cfg), **method_options(cfg))
    strategy = HeteroLoRAStrategy(method, cfg, method.init_state(model))

    progress.status("waiting for clients")
    strategy.discover(grid, timeout=cfg.round_timeout)

    def evaluate() -> dict[str, float]:
        method.load_global(model, strategy.state)
        return task.evaluate(model, eval_data)

    history: list[dict[str, Any]] = [{"round": 0, "metrics": evaluate(), "bytes_up": 0, "bytes_down": 0,
                                      "init_noise": 0.0, "agg_noise": 0.0, "wall_s": 0.0, "clients": []}]
    progress.round(history[0], task.metric, cfg.rounds)
    for rnd in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        progress.status(f"round {rnd}/{cfg.rounds}: training")
        messages = strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid)
        replies = grid.send_and_receive(messages, timeout=cfg.round_timeout) if messages else []
        strategy.aggregate_train(rnd, replies)
        rec = strategy.record
        entry = {"round": rnd, "metrics": {}, "bytes_up": rec.bytes_up, "bytes_down": rec.bytes_down,
                 "init_noise": rec.init_noise, "agg_noise": rec.agg_noise, "agg_s": rec.agg_s,
                 "train_loss": rec.train_loss, "aggregated": rec.aggregated, "clients": rec.clients,
                 "failures": rec.failures}
        if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
            progress.status(f"round {rnd}/{cfg.rounds}: evaluating")
            entry["metrics"] = evaluate()
        entry["wall_s"] = time.perf_counter() - t0
        history.append(entry)
        progress.round(entry, task.metric, cfg.rounds)

    method.export_adapter(model, strategy.state, out / "adapter", getattr(task, "model_path", None))
    final = next(h["metrics"] for h in reversed(history) if h["metrics"])
    summary = {
        "method": cfg.method, "task": cfg.task, "model": getattr(task, "model_path", cfg.model),
        "metric": task.metric, "seed": cfg.seed, "rounds": cfg.rounds, "num_clients": cfg.num_clients,
        "clients_per_round": cfg.clients_per_round, "rank": cfg.rank,
        "final": final, "initial": history[0]["metrics"], "history": history,
        "bytes_up_total": sum(h["bytes_up"] for h in history),
        "bytes_down_total": sum(h["bytes_down"] for h in history),
        "wall_s": time.perf_counter() - t_start,
    }
    plot_run(summary, out / "metrics.png")
    write_json(out / "summary.json", summary)  # last: its presence means the run's outputs are complete
    progress.done(summary, out)
    return summary


def config_from_run_config(run_config: dict[str, Any]) -> tuple[RunConfig, Path]:
    """Settings under ``flwr run``: an optional ``config-file`` (TOML), then the other keys as overrides."""
    values = dict(run_config)
    path = values.pop("config-file", "")
    base = RunConfig.from_toml(path) if path else RunConfig()
    cfg = base.with_overrides(**{k.replace("-", "_"): v for k, v in values.items() if v != ""}).validate()
    return cfg, Path(cfg.out or "runs/flwr-run")


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, out = config_from_run_config(dict(context.run_config))
    run_federation(grid, cfg, out, Progress.console())
