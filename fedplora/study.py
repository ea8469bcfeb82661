"""``fedplora study FILE.toml``: a grid of tasks x methods x partitions x seeds, resumable, with one report.

Every cell of the grid is an ordinary run folder (``fedplora run`` writes the same files):
``<out>/cells/<task>/<partition>/<method>/seed<k>/``. The study's state lives in those folders:

* a cell with ``summary.json`` whose ``config.toml`` equals the cell's settings is done and skipped;
* a cell with a checkpoint but no summary is continued from it (``run_simulation(..., resume=True)``);
* a cell whose saved settings differ from what the study file now says stops the study before anything
  runs, with one line naming the cell and the setting (results made with other settings are never mixed);
* a cell that is not started, and whose settings (less MAY_DIFFER) a finished cell of another study listed in
  ``[study] reuse`` already ran, is copied from there instead of being run again (same settings, same
  numbers on the same code and kind of machine), so studies that share cells pay for them once;
* a cell that fails is recorded in ``<out>/study-state.json`` with its error line, the others go on, and
  the next invocation tries it again.

So a study can be stopped (Ctrl-C, SIGTERM, a closed laptop) and continued later, or on another machine
with the same paths, by running the same command. The report (``report.md``, ``table.json``, plots) is
made from the cell folders alone, deterministically: the same cells give byte-identical table.json and
report.md, whatever order or session they ran in; wall times go to ``times.md``. The file format is in
docs/study.md.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import json
import math
import re
import signal
import statistics
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import BY_NAME, RunConfig
from .errors import ConfigError, FedploraError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
STUDY_KEYS = {"name": str, "out": str, "seeds": list, "percent": bool, "description": str, "reuse": list}
TOP_KEYS = ("study", "base", "task", "method", "partition", "override", "paper")
ENTRY_META = {"task": ("name", "label", "metric"), "method": ("name", "label"), "partition": ("name", "label")}
STUDY_SETS = ("seed", "out")  # set by the study for each cell, never by an entry
# settings that may differ between a cell's saved config.toml and the study file: where the cell lies,
# machine-resolved resources and patience; none of them changes a run's numbers
MAY_DIFFER = ("out", "cache_dir", "client_gpus", "round_timeout", "connect_timeout")
# the --dry-run estimate for a task none of whose cells has finished: a simulated round's wall time per local
# step, evaluation every 3rd round included, for MiniLM at batch 16 on SST-2 sentences on 2 idle CPU cores
# (benchmarks/bench_round.py, docs/speed.md: 18.2 s for 10 clients x 6 steps); longer inputs cost more
STEP_SECONDS = 0.30
START_SECONDS = 20  # a cell's Flower start-up before its ServerApp's clock (SuperLink, Ray) on 2 busy CPU cores
STATE_FILE = "study-state.json"


# ------------------------------------------------------------------ the study file
@dataclass(frozen=True)
class Entry:
    kind: str  # task, method or partition
    name: str  # folder-safe id, used in paths and [paper] keys
    label: str  # what tables show
    settings: dict[str, Any]
    metric: str | None = None  # task only: the metric to report (default: the task's headline metric)


@dataclass(frozen=True)
class Cell:
    index: int  # 1-based, in run order
    task: Entry
    partition: Entry
    method: Entry
    seed: int
    folder: Path
    cfg: RunConfig

    @property
    def rel(self) -> str:
        return f"cells/{self.task.name}/{self.partition.name}/{self.method.name}/seed{self.seed}"

    def describe(self) -> str:
        return f"{self.task.label}, {self.partition.label}, {self.method.label}, seed {self.seed}"


@dataclass
class Study:
    path: Path
    name: str
    out: Path
    seeds: list[int]
    percent: bool
    description: str
    base: dict[str, Any]
    tasks: list[Entry]
    methods: list[Entry]
    partitions: list[Entry]
    overrides: list[dict[str, Any]]
    paper: dict[str, dict[str, dict[str, float]]]
    paper_note: str
    reuse: list[Path] = field(default_factory=list)  # other studies' out folders whose finished cells may be copied
    cells: list[Cell] = field(default_factory=list)


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_settings(where: str, data: dict[str, Any]) -> dict[str, Any]:
    """An entry's RunConfig settings, each checked on its own; the error names the entry and the key."""
    out = {}
    for raw, value in data.items():
        key = raw.replace("-", "_")
        if key in STUDY_SETS:
            raise ConfigError(f"{where}: {key!r} is set by the study for every cell ([study] seeds, [study] out); "
                              "remove it here")
        if key not in BY_NAME:
            raise ConfigError(f"{where}: unknown key {raw!r}{_suggest(key, sorted(BY_NAME))}; an entry takes "
                              "fedplora settings (docs/study.md)")
        value = BY_NAME[key].coerce(value)
        problem = BY_NAME[key].problem(value)
        if problem:
            raise ConfigError(f"{where}: {key}: {problem}")
        out[key] = value
    return out


def _entries(kind: str, raw: Any, source: str) -> list[Entry]:
    if raw is None:
        raise ConfigError(f"{source}: needs at least one [[{kind}]] entry")
    if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
        raise ConfigError(f"{source}: {kind} must be a list of tables, written [[{kind}]]")
    entries, seen = [], set()
    for i, data in enumerate(raw, 1):
        name = data.get("name")
        where = f"{source}: [[{kind}]] #{i}" + (f" {name!r}" if isinstance(name, str) else "")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ConfigError(f"{where}: needs name = \"...\" (letters, digits, '.', '_', '-'; it names the cell "
                              f"folders), got {name!r}")
        if name in seen:
            raise ConfigError(f"{where}: the name {name!r} is used twice")
        seen.add(name)
        meta = ENTRY_META[kind]
        for key in meta[1:]:
            if key in data and not isinstance(data[key], str):
                raise ConfigError(f"{where}: {key} must be a string, got {data[key]!r}")
        settings = _check_settings(where, {k: v for k, v in data.items() if k not in meta})
        entries.append(Entry(kind, name, data.get("label", name), settings, data.get("metric")))
    return entries


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"study: no such file {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"study: {path} is not valid TOML ({e})") from None


def load_study(path: str | Path, out: str | Path | None = None) -> Study:
    """Read and check the whole study file, and build every cell's validated RunConfig.

    Nothing runs before this has passed: every problem is one ``ConfigError`` line naming the entry and key.
    """
    path = Path(path)
    data = _read_toml(path)
    src = str(path)
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{src}: unknown table(s) {unknown}{_suggest(unknown[0], list(TOP_KEYS))}; a study file "
                          f"has {', '.join(f'[{k}]' for k in TOP_KEYS)}")
    head = data.get("study", {})
    if not isinstance(head, dict):
        raise ConfigError(f"{src}: [study] must be a table")
    for key, value in head.items():
        if key not in STUDY_KEYS:
            raise ConfigError(f"{src}: [study]: unknown key {key!r}{_suggest(key, list(STUDY_KEYS))}; "
                              f"known: {', '.join(STUDY_KEYS)}")
        if not isinstance(value, STUDY_KEYS[key]):
            raise ConfigError(f"{src}: [study]: {key} must be a {STUDY_KEYS[key].__name__}, got {value!r}")
    name = head.get("name", path.stem)
    seeds = head.get("seeds", [0])
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{src}: [study]: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{src}: [study]: seeds {seeds} names a seed twice")
    reuse = head.get("reuse", [])
    if not all(isinstance(r, str) and r for r in reuse):
        raise ConfigError(f"{src}: [study]: reuse must be a list of other studies' out folders (strings), "
                          f"got {reuse!r}")
    base = data.get("base", {})
    if not isinstance(base, dict):
        raise ConfigError(f"{src}: [base] must be a table of fedplora settings")
    base = _check_settings(f"{src}: [base]", base)
    tasks = _entries("task", data.get("task"), src)
    methods = _entries("method", data.get("method"), src)
    partitions = _entries("partition", data.get("partition"), src)
    names = {"task": [e.name for e in tasks], "method": [e.name for e in methods],
             "partition": [e.name for e in partitions]}
    overrides = []
    raw_over = data.get("override", [])
    if not isinstance(raw_over, list) or not all(isinstance(e, dict) for e in raw_over):
        raise ConfigError(f"{src}: override must be a list of tables, written [[override]]")
    for i, o in enumerate(raw_over, 1):
        where = f"{src}: [[override]] #{i}"
        match = {}
        for kind in ("task", "method", "partition"):
            if kind in o:
                wanted = o[kind] if isinstance(o[kind], list) else [o[kind]]
                for w in wanted:
                    if w not in names[kind]:
                        raise ConfigError(f"{where}: {kind} {w!r} is not a [[{kind}]] name "
                                          f"({', '.join(names[kind])})")
                match[kind] = wanted
        if not match:
            raise ConfigError(f"{where}: needs task, method and/or partition = the entries it applies to")
        overrides.append({"match": match, "settings": _check_settings(
            where, {k: v for k, v in o.items() if k not in ("task", "method", "partition")})})
    paper, note = _paper(data.get("paper", {}), names, src)
    study = Study(path=path, name=name, out=Path(out or head.get("out") or f"runs/study-{name}"), seeds=list(seeds),
                  percent=head.get("percent", True), description=head.get("description", ""), base=base,
                  tasks=tasks, methods=methods, partitions=partitions, overrides=overrides, paper=paper,
                  paper_note=note, reuse=[Path(r) for r in reuse])
    if any(r.resolve() == study.out.resolve() for r in study.reuse):
        raise ConfigError(f"{src}: [study]: reuse names this study's own out folder {study.out}; list other "
                          "studies' out folders")
    study.cells = _cells(study)
    return study


def _known(where: str, kind: str, name: str, names: dict[str, list[str]]) -> None:
    if name not in names[kind]:
        raise ConfigError(f"{where}: {name!r} is not a [[{kind}]] name ({', '.join(names[kind])})")


def _paper(raw: Any, names: dict[str, list[str]], src: str) -> tuple[dict, str]:
    """``[paper.<task>.<partition>] <method> = number``: the paper's figures, in the table's units."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: [paper] must be a table")
    note = raw.get("note", "")
    if not isinstance(note, str):
        raise ConfigError(f"{src}: [paper]: note must be a string")
    paper: dict[str, dict[str, dict[str, float]]] = {}
    for task, parts in raw.items():
        if task == "note":
            continue
        where = f"{src}: [paper.{task}]"
        _known(where, "task", task, names)
        if not isinstance(parts, dict):
            raise ConfigError(f"{where}: must be tables [paper.{task}.<partition>] of <method> = number")
        for part, methods in parts.items():
            where = f"{src}: [paper.{task}.{part}]"
            _known(where, "partition", part, names)
            if not isinstance(methods, dict):
                raise ConfigError(f"{where}: must be a table of <method> = number")
            for method, value in methods.items():
                _known(where, "method", method, names)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"{where}: {method} must be a number, got {value!r}")
                paper.setdefault(task, {}).setdefault(part, {})[method] = float(value)
    return paper, note


def _cells(study: Study) -> list[Cell]:
    """Every cell, seed-major (a study stopped after seed 0 already has a full table), then task, partition,
    method. A cell's settings: [base] < [[task]] < [[partition]] < [[method]] < matching [[override]]s."""
    cells = []
    for seed in study.seeds:
        for task in study.tasks:
            for part in study.partitions:
                for method in study.methods:
                    layers = [study.base, task.settings, part.settings, method.settings]
                    layers += [o["settings"] for o in study.overrides
                               if all(e.name in o["match"].get(e.kind, [e.name]) for e in (task, part, method))]
                    merged: dict[str, Any] = {}
                    for layer in layers:
                        merged.update(layer)
                    if "task" not in merged:  # a [[task]] named after a fedplora task needs no task = "..."
                        if task.name not in _task_names():
                            raise ConfigError(f"{study.path}: [[task]] {task.name!r}: not a fedplora task name; add "
                                              f"task = \"...\" (one of {', '.join(sorted(_task_names()))})")
                        merged["task"] = task.name
                    if "ranks" in merged and "rank_shares" not in merged:  # ranks alone: equal shares
                        merged["rank_shares"] = [1.0] * len(merged["ranks"])
                    index = len(cells) + 1
                    folder = study.out / "cells" / task.name / part.name / method.name / f"seed{seed}"
                    where = f"{study.path}: cell {task.name}/{part.name}/{method.name}/seed{seed}"
                    try:
                        cfg = RunConfig.from_dict(merged, source=where).with_overrides(
                            seed=seed, out=str(folder)).validate()
                    except ConfigError as e:
                        raise ConfigError(f"{where}: {e}") from None
                    cells.append(Cell(index, task, part, method, seed, folder, cfg))
    return cells


def _task_names() -> set[str]:
    from .tasks import TASKS

    return set(TASKS)


# ------------------------------------------------------------------ the state of each cell
def expected_config(cell: Cell) -> dict[str, Any]:
    """What the cell's config.toml holds once it has run: the settings with paths made absolute."""
    from .federation.simulation import absolute_paths

    return absolute_paths(cell.cfg).to_dict()


def config_difference(cell: Cell) -> str | None:
    """None when the cell's saved config.toml matches the study file (or there is none), else the difference."""
    toml = cell.folder / "config.toml"
    if not toml.is_file():
        return None
    try:
        saved = RunConfig.from_toml(toml).to_dict()
    except ConfigError as e:
        return f"its config.toml is unreadable ({e})"
    want = expected_config(cell)
    differ = [k for k in sorted(set(saved) | set(want)) if k not in MAY_DIFFER and saved.get(k) != want.get(k)]
    if not differ:
        return None
    k = differ[0]
    more = f" (and {len(differ) - 1} more settings)" if len(differ) > 1 else ""
    return f"it was run with {k}={saved.get(k)!r}, the study file now gives {k}={want.get(k)!r}{more}"


def cell_status(cell: Cell) -> str:
    """todo, done, resume (a checkpoint, no summary) or conflict (saved settings differ from the study's)."""
    if config_difference(cell) is not None:
        return "conflict"
    summary = cell.folder / "summary.json"
    if summary.is_file():
        try:
            json.loads(summary.read_text())
            return "done"
        except ValueError:
            pass
    if (cell.folder / "config.toml").is_file() and (cell.folder / "checkpoint" / "checkpoint.json").is_file():
        return "resume"
    return "todo"


def _settings_key(config: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in MAY_DIFFER}, sort_keys=True, default=str)


def reusable_cells(study: Study) -> dict[str, Path]:
    """Finished cells of the studies in ``[study] reuse``, by their settings (less MAY_DIFFER): the first found
    wins. A folder that is missing or unreadable offers nothing (it may not have been run on this machine)."""
    found: dict[str, Path] = {}
    for root in study.reuse:
        for summary in sorted(root.glob("cells/*/*/*/seed*/summary.json")):
            folder = summary.parent
            try:
                json.loads(summary.read_text())
                key = _settings_key(RunConfig.from_toml(folder / "config.toml").to_dict())
            except (OSError, ValueError, FedploraError):
                continue
            found.setdefault(key, folder)
    return found


def reuse_cell(cell: Cell, source: Path) -> None:
    """Copy a finished run folder (less its checkpoint: a finished cell never resumes) into the cell, with its
    config.toml naming where it now lies. Built beside the cell and moved into place in one rename, so a stop
    half-way leaves the cell as it was (todo), never a summary without the rest."""
    import shutil

    staging = cell.folder.with_name(cell.folder.name + ".reusing")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("checkpoint"))
    (staging / "config.toml").write_text(RunConfig.from_toml(source / "config.toml").with_overrides(
        out=str(cell.folder.expanduser().resolve())).to_toml())
    shutil.rmtree(cell.folder, ignore_errors=True)  # a todo cell: no summary, no checkpoint to continue from
    staging.replace(cell.folder)


def check_conflicts(study: Study) -> None:
    """Refuse to mix: a cell run with other settings stops the study before anything runs."""
    bad = [c for c in study.cells if cell_status(c) == "conflict"]
    if bad:
        c = bad[0]
        more = f"; {len(bad) - 1} more cells differ too" if len(bad) > 1 else ""
        raise ConfigError(f"{c.folder}: {config_difference(c)}{more}. Restore the study file, move that folder "
                          "away to run the cell again, or give the study another out (--out)")


def read_state(out: Path) -> dict[str, Any]:
    try:
        state = json.loads((out / STATE_FILE).read_text())
        return state if isinstance(state, dict) and isinstance(state.get("cells"), dict) else {"cells": {}}
    except (OSError, ValueError):
        return {"cells": {}}


def write_state(out: Path, state: dict[str, Any]) -> None:
    from .reports import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / STATE_FILE, state)


# ------------------------------------------------------------------ running
def fmt_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Stop(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt: no ``except Exception`` swallows it,
    and the running cell's ``finally`` stops its processes."""


def _raise_stop(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the cleanup
    raise Stop()


def select_cells(study: Study, patterns: list[str] | None) -> list[Cell]:
    """The cells whose folder under ``cells/`` matches one of the shell-style ``patterns`` (``sst2/iid/*``,
    ``*/seed0``; ``*`` crosses ``/``), all of them without patterns. Lets a study spend its compute where it
    informs first (one task, one seed) while its report still covers, and lists, every cell."""
    if not patterns:
        return list(study.cells)
    names = {c.rel: c.rel.removeprefix("cells/") for c in study.cells}
    chosen = []
    for pattern in patterns:
        pat = pattern.strip().removeprefix("cells/")
        hits = [c for c in study.cells if fnmatch.fnmatchcase(names[c.rel], pat)]
        if not hits:
            raise ConfigError(f"--cells {pattern!r}: matches none of the study's {len(study.cells)} cells; they "
                              f"are named like {names[study.cells[0].rel]!r} (task/partition/method/seed)")
        chosen += [c for c in hits if c not in chosen]
    return [c for c in study.cells if c in chosen]  # the study's order, whatever the patterns' order


def run_study(study: Study, *, only_cells: int | None = None, echo_rounds: bool = True,
              log=print, cells: list[str] | None = None) -> dict[str, Any]:
    """Run every cell that is not done (at most ``only_cells`` of them; only those ``cells`` matches, see
    select_cells), then write the report.

    Returns ``{"ran": [...], "failed": [...], "left": n, "reused": [...]}`` (``reused``: cells copied from
    ``[study] reuse``). KeyboardInterrupt (Ctrl-C, or SIGTERM turned into
    ``Stop``) propagates after the running cell's Flower processes are stopped; the cell keeps its checkpoint.
    """
    from .federation.progress import Progress
    from .federation.simulation import run_simulation

    check_conflicts(study)
    state = read_state(study.out)
    statuses = {c.rel: cell_status(c) for c in study.cells}
    chosen = select_cells(study, cells)
    todo = [c for c in chosen if statuses[c.rel] != "done"]
    n = len(study.cells)
    offered = reusable_cells(study) if study.reuse else {}
    reused = []
    for cell in [c for c in todo if statuses[c.rel] == "todo"]:
        source = offered.get(_settings_key(expected_config(cell)))
        if source is None:
            continue
        try:
            reuse_cell(cell, source)
        except OSError as e:  # the source went away, a full disk: the cell is simply run
            log(f"cell {cell.index}/{n} could not be copied from {source} ({e}); it runs instead")
            continue
        state["cells"][cell.rel] = {"status": "done", "reused_from": str(source),
                                    "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_state(study.out, state)
        reused.append(cell)
        log(f"cell {cell.index}/{n} reused ({cell.describe()}): the same settings already ran in {source}")
    todo = [c for c in todo if c not in reused]
    resumable = sum(statuses[c.rel] == "resume" for c in todo)
    done = sum(statuses[c.rel] == "done" for c in study.cells) + len(reused)
    log(f"study {study.name}: {n} cells, {done} done"
        + (f" ({len(reused)} copied from [study] reuse)" if reused else "") + f", {len(todo)} to run"
        + (f" of the {len(chosen)} --cells chooses" if cells else "")
        + (f" ({resumable} to continue from a checkpoint)" if resumable else "") + f"; outputs in {study.out}/")
    finished = [(c, c.folder) for c in study.cells if statuses[c.rel] == "done" or c in reused]  # measured rates
    progress = Progress.console() if echo_rounds else None
    ran, failed = [], []
    budget = len(todo) if only_cells is None else min(only_cells, len(todo))
    for k, cell in enumerate(todo[:budget]):
        resume = statuses[cell.rel] == "resume"
        log(f"cell {cell.index}/{n} {'continues' if resume else 'starts'} ({cell.describe()}) in {cell.folder}")
        t0 = time.monotonic()
        try:
            summary = run_simulation(cell.cfg, cell.folder, progress, resume=resume)
        except (KeyboardInterrupt, Stop):
            raise
        except Exception as e:  # noqa: BLE001 - a failed cell is recorded, the rest go on
            seconds = time.monotonic() - t0
            line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if not isinstance(e, FedploraError):
                line = f"{type(e).__name__}: {line}"
            state["cells"][cell.rel] = {"status": "failed", "error": line, "seconds": round(seconds, 1),
                                        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            write_state(study.out, state)
            failed.append(cell)
            left = todo[k + 1:]
            log(f"cell {cell.index}/{n} FAILED ({cell.describe()}) after {fmt_duration(seconds)}: {line}; "
                f"{len(left)} left" + (f", about {fmt_duration(estimate(left, finished)[0])}" if left else ""))
            continue
        seconds = time.monotonic() - t0
        finished.append((cell, cell.folder))
        state["cells"][cell.rel] = {"status": "done", "seconds": round(seconds, 1),
                                    "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_state(study.out, state)
        ran.append(cell)
        metric = cell.task.metric or summary["metric"]
        value = summary["final"].get(metric)
        left = todo[k + 1:]
        log(f"cell {cell.index}/{n} done ({cell.describe()}): {metric} "
            f"{value:.4f} in {fmt_duration(seconds)}; {len(left)} left"
            + (f", about {fmt_duration(estimate(left, finished)[0])}" if left else "")
            if isinstance(value, (int, float)) else
            f"cell {cell.index}/{n} done ({cell.describe()}) in {fmt_duration(seconds)}; {len(left)} left")
    left = len(todo) - len(ran)
    return {"ran": ran, "failed": failed, "left": left, "reused": reused}


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


def dry_run(study: Study, log=print, cells: list[str] | None = None) -> None:
    """The cells, their state and their cost in local training steps, and a time: per task, at the seconds a
    step its finished cells took (else STEP_SECONDS), plus START_SECONDS a cell. Cells ``cells`` leaves out
    (see select_cells) are listed as "left out" and not counted."""
    check_conflicts(study)
    chosen = select_cells(study, cells)
    offered = reusable_cells(study) if study.reuse else {}
    log(f"study {study.name}: {len(study.tasks)} tasks x {len(study.partitions)} partitions x {len(study.methods)} "
        f"methods x {len(study.seeds)} seeds = {len(study.cells)} cells; outputs in {study.out}/")
    todo, finished = [], []
    for c in study.cells:
        steps = cell_steps(c)
        status = cell_status(c)
        source = offered.get(_settings_key(expected_config(c))) if status == "todo" else None
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
    log(f"to run: {len(todo)} cells, {steps} local steps: about {fmt_duration(seconds)}"
        + (f"; {'; '.join(rates)}; plus {START_SECONDS} s of start-up a cell" if todo else ""))


# ------------------------------------------------------------------ the report, from the cell folders alone
def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


# the pre-"fn_" names of the function-level noise, kept in histories as aliases: reported once, under fn_*
NOISE_ALIASES = {"init_noise": "fn_init_noise", "agg_noise": "fn_agg_noise"}


def _noise_keys(history: list[dict[str, Any]]) -> list[str]:
    keys = {k for h in history for k, v in h.items()
            if k.endswith("noise") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return sorted(k for k in keys if NOISE_ALIASES.get(k) not in keys)


def _row(method: Entry, metric: str, summaries: list[dict[str, Any]], scale: float) -> dict[str, Any]:
    """One method's row of a (task, partition) table: the seeds' final metric, traffic, noise, per-round curves."""
    values = [s["final"][metric] * scale for s in summaries]
    mean, std = _mean_std(values)
    others = sorted({m for s in summaries for m in s["final"]} - {metric})
    noise = _noise_keys([h for s in summaries for h in s["history"]])
    rounds = sorted({h["round"] for s in summaries for h in s["history"]})
    by_round = [{h["round"]: h for h in s["history"]} for s in summaries]

    def curve(get) -> list[float | None]:
        out = []
        for r in rounds:
            vals = [get(b[r]) for b in by_round if r in b]
            vals = [v for v in vals if isinstance(v, (int, float))]
            out.append(statistics.fmean(vals) if len(vals) == len(summaries) else None)
        return out

    return {
        "method": method.name, "label": method.label, "seeds": [s["seed"] for s in summaries],
        "n": len(summaries), "mean": mean, "std": std, "values": values,
        # seeds whose final model predicts a single class: MCC is exactly 0 then (tasks/metrics.py), and in
        # practice only then; such a figure is the class share of the split, not something learned
        "one_class": (sum(s["final"]["mcc"] == 0.0 for s in summaries)
                      if all("mcc" in s["final"] for s in summaries) else None),
        # round 0, before any training: what "learned nothing" looks like (e.g. the majority class)
        "start": (statistics.fmean(s["initial"][metric] * scale for s in summaries)
                  if all(metric in s.get("initial", {}) for s in summaries) else None),
        "other_metrics": {m: dict(zip(("mean", "std"), _mean_std([s["final"][m] for s in summaries
                                                                   if m in s["final"]])))
                          for m in others if all(m in s["final"] for s in summaries)},
        "up_mb": statistics.fmean(s["bytes_up_total"] for s in summaries) / 1e6,
        "down_mb": statistics.fmean(s["bytes_down_total"] for s in summaries) / 1e6,
        # a figure is None where it could not be measured (secure aggregation: the history's noise_unavailable)
        "noise": {k: statistics.fmean(statistics.fmean(h[k] for h in s["history"] if h["round"] > 0 and
                                                       h.get(k) is not None)
                                      for s in summaries if any(h["round"] > 0 and h.get(k) is not None
                                                                for h in s["history"]))
                  for k in noise if any(h["round"] > 0 and h.get(k) is not None
                                        for s in summaries for h in s["history"])},
        "per_round": {"round": rounds,
                      metric: curve(lambda h: h.get("metrics", {}).get(metric) * scale
                                    if isinstance(h.get("metrics", {}).get(metric), (int, float)) else None),
                      **{k: curve(lambda h, k=k: h.get(k)) for k in noise},
                      "up_mb": curve(lambda h: h.get("bytes_up", 0) / 1e6),
                      "down_mb": curve(lambda h: h.get("bytes_down", 0) / 1e6)},
    }


def _read_summary(cell: Cell) -> dict[str, Any] | None:
    if cell_status(cell) != "done":
        return None
    return json.loads((cell.folder / "summary.json").read_text())


SIGNIFICANT = 10  # digits kept of every number in table.json (see _round)


def _round(value: Any) -> Any:
    """Every float to SIGNIFICANT significant digits, recursively.

    A run continued from a checkpoint can differ from an uninterrupted one in the last bit of a noise
    measure (seen: agg_noise 0.2936071215232374 vs ...375 in the round after the resume, the model and its
    metrics equal), so full float64 digits would make a stopped-and-continued study's table differ from an
    uninterrupted one's in digits that mean nothing. 10 digits keep every figure far beyond what it measures.
    """
    if isinstance(value, float):
        return float(f"{value:.{SIGNIFICANT}g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


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


def build_table(study: Study) -> dict[str, Any]:
    """table.json: per task x partition, one row per method (mean ± std over the finished seeds). Deterministic:
    only the cells' results and the study file go in (no times, no absolute paths), numbers rounded to
    SIGNIFICANT digits."""
    summaries = {c.rel: _read_summary(c) for c in study.cells}
    scale = 100.0 if study.percent else 1.0
    tables = []
    for task in study.tasks:
        for part in study.partitions:
            rows, metric = [], task.metric
            for method in study.methods:
                got = [summaries[c.rel] for c in study.cells
                       if (c.task, c.partition, c.method) == (task, part, method) and summaries[c.rel] is not None]
                metric = metric or (got[0]["metric"] if got else None)
                if not got:
                    rows.append({"method": method.name, "label": method.label, "n": 0, "seeds": [],
                                 "paper": study.paper.get(task.name, {}).get(part.name, {}).get(method.name)})
                    continue
                missing = [s["seed"] for s in got if metric not in s["final"]]
                if missing:
                    raise ConfigError(f"{study.path}: [[task]] {task.name!r}: metric {metric!r} is not in the runs' "
                                      f"results (they have {', '.join(sorted(got[0]['final']))})")
                row = _row(method, metric, got, scale)
                row["paper"] = study.paper.get(task.name, {}).get(part.name, {}).get(method.name)
                rows.append(row)
            tables.append({"task": task.name, "task_label": task.label, "partition": part.name,
                           "partition_label": part.label, "metric": metric, "rows": rows,
                           "reading": reading(rows)})
    done = sum(s is not None for s in summaries.values())
    return _round({"study": study.name, "units": "percent" if study.percent else "as measured",
            "seeds": study.seeds, "cells": {"total": len(study.cells), "done": done,
                                            "missing": [c.rel for c in study.cells if summaries[c.rel] is None]},
            "tables": tables})


def _num(v: float | None, digits: int = 2) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _ours(row: dict[str, Any], digits: int) -> str:
    if not row["n"]:
        return "—"
    std = f" ± {_num(row['std'], digits)}" if row["std"] is not None else ""
    return f"{_num(row['mean'], digits)}{std}"


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
    head = ["method", "partition", *[f"{t.label} {_metric_of(table, t.name)}{units}" for t in study.tasks]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for part in study.partitions:
        for method in study.methods:
            row = [method.label, part.label]
            for task in study.tasks:
                r = _find(table, task.name, part.name, method.name)
                text = f"{_ours(r, digits)} ({r['n']})" if r["n"] else "—"
                if r.get("paper") is not None:
                    text += f" [{_num(r['paper'], digits)}]"
                row.append(text)
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if study.paper_note:
        lines += [f"Paper figures: {study.paper_note.strip()}", ""]
    lines += _reading_markdown(study, table, digits)
    if len(study.partitions) > 1:  # each method across the settings it was run in, e.g. attacks or privacy levels
        for task in study.tasks:
            if not any(r["n"] for t in table["tables"] if t["task"] == task.name for r in t["rows"]):
                continue
            lines += [f"## {task.label}: {_metric_of(table, task.name)}{units} per partition", ""]
            head = ["method", *[p.label for p in study.partitions]]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for method in study.methods:
                row = [method.label]
                for part in study.partitions:
                    r = _find(table, task.name, part.name, method.name)
                    row.append(_ours(r, digits) + (f" ({r['n']})" if r["n"] > 1 else ""))
                lines.append("| " + " | ".join(row) + " |")
            lines += ["", f"![final {_metric_of(table, task.name)} per partition](plots/{task.name}-by-partition.png)",
                      ""]
    for t in table["tables"]:
        if not any(r["n"] for r in t["rows"]):
            continue
        noise = sorted({k for r in t["rows"] if r["n"] for k in r["noise"]})
        lines += [f"## {t['task_label']}, {t['partition_label']}", ""]
        head = ["method", f"{t['metric']}{units}", "seeds", "paper", "up MB", "down MB", *noise]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in t["rows"]:
            if not r["n"]:
                empty = [r["label"], "—", "0", _num(r["paper"], digits)] + ["—"] * (len(head) - 4)
                lines.append("| " + " | ".join(empty) + " |")
                continue
            lines.append("| " + " | ".join([
                r["label"], _ours(r, digits), ",".join(map(str, r["seeds"])), _num(r["paper"], digits),
                _num(r["up_mb"]), _num(r["down_mb"]), *[f"{r['noise'][k]:.3g}" if k in r["noise"] else "—"
                                                       for k in noise]]) + " |")
        stem = f"{t['task']}-{t['partition']}"
        lines += ["", f"![{t['metric']} per round](plots/{stem}-metric.png) ![noise per round](plots/{stem}-noise.png) "
                      f"![traffic](plots/{stem}-traffic.png)", ""]
    lines += ["Noise columns: each run's per-round noise (every `*noise` entry of its history: see docs/method.md for "
              "each definition), averaged over rounds 1..T, then over seeds. Traffic: arrays actually sent, all "
              "rounds, mean over seeds. Wall times are in times.md (they differ between sessions; this report "
              "does not).", ""]
    if cells["missing"]:
        lines += ["## Cells not done", "", *[f"- `{rel}`" for rel in cells["missing"]], ""]
    return "\n".join(lines)


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
    head = ["task", "partition", "start", "ours, best first"] + (["paper, best first"] if study.paper else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def order(entries, value, mark=lambda e: ""):
        if not entries:
            return "—"
        first = entries[0]
        return " · ".join([f"{first['label']} {_num(first[value], digits)}{mark(first)}"]
                          + [f"{e['label']} −{_num(e['gap'], digits)}{mark(e)}" for e in entries[1:]])
    for t in tables:
        rd = t["reading"]
        starts = [r["start"] for r in t["rows"] if r["n"] and r.get("start") is not None]
        start = _num(statistics.fmean(starts), digits) if starts else "—"
        means = [e["mean"] for e in rd["ours"]]
        span = _num(min(means), digits) + ("" if min(means) == max(means) else f" to {_num(max(means), digits)}")
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


def _metric_of(table: dict[str, Any], task: str) -> str:
    return next((t["metric"] for t in table["tables"] if t["task"] == task and t["metric"]), "")


def _find(table: dict[str, Any], task: str, part: str, method: str) -> dict[str, Any]:
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
        s = _read_summary(c)
        if s is not None:
            total += s.get("wall_s", 0.0)
            seconds = state.get(c.rel, {}).get("seconds")
            total_cell += seconds or 0.0
            with_start = "—" if seconds is None else f"{seconds:.0f}"
            lines.append(f"| `{c.rel}` | {s.get('wall_s', 0.0):.0f} | {with_start} |")
    lines += ["", f"Total: {fmt_duration(total)} of run time, {fmt_duration(total_cell)} with start-up.", ""]
    return "\n".join(lines)


def plot_table(table: dict[str, Any], out: Path) -> list[Path]:
    """Per task x partition: the metric per round per method (mean over seeds), noise per round, traffic; per
    task with several partitions: each method's final metric across them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110, metadata={"Software": None})
        plt.close(fig)
        written.append(out / name)
    for t in table["tables"]:
        rows = [r for r in t["rows"] if r["n"]]
        if not rows:
            continue
        stem, title = f"{t['task']}-{t['partition']}", f"{t['task_label']}, {t['partition_label']}"

        def series(r, key):
            pts = [(x, y) for x, y in zip(r["per_round"]["round"], r["per_round"][key]) if y is not None]
            return zip(*pts) if pts else ((), ())

        fig, ax = plt.subplots(figsize=(6.5, 4))
        for r in rows:
            ax.plot(*series(r, t["metric"]), marker="o", markersize=3, label=r["label"])
        ax.set(xlabel="round", ylabel=t["metric"], title=f"{title}: {t['metric']} per round (mean over seeds)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, f"{stem}-metric.png")

        keys = sorted({k for r in rows for k in r["noise"]})
        if keys:
            fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
            for key, ax in zip(keys, axes[0]):
                for r in rows:
                    if key in r["per_round"]:
                        xs, ys = series(r, key)
                        pts = [(x, max(y, 1e-12)) for x, y in zip(xs, ys) if x > 0]
                        if pts:
                            ax.plot(*zip(*pts), marker="o", markersize=3, label=r["label"])
                ax.set(xlabel="round", ylabel=key.replace("_", " "), yscale="log",
                       title=f"{key.replace('_', ' ')} (0 shown at 1e-12)")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.grid(alpha=0.3)
            axes[0][0].legend(fontsize=8)
            fig.suptitle(title)
            save(fig, f"{stem}-noise.png")

        fig, ax = plt.subplots(figsize=(6.5, 4))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["down_mb"] for r in rows], width=0.4, label="down (server to clients)")
        ax.bar([x + 0.2 for x in xs], [r["up_mb"] for r in rows], width=0.4, label="up (clients to server)")
        ax.set_xticks(list(xs), [r["label"] for r in rows], rotation=20, ha="right", fontsize=8)
        ax.set(ylabel="MB per run (all rounds)", yscale="log", title=f"{title}: traffic")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        save(fig, f"{stem}-traffic.png")
    tasks = list(dict.fromkeys(t["task"] for t in table["tables"]))
    for task in tasks:  # each method's final metric across the partitions (attacks, privacy levels, ...)
        parts = [t for t in table["tables"] if t["task"] == task]
        if len(parts) < 2 or not any(r["n"] for t in parts for r in t["rows"]):
            continue
        fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * len(parts) + 2), 4))
        for i, first in enumerate(parts[0]["rows"]):
            pts = [(x, t["rows"][i]["mean"], t["rows"][i]["std"] or 0.0) for x, t in enumerate(parts)
                   if t["rows"][i]["n"]]
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, marker="o", markersize=4, capsize=3, label=first["label"])
        ax.set_xticks(range(len(parts)), [t["partition_label"] for t in parts], rotation=20, ha="right", fontsize=8)
        metric = next(t["metric"] for t in parts if t["metric"])
        ax.set(ylabel=metric, title=f"{parts[0]['task_label']}: final {metric} per partition (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, f"{task}-by-partition.png")
    return written


def write_report(study: Study, plots: bool = True) -> dict[str, Any]:
    """table.json, report.md, times.md and the plots, from the cell folders alone."""
    table = build_table(study)
    study.out.mkdir(parents=True, exist_ok=True)
    (study.out / "table.json").write_text(json.dumps(table, indent=2) + "\n")
    (study.out / "report.md").write_text(markdown_report(study, table))
    (study.out / "times.md").write_text(times_markdown(study))
    if plots:
        plot_table(table, study.out / "plots")
    return table


# ------------------------------------------------------------------ command line
def add_study_parser(subparsers) -> argparse.ArgumentParser:
    """``fedplora study``: wire it with ``add_study_parser(sub)`` and dispatch ``args.command == "study"`` to
    ``study_main(args)``."""
    p = subparsers.add_parser("study", help="a resumable grid of tasks x methods x partitions x seeds with one "
                                            "report (docs/study.md)", description=__doc__.split("\n\n")[0])
    _study_arguments(p)
    return p


def _patterns(value: str) -> list[str]:
    patterns = [x.strip() for x in value.split(",") if x.strip()]
    if not patterns:
        raise argparse.ArgumentTypeError("give one or more cell patterns, e.g. 'sst2/iid/*' or '*/seed0'")
    return patterns


def _study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE.toml", help="the study file (docs/study.md)")
    p.add_argument("--out", help="output folder (default: [study] out, else runs/study-<name>)")
    p.add_argument("--report-only", action="store_true", help="run nothing: remake the report from the cell folders")
    p.add_argument("--dry-run", action="store_true", help="run nothing: list the cells, their state and cost")
    p.add_argument("--only-cells", type=int, metavar="N", help="run at most N cells, then write the report and stop")
    p.add_argument("--cells", metavar="GLOB[,GLOB]", type=_patterns,
                   help="run only the cells whose folder matches, e.g. 'sst2/iid/*' or '*/seed0' (the report "
                        "still covers every cell)")
    p.add_argument("--quiet", action="store_true", help="no per-round lines, only one line per cell")


def study_main(args: argparse.Namespace) -> int:
    """The ``fedplora study`` command. FedploraError lines are for the caller to print (as cli.main does)."""
    study = load_study(args.file, out=args.out)
    if args.only_cells is not None and args.only_cells < 1:
        raise ConfigError(f"--only-cells: must be >= 1, got {args.only_cells}")
    cells = getattr(args, "cells", None)
    if args.dry_run:
        dry_run(study, cells=cells)
        return 0
    select_cells(study, cells)  # a pattern that matches nothing: one line before anything runs
    check_conflicts(study)  # also for --report-only: a cell run with other settings is never reported as this study's
    if not args.report_only:
        previous = signal.signal(signal.SIGTERM, _raise_stop)
        try:
            result = run_study(study, only_cells=args.only_cells, echo_rounds=not args.quiet, cells=cells)
        except (KeyboardInterrupt, Stop):
            done = sum(cell_status(c) == "done" for c in study.cells)
            print(f"study {study.name} stopped: {done} of {len(study.cells)} cells done; the running cell keeps its "
                  f"checkpoint. Continue with the same command.", flush=True)
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous)
    table = write_report(study)
    cells = table["cells"]
    print(f"report: {study.out / 'report.md'} ({cells['done']} of {cells['total']} cells done; table.json, plots/, "
          "times.md)")
    if not args.report_only:
        failed = [rel for rel, rec in read_state(study.out)["cells"].items()
                  if rec.get("status") == "failed" and rel in cells["missing"]]
        if failed:
            print(f"{len(failed)} cells failed (errors in {study.out / STATE_FILE}); run the same command to try "
                  "them again", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedplora.study", description=__doc__.split("\n\n")[0])
    _study_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return study_main(args)
    except FedploraError as e:
        print(f"fedplora: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
