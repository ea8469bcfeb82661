"""The study file: its TOML schema, its checks, and the grid of cells it describes.

Everything a study file can get wrong is found here, before any cell runs: each problem is one
``ConfigError`` line naming the entry and the key, and every cell's ``RunConfig`` is built and validated
up front. Nothing here touches the disk beyond reading the file, so ``--dry-run`` and the tests can load
any study cheaply. The format is in docs/study.md.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import BY_NAME, RunConfig
from ..errors import ConfigError
from .summary import TARGET_FRACTION

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
STUDY_KEYS = {"name": str, "out": str, "seeds": list, "percent": bool, "description": str, "reuse": list,
              "target_fraction": float, "workers": int}
TOP_KEYS = ("study", "base", "task", "method", "partition", "override", "paper")
ENTRY_META = {"task": ("name", "label", "metric"), "method": ("name", "label"), "partition": ("name", "label")}
STUDY_SETS = ("seed", "out")  # set by the study for each cell, never by an entry


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
    target_fraction: float = TARGET_FRACTION  # time to target: this fraction of each table's best final mean
    workers: int = 1  # cells run at once, each in a process of its own (--workers overrides it)
    cells: list[Cell] = field(default_factory=list)


def workers_problem(value: object) -> str | None:
    """What is wrong with a number of workers (``[study] workers``, ``--workers``), else None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"must be an integer >= 1 (the cells run at once), got {value!r}"
    return None


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _checked_settings(where: str, data: dict[str, Any]) -> dict[str, Any]:
    """An entry's RunConfig settings, each checked on its own; the error names the entry and the key."""
    out = {}
    for raw, value in data.items():
        key = raw.replace("-", "_")
        if key in STUDY_SETS:
            raise ConfigError(f"{where}: {key!r} is set by the study for every cell ([study] seeds, [study] out); "
                              "remove it here")
        if key not in BY_NAME:
            raise ConfigError(f"{where}: unknown key {raw!r}{_did_you_mean(key, sorted(BY_NAME))}; an entry takes "
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
        settings = _checked_settings(where, {k: v for k, v in data.items() if k not in meta})
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
        raise ConfigError(f"{src}: unknown table(s) {unknown}{_did_you_mean(unknown[0], list(TOP_KEYS))}; a study "
                          f"file has {', '.join(f'[{k}]' for k in TOP_KEYS)}")
    head = data.get("study", {})
    if not isinstance(head, dict):
        raise ConfigError(f"{src}: [study] must be a table")
    for key, value in head.items():
        if key not in STUDY_KEYS:
            raise ConfigError(f"{src}: [study]: unknown key {key!r}{_did_you_mean(key, list(STUDY_KEYS))}; "
                              f"known: {', '.join(STUDY_KEYS)}")
        if STUDY_KEYS[key] is float and isinstance(value, int) and not isinstance(value, bool):
            continue  # an integer is a number too (target_fraction = 1)
        if not isinstance(value, STUDY_KEYS[key]) or (STUDY_KEYS[key] is int and isinstance(value, bool)):
            kind = "number" if STUDY_KEYS[key] is float else STUDY_KEYS[key].__name__
            raise ConfigError(f"{src}: [study]: {key} must be a {kind}, got {value!r}")
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
    fraction = float(head.get("target_fraction", TARGET_FRACTION))
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"{src}: [study]: target_fraction must be a number in (0, 1] (the fraction of each table's "
                          f"best final figure that time to target measures), got {head['target_fraction']!r}")
    workers = head.get("workers", 1)
    problem = workers_problem(workers)
    if problem:
        raise ConfigError(f"{src}: [study]: workers {problem}")
    base = data.get("base", {})
    if not isinstance(base, dict):
        raise ConfigError(f"{src}: [base] must be a table of fedplora settings")
    base = _checked_settings(f"{src}: [base]", base)
    tasks = _entries("task", data.get("task"), src)
    methods = _entries("method", data.get("method"), src)
    partitions = _entries("partition", data.get("partition"), src)
    names = {"task": [e.name for e in tasks], "method": [e.name for e in methods],
             "partition": [e.name for e in partitions]}
    overrides = _overrides(data.get("override", []), names, src)
    paper, note = _paper_figures(data.get("paper", {}), names, src)
    study = Study(path=path, name=name, out=Path(out or head.get("out") or f"runs/study-{name}"), seeds=list(seeds),
                  percent=head.get("percent", True), description=head.get("description", ""), base=base,
                  tasks=tasks, methods=methods, partitions=partitions, overrides=overrides, paper=paper,
                  paper_note=note, reuse=[Path(r) for r in reuse], target_fraction=fraction, workers=workers)
    if any(r.resolve() == study.out.resolve() for r in study.reuse):
        raise ConfigError(f"{src}: [study]: reuse names this study's own out folder {study.out}; list other "
                          "studies' out folders")
    study.cells = _grid(study)
    return study


def _overrides(raw: Any, names: dict[str, list[str]], src: str) -> list[dict[str, Any]]:
    """``[[override]]``: settings for the cells whose task, method and/or partition the entry names."""
    if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
        raise ConfigError(f"{src}: override must be a list of tables, written [[override]]")
    overrides = []
    for i, o in enumerate(raw, 1):
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
        overrides.append({"match": match, "settings": _checked_settings(
            where, {k: v for k, v in o.items() if k not in ("task", "method", "partition")})})
    return overrides


def _require_entry(where: str, kind: str, name: str, names: dict[str, list[str]]) -> None:
    if name not in names[kind]:
        raise ConfigError(f"{where}: {name!r} is not a [[{kind}]] name ({', '.join(names[kind])})")


def _paper_figures(raw: Any, names: dict[str, list[str]], src: str) -> tuple[dict, str]:
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
        _require_entry(where, "task", task, names)
        if not isinstance(parts, dict):
            raise ConfigError(f"{where}: must be tables [paper.{task}.<partition>] of <method> = number")
        for part, methods in parts.items():
            where = f"{src}: [paper.{task}.{part}]"
            _require_entry(where, "partition", part, names)
            if not isinstance(methods, dict):
                raise ConfigError(f"{where}: must be a table of <method> = number")
            for method, value in methods.items():
                _require_entry(where, "method", method, names)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"{where}: {method} must be a number, got {value!r}")
                paper.setdefault(task, {}).setdefault(part, {})[method] = float(value)
    return paper, note


def _grid(study: Study) -> list[Cell]:
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
    from ..tasks import TASKS

    return set(TASKS)
