"""The one summariser over seeds, for ``fedplora study`` and ``fedplora compare`` alike.

A method run at several seeds is summarised by the mean and the sample standard deviation of its
results. Both commands used to compute that on their own and disagreed on one seed (compare wrote a std
of 0.0, the study none); here it is defined once. The std of a single seed is ``None``: it is undefined,
not zero, and a table shows the mean alone (``format_mean_std``) rather than a spread nobody measured.

``over_seeds`` is what both commands take from a method's runs (final metrics, traffic); ``method_row``
is the study's row of a task x partition table built on it, and ``reading`` ranks such rows.
``time_to_target`` is both commands' time to accuracy: per method, the round (and the wall seconds) at
which each seed first reaches a fraction of the best method's final figure.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .spec import Entry

# the pre-"fn_" names of the function-level noise, kept in histories as aliases: reported once, under fn_*
NOISE_ALIASES = {"init_noise": "fn_init_noise", "agg_noise": "fn_agg_noise"}
# the time-to-target fraction of the best final figure: [study] target_fraction and compare's --target-fraction
TARGET_FRACTION = 0.95


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std over seeds; the std of one seed is None (undefined), never 0.0."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def spread(values: list[float]) -> dict[str, float | None]:
    """``mean_std`` as the ``{"mean": ..., "std": ...}`` that table.json and comparison.json hold."""
    return dict(zip(("mean", "std"), mean_std(values)))


def format_number(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_mean_std(mean: float | None, std: float | None, digits: int) -> str:
    """``mean ± std``, or the mean alone where the std is undefined (one seed)."""
    return format_number(mean, digits) + (f" ± {format_number(std, digits)}" if std is not None else "")


def over_seeds(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's runs (summary.json dicts, one a seed) summarised over the seeds: the seeds, each final
    metric every run has (``spread``: mean and std, in sorted order), and the mean traffic of a run."""
    metrics = sorted({m for s in summaries for m in s["final"]})
    return {"seeds": [s["seed"] for s in summaries],
            "final": {m: spread([s["final"][m] for s in summaries])
                      for m in metrics if all(m in s["final"] for s in summaries)},
            "bytes_up_total": statistics.fmean(s["bytes_up_total"] for s in summaries),
            "bytes_down_total": statistics.fmean(s["bytes_down_total"] for s in summaries)}


def noise_keys(history: list[dict[str, Any]]) -> list[str]:
    """The history's numeric ``*noise`` entries, an old alias left out where its fn_ name is there too."""
    keys = {k for h in history for k, v in h.items()
            if k.endswith("noise") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return sorted(k for k in keys if NOISE_ALIASES.get(k) not in keys)


def method_row(method: Entry, metric: str, summaries: list[dict[str, Any]], scale: float) -> dict[str, Any]:
    """One method's row of a (task, partition) table: the seeds' final metric, traffic, noise, per-round curves.

    ``method`` is the study's Entry (its name and label); ``scale`` multiplies the headline metric (100 for
    percent), before the mean so that a figure and its seeds' values agree digit for digit."""
    values = [s["final"][metric] * scale for s in summaries]
    mean, std = mean_std(values)
    seeds = over_seeds(summaries)
    noise = noise_keys([h for s in summaries for h in s["history"]])
    rounds = sorted({h["round"] for s in summaries for h in s["history"]})
    by_round = [{h["round"]: h for h in s["history"]} for s in summaries]

    def curve(get) -> list[float | None]:
        out = []
        for r in rounds:
            vals = [get(b[r]) for b in by_round if r in b]
            vals = [v for v in vals if isinstance(v, (int, float))]
            out.append(statistics.fmean(vals) if len(vals) == len(summaries) else None)
        return out

    def measured(h: dict[str, Any], k: str) -> bool:
        return h["round"] > 0 and h.get(k) is not None

    return {
        "method": method.name, "label": method.label, "seeds": seeds["seeds"],
        "n": len(summaries), "mean": mean, "std": std, "values": values,
        # seeds whose final model predicts a single class: MCC is exactly 0 then (tasks/metrics.py), and in
        # practice only then; such a figure is the class share of the split, not something learned
        "one_class": (sum(s["final"]["mcc"] == 0.0 for s in summaries)
                      if all("mcc" in s["final"] for s in summaries) else None),
        # round 0, before any training: what "learned nothing" looks like (e.g. the majority class)
        "start": (statistics.fmean(s["initial"][metric] * scale for s in summaries)
                  if all(metric in s.get("initial", {}) for s in summaries) else None),
        "other_metrics": {m: v for m, v in seeds["final"].items() if m != metric},
        "up_mb": seeds["bytes_up_total"] / 1e6,
        "down_mb": seeds["bytes_down_total"] / 1e6,
        # a figure is None where it could not be measured (secure aggregation: the history's noise_unavailable)
        "noise": {k: statistics.fmean(statistics.fmean(h[k] for h in s["history"] if measured(h, k))
                                      for s in summaries if any(measured(h, k) for h in s["history"]))
                  for k in noise if any(measured(h, k) for s in summaries for h in s["history"])},
        "per_round": {"round": rounds,
                      metric: curve(lambda h: h.get("metrics", {}).get(metric) * scale
                                    if isinstance(h.get("metrics", {}).get(metric), (int, float)) else None),
                      **{k: curve(lambda h, k=k: h.get(k)) for k in noise},
                      "up_mb": curve(lambda h: h.get("bytes_up", 0) / 1e6),
                      "down_mb": curve(lambda h: h.get("bytes_down", 0) / 1e6)},
    }


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def first_reach(history: list[dict[str, Any]], metric: str, target: float,
                scale: float = 1.0) -> tuple[int, float | None] | None:
    """The first evaluated round whose ``metric`` (times ``scale``) reaches ``target``, and the wall seconds
    from the start of training to the end of that round; None when no round reaches it.

    The seconds are the sum of the history's per-round ``wall_s`` over rounds 1..k (each round's training,
    aggregation and evaluation, its own clock, so a resumed run's restart is not counted). Round 0, the
    evaluation before any training, counts 0 s: a model that starts at the target reaches it at round 0 in
    0 s. The seconds are None where a round up to k has no ``wall_s`` (a history that never recorded it).
    """
    seconds: float | None = 0.0
    for h in sorted(history, key=lambda h: h["round"]):
        if h["round"] > 0:
            wall = h.get("wall_s")
            seconds = seconds + wall if seconds is not None and _number(wall) else None
        value = (h.get("metrics") or {}).get(metric)
        if _number(value) and value * scale >= target:
            return h["round"], seconds
    return None


def time_to_target(runs: dict[str, list[dict[str, Any]]], metric: str, fraction: float = TARGET_FRACTION,
                   scale: float = 1.0) -> dict[str, Any]:
    """Time to accuracy of several methods' runs (summary.json dicts, one a seed) on one task and partition.

    The target is ``fraction`` of the best method's final mean (``mean_std`` of its seeds' final ``metric``
    times ``scale``: the table's own figure), so a seed of the best method reaches it; none where the best mean is
    not positive (e.g. every method at MCC 0: "learned nothing" has no fraction). Per method: each seed's
    ``first_reach``; over the seeds that reach it, ``spread`` of the round and of the seconds (one seed: no
    std); a seed that never reaches it is counted in ``n`` but not in ``reached`` and not averaged. ``slower``:
    the method's mean round over the fastest method's, among methods whose every seed reaches the target
    (a mean over the lucky seeds alone would flatter a method); None for the others, or if the fastest
    reaches it at round 0.
    """
    finals = {name: mean_std([s["final"][metric] * scale for s in runs[name]])[0] for name in runs
              if runs[name] and all(_number(s["final"].get(metric)) for s in runs[name])}
    best = max(finals, key=lambda name: finals[name]) if finals else None  # the first listed on a tie
    target = fraction * finals[best] if best is not None and finals[best] > 0 else None
    methods: dict[str, dict[str, Any]] = {}
    for name, summaries in runs.items():
        hits = [first_reach(s["history"], metric, target, scale) if target is not None else None for s in summaries]
        reached = [h for h in hits if h is not None]
        seconds = [h[1] for h in reached]
        methods[name] = {
            "n": len(summaries), "reached": len(reached),
            "rounds": spread([float(h[0]) for h in reached]) if reached else None,
            "seconds": spread(seconds) if reached and None not in seconds else None,
            "per_seed": [{"seed": s["seed"], "round": h[0] if h else None, "seconds": h[1] if h else None}
                         for s, h in zip(summaries, hits)],
        }
    everywhere = {name: m["rounds"]["mean"] for name, m in methods.items() if m["n"] and m["reached"] == m["n"]}
    fastest = min(everywhere, key=lambda name: everywhere[name]) if everywhere else None
    for name, m in methods.items():
        m["slower"] = (everywhere[name] / everywhere[fastest]
                       if name in everywhere and everywhere[fastest] > 0 else None)
    return {"fraction": fraction, "metric": metric, "best": best, "best_mean": finals.get(best), "target": target,
            "fastest": fastest, "fastest_rounds": everywhere.get(fastest), "methods": methods}


def format_reach(m: dict[str, Any], seconds: bool = False) -> str:
    """One method's time to target as a table shows it: mean ± std rounds over the seeds that reach it (with
    the seconds in brackets where asked), "k of n" when some seed does not, "not reached" when none does."""
    if not m["reached"]:
        return "not reached" + (f" ({m['n']} seeds)" if m["n"] > 1 else "")
    text = format_mean_std(m["rounds"]["mean"], m["rounds"]["std"], 1)
    if seconds:
        s = m.get("seconds")
        text += f" ({format_mean_std(s['mean'], s['std'], 0)} s)" if s else " (— s)"
    return text + (f", {m['reached']} of {m['n']} seeds" if m["reached"] < m["n"] else "")


def format_slower(m: dict[str, Any]) -> str:
    return "—" if m.get("slower") is None else f"{m['slower']:.2f}×"


def reading(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Who wins one task x partition, by how much, and whether that is more than the seeds' own spread.

    A gap counts as beyond the seed deviation only when it exceeds the larger of the two methods' sample std
    over seeds (both need 2+ seeds): a deliberately plain rule a reader can check by eye in the table, and
    a conservative one with 3 seeds. The paper's order is given the same way (its gaps, no deviation), so
    our ranking and its ranking sit side by side.
    """
    ours = sorted((r for r in rows if r["n"]), key=lambda r: -r["mean"])
    out: dict[str, Any] = {"ours": [], "paper": [], "all_equal": None, "all_one_class": False}
    if ours:
        best = ours[0]
        for r in ours:
            devs = [x["std"] for x in (best, r) if x["std"] is not None]
            dev = max(devs) if len(devs) == 2 else None
            gap = best["mean"] - r["mean"]
            out["ours"].append({"method": r["method"], "label": r["label"], "mean": r["mean"], "gap": gap,
                                "deviation": dev, "beyond": None if dev is None or r is best else gap > dev,
                                "one_class": r.get("one_class") == r["n"]})
        if len(ours) > 1 and ours[0]["mean"] == ours[-1]["mean"]:
            out["all_equal"] = ours[0]["mean"]
        out["all_one_class"] = len(ours) > 1 and all(e["one_class"] for e in out["ours"])
    paper = sorted((r for r in rows if r.get("paper") is not None), key=lambda r: -r["paper"])
    out["paper"] = [{"method": r["method"], "label": r["label"], "value": r["paper"],
                     "gap": paper[0]["paper"] - r["paper"]} for r in paper]
    return out
