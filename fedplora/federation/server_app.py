"""The Flower ServerApp: waits for the nodes, runs the rounds, evaluates centrally, writes outputs.

``run_federation`` is the whole server loop in one readable function; the
``ServerApp`` below is its entry point under ``flwr run`` (settings from the
run config), and ``fedplora run`` calls it through the Simulation Engine.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from .. import rng
from ..adapters import get_plora_model
from ..config import ConfigError, RunConfig
from ..errors import FedploraError
from ..methods import build_method, plora_config
from ..reports import plot_run, write_json
from ..tasks import make_task
from ..tasks.partition import partition_for, partition_report
from .checkpoint import load_checkpoint, restore_rng, save_checkpoint, start_fresh
from . import attacks
from .progress import Progress
from .strategy import HeteroLoRAStrategy, arrays_to_state, state_to_arrays

log = logging.getLogger("fedplora")


def evaluation_set(task, test, cfg: RunConfig):
    """A fixed, seeded held-out sample (the same every round and every run with the seed)."""
    n = min(cfg.eval_max_examples, len(test))
    idx = rng.generator("eval_subset", cfg.seed).choice(len(test), size=n, replace=False)
    return task.encode(test.select(sorted(int(i) for i in idx)))


def run_federation(grid: Grid, cfg: RunConfig, out: Path, progress: Progress | None = None, *,
                   resume: bool = False) -> dict[str, Any]:
    """The server side of a run. ``resume``: continue the run in ``out`` after its last checkpointed round."""
    t_start = time.perf_counter()
    progress = progress or Progress(None)

    torch.manual_seed(rng.seed_int("init", cfg.seed))  # the initial pairs (and any new head) come from the seed
    task = make_task(cfg)
    train, test = task.splits()
    eval_data = evaluation_set(task, test, cfg)
    model = get_plora_model(task.build_model(), plora_config(cfg))
    method = build_method(cfg)
    model_id = getattr(task, "model_path", cfg.model)
    state, history, elapsed, privacy, moments = method.init_state(model), [], 0.0, None, {}
    if resume:  # every check passes before anything in ``out`` is touched
        ckpt = load_checkpoint(out, cfg, model_id, state)
        state, history, elapsed, privacy = ckpt.state, ckpt.history, ckpt.elapsed_s, ckpt.privacy
        moments = ckpt.server_opt or {}
        restore_rng(ckpt.rng)
    else:
        start_fresh(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(cfg.to_toml())
        # the clients' partitions, as every client computes them: sizes and label histograms
        write_json(out / "partitions.json", partition_report(partition_for(task, train, cfg), task.partition_column))
    attacks.check_task(cfg)  # an attack the task cannot carry is refused before the first round
    # with DP, sigma is resolved here, once; the injected attackers are recorded, for measuring only
    strategy = HeteroLoRAStrategy(method, cfg, progress=progress, attackers=attacks.attackers(cfg))
    if resume:
        strategy.load_privacy_state(privacy)  # the privacy count continues exactly where the checkpoint left it
        strategy.server_opt.load_state_dict(moments)  # and the server optimizer's moments

    # no node is asked anything before its first round: a round asks only the nodes it samples (roster.py)
    progress.status("waiting for nodes")
    strategy.wait_for_nodes(grid, timeout=cfg.connect_timeout)

    def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Central evaluation on the fixed held-out sample, every ``eval_every`` rounds and after the last."""
        if rnd % cfg.eval_every and rnd != cfg.rounds:
            return None
        method.load_global(model, arrays_to_state(arrays))
        return MetricRecord(task.evaluate(model, eval_data))

    def on_round(entry: dict[str, Any], arrays: ArrayRecord) -> None:
        progress.round(entry, task.metric, cfg.rounds)
        rnd = entry["round"]
        if cfg.checkpoint_every and (rnd % cfg.checkpoint_every == 0 or rnd == cfg.rounds):
            save_checkpoint(out, rnd, arrays_to_state(arrays), strategy.history, cfg, model_id,
                            elapsed + time.perf_counter() - t_start, privacy=strategy.privacy_state(),
                            server_opt=strategy.server_opt.state_dict())

    if history:
        progress.status(f"resuming after round {len(history) - 1} (checkpoint in {out})")
    result = strategy.start(grid, state_to_arrays(state), num_rounds=cfg.rounds, timeout=cfg.round_timeout,
                            evaluate_fn=evaluate, history=history, on_round=on_round)
    history = strategy.history

    method.export_adapter(model, arrays_to_state(result.arrays), out / "adapter", getattr(task, "model_path", None))
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
    if strategy.accountant is not None:
        summary.update(dp_epsilon=strategy.dp_epsilon(), dp=dp_summary(cfg, strategy))
    plot_run(summary, out / "metrics.png")
    write_json(out / "summary.json", summary)  # last: its presence means the run's outputs are complete
    progress.done(summary, out)
    return summary


def dp_summary(cfg: RunConfig, strategy: HeteroLoRAStrategy) -> dict[str, Any]:
    """The run's privacy for summary.json: the settings, the sigma used and what was spent at dp_delta."""
    acc = strategy.accountant
    out = {"mode": cfg.dp_mode, "clip": cfg.dp_clip, "noise_multiplier": acc.noise_multiplier, "delta": acc.delta,
           "target_epsilon": cfg.target_epsilon, "epsilon": strategy.dp_epsilon(), "rounds_accounted": acc.rounds}
    if cfg.dp_mode == "central":
        out["sampling_rate"] = acc.q  # local DP has no amplification by sampling (q = 1 per client)
    else:
        uploads = strategy.privacy.uploads
        out["client_epsilon"] = {str(c): strategy.privacy.client_epsilon(c) for c in sorted(uploads)}
        out["client_uploads"] = {str(c): n for c, n in sorted(uploads.items())}
    return out


# the run-config keys of the app (pyproject.toml, [tool.flwr.app.config]); the settings themselves
# come from ``config-file``, a TOML file of RunConfig settings (fedplora.config)
RUN_KEYS = ("config-file", "out", "resume", "error-file")


def config_from_run_config(run_config: dict[str, Any]) -> tuple[RunConfig, Path, bool]:
    """Settings under ``flwr run``: ``config-file`` (TOML) and ``out``; ``resume = true`` continues the run
    in ``out`` with the settings it started with (its config.toml)."""
    from .checkpoint import resume_config

    values = {k: v for k, v in run_config.items() if k not in ("error-file",)}
    resume = bool(values.pop("resume", False))
    path, out = values.pop("config-file", ""), values.pop("out", "")
    if values:
        raise ConfigError(f"run config: unknown key(s) {sorted(values)}; settings go in the TOML file named by "
                          f"config-file (keys: {', '.join(RUN_KEYS)})")
    if resume:
        if not out:
            raise ConfigError("run config: resume = true needs out = '<folder of the stopped run>'")
        return resume_config(Path(out)), Path(out), True
    base = RunConfig.from_toml(path) if path else RunConfig()
    cfg = base.with_overrides(out=out or None).validate()
    return cfg, Path(cfg.out or "runs/flwr-run"), False


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``error-file``: where a run's one-line error goes (``fedplora run`` reads it back and prints it, so the
    error is not raised here as well: Flower would print its traceback above that line). Under a plain
    ``flwr run`` (no error file) the error is raised, and Flower reports the run as failed."""
    error_file = str(context.run_config.get("error-file", ""))
    try:
        cfg, out, resume = config_from_run_config(dict(context.run_config))
        run_federation(grid, cfg, out, Progress.console(), resume=resume)
    except FedploraError as e:
        if not error_file:
            raise
        Path(error_file).write_text(f"{type(e).__name__}: {e}")
