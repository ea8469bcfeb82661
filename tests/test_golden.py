"""Behaviour recorded before the aggregation pipeline was rebuilt (tests/golden/record.py) must not change.

Three layers, fastest first: every method's server-side outputs on recorded inputs (its mean, each robust
rule, central DP, the secure decode, the noise figures); one small run per variant through the real server
code with the real ClientApp in this process; and two of those runs through Flower's own processes (slow).
The method-level outputs must be identical (to 1e-12); per-round metrics of the runs within 1e-6 relative and
exported adapters within 1e-5 of each tensor's scale.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN))

import record  # noqa: E402  (tests/golden/record.py: the settings and the code paths it recorded)

from fedplora.methods import ClientInfo, ClientTask, ClientUpdate  # noqa: E402


def assert_same(got, want, rel: float, where: str = "") -> None:
    """Equal structure; numbers within ``rel`` relative (a tiny absolute floor); a tensor within ``rel`` of its own
    scale (its largest magnitude): a float32 rounding difference relative to an element near zero is no change."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype, where
        scale = float(want.detach().double().abs().max()) if want.numel() else 0.0
        torch.testing.assert_close(got, want, rtol=0, atol=max(rel * scale, 1e-12), msg=lambda m: f"{where}: {m}")
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys {sorted(set(got) ^ set(want))}"
        for k in want:
            assert_same(got[k], want[k], rel, f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, rel, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert isinstance(got, (int, float)), f"{where}: {got!r} is not a number"
        assert got == pytest.approx(want, rel=rel, abs=1e-12) or (math.isnan(got) and math.isnan(want)), where
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


# ------------------------------------------------------------------------------------------------- method level
@pytest.mark.parametrize("name", sorted(record.METHOD_CASES))
def test_every_aggregation_path_gives_the_recorded_numbers(name):
    saved = torch.load(GOLDEN / "aggregation" / f"{name}.pt", weights_only=True)
    cfg = record.run_config({}, saved["overrides"])
    method = record.method_for(cfg)
    state = saved["state"]
    # the tasks: selection and what is sent down are part of a method's behaviour too
    tasks = []
    for (cid, budget, n), want in zip(saved["infos"], saved["tasks"]):
        task = method.configure_client(state, ClientInfo(cid, budget, n), 2)
        assert json.dumps(task.config, sort_keys=True) == want["config"]
        assert_same(dict(task.arrays), want["arrays"], 0.0, f"{name} task {cid}")
        tasks.append(ClientTask(want["arrays"], json.loads(want["config"])))
    updates = [ClientUpdate(u["arrays"], json.loads(u["config"]), u["num_samples"]) for u in saved["updates"]]
    got = record.outputs(cfg, state, tasks, updates)
    assert sorted(got) == sorted(saved["outputs"])
    for path, want in saved["outputs"].items():  # bit for bit (the runs below allow the tolerances)
        assert_same(got[path], want, 0.0, f"{name} {path}")


# ------------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return record.assets(tmp_path_factory.mktemp("golden-assets"))


def check_run(summary: dict, name: str, adapter: Path) -> None:
    want = json.loads((GOLDEN / "runs" / name / "summary.json").read_text())
    assert_same(json.loads(json.dumps(record.comparable(summary))), want, 1e-6, name)
    got, expected = load_file(str(adapter)), load_file(str(GOLDEN / "runs" / name / "adapter.safetensors"))
    assert_same(got, expected, 1e-5, f"{name} adapter")


@pytest.mark.parametrize("name", sorted(record.RUNS))
def test_each_variant_runs_as_recorded_through_the_server(name, paths, tmp_path):
    out = tmp_path / "run"
    summary = record.run_in_process(record.run_config(paths, record.RUNS[name], out), out)
    check_run(summary, name, out / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fedplora-secure"])  # SecAgg+ through real processes; plain runs: above
def test_flower_processes_give_the_recorded_run(name, paths, tmp_path):
    from fedplora.federation.simulation import run_simulation

    out = tmp_path / "run"
    summary = run_simulation(record.run_config(paths, record.RUNS[name], out), out)
    check_run(summary, name, out / "adapter" / "adapter_model.safetensors")
