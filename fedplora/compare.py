"""``fedplora compare``: every method on the same clients, partitions, budgets and seeds.

Only the method differs between runs: each is a ``RunConfig`` with one field
changed, executed by the same simulation, so the comparison is fair by
construction. Outputs: comparison.json, comparison.md and two plots.

A comparison is one table of a study (one task x partition, a row per method), and its per-method
figures over seeds come from the study's summariser (``fedplora.study.summary.over_seeds``): the same
mean and std, and the same convention for one seed (no std: undefined, shown as the mean alone), in both
reports. Its time to target is the study's too (``time_to_target``): per method, the round and the wall
seconds at which each seed first reaches ``--target-fraction`` of the best method's final mean. What is
compare's own: both noise families per round, from histories of any age (``noise_of``).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig
from .measure import NOISE_KEYS, noise_of
from .methods import METHODS
from .reports import write_json
from .study.summary import (TARGET_FRACTION, format_mean_std, format_number, format_reach, format_slower, over_seeds,
                            time_to_target)

# names accepted in --methods beyond the registry: variants of one method
VARIANTS: dict[str, dict[str, Any]] = {
    "fedit-feasible": {"method": "fedit", "fedit_variant": "feasible"},
    "fedit-ideal": {"method": "fedit", "fedit_variant": "ideal"},
}
LABELS = {"fedit": "fedit (ideal: every client at R, ignores budgets)",
          "fedit-feasible": "fedit-feasible (every client at the smallest budget)"}


def method_config(cfg: RunConfig, name: str, seed: int, out: Path) -> RunConfig:
    if name in VARIANTS:
        overrides = dict(VARIANTS[name])
    elif name in METHODS:
        overrides = {"method": name}
    else:
        raise ConfigError(f"methods: unknown method {name!r}; choose from {sorted(METHODS) + sorted(VARIANTS)}")
    return cfg.with_overrides(**overrides, seed=seed, out=str(out)).validate()


# the two noise families (docs/method.md, "Measurements"): history key -> column / axis label
NOISE_LABELS = {"fn_init_noise": "init noise (function-level)", "fn_agg_noise": "agg noise (function-level)",
                "paper_init_noise": "init noise (paper, parameter-level)",
                "paper_agg_noise": "agg noise (paper, per-pair for Fed-PLoRA)"}
assert set(NOISE_LABELS) == set(NOISE_KEYS)


def _nanmean(values) -> float:
    """Mean of the measured values (a history written before the paper's figures has NaN there: skipped)."""
    finite = [v for v in values if v == v]
    return statistics.fmean(finite) if finite else float("nan")


def summarize(runs: dict[str, list[dict[str, Any]]], target_fraction: float = TARGET_FRACTION) -> dict[str, Any]:
    """Per method: final metrics (mean/std over seeds: the study's ``over_seeds``), traffic, time, noise,
    aggregation time, and time to target (the study's ``time_to_target`` on the headline metric: ``to_target``
    holds the method's rounds, seconds and ``slower``, and the comparison's target beside them)."""
    table = {}
    metric = next(iter(runs.values()))[0]["metric"] if runs and next(iter(runs.values())) else None
    reach = time_to_target(runs, metric, target_fraction) if metric is not None else None
    for name, summaries in runs.items():
        rounds = [h for s in summaries for h in s["history"] if h["round"] > 0]
        seeds = over_seeds(summaries)
        table[name] = {
            "label": LABELS.get(name, name),
            "seeds": seeds["seeds"],
            "final": seeds["final"],
            "bytes_up_total": seeds["bytes_up_total"],
            "bytes_down_total": seeds["bytes_down_total"],
            "wall_s": statistics.fmean(s["wall_s"] for s in summaries),
            **{f"{key}_mean": _nanmean(noise_of(h, key) for h in rounds) for key in NOISE_KEYS},
            # the function-level means under their names from before the paper's were added
            "init_noise_mean": _nanmean(noise_of(h, "fn_init_noise") for h in rounds),
            "agg_noise_mean": _nanmean(noise_of(h, "fn_agg_noise") for h in rounds),
            "agg_s_mean": statistics.fmean(h.get("agg_s", 0.0) for h in rounds),
            "to_target": None if reach is None else {
                **{k: reach[k] for k in ("fraction", "metric", "best", "best_mean", "target", "fastest",
                                         "fastest_rounds")},
                **reach["methods"][name]},
            "per_round": {
                "round": [h["round"] for h in summaries[0]["history"]],
                summaries[0]["metric"]: [statistics.fmean(s["history"][k]["metrics"].get(summaries[0]["metric"], float("nan"))
                                                          for s in summaries) for k in range(len(summaries[0]["history"]))],
                **{key: [_nanmean(noise_of(s["history"][k], key) for s in summaries)
                         for k in range(len(summaries[0]["history"]))] for key in NOISE_KEYS},
                "init_noise": [_nanmean(noise_of(s["history"][k], "fn_init_noise") for s in summaries)
                               for k in range(len(summaries[0]["history"]))],
                "agg_noise": [_nanmean(noise_of(s["history"][k], "fn_agg_noise") for s in summaries)
                              for k in range(len(summaries[0]["history"]))],
            },
        }
    return table


def markdown(table: dict[str, Any], cfg: RunConfig, command: str) -> str:
    metrics = list(next(iter(table.values()))["final"])
    reach = next(iter(table.values())).get("to_target")
    target = None if reach is None else reach["target"]
    head = ["method", *[f"{m} (mean ± std)" for m in metrics], "up MB", "down MB", *NOISE_LABELS.values(),
            "agg ms/round", "wall s",
            "rounds (s) to " + ("target" if target is None else format_number(target, 4)), "vs fastest"]
    lines = [f"# Comparison on `{cfg.task}` ({cfg.num_clients} clients, {cfg.clients_per_round} per round, "
             f"{cfg.rounds} rounds, R={cfg.rank}, budgets {cfg.ranks} at {':'.join(f'{s:g}' for s in cfg.rank_shares)}, "
             f"{cfg.partitioner} partitions)", "", f"Command: `{command}`", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in table.items():
        cells = [row["label"], *[format_mean_std(row["final"][m]["mean"], row["final"][m]["std"], 4) for m in metrics],
                 f"{row['bytes_up_total'] / 1e6:.2f}", f"{row['bytes_down_total'] / 1e6:.2f}",
                 *[f"{row.get(f'{key}_mean', float('nan')):.3g}" for key in NOISE_LABELS],
                 f"{1000 * row['agg_s_mean']:.1f}",
                 f"{row['wall_s']:.0f}",
                 "—" if target is None else format_reach(row["to_target"], seconds=True),
                 "—" if target is None else format_slower(row["to_target"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Seeds: {next(iter(table.values()))['seeds']}. Noise, summed over adapted layers, mean over rounds "
              "(docs/method.md, \"Measurements\"). Function-level: initialization = ||dW_global - dW_client_start||_F "
              "(mean over the round's clients); aggregation = ||sum_i w_i B_i A_i - B_new A_new||_F (the method's "
              "weights). Paper (parameter-level): initialization = sum_i (||A - A_i||_F + ||B - B_i||_F), zero-padded "
              "rank-wise (a sum over the round's clients); aggregation = ||dW* - B_new A_new||_F with the uniform "
              "dW* = (1/v) sum_i B_i A_i (Fed-PLoRA: per pair over the clients that trained it). "
              "Bytes: arrays actually sent, all rounds." + (" " + _target_note(table) if _target_note(table) else "")
              + (" One seed has no std (it needs two): the mean alone is shown."
                 if any(len(row["seeds"]) < 2 for row in table.values()) else "")]
    return "\n".join(lines) + "\n"


def _target_note(table: dict[str, Any]) -> str:
    """The sentence on time to target: what the target is, and how rounds, seconds and "vs fastest" are read."""
    reach = next(iter(table.values())).get("to_target")
    if reach is None:
        return ""
    share = f"{100 * reach['fraction']:g}%"
    best = reach["best"]
    if reach["target"] is None:
        return (f"No time to target: the best final {reach['metric']} is {format_number(reach['best_mean'], 4)} "
                f"({best}); {share} of it measures nothing.")
    return (f"Time to target: {share} of the best final {reach['metric']} ({best}, "
            f"{format_number(reach['best_mean'], 4)}), {format_number(reach['target'], 4)} (--target-fraction). "
            "Per seed, the first evaluated round that reaches it and the run's wall seconds to the end of that round "
            "(per-round wall_s summed over rounds 1..k; round 0, the evaluation before training, counts 0 s); "
            "mean ± std over the seeds that reach it, \"k of n seeds\" when some never do (not averaged). "
            "Vs fastest: mean rounds over the fastest method's, among the methods that reach it on every seed"
            + (" (the initial model, round 0, already reaches it: no ratio)." if reach["fastest_rounds"] == 0 else "."))


def plot(table: dict[str, Any], metric: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, row in table.items():
        ax.plot(row["per_round"]["round"], row["per_round"][metric], marker="o", label=name)
    ax.set(xlabel="round", ylabel=f"test {metric}", title=f"{metric} per round (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "comparison_metric.png", dpi=110)
    plt.close(fig)

    plot_noise(table, out / "comparison_noise.png")


def plot_noise(table: dict[str, Any], path: Path) -> None:
    """Both noise families per round, one panel each: function-level (top) and the paper's (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for key, ax in zip(NOISE_LABELS, axes.flat):
        for name, row in table.items():
            rs, vs = row["per_round"]["round"][1:], row["per_round"].get(key, [])[1:]
            ax.plot(rs[: len(vs)], [max(v, 1e-12) for v in vs], marker="o", label=name)
        ax.set(xlabel="round", ylabel=NOISE_LABELS[key], yscale="log",
               title=f"{NOISE_LABELS[key]} per round (0 shown at 1e-12)")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_compare(cfg: RunConfig, methods: list[str], seeds: list[int], out: Path, command: str = "",
                progress=None, target_fraction: float = TARGET_FRACTION) -> dict[str, Any]:
    from .federation.simulation import run_simulation

    if not methods:
        raise ConfigError("methods: give at least one, e.g. --methods fedplora,fedit,hetlora,flexlora,flora")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"methods: {methods} names a method twice")
    if not 0.0 < target_fraction <= 1.0:
        raise ConfigError(f"--target-fraction: must be a number in (0, 1] (the fraction of the best method's final "
                          f"mean that time to target measures), got {target_fraction!r}")
    plans = {name: [method_config(cfg, name, s, out / name / f"seed-{s}") for s in seeds] for name in methods}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in methods}
    for seed_index in range(len(seeds)):  # seed-major: a partial comparison still covers every method
        for name in methods:
            run_cfg = plans[name][seed_index]
            if progress is not None:
                progress.status(f"{name}, seed {run_cfg.seed}")
            runs[name].append(run_simulation(run_cfg, Path(run_cfg.out), progress))
    table = summarize(runs, target_fraction)
    metric = next(iter(runs.values()))[0]["metric"]
    reach = next(iter(table.values()))["to_target"]
    result = {"task": cfg.task, "metric": metric, "seeds": seeds, "command": command,
              "config": cfg.to_dict(), "target": {k: reach[k] for k in ("fraction", "best", "best_mean", "target",
                                                                         "fastest", "fastest_rounds")},
              "methods": table}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "comparison.json", result)
    (out / "comparison.md").write_text(markdown(table, cfg, command))
    plot(table, metric, out)
    return result
