"""How long the cells left will take: the one estimate behind ``--dry-run`` and a running study's progress.

A study on 2 CPU cores runs for hours, so the time left is worth saying, and saying well: it is measured
from the study's own finished cells (their run's clock, per local step, per task) wherever there are
some, and only falls back to a constant for a task none of whose cells has finished.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .spec import Cell

# the --dry-run estimate for a task none of whose cells has finished: a simulated round's wall time per local
# step, evaluation every 3rd round included, for MiniLM at batch 16 on SST-2 sentences on 2 idle CPU cores
# (benchmarks/bench_round.py, docs/speed.md: 18.2 s for 10 clients x 6 steps); longer inputs cost more
STEP_SECONDS = 0.30
START_SECONDS = 20  # a cell's Flower start-up before its ServerApp's clock (SuperLink, Ray) on 2 busy CPU cores


def fmt_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def cell_steps(cell: Cell) -> int:
    return cell.cfg.rounds * cell.cfg.clients_per_round * cell.cfg.local_steps


def measured_step_seconds(finished: list[tuple[Cell, Path]]) -> dict[str, tuple[float, int, int]]:
    """Per task: (median run seconds per local step, cells, of which copies) over finished cells' summary.json
    ``wall_s`` (a cell and the folder that holds its run: its own, or the one ``[study] reuse`` copies). The
    run's own clock (its ServerApp's start-up included, Flower's before it not), so it holds for cells copied
    onto another machine of the same kind; the constant STEP_SECONDS was 1.5x too low for tweets at 128 tokens."""
    per: dict[str, list[tuple[float, bool]]] = {}
    for c, folder in finished:
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except (OSError, ValueError):
            continue
        wall = summary.get("wall_s") if isinstance(summary, dict) else None
        if isinstance(wall, (int, float)) and wall > 0:
            per.setdefault(c.task.name, []).append((wall / cell_steps(c), folder != c.folder))
    return {task: (statistics.median(r for r, _ in v), len(v), sum(copy for _, copy in v)) for task, v in per.items()}


def estimate(todo: list[Cell], finished: list[tuple[Cell, Path]]) -> tuple[float, list[str]]:
    """Seconds the cells in ``todo`` will take, and how the rates were found: each cell START_SECONDS plus its
    local steps at its task's measured seconds a step (measured_step_seconds over ``finished``), else at
    STEP_SECONDS. The one estimate behind both ``--dry-run`` and the progress lines of a running study."""
    measured = measured_step_seconds(finished)
    seconds = sum(START_SECONDS + cell_steps(c) * measured.get(c.task.name, (STEP_SECONDS, 0, 0))[0] for c in todo)
    rates, unmeasured = [], []
    for task in dict.fromkeys(c.task.name for c in todo):
        rate, n, copies = measured.get(task, (STEP_SECONDS, 0, 0))
        if n:
            rates.append(f"{task} at {rate:.2f} s a step (its {n} finished cell{'s' if n != 1 else ''}"
                         + (f", {copies} of them to be copied" if copies else "") + ")")
        else:
            unmeasured.append(task)
    if unmeasured:
        rates.append(f"{', '.join(unmeasured)} at {STEP_SECONDS:.2f} s a step (no finished cell yet: a simulated "
                     "MiniLM step at batch 16 on 2 CPU cores)")
    return seconds, rates
