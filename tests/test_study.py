"""`fedplora study`: the study file's checks, the cell grid, skip/resume/conflict, the report's determinism.

The fast tests write finished cell folders themselves (a config.toml as the ServerApp writes it and a
summary.json with a history), so the study's logic runs without any Flower run. The slow ones run a tiny
real study with one worker and with two, each stopped with SIGTERM while cells run and continued, and
compare their tables and cell folders; and a run on a Ray cluster the test starts.
"""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedplora.errors import ConfigError
from fedplora.study import (add_study_parser, build_table, cell_status, check_conflicts, expected_config,
                            load_study, main, read_state, write_report)

ROOT = Path(__file__).resolve().parents[1]

SKEW = """[[partition]]
name = "skew"
label = "non-IID"
partitioner = "dirichlet_per_client"
dirichlet_alpha = 0.3
"""

TINY = """
[study]
name = "tiny"
seeds = [0, 1]

[base]
rounds = 2
num_clients = 3
clients_per_round = 2
local_steps = 2
batch_size = 8
max_seq_len = 32
eval_max_examples = 32

[[task]]
name = "tweets"

[[partition]]
name = "iid"
label = "IID"

[[partition]]
name = "skew"
label = "non-IID"
partitioner = "dirichlet_per_client"
dirichlet_alpha = 0.3

[[method]]
name = "fedit-r"
label = "FedIT R"
method = "fedit"

[[method]]
name = "fedit-r2"
label = "FedIT R/2"
method = "fedit"
rank = 4
ranks = [2, 4]
alpha = 8.0

[paper.tweets.iid]
fedit-r = 70.0
"""


def write(tmp_path: Path, text: str, name: str = "study.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_study(write(tmp_path, text), out=tmp_path / "out")
    message = str(e.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------ the file's checks: one line each
@pytest.mark.parametrize("change, expected", [
    (("rounds = 2", "roundz = 2"), "[base]: unknown key 'roundz' (did you mean 'rounds'?)"),
    (("rounds = 2", "rounds = 0"), "[base]: rounds: must be an integer >= 1, got 0"),
    (('method = "fedit"\nrank = 4', 'method = "fedit"\nrnak = 4'), "[[method]] #2 'fedit-r2': unknown key 'rnak'"),
    (('name = "skew"', 'name = "sk ew"'), "[[partition]] #2 'sk ew': needs name"),
    (('name = "fedit-r2"', 'name = "fedit-r"'), "the name 'fedit-r' is used twice"),
    (("seeds = [0, 1]", "seeds = [0, 0]"), "seeds [0, 0] names a seed twice"),
    (("seeds = [0, 1]", "seeds = []"), "seeds must be a non-empty list of integers"),
    (('name = "tiny"', 'name = "tiny"\nseedz = [1]'), "[study]: unknown key 'seedz' (did you mean 'seeds'?)"),
    (("[paper.tweets.iid]", "[paper.tweets.nope]"), "[paper.tweets.nope]: 'nope' is not a [[partition]] name"),
    (("fedit-r = 70.0", "fedit-x = 70.0"), "'fedit-x' is not a [[method]] name"),
    (("fedit-r = 70.0", 'fedit-r = "high"'), "fedit-r must be a number"),
    (("rounds = 2", "rounds = 2\nseed = 3"), "[base]: 'seed' is set by the study"),
    (("ranks = [2, 4]", "ranks = [2, 8]"), "cell tweets/iid/fedit-r2/seed0: ranks: budget 8 is outside [1, rank=4]"),
    (("[base]", "[bsae]"), "unknown table(s) ['bsae']"),
])
def test_a_bad_study_file_is_one_line_naming_the_entry_and_key(tmp_path, change, expected):
    old, new = change
    assert old in TINY
    assert expected in error_of(tmp_path, TINY.replace(old, new, 1))


def test_a_missing_file_and_bad_toml_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_study(tmp_path / "nope.toml")
    assert "is not valid TOML" in error_of(tmp_path, "[study\n")
    no_paper = TINY.split("[paper.")[0]
    assert "[[task]] 'mytask': not a fedplora task name; add task = " in error_of(
        tmp_path, no_paper.replace('[[task]]\nname = "tweets"', '[[task]]\nname = "mytask"'))
    message = error_of(tmp_path, no_paper.replace('name = "tweets"', 'name = "mytask"\ntask = "twets"'))
    assert "[[task]] #1 'mytask': task: must be 'bbc', " in message and message.endswith("got 'twets' (--task)")
    assert "needs at least one [[method]] entry" in error_of(tmp_path, '[[task]]\nname = "tweets"\n'
                                                                         '[[partition]]\nname = "iid"\n')


def test_the_cells_their_order_folders_and_settings(tmp_path):
    study = load_study(write(tmp_path, TINY), out=tmp_path / "out")
    assert len(study.cells) == 8
    # seed-major, then task, partition, method: a study stopped after seed 0 has a complete table
    assert [c.rel for c in study.cells[:4]] == ["cells/tweets/iid/fedit-r/seed0", "cells/tweets/iid/fedit-r2/seed0",
                                                "cells/tweets/skew/fedit-r/seed0", "cells/tweets/skew/fedit-r2/seed0"]
    assert [c.index for c in study.cells] == list(range(1, 9))
    c = study.cells[3]
    assert c.folder == tmp_path / "out" / "cells" / "tweets" / "skew" / "fedit-r2" / "seed0"
    cfg = c.cfg
    assert (cfg.task, cfg.method, cfg.rank, cfg.ranks, cfg.rank_shares, cfg.alpha) == \
        ("tweets", "fedit", 4, [2, 4], [1.0, 1.0], 8.0)  # ranks alone: equal shares
    assert (cfg.partitioner, cfg.dirichlet_alpha, cfg.rounds, cfg.seed, cfg.out) == \
        ("dirichlet_per_client", 0.3, 2, 0, str(c.folder))
    assert study.cells[4].seed == 1 and study.cells[4].cfg.seed == 1
    assert study.paper == {"tweets": {"iid": {"fedit-r": 70.0}}}


def test_overrides_apply_to_the_cells_they_name(tmp_path):
    text = TINY + '\n[[override]]\nmethod = "fedit-r2"\npartition = ["skew"]\nlr = 0.001\n'
    study = load_study(write(tmp_path, text), out=tmp_path / "out")
    lrs = {c.rel: c.cfg.lr for c in study.cells if c.seed == 0}
    assert lrs["cells/tweets/skew/fedit-r2/seed0"] == 0.001
    assert lrs["cells/tweets/iid/fedit-r2/seed0"] == lrs["cells/tweets/skew/fedit-r/seed0"] == 4e-3
    assert "'nope' is not a [[method]] name" in error_of(tmp_path, TINY + '\n[[override]]\nmethod = "nope"\nlr = 1.0\n')
    assert "[[override]] #1: lr: must be a number > 0" in error_of(
        tmp_path, TINY + '\n[[override]]\nmethod = "fedit-r"\nlr = -1.0\n')


# ------------------------------------------------------------------ fake finished cells
def fake_summary(cell, accuracy: float) -> dict:
    history = [{"round": 0, "metrics": {"accuracy": 0.3, "loss": 1.1}, "bytes_up": 0, "bytes_down": 0,
                "init_noise": 0.0, "agg_noise": 0.0}]
    for r in range(1, cell.cfg.rounds + 1):
        history.append({"round": r, "metrics": {"accuracy": accuracy - 0.1 * (cell.cfg.rounds - r), "loss": 0.5},
                        "bytes_up": 1_000_000 * cell.cfg.rank, "bytes_down": 2_000_000 * cell.cfg.rank,
                        "init_noise": 0.0, "agg_noise": 0.5 * r, "paper_agg_noise": 0.25 * r})
    return {"method": cell.cfg.method, "task": cell.cfg.task, "metric": "accuracy", "seed": cell.seed,
            "rounds": cell.cfg.rounds, "final": history[-1]["metrics"], "initial": history[0]["metrics"],
            "history": history, "bytes_up_total": sum(h["bytes_up"] for h in history),
            "bytes_down_total": sum(h["bytes_down"] for h in history), "wall_s": time.time() % 1000}


def finish(cell, accuracy: float, cfg=None) -> None:
    """A cell folder as a finished `fedplora run` leaves it (config.toml as the ServerApp writes it)."""
    from fedplora.config import RunConfig

    cell.folder.mkdir(parents=True, exist_ok=True)
    saved = RunConfig.from_dict(expected_config(cell)).with_overrides(out=str(cell.folder.resolve()), client_gpus=0.0)
    (cell.folder / "config.toml").write_text((cfg or saved).to_toml())
    (cell.folder / "summary.json").write_text(json.dumps(fake_summary(cell, accuracy)))


def test_skip_resume_and_changed_settings(tmp_path):
    path = write(tmp_path, TINY)
    study = load_study(path, out=tmp_path / "out")
    a, b, c = study.cells[:3]
    assert cell_status(a) == "todo"
    finish(a, 0.7)
    assert cell_status(a) == "done"
    # a stopped cell: config.toml and a checkpoint, no summary -> continued from the checkpoint
    finish(b, 0.6)
    (b.folder / "summary.json").unlink()
    assert cell_status(b) == "todo"  # no checkpoint: started again
    (b.folder / "checkpoint").mkdir()
    (b.folder / "checkpoint" / "checkpoint.json").write_text("{}")
    assert cell_status(b) == "resume"
    # where the cell lies and the machine-resolved GPU share may differ; a moved study is still done
    moved = load_study(path, out=tmp_path / "out")
    assert cell_status(moved.cells[0]) == "done"
    check_conflicts(moved)
    # the study file changed a setting of a finished cell: refused before anything runs, one line
    changed = load_study(write(tmp_path, TINY.replace("local_steps = 2", "local_steps = 3")), out=tmp_path / "out")
    assert cell_status(changed.cells[0]) == "conflict"
    assert cell_status(changed.cells[2]) == "todo"
    with pytest.raises(ConfigError) as e:
        check_conflicts(changed)
    msg = str(e.value)
    assert "fedit-r/seed0: it was run with local_steps=2, the study file now gives local_steps=3" in msg
    assert "1 more cells differ too" in msg and "\n" not in msg


def test_a_conflict_stops_the_command_with_one_line(tmp_path, capsys):
    path = write(tmp_path, TINY)
    study = load_study(path, out=tmp_path / "out")
    finish(study.cells[0], 0.7)
    write(tmp_path, TINY.replace("local_steps = 2", "local_steps = 3"))
    assert main([str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedplora: error: ") and "local_steps=2" in err and "\n" not in err
    assert main([str(path), "--out", str(tmp_path / "out"), "--report-only"]) == 2
    assert "local_steps=2" in capsys.readouterr().err and not (tmp_path / "out" / "table.json").exists()


def test_a_cell_another_study_already_ran_with_the_same_settings_is_copied_not_run(tmp_path, capsys, monkeypatch):
    from fedplora.study import run_study

    first = load_study(write(tmp_path, TINY, "first.toml"), out=tmp_path / "first")
    finish(first.cells[0], 0.7)  # iid/fedit-r/seed0
    finish(first.cells[1], 0.6)  # iid/fedit-r2/seed0
    # the second study: the same federation, FedIT R under another name; FedIT R/2 with another lr
    second_text = (TINY.replace('name = "tiny"', 'name = "second"\nreuse = ["first", "missing"]')
                   .replace('name = "fedit-r"\n', 'name = "fedit-full"\n')
                   .replace("alpha = 8.0", "alpha = 8.0\nlr = 0.05").replace("seeds = [0, 1]", "seeds = [0]").replace("fedit-r = 70.0", "fedit-full = 70.0"))
    path = write(tmp_path, second_text, "second.toml")
    monkeypatch.chdir(tmp_path)  # reuse folders are relative to where the command runs, like out
    assert main([str(path), "--out", str(tmp_path / "second"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "reuse     cells/tweets/iid/fedit-full/seed0" in out and "todo      cells/tweets/iid/fedit-r2/seed0" in out
    assert "to run: 3 cells" in out and "(its 1 finished cell, 1 of them to be copied)" in out  # the copy's clock
    second = load_study(path, out=tmp_path / "second")
    (first.cells[0].folder / "checkpoint").mkdir()  # a finished run keeps its last checkpoint; the copy does not
    (first.cells[0].folder / "checkpoint" / "checkpoint.json").write_text("{}")
    second.cells[0].folder.mkdir(parents=True)
    (second.cells[0].folder / "stale.txt").write_text("from an earlier failed attempt")
    lines = []
    result = run_study(second, only_cells=0, echo_rounds=False, log=lines.append)
    assert [c.rel for c in result["reused"]] == ["cells/tweets/iid/fedit-full/seed0"] and result["ran"] == []
    cell = second.cells[0]
    assert cell_status(cell) == "done"  # its config.toml now names where it lies; nothing conflicts
    check_conflicts(second)
    assert (json.loads((cell.folder / "summary.json").read_text())
            == json.loads((first.cells[0].folder / "summary.json").read_text()))
    assert any("reused" in line and f"first/{first.cells[0].rel}" in line for line in lines)
    assert read_state(tmp_path / "second")["cells"][cell.rel]["reused_from"] == f"first/{first.cells[0].rel}"
    assert "1 done (1 copied from [study] reuse), 3 to run" in lines[-1]
    assert sorted(p.name for p in cell.folder.iterdir()) == ["config.toml", "summary.json"]
    assert not list(cell.folder.parent.glob("*.reusing"))
    from fedplora.config import RunConfig

    assert RunConfig.from_toml(cell.folder / "config.toml").out == str(cell.folder.resolve())
    assert cell_status(second.cells[1]) == "todo"  # another lr: run, never copied
    assert "reuse names this study's own out folder" in error_of(
        tmp_path, TINY.replace('name = "tiny"', 'name = "tiny"\nreuse = ["out"]'))
    assert "reuse must be a list" in error_of(tmp_path, TINY.replace('name = "tiny"', 'name = "tiny"\nreuse = [1]'))


def test_dry_run_lists_the_cells_and_their_state(tmp_path, capsys):
    path = write(tmp_path, TINY)
    study = load_study(path, out=tmp_path / "out")
    finish(study.cells[0], 0.7)
    assert main([str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8 cells" in out and "done      cells/tweets/iid/fedit-r/seed0" in out
    assert "todo      cells/tweets/skew/fedit-r2/seed1" in out and "to run: 7 cells, 56 local steps" in out


def test_dry_run_estimates_from_the_finished_cells_run_time_else_the_constant(tmp_path, capsys):
    from fedplora.study import START_SECONDS, STEP_SECONDS

    path = write(tmp_path, TINY)
    assert main([str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    expected = round(8 * (8 * STEP_SECONDS + START_SECONDS))  # 8 cells of 2 rounds x 2 clients x 2 steps
    assert f"about {expected // 60}m{expected % 60:02d}s; tweets at {STEP_SECONDS:.2f} s a step (no finished cell" \
        in capsys.readouterr().out
    study = load_study(path, out=tmp_path / "out")
    finish(study.cells[0], 0.7)
    summary = json.loads((study.cells[0].folder / "summary.json").read_text())
    (study.cells[0].folder / "summary.json").write_text(json.dumps({**summary, "wall_s": 16.0}))  # 2 s a step
    assert main([str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    expected = 7 * (8 * 2 + START_SECONDS)
    assert f"about {expected // 60}m{expected % 60:02d}s; tweets at 2.00 s a step (its 1 finished cell)" \
        in capsys.readouterr().out


def test_the_report_is_made_from_the_cell_folders_and_is_deterministic(tmp_path, capsys):
    path = write(tmp_path, TINY)
    study = load_study(path, out=tmp_path / "out")
    accuracies = [0.70, 0.60, 0.65, 0.55, 0.74, 0.62, 0.61, 0.57]
    for cell, acc in zip(study.cells, accuracies):
        finish(cell, acc)
    assert main([str(path), "--out", str(tmp_path / "out"), "--report-only"]) == 0
    out = tmp_path / "out"
    first = {name: (out / name).read_bytes() for name in ("table.json", "report.md")}
    table = json.loads(first["table.json"])
    t = table["tables"][0]
    assert (t["task"], t["partition"], t["metric"]) == ("tweets", "iid", "accuracy")
    r = t["rows"][0]
    assert r["label"] == "FedIT R" and r["seeds"] == [0, 1] and r["n"] == 2 and r["paper"] == 70.0
    assert r["mean"] == pytest.approx(72.0) and r["std"] == pytest.approx(2.8284271247)
    assert r["up_mb"] == pytest.approx(16.0) and r["down_mb"] == pytest.approx(32.0)
    assert r["noise"] == {"agg_noise": pytest.approx(0.75), "init_noise": 0.0, "paper_agg_noise": pytest.approx(0.375)}
    assert r["per_round"]["round"] == [0, 1, 2] and r["per_round"]["accuracy"] == pytest.approx([30.0, 62.0, 72.0])
    assert t["rows"][1]["paper"] is None and t["rows"][1]["mean"] == pytest.approx(61.0)
    assert table["cells"] == {"total": 8, "done": 8, "missing": []}
    report = first["report.md"].decode()
    assert "| FedIT R | IID | 72.00 ± 2.83 (2) [70.00] |" in report
    assert "| FedIT R/2 | non-IID | 56.00 ± 1.41 (2) |" in report
    # each method across the partitions, side by side
    assert "## tweets: accuracy (×100) per partition" in report and "| method | IID | non-IID |" in report
    assert "| FedIT R/2 | 61.00 ± 1.41 (2) | 56.00 ± 1.41 (2) |" in report
    # the reading: gap 11 > the larger std (2.83) is marked; round 0 was 0.3 in every cell
    assert r["start"] == pytest.approx(30.0)
    assert "| tweets | IID | 30.00 | FedIT R 72.00 · FedIT R/2 −11.00* | FedIT R 70.00 |" in report
    assert "| tweets | non-IID | 30.00 | FedIT R 63.00 · FedIT R/2 −7.00* |" in report
    assert str(tmp_path) not in report and str(tmp_path) not in first["table.json"].decode()
    for name in ("tweets-iid-metric.png", "tweets-iid-noise.png", "tweets-skew-traffic.png", "tweets-by-partition.png"):
        assert (out / "plots" / name).is_file()
    assert "run time s" in (out / "times.md").read_text()
    # the same cells again (their wall times differ): byte-identical table and report
    for cell, acc in zip(study.cells, accuracies):
        finish(cell, acc)
    write_report(load_study(path, out=out), plots=False)
    assert {name: (out / name).read_bytes() for name in first} == first
    # a study elsewhere holding the same cells (copied, e.g. from another machine) gives the same bytes
    import shutil

    shutil.copytree(out / "cells", tmp_path / "copy" / "cells")
    write_report(load_study(path, out=tmp_path / "copy"), plots=False)
    assert {name: (tmp_path / "copy" / name).read_bytes() for name in first} == first


def _r(method: str, values: list[float], paper: float | None = None) -> dict:
    import statistics
    return {"method": method, "label": method.upper(), "n": len(values), "paper": paper,
            "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None}


def test_the_reading_ranks_marks_gaps_beyond_the_seed_spread_and_says_when_nothing_separates():
    from fedplora.study import reading

    rows = [_r("a", [80.0, 82.0, 84.0], paper=90.0),  # 82 ± 2
            _r("b", [79.0, 81.0, 83.0], paper=91.0),  # 81 ± 2: 1 point behind, within the spread
            _r("c", [70.0, 76.0, 73.0]),              # 73 ± 3: 9 behind, beyond max(2, 3)
            _r("d", [60.0]),                          # one seed: no deviation to compare with
            _r("e", [])]                              # not run yet: left out
    rd = reading(rows)
    assert [(e["method"], e["gap"], e["deviation"], e["beyond"]) for e in rd["ours"]] == [
        ("a", 0.0, 2.0, None), ("b", 1.0, 2.0, False), ("c", 9.0, 3.0, True), ("d", 22.0, None, None)]
    assert [(e["method"], e["gap"]) for e in rd["paper"]] == [("b", 0.0), ("a", 1.0)]
    assert rd["all_equal"] is None
    # every method at the same figure (e.g. all stuck at the majority class): said, not ranked
    same = reading([_r("a", [49.08, 49.08]), _r("b", [49.08])])
    assert same["all_equal"] == pytest.approx(49.08)
    assert reading([_r("a", [50.0])])["all_equal"] is None  # one method is no comparison
    # a method whose model predicts one class on every seed (final MCC exactly 0) is marked; all of them: no ranking
    stuck = [dict(_r("a", [81.0, 80.0]), one_class=0), dict(_r("b", [49.08, 49.08]), one_class=2),
             dict(_r("c", [50.92, 49.08]), one_class=1)]
    rd = reading(stuck)
    assert [(e["method"], e["one_class"]) for e in rd["ours"]] == [("a", False), ("c", False), ("b", True)]
    assert not rd["all_one_class"]
    assert reading([dict(_r("a", [49.08]), one_class=1), dict(_r("b", [50.92]), one_class=1)])["all_one_class"]


def test_one_class_models_are_marked_in_the_report_from_their_final_mcc(tmp_path):
    path = write(tmp_path, TINY.replace("seeds = [0, 1]", "seeds = [0]").replace(SKEW, ""))
    study = load_study(path, out=tmp_path / "out")
    for cell, acc, mcc in zip(study.cells, [0.70, 0.45], [0.41, 0.0]):
        finish(cell, acc)
        summary = json.loads((cell.folder / "summary.json").read_text())
        summary["final"]["mcc"] = mcc
        (cell.folder / "summary.json").write_text(json.dumps(summary))
    table = write_report(study, plots=False)
    assert [r["one_class"] for r in table["tables"][0]["rows"]] == [0, 1]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| tweets | IID | 30.00 | FedIT R 70.00 · FedIT R/2 −25.00° | FedIT R 70.00 |" in report
    cells = [line.split(" | ") for line in report.splitlines() if line.startswith(("| method | accuracy", "| FedIT"))]
    column = cells[-3].index("one-class seeds")  # the cell table's header, then its two rows
    assert [(c[0], c[column]) for c in cells[-2:]] == [("| FedIT R", "0 of 1"), ("| FedIT R/2", "1 of 1")]


def test_a_partial_study_reports_what_is_done_and_lists_the_rest(tmp_path):
    path = write(tmp_path, TINY)
    study = load_study(path, out=tmp_path / "out")
    finish(study.cells[0], 0.7)
    table = write_report(study, plots=False)
    assert table["cells"]["done"] == 1 and len(table["cells"]["missing"]) == 7
    row = table["tables"][0]["rows"][0]
    assert row["n"] == 1 and row["std"] is None
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| FedIT R | IID | 70.00 (1) [70.00] |" in report and "| FedIT R/2 | IID | — |" in report
    assert "## Cells not done" in report and "- `cells/tweets/skew/fedit-r2/seed1`" in report


def test_a_failed_cell_is_recorded_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    from fedplora.errors import DataError
    from fedplora.federation import simulation
    from fedplora.study import STATE_FILE, read_state

    path = write(tmp_path, TINY.replace("seeds = [0, 1]", "seeds = [0]"))
    calls = []

    def fake_run(cfg, out, progress=None, *, resume=False):
        calls.append((Path(out).name, Path(out).parent.name, resume))
        if Path(out).parent.name == "fedit-r2":
            raise DataError("tweets: something is wrong with the data")
        cell = next(c for c in load_study(path, out=tmp_path / "out").cells if c.folder == Path(out))
        finish(cell, 0.7)
        return json.loads((Path(out) / "summary.json").read_text())

    monkeypatch.setattr(simulation, "run_simulation", fake_run)
    assert main([str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    assert len(calls) == 4
    state = read_state(tmp_path / "out")
    assert state["cells"]["cells/tweets/iid/fedit-r2/seed0"]["status"] == "failed"
    assert state["cells"]["cells/tweets/iid/fedit-r2/seed0"]["error"] == "tweets: something is wrong with the data"
    assert state["cells"]["cells/tweets/skew/fedit-r/seed0"]["status"] == "done"
    captured = capsys.readouterr()
    assert "cell 2/4 FAILED (tweets, IID, FedIT R/2, seed 0)" in captured.out
    assert "cell 3/4 done (tweets, non-IID, FedIT R, seed 0): accuracy 0.7000" in captured.out
    assert "2 cells failed" in captured.err and (tmp_path / "out" / STATE_FILE).is_file()
    # a rerun runs only the failed cells
    calls.clear()
    main([str(path), "--out", str(tmp_path / "out"), "--quiet", "--only-cells", "1"])
    assert calls == [("seed0", "fedit-r2", False)]


def test_only_cells_and_the_progress_lines(tmp_path, monkeypatch, capsys):
    from fedplora.federation import simulation
    from fedplora.study import START_SECONDS

    path = write(tmp_path, TINY)

    def fake_run(cfg, out, progress=None, *, resume=False):
        cell = next(c for c in load_study(path, out=tmp_path / "out").cells if c.folder == Path(out))
        finish(cell, 0.7)
        summary = {**json.loads((Path(out) / "summary.json").read_text()), "wall_s": 16.0}  # 2 s a step
        (Path(out) / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(simulation, "run_simulation", fake_run)
    assert main([str(path), "--out", str(tmp_path / "out"), "--quiet", "--only-cells", "3"]) == 0
    out = capsys.readouterr().out
    assert "study tiny: 8 cells, 0 done, 8 to run" in out
    assert "cell 1/8 starts (tweets, IID, FedIT R, seed 0)" in out
    # the estimate the dry run gives: the 5 cells left at 2 s a step (the finished cells' rate) plus start-up
    expected = 5 * (8 * 2 + START_SECONDS)
    assert ("cell 3/8 done (tweets, non-IID, FedIT R, seed 0): accuracy 0.7000 in 0s; 5 left, "
            f"about {expected // 60}m{expected % 60:02d}s") in out
    assert "3 of 8 cells done" in out
    assert main([str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "8 cells, 3 done, 5 to run" in out and "cell 4/8 starts" in out and "cell 1/8" not in out


def test_cells_runs_only_the_matching_cells_and_the_report_still_lists_the_rest(tmp_path, monkeypatch, capsys):
    from fedplora.federation import simulation
    from fedplora.study import select_cells

    path = write(tmp_path, TINY)
    study = load_study(path, out=tmp_path / "out")
    rels = lambda cells: [c.rel.removeprefix("cells/") for c in cells]  # noqa: E731
    assert rels(select_cells(study, ["tweets/iid/*"])) == [
        "tweets/iid/fedit-r/seed0", "tweets/iid/fedit-r2/seed0", "tweets/iid/fedit-r/seed1", "tweets/iid/fedit-r2/seed1"]
    # several patterns: the study's order, each cell once; a leading cells/ is accepted
    assert rels(select_cells(study, ["*/seed1", "cells/tweets/skew/fedit-r/*"])) == [
        "tweets/skew/fedit-r/seed0", "tweets/iid/fedit-r/seed1", "tweets/iid/fedit-r2/seed1",
        "tweets/skew/fedit-r/seed1", "tweets/skew/fedit-r2/seed1"]
    assert len(select_cells(study, None)) == 8
    ran = []

    def fake_run(cfg, out, progress=None, *, resume=False):
        cell = next(c for c in load_study(path, out=tmp_path / "out").cells if c.folder == Path(out))
        ran.append(cell.rel)
        finish(cell, 0.7)
        return json.loads((Path(out) / "summary.json").read_text())

    monkeypatch.setattr(simulation, "run_simulation", fake_run)
    assert main([str(path), "--out", str(tmp_path / "out"), "--quiet", "--cells", "*/seed0"]) == 0
    out = capsys.readouterr().out
    assert ran == [c.rel for c in study.cells if c.seed == 0]
    assert "8 cells, 0 done, 4 to run of the 4 --cells chooses" in out and "4 of 8 cells done" in out
    assert "- `cells/tweets/iid/fedit-r/seed1`" in (tmp_path / "out" / "report.md").read_text()
    # the dry run lists the others as left out and prices only the chosen
    assert main([str(path), "--out", str(tmp_path / "out"), "--dry-run", "--cells", "tweets/iid/*"]) == 0
    out = capsys.readouterr().out
    assert "left out  cells/tweets/skew/fedit-r/seed1" in out and "to run: 2 cells" in out
    # a pattern that matches nothing, or none at all: one line, exit 2, nothing runs
    assert main([str(path), "--out", str(tmp_path / "out"), "--cells", "sst2/*"]) == 2
    err = capsys.readouterr().err
    assert "--cells 'sst2/*': matches none of the study's 8 cells" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main([str(path), "--cells", " , "])
    assert len(ran) == 4


def test_the_study_parser_wires_into_a_subparsers_object():
    import argparse

    parser = argparse.ArgumentParser(prog="fedplora")
    sub = parser.add_subparsers(dest="command")
    add_study_parser(sub)
    args = parser.parse_args(["study", "x.toml", "--only-cells", "2", "--report-only"])
    assert (args.command, args.file, args.only_cells, args.report_only, args.dry_run) == ("study", "x.toml", 2,
                                                                                         True, False)


def test_the_shipped_study_files_are_valid(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    demo = load_study(ROOT / "studies" / "demo.toml")
    assert len(demo.cells) == 12
    assert {(c.method.label, c.cfg.rank) for c in demo.cells} == {("Fed-PLoRA", 8), ("FedIT R", 8), ("FedIT R/2", 4)}
    if not (ROOT.parent / "shared" / "data" / "sst2").is_dir():
        pytest.skip("../shared/data is not here: studies/glue-paper.toml reads its data from there")
    glue = load_study(ROOT / "studies" / "glue-paper.toml")
    assert len(glue.cells) == 3 * 2 * 6 * 3
    c = next(c for c in glue.cells if c.rel == "cells/cola/dir0.01/fedit-r2/seed2")
    assert (c.cfg.task, c.cfg.rounds, c.cfg.rank, c.cfg.alpha, c.cfg.num_clients, c.cfg.clients_per_round) == \
        ("cola", 200, 8, 8.0, 100, 10)
    assert (c.cfg.partitioner, c.cfg.dirichlet_alpha, c.cfg.targets, c.cfg.weighting) == \
        ("dirichlet_per_client", 0.01, ["query", "value"], "uniform")
    assert glue.paper["sst2"]["iid"]["fedplora"] == 92.35 and glue.paper["cola"]["dir0.01"]["flora"] == -2.07
    assert len([v for t in glue.paper.values() for p in t.values() for v in p.values()]) == 36
    assert main([str(ROOT / "studies" / "glue-paper.toml"), "--dry-run", "--out", "/nonexistent/x"]) == 0
    assert "108 cells" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "studies").glob("*.toml")))
def test_every_shipped_study_file_loads(name):
    text = (ROOT / "studies" / name).read_text()
    if "../shared/data" in text and not (ROOT.parent / "shared" / "data").is_dir():
        pytest.skip("../shared/data is not here")
    study = load_study(ROOT / "studies" / name)
    assert study.cells and len({c.rel for c in study.cells}) == len(study.cells)


# ------------------------------------------------------------------ end to end (below): stopped and continued
def _study_cmd(path: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fedplora.study", str(path), "--out", str(out), "--quiet", *extra]


def test_function_level_noise_is_reported_once_under_its_fn_name():
    from fedplora.study import _noise_keys

    new = [{"round": 1, "init_noise": 0.0, "agg_noise": 2.0, "fn_init_noise": 0.0, "fn_agg_noise": 2.0,
            "paper_init_noise": 0.0, "paper_agg_noise": 0.5}]
    assert _noise_keys(new) == ["fn_agg_noise", "fn_init_noise", "paper_agg_noise", "paper_init_noise"]
    old = [{"round": 1, "init_noise": 0.0, "agg_noise": 2.0}]  # a run from before the fn_/paper_ names
    assert _noise_keys(old) == ["agg_noise", "init_noise"]


def test_compare_and_the_study_summarise_seeds_with_one_definition_and_one_seed_has_no_std():
    """`fedplora compare` takes its per-method figures from the study's summariser: the same mean and std, and
    for one seed no std (undefined, not 0.0), shown as the mean alone in both reports."""
    import types

    from fedplora.compare import markdown, summarize
    from fedplora.study import Entry, method_row, spread

    def run(seed: int, acc: float, mcc: float) -> dict:
        history = [{"round": r, "metrics": {"accuracy": acc}, "fn_init_noise": 0.0, "fn_agg_noise": 1.0,
                    "paper_init_noise": 0.0, "paper_agg_noise": 2.0, "bytes_up": 10, "bytes_down": 20}
                   for r in (0, 1)]
        return {"seed": seed, "metric": "accuracy", "final": {"accuracy": acc, "mcc": mcc}, "history": history,
                "bytes_up_total": 10 + seed, "bytes_down_total": 20, "wall_s": 1.0}

    two, one = [run(0, 0.70, 0.40), run(1, 0.60, 0.20)], [run(0, 0.65, 0.30)]
    table = summarize({"a": two, "b": one})
    for name, runs in (("a", two), ("b", one)):
        row = method_row(Entry("method", name, name, {}), "accuracy", runs, scale=1.0)
        assert table[name]["final"]["accuracy"] == spread([0.70, 0.60] if name == "a" else [0.65]) \
            == {"mean": row["mean"], "std": row["std"]}
        assert table[name]["final"]["mcc"] == row["other_metrics"]["mcc"]
        assert table[name]["bytes_up_total"] / 1e6 == row["up_mb"]
    assert table["a"]["final"]["accuracy"]["std"] > 0 and table["b"]["final"]["accuracy"]["std"] is None
    cfg = types.SimpleNamespace(task="t", num_clients=2, clients_per_round=2, rounds=1, rank=4, ranks=[1],
                                rank_shares=[1.0], partitioner="iid")
    text = markdown(table, cfg, "cmd")
    assert "| a | 0.6500 ± 0.0707 | 0.3000 ± 0.1414 |" in text and "| b | 0.6500 | 0.3000 |" in text
    assert "One seed has no std" in text
    assert "One seed has no std" not in markdown({"a": table["a"]}, cfg, "cmd")


# ------------------------------------------------------------------ time to target (issue 25, item 3)
def _timed_run(seed: int, curve: list[float | None], walls: list[float] | None = None) -> dict:
    """A run whose round r has ``curve[r]`` as accuracy (None: not evaluated) and ``walls[r-1]`` wall seconds."""
    walls = walls or [10.0] * (len(curve) - 1)
    history = [{"round": r, "metrics": {} if v is None else {"accuracy": v}, "wall_s": 0.0 if r == 0 else walls[r - 1]}
               for r, v in enumerate(curve)]
    return {"seed": seed, "metric": "accuracy", "final": {"accuracy": curve[-1]}, "history": history,
            "bytes_up_total": 1, "bytes_down_total": 1, "wall_s": sum(walls)}


def test_time_to_target_finds_the_first_round_and_its_wall_seconds_and_counts_a_seed_that_never_reaches_it():
    from fedplora.study import TARGET_FRACTION, first_reach, mean_std, spread, time_to_target

    assert TARGET_FRACTION == 0.95
    fast = [_timed_run(0, [0.3, 0.5, 0.8, 0.9, 1.0], [10.0, 20.0, 30.0, 40.0]),  # 0.8 at round 2: 10 + 20 s
            _timed_run(1, [0.3, 0.4, 0.6, 0.8, 0.8], [11.0, 12.0, 13.0, 14.0])]  # 0.8 at round 3: 36 s
    slow = [_timed_run(0, [0.3, 0.4, 0.5, 0.6, 0.85]), _timed_run(1, [0.3, 0.4, 0.5, 0.7, 0.7])]  # seed 1: never
    steady = [_timed_run(0, [0.3, None, None, None, 0.8]), _timed_run(1, [0.3, None, None, None, 0.8])]  # eval at 4
    # the best final figure: fast's mean 0.9; the target is the fraction of it, 0.9 * 0.9 = 0.81 -> not 0.8
    assert first_reach(fast[0]["history"], "accuracy", 0.8) == (2, 30.0)
    assert first_reach(fast[1]["history"], "accuracy", 0.8) == (3, 36.0)
    assert first_reach(fast[1]["history"], "accuracy", 0.81) is None
    assert first_reach(fast[0]["history"], "accuracy", 0.2) == (0, 0.0)  # round 0 (before training) counts 0 s
    assert first_reach(fast[0]["history"], "accuracy", 80.0, scale=100.0) == (2, 30.0)  # the table's own scale
    reach = time_to_target({"fast": fast, "slow": slow, "steady": steady}, "accuracy", fraction=8 / 9)
    assert reach["best"] == "fast" and reach["best_mean"] == pytest.approx(0.9)
    assert reach["target"] == pytest.approx(0.8)
    f, s, st = (reach["methods"][k] for k in ("fast", "slow", "steady"))
    assert (f["n"], f["reached"]) == (2, 2) and f["rounds"] == spread([2.0, 3.0]) and f["seconds"] == spread([30.0, 36.0])
    assert [(p["seed"], p["round"], p["seconds"]) for p in f["per_seed"]] == [(0, 2, 30.0), (1, 3, 36.0)]
    # a seed that never reaches the target is counted, not averaged: one seed left, so no std
    assert (s["n"], s["reached"]) == (2, 1) and s["rounds"] == {"mean": 4.0, "std": None}
    assert s["seconds"] == {"mean": 40.0, "std": None} and s["per_seed"][1] == {"seed": 1, "round": None, "seconds": None}
    # evaluated only at round 4: the first *evaluated* round that reaches it
    assert st["rounds"] == {"mean": 4.0, "std": 0.0} and st["seconds"]["mean"] == 40.0
    # vs fastest: among the methods every seed of which reaches the target (slow's lucky seed is not compared)
    assert reach["fastest"] == "fast" and reach["fastest_rounds"] == 2.5
    assert f["slower"] == 1.0 and st["slower"] == pytest.approx(4.0 / 2.5) and s["slower"] is None
    assert mean_std([4.0])[1] is None  # the study's one summariser
    # the default fraction: 95% of 0.9 = 0.855, which only fast's seed 0 reaches (round 3, 60 s)
    default = time_to_target({"fast": fast, "slow": slow}, "accuracy")
    assert default["fraction"] == 0.95 and default["target"] == pytest.approx(0.855)
    assert default["methods"]["fast"]["per_seed"][0]["round"] == 3 and default["methods"]["fast"]["reached"] == 1
    assert default["fastest"] is None and default["methods"]["fast"]["slower"] is None
    # a history without wall_s: the round is known, the seconds are not
    old = _timed_run(0, [0.3, 0.9])
    del old["history"][1]["wall_s"]
    assert first_reach(old["history"], "accuracy", 0.8) == (1, None)
    assert time_to_target({"old": [old]}, "accuracy")["methods"]["old"]["seconds"] is None
    # no target when the best final figure is not positive (every method at MCC 0: nothing to take a fraction of)
    zero = time_to_target({"a": [_timed_run(0, [0.0, 0.0])]}, "accuracy")
    assert zero["target"] is None and zero["methods"]["a"]["reached"] == 0


def test_target_fraction_is_one_study_setting_checked_in_one_line(tmp_path):
    assert load_study(write(tmp_path, TINY), out=tmp_path / "out").target_fraction == 0.95
    head = 'name = "tiny"'
    assert load_study(write(tmp_path, TINY.replace(head, head + "\ntarget_fraction = 0.8")),
                      out=tmp_path / "out").target_fraction == 0.8
    assert load_study(write(tmp_path, TINY.replace(head, head + "\ntarget_fraction = 1")),
                      out=tmp_path / "out").target_fraction == 1.0
    assert "[study]: target_fraction must be a number in (0, 1]" in error_of(
        tmp_path, TINY.replace(head, head + "\ntarget_fraction = 1.5"))
    assert "[study]: target_fraction must be a number in (0, 1]" in error_of(
        tmp_path, TINY.replace(head, head + "\ntarget_fraction = 0"))
    assert "[study]: target_fraction must be a number, got 'high'" in error_of(
        tmp_path, TINY.replace(head, head + '\ntarget_fraction = "high"'))
    assert "(did you mean 'target_fraction'?)" in error_of(tmp_path, TINY.replace(head, head + "\ntarget_fractoin = 1"))


def test_table_json_report_md_and_times_md_carry_the_time_to_target(tmp_path):
    """Rounds to target (deterministic) in table.json and report.md; the wall seconds, which differ between
    sessions, in times.md."""
    path = write(tmp_path, TINY.replace('name = "tiny"', 'name = "tiny"\ntarget_fraction = 0.8'))
    study = load_study(path, out=tmp_path / "out")
    for cell, acc in zip(study.cells, [0.70, 0.60, 0.65, 0.55, 0.74, 0.62, 0.61, 0.57]):
        finish(cell, acc)
        summary = json.loads((cell.folder / "summary.json").read_text())
        for h in summary["history"]:
            h["wall_s"] = 0.0 if h["round"] == 0 else 5.0 * h["round"]  # rounds 1, 2: 5 s, 10 s
        (cell.folder / "summary.json").write_text(json.dumps(summary))
    table = write_report(study, plots=False)
    assert table["target_fraction"] == 0.8
    t = table["tables"][0]  # tweets, IID: FedIT R 72.0 is the best; 80% of it is 57.6
    assert t["target"] == {"fraction": 0.8, "best": "fedit-r", "best_mean": pytest.approx(72.0),
                           "target": pytest.approx(57.6), "fastest": "fedit-r", "fastest_rounds": 1.0}
    r, r2 = t["rows"]
    # FedIT R: 60 and 64 at round 1; FedIT R/2: 50 and 52 at round 1, 60 and 62 at round 2
    assert r["to_target"] == {"reached": 2, "n": 2, "rounds": {"mean": 1.0, "std": 0.0}, "per_seed": [1, 1],
                              "slower": 1.0}
    assert r2["to_target"] == {"reached": 2, "n": 2, "rounds": {"mean": 2.0, "std": 0.0}, "per_seed": [2, 2],
                               "slower": 2.0}
    assert "seconds" not in json.dumps(table)  # no wall times in the deterministic table
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| method | accuracy (×100) | seeds | paper | rounds to 57.60 | vs fastest | up MB |" in report
    assert "| FedIT R | 72.00 ± 2.83 | 0,1 | 70.00 | 1.0 ± 0.0 | 1.00× |" in report
    assert "| FedIT R/2 | 61.00 ± 1.41 | 0,1 | — | 2.0 ± 0.0 | 2.00× |" in report
    assert ("Target: 80% of the best final accuracy (×100) (FedIT R, 72.00), 57.60. Fastest to it on every seed "
            "(1.00× of \"vs fastest\"): FedIT R.") in report
    times = (tmp_path / "out" / "times.md").read_text()
    assert "## Time to target" in times and "| method | rounds (s) to 57.60 | vs fastest | per seed: round (s) |" in times
    assert "| FedIT R/2 | 2.0 ± 0.0 (15 ± 0 s) | 2.00× | 0: 2 (15 s), 1: 2 (15 s) |" in times
    # the default 95%: 68.4 on IID, which FedIT R/2 never reaches
    finish_fraction = load_study(write(tmp_path, TINY, "default.toml"), out=tmp_path / "out")
    t = build_table(finish_fraction)["tables"][0]
    assert t["target"]["target"] == pytest.approx(68.4)
    assert t["rows"][1]["to_target"] == {"reached": 0, "n": 2, "rounds": None, "per_seed": [None, None],
                                         "slower": None}
    write_report(finish_fraction, plots=False)
    assert "| FedIT R/2 | 61.00 ± 1.41 | 0,1 | — | not reached (2 seeds) | — |" in \
        (tmp_path / "out" / "report.md").read_text()


# ------------------------------------------------------------------ several cells at once (--workers)
def _normalised(value, key=""):
    """A summary's or checkpoint record's content less its clock readings (TIMINGS, elapsed_s), with the float64
    noise diagnostic to 12 digits (its sum over layers may round differently in the last bit between
    processes; test_fault_tolerance compares it the same way). Of the record's global generator states only
    torch's: Python's and NumPy's are never seeded (every draw of a run comes from its named streams, rng.py),
    so they differ between any two runs, two sequential ones too."""
    from fedplora.federation.history import TIMINGS

    if key == "rng" and isinstance(value, dict):
        return {"torch": value.get("torch")}
    if isinstance(value, dict):
        return {k: _normalised(v, k) for k, v in value.items() if k not in TIMINGS and k != "elapsed_s"}
    if isinstance(value, list):
        return [_normalised(v, key) for v in value]
    if key.endswith("agg_noise") and isinstance(value, float):
        return float(f"{value:.12g}")
    return value


def _same_cell_folders(a: Path, b: Path) -> int:
    """Every file of every cell folder the same, byte for byte, but the clock: summary.json and the checkpoint
    record compared without their wall times, simulation.log (Flower's streamed log: run ids, clock times) by
    name only. Returns the number of files compared."""
    files = sorted(p.relative_to(a) for p in (a / "cells").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in (b / "cells").rglob("*") if p.is_file())
    for rel in files:
        if rel.name == "simulation.log":
            continue
        if rel.name in ("summary.json", "checkpoint.json"):
            assert _normalised(json.loads((a / rel).read_text())) == _normalised(json.loads((b / rel).read_text())), rel
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    return len(files)


@pytest.mark.slow
def test_a_study_stopped_and_continued_sequentially_and_with_two_workers_gives_one_table_and_the_same_cells(
        tiny_assets, tmp_path):
    """3 cells (IID x FedIT at R, R/2 and rank 1, 1 seed, 2 rounds, the tiny model), run twice in the same out
    folder (so every path inside the cells is the same), each time stopped by SIGTERM and continued:

    * with one worker (the cells run in the study's process), stopped while the second cell runs, after its
      first checkpoint: it exits 130 with every process of the cell gone, and the same command skips the first
      cell and continues the second from its checkpoint;
    * with --workers 2, stopped while the first two cells run, each after its first checkpoint: both stop with
      their checkpoints, and the same command continues both and runs the third uninterrupted, two at once.

    table.json and report.md are byte-identical, and so is every file of every cell folder but the clock
    readings (_same_cell_folders). Cell 1 was stopped and continued with two workers and ran uninterrupted with
    one, so the comparison also shows that continuing a cell gives the uninterrupted cell's files."""
    import psutil

    rank1 = '[[method]]\nname = "fedit-1"\nlabel = "FedIT 1"\nmethod = "fedit"\nrank = 1\nranks = [1]\nalpha = 2.0\n\n'
    text = TINY.replace("seeds = [0, 1]", "seeds = [0]").replace(SKEW, "").replace("[paper.", rank1 + "[paper.").replace(
        "[base]\n", f"[base]\nmodel = {json.dumps(tiny_assets['model'])}\ndata_dir = {json.dumps(tiny_assets['data_dir'])}\n")
    path = write(tmp_path, text)
    study = tmp_path / "study"
    cells = load_study(path, out=study).cells
    assert len(cells) == 3
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               FLWR_DISABLE_UPDATE_CHECK="1", TOKENIZERS_PARALLELISM="false")

    def stop_when_running(workers: str, running: list) -> str:
        """The study with ``workers``, SIGTERMed once each of ``running`` has written a checkpoint; its output."""
        proc = subprocess.Popen(_study_cmd(path, study, "--workers", workers), cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 400
            while not all((c.folder / "checkpoint" / "checkpoint.json").is_file() for c in running):
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, f"cells {[c.index for c in running]} never all checkpointed"
                time.sleep(0.2)
            cell_procs = [p for p in psutil.Process(proc.pid).children()
                          if "fedplora.study.worker" in " ".join(p.cmdline())]
            assert len(cell_procs) == (len(running) if workers != "1" else 0)  # a process per running cell
            children = psutil.Process(proc.pid).children(recursive=True)  # SuperLinks, flwr, Ray, ...
            assert children
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode == 130, out
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"processes of the stopped cells still run: {alive}"
        assert all(not (c.folder / "summary.json").exists() and (c.folder / "checkpoint" / "checkpoint.json").is_file()
                   for c in running)
        return out

    def finish(workers: str) -> str:
        done = subprocess.run(_study_cmd(path, study, "--workers", workers), cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    t0 = time.monotonic()
    out = stop_when_running("1", cells[1:2])
    assert "stopped: 1 of 3 cells done; the running cell keeps its checkpoint" in out
    out = finish("1")
    assert "3 cells, 1 done, 2 to run (1 to continue from a checkpoint);" in out  # one worker: nothing "at once"
    assert "cell 2/3 continues" in out and "cell 1/3" not in out and not (study / "logs").exists()
    study.rename(tmp_path / "sequential")
    t1 = time.monotonic()

    out = stop_when_running("2", cells[:2])
    assert "stopped: 0 of 3 cells done; the running cells keep their checkpoints" in out
    out = finish("2")
    assert "3 cells, 0 done, 3 to run (2 to continue from a checkpoint), 2 at once" in out
    assert "cell 1/3 continues" in out and "cell 2/3 continues" in out and "cell 3/3 starts" in out
    log = (study / "logs" / "tweets" / "iid" / "fedit-r" / "seed0.log").read_text()  # a cell's console, outside it
    assert "the cell starts" in log and "the cell continues" in log and "round 2/2" in log
    t2 = time.monotonic()

    sequential = tmp_path / "sequential"
    assert (study / "table.json").read_text() == (sequential / "table.json").read_text()
    assert (study / "report.md").read_text() == (sequential / "report.md").read_text()
    assert _same_cell_folders(sequential, study) >= 3 * 9  # config, partitions, summary, plot, adapter/, checkpoint/
    table = json.loads((study / "table.json").read_text())
    assert table["cells"]["done"] == 3 and all(r["n"] == 1 for t in table["tables"] for r in t["rows"])
    print(f"\none worker, stopped and continued: {t1 - t0:.0f} s; two workers, stopped and continued: {t2 - t1:.0f} s")


@pytest.mark.slow
def test_a_run_attaches_to_a_ray_cluster_it_did_not_start(tiny_assets, tmp_path, monkeypatch):
    """Flower 1.42's federation config has no Ray address, but its Ray backend calls ray.init() without one, and
    Ray then joins the cluster RAY_ADDRESS names (README, "Running a study on a machine with several GPUs"). A
    head started here (`ray start --head --block`, in a temporary folder of its own, so no other Ray on this
    machine finds it), a one-round run with RAY_ADDRESS set, and the head stopped by PID: `ray stop` would end
    every Ray process on the machine, other runs' too."""
    import tempfile

    from fedplora.config import RunConfig
    from fedplora.federation.processes import flower_env, flwr_bin, free_port, stop_tree, wait_for_port
    from fedplora.federation.simulation import federation_config, run_simulation

    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    port, log = free_port(), tmp_path / "ray-head.log"
    head = subprocess.Popen([flwr_bin("ray"), "start", "--head", "--block", "--port", str(port), "--temp-dir",
                             str(temp), "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=flower_env(tmp_path / "home"),
                            start_new_session=True)
    try:
        wait_for_port(port, head, 180, "ray start --head", log)
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        cfg = RunConfig(model=tiny_assets["model"], data_dir=tiny_assets["data_dir"], rounds=1, num_clients=2,
                        clients_per_round=2, local_steps=2, batch_size=8, max_seq_len=32, eval_max_examples=32,
                        seed=3).validate()
        assert "init-args-num-cpus" not in federation_config(cfg, cpus=1)  # Ray refuses a CPU count for a cluster
        summary = run_simulation(cfg, tmp_path / "run")
        assert [sorted(c["cid"] for c in h["clients"]) for h in summary["history"][1:]] == [[0, 1]]
        assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
        # the clients ran on that cluster: its session holds the actors' logs (and the Simulation Engine's driver's)
        logs = temp / "session_latest" / "logs"
        actors = [p for p in logs.glob("worker-*.out") if ":actor_name:ClientAppActor" in p.read_text()]
        assert actors and list(logs.glob("python-core-driver-*.log"))
    finally:
        stop_tree([head])
        shutil.rmtree(temp, ignore_errors=True)
    assert head.returncode is not None


def test_workers_is_a_flag_and_a_study_key_and_a_bad_value_is_one_line(tmp_path, capsys):
    from fedplora.cli import main as fedplora_main

    path = write(tmp_path, TINY)
    assert load_study(path).workers == 1
    assert load_study(write(tmp_path, TINY.replace('name = "tiny"', 'name = "tiny"\nworkers = 3'), "w.toml")).workers == 3
    for value, shown in (("0", "0"), ("-2", "-2"), ("two", "'two'"), ("1.5", "'1.5'")):
        for run in (lambda: main([str(path), "--workers", value, "--dry-run"]),
                    lambda: fedplora_main(["study", str(path), "--workers", value, "--dry-run"])):
            assert run() == 2
            err = capsys.readouterr().err
            assert err == f"fedplora: error: --workers: must be an integer >= 1 (the cells run at once), got {shown}\n"
    for value in ("0", "true", '"2"'):
        bad = write(tmp_path, TINY.replace('name = "tiny"', f'name = "tiny"\nworkers = {value}'), "bad.toml")
        message = error_of(tmp_path, bad.read_text())
        assert "[study]: workers must be" in message
    # the flag wins over the key, and the dry run divides its estimate among the workers
    keyed = write(tmp_path, TINY.replace('name = "tiny"', 'name = "tiny"\nworkers = 4'), "k.toml")
    assert main([str(keyed), "--out", str(tmp_path / "o"), "--dry-run", "--workers", "2"]) == 0
    assert "(2 at once)" in capsys.readouterr().out
    assert main([str(keyed), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    assert "(4 at once)" in capsys.readouterr().out


def test_each_worker_gets_a_gpu_else_a_share_of_the_cpus_and_none_on_a_ray_cluster(tmp_path, monkeypatch):
    from fedplora.study import parallel
    from fedplora.study.parallel import Share, check_shares, machine_shares, visible_gpus

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(parallel, "machine_cpus", lambda: 16)
    monkeypatch.setattr(parallel, "visible_gpus", lambda: [])
    assert machine_shares(4) == [Share(4, None)] * 4 and machine_shares(32) == [Share(1, None)] * 32
    monkeypatch.setattr(parallel, "visible_gpus", lambda: ["2", "3"])
    assert machine_shares(3) == [Share(5, "2"), Share(5, "3"), Share(5, "2")]  # round-robin past the GPUs
    assert Share(5, "3").describe() == "GPU 3, 5 CPUs" and Share(1, None).describe() == "1 CPU"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert machine_shares(2) == [Share(None, None)] * 2
    assert Share(None, None).describe() == "the Ray cluster's resources"
    # the GPU ids a child's CUDA_VISIBLE_DEVICES takes: ours when set, else 0..n-1
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert visible_gpus() == ["5", "7"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpus() == ["0", "1"]
    # clients that need more CPUs than a cell's share would never be placed: refused in one line
    study = load_study(write(tmp_path, TINY.replace("local_steps = 2", "local_steps = 2\nclient_cpus = 4")),
                       out=tmp_path / "out")
    with pytest.raises(ConfigError, match=r"--workers 8: each cell gets 2 of this machine's 16 CPUs, but cell "
                                          r"cells/tweets/iid/fedit-r/seed0 gives each client client_cpus=4 .* use "
                                          r"--workers 4 or fewer"):
        check_shares(study.cells, [Share(2, None)] * 8, 8)
    check_shares(study.cells, [Share(4, None)] * 4, 4)
    check_shares(study.cells, [Share(None, None)] * 8, 8)  # a cluster's scheduler decides


def test_the_cpu_share_reaches_the_runs_ray_unless_it_joins_a_cluster(monkeypatch):
    from fedplora.config import RunConfig
    from fedplora.federation.simulation import federation_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = RunConfig(num_clients=4, clients_per_round=2, client_cpus=1.0, client_gpus=0.0)
    assert f"init-args-num-cpus={os.cpu_count()} " in federation_config(cfg)  # a run alone: the whole machine
    assert "init-args-num-cpus=3 " in federation_config(cfg, cpus=3)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert "init-args-num-cpus" not in federation_config(cfg, cpus=3)
    assert "num-supernodes=4 client-resources-num-cpus=1" in federation_config(cfg, cpus=3)
