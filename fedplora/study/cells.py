"""The state of each cell, read from its folder alone: todo, resume, done or conflict.

A study keeps no database: a cell's run folder says what happened to it, so a study can be stopped
anywhere and continued later (or elsewhere, with the same paths) by running the same command. This
module is the one place that reads those folders: the status of a cell, whether its saved settings
still match the study file (results made with other settings are never mixed), which finished cells of
other studies (``[study] reuse``) may be copied instead of run, which cells ``--cells`` chooses, and the
small ``study-state.json`` that records failures and wall times.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import ConfigError, FedploraError
from .spec import Cell, Study

# settings that may differ between a cell's saved config.toml and the study file: where the cell lies,
# machine-resolved resources and patience; none of them changes a run's numbers
MAY_DIFFER = ("out", "cache_dir", "client_gpus", "round_timeout", "connect_timeout")
STATE_FILE = "study-state.json"


def expected_config(cell: Cell) -> dict[str, Any]:
    """What the cell's config.toml holds once it has run: the settings with paths made absolute."""
    from ..federation.simulation import absolute_paths

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


def finished_summary(cell: Cell) -> dict[str, Any] | None:
    """The cell's summary.json when the cell is done, else None."""
    if cell_status(cell) != "done":
        return None
    return json.loads((cell.folder / "summary.json").read_text())


def check_conflicts(study: Study) -> None:
    """Refuse to mix: a cell run with other settings stops the study before anything runs."""
    bad = [c for c in study.cells if cell_status(c) == "conflict"]
    if bad:
        c = bad[0]
        more = f"; {len(bad) - 1} more cells differ too" if len(bad) > 1 else ""
        raise ConfigError(f"{c.folder}: {config_difference(c)}{more}. Restore the study file, move that folder "
                          "away to run the cell again, or give the study another out (--out)")


# ------------------------------------------------------------------ cells other studies already ran
def settings_key(config: dict[str, Any]) -> str:
    """A run's settings less MAY_DIFFER, as one string: equal keys, equal numbers (same code, same machine)."""
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
                key = settings_key(RunConfig.from_toml(folder / "config.toml").to_dict())
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


# ------------------------------------------------------------------ choosing cells, recording what happened
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


def read_state(out: Path) -> dict[str, Any]:
    try:
        state = json.loads((out / STATE_FILE).read_text())
        return state if isinstance(state, dict) and isinstance(state.get("cells"), dict) else {"cells": {}}
    except (OSError, ValueError):
        return {"cells": {}}


def write_state(out: Path, state: dict[str, Any]) -> None:
    from ..reports import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / STATE_FILE, state)
