"""The study's report, made from the cell folders alone: table.json, report.md and times.md.

The report must not depend on when or in how many sessions the cells ran: the same finished cells give
byte-identical table.json and report.md (numbers rounded to SIGNIFICANT digits, no times, no absolute
paths), so a stopped-and-continued study can be checked against an uninterrupted one and a published
table can be re-made and compared. Wall times differ between sessions; they go to times.md.
"""

from __future__ import annotations

import json
import math
import statistics
from typing import Any

from ..errors import ConfigError
from .cells import finished_summary, read_state
from .estimate import fmt_duration
from .spec import Study
from .summary import (format_mean_std, format_number, format_reach, format_slower, method_row, reading,
                      time_to_target)

SIGNIFICANT = 10  # digits kept of every number in table.json (see round_figures)


def round_figures(value: Any) -> Any:
    """Every float to SIGNIFICANT significant digits, recursively.

    A run continued from a checkpoint can differ from an uninterrupted one in the last bit of a noise
    measure (seen: agg_noise 0.2936071215232374 vs ...375 in the round after the resume, the model and its
    metrics equal), so full float64 digits would make a stopped-and-continued study's table differ from an
    uninterrupted one's in digits that mean nothing. 10 digits keep every figure far beyond what it measures.
    """
    if isinstance(value, float):
        return float(f"{value:.{SIGNIFICANT}g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: round_figures(v) for k, v in value.items()}
    if isinstance(value, list):
        return [round_figures(v) for v in value]
    return value


def _collect(study: Study, summaries: dict[str, dict[str, Any] | None]
             ) -> list[tuple[Any, Any, str | None, dict[str, list[dict[str, Any]]]]]:
    """Per task x partition: the table's metric and each method's finished runs (summary.json dicts), in the
    study file's order; one line naming the task where its metric is not in the runs' results."""
    out = []
    for task in study.tasks:
        for part in study.partitions:
            metric, runs = task.metric, {}
            for method in study.methods:
                got = [summaries[c.rel] for c in study.cells
                       if (c.task, c.partition, c.method) == (task, part, method) and summaries[c.rel] is not None]
                metric = metric or (got[0]["metric"] if got else None)
                missing = [s["seed"] for s in got if metric not in s["final"]]
                if missing:
                    raise ConfigError(f"{study.path}: [[task]] {task.name!r}: metric {metric!r} is not in the runs' "
                                      f"results (they have {', '.join(sorted(got[0]['final']))})")
                runs[method.name] = got
            out.append((task, part, metric, runs))
    return out


def _reach(study: Study, metric: str | None, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any] | None:
    """The table's time to target (summary.time_to_target, in the table's scale); None for a table with no runs."""
    if metric is None or not any(runs.values()):
        return None
    return time_to_target(runs, metric, study.target_fraction, 100.0 if study.percent else 1.0)


def build_table(study: Study) -> dict[str, Any]:
    """table.json: per task x partition, one row per method (mean ± std over the finished seeds). Deterministic:
    only the cells' results and the study file go in (no times, no absolute paths), numbers rounded to
    SIGNIFICANT digits. Time to target is there in rounds; its wall seconds differ between sessions and go to
    times.md."""
    summaries = {c.rel: finished_summary(c) for c in study.cells}
    scale = 100.0 if study.percent else 1.0
    tables = []
    for task, part, metric, runs in _collect(study, summaries):
        rows = []
        reach = _reach(study, metric, runs)
        for method in study.methods:
            got = runs[method.name]
            if not got:
                rows.append({"method": method.name, "label": method.label, "n": 0, "seeds": [],
                             "paper": study.paper.get(task.name, {}).get(part.name, {}).get(method.name)})
                continue
            row = method_row(method, metric, got, scale)
            row["paper"] = study.paper.get(task.name, {}).get(part.name, {}).get(method.name)
            m = reach["methods"][method.name]
            row["to_target"] = {"reached": m["reached"], "n": m["n"], "rounds": m["rounds"],
                                "per_seed": [p["round"] for p in m["per_seed"]], "slower": m["slower"]}
            rows.append(row)
        t = {"task": task.name, "task_label": task.label, "partition": part.name, "partition_label": part.label,
             "metric": metric, "rows": rows, "reading": reading(rows)}
        if reach is not None:
            t["target"] = {k: reach[k]
                           for k in ("fraction", "best", "best_mean", "target", "fastest", "fastest_rounds")}
        tables.append(t)
    done = sum(s is not None for s in summaries.values())
    return round_figures({"study": study.name, "units": "percent" if study.percent else "as measured",
                          "seeds": study.seeds, "target_fraction": study.target_fraction,
                          "cells": {"total": len(study.cells), "done": done,
                                    "missing": [c.rel for c in study.cells if summaries[c.rel] is None]},
                          "tables": tables})


def _ours(row: dict[str, Any], digits: int) -> str:
    return format_mean_std(row["mean"], row["std"], digits) if row["n"] else "—"


def _table_lines(head: list[str]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def markdown_report(study: Study, table: dict[str, Any]) -> str:
    digits = 2 if study.percent else 4
    units = " (×100)" if study.percent else ""
    lines = [f"# Study `{study.name}`", ""]
    if study.description:
        lines += [study.description.strip(), ""]
    cells = table["cells"]
    lines += [f"Study file: `{study.path.name}`. Seeds: {', '.join(map(str, study.seeds))}. "
              f"Cells: {cells['done']} of {cells['total']} done"
              + (" (this report is partial: the missing cells are listed at the end)." if cells["missing"] else "."),
              "", "Each entry is our mean ± sample std over the finished seeds, with the number of seeds in brackets"
              + ("; the paper's figure follows in [square brackets] where the study file gives it." if study.paper
                 else "."), ""]
    # the paper-style table: one row per (partition, method), one column per task
    lines += ["## Summary", ""]
    lines += _table_lines(["method", "partition", *[f"{t.label} {metric_of(table, t.name)}{units}"
                                                     for t in study.tasks]])
    for part in study.partitions:
        for method in study.methods:
            row = [method.label, part.label]
            for task in study.tasks:
                r = find_row(table, task.name, part.name, method.name)
                text = f"{_ours(r, digits)} ({r['n']})" if r["n"] else "—"
                if r.get("paper") is not None:
                    text += f" [{format_number(r['paper'], digits)}]"
                row.append(text)
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if study.paper_note:
        lines += [f"Paper figures: {study.paper_note.strip()}", ""]
    lines += _reading_markdown(study, table, digits)
    if len(study.partitions) > 1:  # each method across the settings it was run in, e.g. attacks or privacy levels
        lines += _by_partition_markdown(study, table, digits, units)
    for t in table["tables"]:
        if any(r["n"] for r in t["rows"]):
            lines += _cell_table_markdown(t, digits, units)
    lines += ["Noise columns: each run's per-round noise (every `*noise` entry of its history: see docs/method.md for "
              "each definition), averaged over rounds 1..T, then over seeds. Traffic: arrays actually sent, all "
              "rounds, mean over seeds. Rounds to target: per seed, the first evaluated round whose figure reaches "
              f"the table's target ({100 * study.target_fraction:g}% of its best final figure, `[study] "
              "target_fraction`); mean ± std over the seeds that reach it, \"k of n seeds\" when some never do "
              "(those are not averaged). Vs fastest: that mean over the fastest method's, among the methods that "
              "reach the target on every seed. Wall times, and the seconds to each target, are in times.md (they "
              "differ between sessions; this report does not).", ""]
    if cells["missing"]:
        lines += ["## Cells not done", "", *[f"- `{rel}`" for rel in cells["missing"]], ""]
    return "\n".join(lines)


def _by_partition_markdown(study: Study, table: dict[str, Any], digits: int, units: str) -> list[str]:
    lines = []
    for task in study.tasks:
        if not any(r["n"] for t in table["tables"] if t["task"] == task.name for r in t["rows"]):
            continue
        lines += [f"## {task.label}: {metric_of(table, task.name)}{units} per partition", ""]
        lines += _table_lines(["method", *[p.label for p in study.partitions]])
        for method in study.methods:
            row = [method.label]
            for part in study.partitions:
                r = find_row(table, task.name, part.name, method.name)
                row.append(_ours(r, digits) + (f" ({r['n']})" if r["n"] > 1 else ""))
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", f"![final {metric_of(table, task.name)} per partition](plots/{task.name}-by-partition.png)", ""]
    return lines


def _target_header(t: dict[str, Any], digits: int) -> str:
    target = (t.get("target") or {}).get("target")
    return "rounds to target" if target is None else f"rounds to {format_number(target, digits)}"


def _target_sentence(t: dict[str, Any], digits: int, units: str) -> str:
    """What a table's target is, in one sentence under it."""
    tg = t.get("target")
    if tg is None:
        return ""
    label = next((r["label"] for r in t["rows"] if r["method"] == tg["best"]), tg["best"])
    share = f"{100 * tg['fraction']:g}%"
    if tg["target"] is None:
        return (f"No target: the best final {t['metric']}{units} is {format_number(tg['best_mean'], digits)} "
                f"({label}); {share} of it measures nothing.")
    fastest = [r["label"] for r in t["rows"] if (r.get("to_target") or {}).get("slower") == 1.0]
    return (f"Target: {share} of the best final {t['metric']}{units} ({label}, "
            f"{format_number(tg['best_mean'], digits)}), {format_number(tg['target'], digits)}. "
            + ("No method reaches it on every seed." if tg["fastest"] is None else
               "The initial model (round 0) already reaches it: no ratio." if tg["fastest_rounds"] == 0 else
               f"Fastest to it on every seed (1.00× of \"vs fastest\"): {', '.join(fastest)}."))


def _cell_table_markdown(t: dict[str, Any], digits: int, units: str) -> list[str]:
    """One task x partition in full: each method's figure, seeds, paper figure, time to target, traffic, noise."""
    noise = sorted({k for r in t["rows"] if r["n"] for k in r["noise"]})
    # seeds whose final model predicts one class (MCC 0): "0 of 3" is the evidence a method left the majority
    one_class = any(r["n"] and r.get("one_class") is not None for r in t["rows"])
    lines = [f"## {t['task_label']}, {t['partition_label']}", ""]
    head = ["method", f"{t['metric']}{units}", "seeds", "paper", _target_header(t, digits), "vs fastest",
            "up MB", "down MB", *(["one-class seeds"] if one_class else []), *noise]
    lines += _table_lines(head)
    for r in t["rows"]:
        if not r["n"]:
            empty = [r["label"], "—", "0", format_number(r["paper"], digits)] + ["—"] * (len(head) - 4)
            lines.append("| " + " | ".join(empty) + " |")
            continue
        reach = r.get("to_target")
        lines.append("| " + " | ".join([
            r["label"], _ours(r, digits), ",".join(map(str, r["seeds"])), format_number(r["paper"], digits),
            format_reach(reach) if reach and t["target"]["target"] is not None else "—",
            format_slower(reach) if reach else "—",
            format_number(r["up_mb"]), format_number(r["down_mb"]),
            *([f"{r['one_class']} of {r['n']}" if r.get("one_class") is not None else "—"] if one_class else []),
            *[f"{r['noise'][k]:.3g}" if k in r["noise"] else "—" for k in noise]]) + " |")
    stem = f"{t['task']}-{t['partition']}"
    sentence = _target_sentence(t, digits, units)
    return lines + [""] + ([sentence, ""] if sentence else []) + [
        f"![{t['metric']} per round](plots/{stem}-metric.png) "
        f"![noise per round](plots/{stem}-noise.png) ![traffic](plots/{stem}-traffic.png)", ""]


def _reading_markdown(study: Study, table: dict[str, Any], digits: int) -> list[str]:
    tables = [t for t in table["tables"] if len(t["reading"]["ours"]) > 1]
    if not tables:
        return []
    lines = ["## Reading", "",
             "Per task and partition, best first: the best method's figure, then each other method's gap to it. "
             "A gap marked * exceeds the larger of the two methods' std over seeds (both with 2+ seeds); an "
             "unmarked gap is within the seeds' spread or has too few seeds to tell. ° marks a method whose final "
             "model predicts one class on every seed (MCC exactly 0): its figure is that class's share, nothing "
             "learned. Start: round 0, before training."
             + (" The paper's order follows, the same way." if study.paper else ""), ""]
    lines += _table_lines(["task", "partition", "start", "ours, best first"]
                          + (["paper, best first"] if study.paper else []))

    def order(entries, value, mark=lambda e: ""):
        if not entries:
            return "—"
        first = entries[0]
        return " · ".join([f"{first['label']} {format_number(first[value], digits)}{mark(first)}"]
                          + [f"{e['label']} −{format_number(e['gap'], digits)}{mark(e)}" for e in entries[1:]])
    for t in tables:
        rd = t["reading"]
        starts = [r["start"] for r in t["rows"] if r["n"] and r.get("start") is not None]
        start = format_number(statistics.fmean(starts), digits) if starts else "—"
        means = [e["mean"] for e in rd["ours"]]
        span = format_number(min(means), digits) + ("" if min(means) == max(means)
                                                    else f" to {format_number(max(means), digits)}")
        if rd.get("all_one_class"):
            ours = f"every method predicts one class ({span}): no ranking"
        elif rd["all_equal"] is not None:
            ours = f"every method {span}: no ranking"
        else:
            ours = order(rd["ours"], "mean",
                         lambda e: ("*" if e["beyond"] else "") + ("°" if e.get("one_class") else ""))
        row = [t["task_label"], t["partition_label"], start, ours]
        if study.paper:
            row.append(order(rd["paper"], "value"))
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def metric_of(table: dict[str, Any], task: str) -> str:
    return next((t["metric"] for t in table["tables"] if t["task"] == task and t["metric"]), "")


def find_row(table: dict[str, Any], task: str, part: str, method: str) -> dict[str, Any]:
    t = next(t for t in table["tables"] if t["task"] == task and t["partition"] == part)
    return next(r for r in t["rows"] if r["method"] == method)


def times_markdown(study: Study) -> str:
    """Wall times per cell, from the cells' summaries: outside report.md because they differ between sessions."""
    state = read_state(study.out)["cells"]
    lines = [f"# Wall times of study `{study.name}`", "",
             "Run time: the run's own clock (summary.json wall_s). With start-up: the study's clock around the cell "
             "in its last session (study-state.json; Flower and Ray start-up included, a resumed cell's earlier "
             "sessions not).", "", "| cell | run time s | with start-up s |", "|---|---|---|"]
    total = total_cell = 0.0
    for c in study.cells:
        s = finished_summary(c)
        if s is not None:
            total += s.get("wall_s", 0.0)
            seconds = state.get(c.rel, {}).get("seconds")
            total_cell += seconds or 0.0
            with_start = "—" if seconds is None else f"{seconds:.0f}"
            lines.append(f"| `{c.rel}` | {s.get('wall_s', 0.0):.0f} | {with_start} |")
    lines += ["", f"Total: {fmt_duration(total)} of run time, {fmt_duration(total_cell)} with start-up.", ""]
    return "\n".join(lines + _seconds_to_target_markdown(study))


def _seconds_to_target_markdown(study: Study) -> list[str]:
    """times.md's time to target: report.md's rounds with the wall seconds beside them (which differ between
    sessions, so they are here and not in report.md)."""
    digits = 2 if study.percent else 4
    units = " (×100)" if study.percent else ""
    summaries = {c.rel: finished_summary(c) for c in study.cells}
    labels = {m.name: m.label for m in study.methods}
    lines = ["## Time to target", "",
             f"Per task and partition, the round and the wall seconds at which each method's seeds first reach "
             f"{100 * study.target_fraction:g}% of the best final figure (`[study] target_fraction`): mean ± std over "
             "the seeds that reach it, \"k of n seeds\" when some never do. Seconds: the run's own clock from the "
             "start of training to the end of that round (the history's per-round wall_s summed over rounds 1..k; "
             "round 0, the evaluation before training, counts 0 s). Vs fastest: mean rounds over the fastest "
             "method's, among those that reach the target on every seed.", ""]
    for task, part, metric, runs in _collect(study, summaries):
        reach = _reach(study, metric, runs)
        if reach is None:
            continue
        t = {"metric": metric, "target": reach,
             "rows": [{"method": name, "label": labels[name], "to_target": reach["methods"][name]} for name in runs]}
        lines += [f"### {task.label}, {part.label}", "", _target_sentence(t, digits, units), ""]
        if reach["target"] is None:
            continue
        lines += _table_lines(["method", f"rounds (s) to {format_number(reach['target'], digits)}", "vs fastest",
                               "per seed: round (s)"])
        for name, m in reach["methods"].items():
            if not m["n"]:
                continue
            seeds = ", ".join(f"{p['seed']}: " + ("not reached" if p["round"] is None else
                                                   f"{p['round']} ({format_number(p['seconds'], 0)} s)")
                              for p in m["per_seed"])
            lines.append(f"| {labels[name]} | {format_reach(m, seconds=True)} | {format_slower(m)} | {seeds} |")
        lines.append("")
    return lines if len(lines) > 4 else []


def write_report(study: Study, plots: bool = True) -> dict[str, Any]:
    """table.json, report.md, times.md and the plots, from the cell folders alone."""
    table = build_table(study)
    study.out.mkdir(parents=True, exist_ok=True)
    (study.out / "table.json").write_text(json.dumps(table, indent=2) + "\n")
    (study.out / "report.md").write_text(markdown_report(study, table))
    (study.out / "times.md").write_text(times_markdown(study))
    if plots:
        from .plots import plot_table

        plot_table(table, study.out / "plots")
    return table
