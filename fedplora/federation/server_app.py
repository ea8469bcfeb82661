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

from .. import rng
from ..adapters import get_plora_model, get_plora_state_dict
from ..config import RunConfig
from ..methods import make_method
from ..reports import plot_run, write_json
from ..tasks import make_task
from ..tasks.partition import partition_for, partition_report
from .checkpoint import load_checkpoint, restore_rng, save_checkpoint, start_fresh
from .client_app import method_options, plora_config
from .progress import Progress
from .strategy import HeteroLoRAStrategy

log = logging.getLogger("fedplora")


def evaluation_set(task, test, cfg: RunConfig):
    """A fixed, seeded held-out sample (the same every round and every run with the seed)."""
    n = min(cfg.eval_max_examples, len(test))
    idx = rng.generator("eval_subset", cfg.seed).choice(len(test), size=n, replace=False)
    return task.encode(test.select(sorted(int(i) for i in idx)))


def train_round(grid: Grid, strategy: HeteroLoRAStrategy, rnd: int, cfg: RunConfig, progress: Progress) -> dict[str, Any]:
    """One round of training; with too few valid replies it is retried (``on_too_few_replies = "retry"``) or skipped.

    Every attempt is all-or-nothing: the global state changes at most once, when one aggregates.
    """
    attempts = 1 + (cfg.max_round_retries if cfg.on_too_few_replies == "retry" else 0)
    for attempt in range(attempts):
        progress.status(f"round {rnd}/{cfg.rounds}: training" + (f" (retry {attempt})" if attempt else ""))
        messages = strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid, attempt=attempt)
        replies = grid.send_and_receive(messages, timeout=cfg.round_timeout) if messages else []
        strategy.aggregate_train(rnd, replies)
        if strategy.record.aggregated:
            break
    return strategy.record.entry()


def run_federation(grid: Grid, cfg: RunConfig, out: Path, progress: Progress | None = None, *,
                   resume: bool = False) -> dict[str, Any]:
    """The server loop. ``resume``: continue the run in ``out`` after its last checkpointed round."""
    t_start = time.perf_counter()
    progress = progress or Progress(None)

    task = make_task(cfg)
    train, test = task.load_splits()
    eval_data = evaluation_set(task, test, cfg)
    model = get_plora_model(task.build_model(), plora_config(cfg))
    method = make_method(cfg.method, plora_config(cfg), **method_options(cfg))
    model_id = getattr(task, "model_path", cfg.model)
    state, history, elapsed = method.init_state(model), [], 0.0
    if resume:  # every check passes before anything in ``out`` is touched
        ckpt = load_checkpoint(out, cfg, model_id, state)
        state, history, elapsed = ckpt.state, ckpt.history, ckpt.elapsed_s
        restore_rng(ckpt.rng)
    else:
        start_fresh(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(cfg.to_toml())
        # the clients' partitions, as every client computes them: sizes and label histograms
        write_json(out / "partitions.json", partition_report(partition_for(task, train, cfg), task.partition_column))
    dtypes = {k: v.dtype for k, v in get_plora_state_dict(model).items()}
    strategy = HeteroLoRAStrategy(method, cfg, state, dtypes=dtypes)

    progress.status("waiting for clients")
    strategy.discover(grid, timeout=cfg.connect_timeout)

    def evaluate() -> dict[str, float]:
        method.load_global(model, strategy.state)
        return task.evaluate(model, eval_data)

    def checkpoint(rnd: int) -> None:
        if cfg.checkpoint_every and (rnd % cfg.checkpoint_every == 0 or rnd == cfg.rounds):
            save_checkpoint(out, rnd, strategy.state, history, cfg, model_id,
                            elapsed + time.perf_counter() - t_start)

    if history:
        progress.status(f"resuming after round {len(history) - 1} (checkpoint in {out})")
    else:
        history.append({"round": 0, "metrics": evaluate(), "bytes_up": 0, "bytes_down": 0, "init_noise": 0.0,
                        "agg_noise": 0.0, "wall_s": 0.0, "clients": []})
        progress.round(history[0], task.metric, cfg.rounds)
        checkpoint(0)
    for rnd in range(len(history), cfg.rounds + 1):  # history holds rounds 0..k
        t0 = time.perf_counter()
        entry = train_round(grid, strategy, rnd, cfg, progress)
        if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
            progress.status(f"round {rnd}/{cfg.rounds}: evaluating")
            entry["metrics"] = evaluate()
        entry["wall_s"] = time.perf_counter() - t0
        history.append(entry)
        progress.round(entry, task.metric, cfg.rounds)
        checkpoint(rnd)

    method.export_adapter(model, strategy.state, out / "adapter", getattr(task, "model_path", None))
    final = next(h["metrics"] for h in reversed(history) if h["metrics"])
    summary = {
        "method": cfg.method, "task": cfg.task, "model": model_id,
        "metric": task.metric, "seed": cfg.seed, "rounds": cfg.rounds, "num_clients": cfg.num_clients,
        "clients_per_round": cfg.clients_per_round, "rank": cfg.rank,
        "final": final, "initial": history[0]["metrics"], "history": history,
        "bytes_up_total": sum(h["bytes_up"] for h in history),
        "bytes_down_total": sum(h["bytes_down"] for h in history),
        "failures_total": sum(len(h.get("failures", [])) for h in history),
        "wall_s": elapsed + time.perf_counter() - t_start,
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
