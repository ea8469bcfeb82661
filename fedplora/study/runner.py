"""Running a study: every cell not done, each an ordinary ``run_simulation``, one after another or several at once.

The runner owns what happens while cells run: copying cells another study already ran, continuing a
cell from its checkpoint, recording a failed cell and going on with the rest, progress lines with the
time left, and stopping cleanly on Ctrl-C or SIGTERM (``Stop``) so the running cells' Flower processes
end and their checkpoints stay for the next invocation. With ``workers`` > 1 the cells run in processes of
their own, up to that many at once (``parallel``); this process alone records them in the state file.
``dry_run`` shows the same plan without running.
"""

from __future__ import annotations

import signal
import time
from typing import Any

from ..errors import FedploraError
from .cells import (cell_status, check_conflicts, expected_config, finished_summary, reusable_cells, reuse_cell,
                    read_state, select_cells, settings_key, write_state)
from .estimate import START_SECONDS, cell_steps, estimate, fmt_duration
from .spec import Study


class Stop(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt: no ``except Exception`` swallows it,
    and the running cell's ``finally`` stops its processes."""


def raise_stop(signum, frame) -> None:
    """The SIGTERM handler a running study installs: turns the signal into ``Stop``."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the cleanup
    raise Stop()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def error_line(e: BaseException) -> str:
    """A failed cell's one line: the error's first line, with its type unless it is a fedplora error (whose
    message is written to be read alone)."""
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return line if isinstance(e, FedploraError) else f"{type(e).__name__}: {line}"


def run_study(study: Study, *, only_cells: int | None = None, echo_rounds: bool = True,
              log=print, cells: list[str] | None = None, workers: int = 1) -> dict[str, Any]:
    """Run every cell that is not done (at most ``only_cells`` of them; only those ``cells`` matches, see
    select_cells), up to ``workers`` at once, then write the report.

    Returns ``{"ran": [...], "failed": [...], "left": n, "reused": [...]}`` (``reused``: cells copied from
    ``[study] reuse``). KeyboardInterrupt (Ctrl-C, or SIGTERM turned into
    ``Stop``) propagates after the running cells' Flower processes are stopped; the cells keep their checkpoints.
    With one worker the cells run in this process, with more each in a process of its own (``parallel``), and
    their folders are the same either way (wall times aside).
    """
    from ..federation.progress import Progress
    from ..federation.simulation import run_simulation

    check_conflicts(study)
    state = read_state(study.out)
    statuses = {c.rel: cell_status(c) for c in study.cells}
    chosen = select_cells(study, cells)
    todo = [c for c in chosen if statuses[c.rel] != "done"]
    n = len(study.cells)
    if workers > 1:  # a share no cell's clients fit in: one line before anything is copied or run
        from .parallel import check_shares, machine_shares

        check_shares(todo, machine_shares(workers), workers)
    offered = reusable_cells(study) if study.reuse else {}
    reused = []
    for cell in [c for c in todo if statuses[c.rel] == "todo"]:
        source = offered.get(settings_key(expected_config(cell)))
        if source is None:
            continue
        try:
            reuse_cell(cell, source)
        except OSError as e:  # the source went away, a full disk: the cell is simply run
            log(f"cell {cell.index}/{n} could not be copied from {source} ({e}); it runs instead")
            continue
        state["cells"][cell.rel] = {"status": "done", "reused_from": str(source), "when": _now()}
        write_state(study.out, state)
        reused.append(cell)
        log(f"cell {cell.index}/{n} reused ({cell.describe()}): the same settings already ran in {source}")
    todo = [c for c in todo if c not in reused]
    resumable = sum(statuses[c.rel] == "resume" for c in todo)
    done = sum(statuses[c.rel] == "done" for c in study.cells) + len(reused)
    budget = len(todo) if only_cells is None else min(only_cells, len(todo))
    workers = max(1, min(workers, budget or 1))
    log(f"study {study.name}: {n} cells, {done} done"
        + (f" ({len(reused)} copied from [study] reuse)" if reused else "") + f", {len(todo)} to run"
        + (f" of the {len(chosen)} --cells chooses" if cells else "")
        + (f" ({resumable} to continue from a checkpoint)" if resumable else "")
        + (f", {workers} at once" if workers > 1 else "") + f"; outputs in {study.out}/")
    finished = [(c, c.folder) for c in study.cells if statuses[c.rel] == "done" or c in reused]  # measured rates
    ran, failed = [], []

    def time_left(left: list) -> str:
        if not left:
            return ""
        seconds = estimate(left, finished)[0] / min(workers, len(left))
        return f", about {fmt_duration(seconds)}"

    def started(cell, resume: bool, where: str = "") -> None:
        log(f"cell {cell.index}/{n} {'continues' if resume else 'starts'} ({cell.describe()}) in {cell.folder}"
            + (f" [{where}]" if where else ""))

    def ended(cell, seconds: float, error: str | None, left: list, summary: dict | None = None) -> None:
        if error is not None:
            state["cells"][cell.rel] = {"status": "failed", "error": error, "seconds": round(seconds, 1),
                                        "when": _now()}
            write_state(study.out, state)
            failed.append(cell)
            log(f"cell {cell.index}/{n} FAILED ({cell.describe()}) after {fmt_duration(seconds)}: {error}; "
                f"{len(left)} left{time_left(left)}")
            return
        finished.append((cell, cell.folder))
        state["cells"][cell.rel] = {"status": "done", "seconds": round(seconds, 1), "when": _now()}
        write_state(study.out, state)
        ran.append(cell)
        summary = summary if summary is not None else finished_summary(cell)
        metric = cell.task.metric or (summary or {}).get("metric")
        value = (summary or {}).get("final", {}).get(metric)
        log(f"cell {cell.index}/{n} done ({cell.describe()}): {metric} "
            f"{value:.4f} in {fmt_duration(seconds)}; {len(left)} left{time_left(left)}"
            if isinstance(value, (int, float)) else
            f"cell {cell.index}/{n} done ({cell.describe()}) in {fmt_duration(seconds)}; {len(left)} left")

    chosen_now = todo[:budget]
    if workers > 1:
        from .parallel import LOGS, run_cells

        log(f"each running cell's own lines (its rounds) go to {study.out / LOGS}/<task>/<partition>/<method>/"
            "seed<k>.log")
        run_cells(study, chosen_now, {c.rel for c in chosen_now if statuses[c.rel] == "resume"}, workers,
                  on_start=started, on_end=ended)
    else:
        progress = Progress.console() if echo_rounds else None
        for k, cell in enumerate(chosen_now):
            resume = statuses[cell.rel] == "resume"
            started(cell, resume)
            t0 = time.monotonic()
            try:
                summary = run_simulation(cell.cfg, cell.folder, progress, resume=resume)
            except (KeyboardInterrupt, Stop):
                raise
            except Exception as e:  # noqa: BLE001 - a failed cell is recorded, the rest go on
                ended(cell, time.monotonic() - t0, error_line(e), todo[k + 1:])
                continue
            ended(cell, time.monotonic() - t0, None, todo[k + 1:], summary)
    left = len(todo) - len(ran)
    return {"ran": ran, "failed": failed, "left": left, "reused": reused}


def dry_run(study: Study, log=print, cells: list[str] | None = None, workers: int = 1) -> None:
    """The cells, their state and their cost in local training steps, and a time: per task, at the seconds a
    step its finished cells took (else STEP_SECONDS), plus START_SECONDS a cell, divided among ``workers`` (an
    ideal split: cells that share a machine also slow each other down). Cells ``cells`` leaves out (see
    select_cells) are listed as "left out" and not counted."""
    check_conflicts(study)
    chosen = select_cells(study, cells)
    offered = reusable_cells(study) if study.reuse else {}
    log(f"study {study.name}: {len(study.tasks)} tasks x {len(study.partitions)} partitions x {len(study.methods)} "
        f"methods x {len(study.seeds)} seeds = {len(study.cells)} cells; outputs in {study.out}/")
    todo, finished = [], []
    for c in study.cells:
        steps = cell_steps(c)
        status = cell_status(c)
        source = offered.get(settings_key(expected_config(c))) if status == "todo" else None
        if source is not None:
            status = "reuse"
            finished.append((c, source))
        elif status == "done":
            finished.append((c, c.folder))
        elif c not in chosen:
            status = "left out"
        else:
            todo.append(c)
        log(f"  {c.index:4d}  {status:8}  {c.rel}  ({c.cfg.method}, R={c.cfg.rank}, {c.cfg.rounds} rounds x "
            f"{c.cfg.clients_per_round} clients x {c.cfg.local_steps} steps = {steps} local steps)")
    seconds, rates = estimate(todo, finished)
    steps = sum(cell_steps(c) for c in todo)
    at_once = max(1, min(workers, len(todo)))
    log(f"to run: {len(todo)} cells, {steps} local steps: about {fmt_duration(seconds / at_once)}"
        + (f" ({at_once} at once)" if at_once > 1 else "")
        + (f"; {'; '.join(rates)}; plus {START_SECONDS} s of start-up a cell" if todo else ""))
