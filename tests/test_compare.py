"""`fedplora compare` of all five methods on the default task (real MiniLM, real tweets), kept short (slow); its
time to target on hand-made runs (fast)."""

import json

import pytest

from fedplora.cli import main


@pytest.mark.slow
def test_compare_runs_each_method_on_the_same_clients_of_the_default_task(tmp_path, capsys):
    """Three methods (a run of each costs a Flower start-up, about 30 s on 2 cores): Fed-PLoRA and the two
    truncating baselines, whose download and initialization noise differ from it by construction. Every
    method's server path runs as recorded in test_golden; Flower processes run each kind of method in
    test_federation (Fed-PLoRA), test_rivals (a rival) and test_golden (SecAgg+)."""
    out = tmp_path / "cmp"
    code = main(["compare", "--methods", "fedplora,hetlora,flexlora", "--rounds", "2", "--clients", "3",
                 "--clients-per-round", "2", "--local-steps", "2", "--batch-size", "8", "--max-seq-len", "32",
                 "--eval-max-examples", "48", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "comparison.json").read_text())
    methods = result["methods"]
    assert list(methods) == ["fedplora", "hetlora", "flexlora"]
    for name, row in methods.items():
        assert 0.0 <= row["final"]["accuracy"]["mean"] <= 1.0
        assert row["bytes_up_total"] > 0 and row["bytes_down_total"] > 0
        summary = json.loads((out / name / "seed-0" / "summary.json").read_text())
        assert [c["cid"] for c in summary["history"][1]["clients"]] == \
            [c["cid"] for c in json.loads((out / "fedplora" / "seed-0" / "summary.json").read_text())["history"][1]["clients"]]
    plora = json.loads((out / "fedplora" / "seed-0" / "summary.json").read_text())
    assert all(h["init_noise"] < 1e-9 for h in plora["history"])  # zero initialization noise, every round
    for name in ("hetlora", "flexlora"):  # truncation loses what the global adapter holds beyond r_i
        s = json.loads((out / name / "seed-0" / "summary.json").read_text())
        assert s["history"][2]["init_noise"] > 1e-6, name
    # Fed-PLoRA downloads all R pairs; HetLoRA/FlexLoRA only r_i: the paper's known trade-off, measured
    assert methods["fedplora"]["bytes_down_total"] > methods["hetlora"]["bytes_down_total"]
    assert "| fedplora |" in (out / "comparison.md").read_text()
    assert (out / "comparison_metric.png").is_file() and (out / "comparison_noise.png").is_file()


def _run(seed: int, curve: list[float], walls: list[float]) -> dict:
    """A run whose round r has accuracy ``curve[r]`` and took ``walls[r - 1]`` wall seconds."""
    history = [{"round": r, "metrics": {"accuracy": v}, "wall_s": 0.0 if r == 0 else walls[r - 1], "bytes_up": 1,
                "bytes_down": 1} for r, v in enumerate(curve)]
    return {"seed": seed, "metric": "accuracy", "final": {"accuracy": curve[-1]}, "history": history,
            "bytes_up_total": 1, "bytes_down_total": 1, "wall_s": sum(walls)}


def test_compare_reports_the_time_to_target_with_the_studys_function(tmp_path, monkeypatch):
    """comparison.json and comparison.md: per method, the round and seconds to --target-fraction of the best
    final mean, from study.summary.time_to_target (no second definition). No Flower run: run_simulation is
    replaced by hand-made runs."""
    import fedplora.federation.simulation as simulation
    from fedplora.study import time_to_target

    curves = {"fedplora": [0.3, 0.6, 0.8], "fedit": [0.3, 0.8, 0.9]}

    def fake_run(cfg, out, progress=None, resume=False):
        return _run(cfg.seed, curves[cfg.method], [20.0, 30.0])

    monkeypatch.setattr(simulation, "run_simulation", fake_run)
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "fedplora,fedit", "--seeds", "0,1", "--rounds", "2",
                 "--target-fraction", "0.85", "--out", str(out)]) == 0
    result = json.loads((out / "comparison.json").read_text())
    # the best final mean is fedit's 0.9; 85% of it is 0.765: fedit at round 1 (20 s), fedplora at round 2 (50 s)
    assert result["target"] == {"fraction": 0.85, "best": "fedit", "best_mean": pytest.approx(0.9),
                                "target": pytest.approx(0.765), "fastest": "fedit", "fastest_rounds": 1.0}
    plora, fedit = result["methods"]["fedplora"]["to_target"], result["methods"]["fedit"]["to_target"]
    assert (plora["reached"], plora["n"], plora["rounds"], plora["seconds"]) == (
        2, 2, {"mean": 2.0, "std": 0.0}, {"mean": 50.0, "std": 0.0})
    assert (fedit["rounds"]["mean"], fedit["seconds"]["mean"], fedit["slower"], plora["slower"]) == (1.0, 20.0, 1.0, 2.0)
    runs = {m: [_run(s, curve, [20.0, 30.0]) for s in (0, 1)] for m, curve in curves.items()}
    expected = time_to_target(runs, "accuracy", 0.85)["methods"]
    for name in curves:
        got = result["methods"][name]["to_target"]
        assert {k: got[k] for k in expected[name]} == expected[name]
    md = (out / "comparison.md").read_text()
    assert "| wall s | rounds (s) to 0.7650 | vs fastest |" in md
    assert "| 2.0 ± 0.0 (50 ± 0 s) | 2.00× |" in md and "| 1.0 ± 0.0 (20 ± 0 s) | 1.00× |" in md
    assert "Time to target: 85% of the best final accuracy (fedit, 0.9000), 0.7650 (--target-fraction)." in md
    # the default: 95% of 0.9 = 0.855, which fedplora never reaches
    assert main(["compare", "--methods", "fedplora,fedit", "--rounds", "2", "--out", str(tmp_path / "d")]) == 0
    default = json.loads((tmp_path / "d" / "comparison.json").read_text())
    assert default["target"]["fraction"] == 0.95 and default["methods"]["fedplora"]["to_target"]["reached"] == 0
    assert "| not reached | — |" in (tmp_path / "d" / "comparison.md").read_text()
    # out of range: one line before anything runs
    assert main(["compare", "--methods", "fedit", "--target-fraction", "1.5", "--out", str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists()
