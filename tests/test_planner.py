"""The memory planner: its exact parts against real models, its fit against the stored measurements, its
plans as memory shrinks, the ``fedplora plan`` command and a SuperNode's ``max-memory``."""

import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedplora import planner
from fedplora.cli import main
from fedplora.config import RunConfig
from fedplora.errors import ConfigError
from fedplora.federation.client_app import client_budget, device_settings

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "memory-results.json"


def _context(**node_config):
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


@pytest.fixture(scope="module")
def smollm2():
    return planner.architecture(planner.load_config())


def _plan(arch, memory, **kw):
    settings = dict(global_rank=8, batch=16, seq=64, dtype="float32", fold="branch", device="cpu")
    return planner.plan(arch, memory, **{**settings, **kw})


# ---------------------------------------------------------------- memory strings
@pytest.mark.parametrize("text,expected", [("2GB", 2 * 10**9), ("1.5GiB", 3 * 2**29), ("800M", 800 * 2**20),
                                           ("512 mb", 512 * 10**6), ("2g", 2 * 2**30), (4096, 4096),
                                           ("123", 123)])
def test_parse_memory(text, expected):
    assert planner.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["2XB", "", "GB", "-1GB", "0", "2 GB extra"])
def test_parse_memory_rejects(text):
    with pytest.raises(ConfigError, match="memory"):
        planner.parse_memory(text)


# ---------------------------------------------------------------- exact parts
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_from_config_match_the_loaded_model(smollm2, dtype):
    from fedplora.tasks.models import load_causal_lm, smollm2_path

    model = load_causal_lm(smollm2_path(), dtype=dtype)
    assert smollm2.parameters == sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert planner.weight_bytes(smollm2, dtype, "none") == planner.held_bytes([model], "cpu")
    assert len(smollm2.targets) == 2 * model.config.num_hidden_layers  # q and v of every layer (the default)


def test_quantized_weights_are_smaller_and_fold_costs(smollm2):
    sizes = [planner.weight_bytes(smollm2, "float32", q) for q in ("none", "8bit", "4bit")]
    assert sizes[0] > sizes[1] > sizes[2]
    assert planner.merge_copy_bytes(smollm2, "float32", "merge", 8, 16) > 0
    assert planner.merge_copy_bytes(smollm2, "float32", "merge", 16, 16) == 0  # nothing folded: no W0 copy
    assert planner.merge_copy_bytes(smollm2, "float32", "branch", 8, 16) == 0


# ---------------------------------------------------------------- the fit
def test_predictions_within_10_percent_of_every_measured_cell():
    data = json.loads(RESULTS.read_text())
    model = planner.memory_model()
    cells = planner.measured_cells(data)
    assert len(cells) == model["cells"]  # the stored coefficients were fitted to exactly these cells
    for c in cells:
        arch = planner.architecture(data["models"][c["model"]], targets=planner.measured_targets(data))
        predicted = planner.predict(arch, c, model["global_rank"])
        assert abs(predicted - c["peak_bytes"]) <= 0.10 * c["peak_bytes"], c


# ---------------------------------------------------------------- plans
def test_plan_degrades_monotonically_as_memory_shrinks(smollm2):
    order = planner.candidates(smollm2, global_rank=8, batch=16, seq=64, dtype="float32", fold="branch")
    positions, chosen = [], []
    for gib in (8, 2, 1.5, 1.2, 1.0, 0.8, 0.6, 0.5, 0.45, 0.4):
        try:
            p, alternatives = _plan(smollm2, int(gib * 2**30))
        except ConfigError:
            break
        assert p.peak <= gib * 2**30 and p in alternatives
        positions.append(order.index(p))
        chosen.append(p)
    assert positions == sorted(positions)
    assert chosen[0].quantization == "none" and not chosen[0].ckpt and chosen[0].rank == 8
    assert chosen[-1].quantization == "4bit" or chosen[-1].rank < 8 or chosen[-1].batch < 16


def test_the_last_candidate_is_the_smallest_and_less_is_refused(smollm2):
    order = planner.candidates(smollm2, global_rank=8, batch=16, seq=64, dtype="float32", fold="branch")
    floor = order[-1]
    assert (floor.rank, floor.batch, floor.quantization, floor.ckpt) == (1, 1, "4bit", True)
    assert floor.peak == min(p.peak for p in order)
    assert _plan(smollm2, 2**40)[0].rank == 8
    with pytest.raises(ConfigError, match="too little"):
        _plan(smollm2, floor.peak - 1)


def test_merge_plans_only_float_bases(smollm2):
    p, alternatives = _plan(smollm2, 2**40, fold="merge")
    assert all(a.quantization == "none" for a in alternatives)


# ---------------------------------------------------------------- CLI
def test_cli_plan(capsys):
    assert main(["plan", "--memory", "2GB", "--batch-size", "2", "--max-seq-len", "128"]) == 0
    out = capsys.readouterr().out
    assert "plan: rank 8, batch 2, quantization none, gradient checkpointing off" in out
    assert "alternatives" in out and "4bit" in out
    # a CUDA plan of a float32 base says how far the CPU-fitted planner was off on a GPU (docs/memory.md)
    assert main(["plan", "--memory", "2GB", "--device", "cuda"]) == 0
    assert "float32 peaks were 1.3x to 1.9x" in capsys.readouterr().out
    assert main(["plan", "--memory", "2GB", "--device", "cuda", "--dtype", "bfloat16"]) == 0
    assert "1.9x" not in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--memory", "2XB"], "memory: cannot read '2XB'"),
    (["--memory", "20MB"], "too little"),
    (["--memory", "2GB", "--model", "/nonexistent/model"], "model"),
    (["--memory", "2GB", "--model", "nobody-here/no-such-model"], "model: cannot read the config"),  # offline
])
def test_cli_plan_errors_are_one_line(capsys, args, message):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedplora: error: ") and message in err and "\n" not in err


# ---------------------------------------------------------------- a SuperNode's max-memory
def _node(memory, **extra):
    return _context(**{"partition-id": 0, "num-partitions": 2, "max-memory": memory, "device": "cpu", **extra})


def test_max_memory_gives_the_budget_and_the_settings(monkeypatch):
    monkeypatch.setattr(planner, "free_memory", lambda device: 64 * 2**30)
    cfg = RunConfig(task="instruct", rank=8, ranks=[2, 4, 8], batch_size=16, max_seq_len=64, num_clients=2)
    roomy = _node("16GB")
    assert client_budget(roomy, cfg, 0, 1) == 8
    settings = device_settings(cfg, roomy)
    assert (settings.quantization, settings.gradient_checkpointing, settings.batch_size) == ("none", False, 16)
    tight = _node("600MB")
    budget = client_budget(tight, cfg, 0, 1)
    settings = device_settings(cfg, tight)
    assert budget <= 8 and (settings.quantization != "none" or settings.gradient_checkpointing
                            or settings.batch_size < 16)


def test_max_memory_query_and_train_agree_within_a_round(monkeypatch):
    cfg = RunConfig(task="instruct", rank=8, ranks=[2, 4, 8], batch_size=16, max_seq_len=64, num_clients=2)
    node = _node("16GB")
    monkeypatch.setattr(planner, "free_memory", lambda device: 64 * 2**30)
    at_query = client_budget(node, cfg, 0, 3), device_settings(cfg, node)
    monkeypatch.setattr(planner, "free_memory", lambda device: 500 * 2**20)  # memory taken since the query
    assert (client_budget(node, cfg, 0, 3), device_settings(cfg, node)) == at_query  # the train's view
    next_round = device_settings(cfg, node), client_budget(node, cfg, 0, 4), device_settings(cfg, node)
    assert next_round[0] == at_query[1]  # the settings read before round 4's plan: still round 3's
    assert next_round[2].quantization != "none" or next_round[2].gradient_checkpointing \
        or next_round[2].batch_size < 16 or next_round[1] < 8  # round 4 plans for what is free now


def test_max_memory_too_small_is_refused(monkeypatch):
    monkeypatch.setattr(planner, "free_memory", lambda device: 64 * 2**30)
    cfg = RunConfig(task="instruct", rank=8, num_clients=2)
    with pytest.raises(ConfigError, match="too little"):
        client_budget(_node("20MB"), cfg, 0, 1)
    with pytest.raises(ConfigError, match="memory: cannot read"):
        device_settings(cfg, _node("lots"))


# ---------------------------------------------------------------- the benchmark's child runner
@pytest.mark.slow
def test_benchmark_child_measures_one_cell():
    """One tiny SmolLM2 cell through the benchmark's own child process (about 10 s)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_memory.py"
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cell = dict(bench.BASE["smollm2"], batch=1, seq=16)
    result = bench.run_child("smollm2", cell, steps=1, device="cpu", timeout=300)
    assert "error" not in result, result
    arch = planner.architecture(planner.load_config())
    weights = planner.weight_bytes(arch, "float32", "none")
    assert weights < result["peak_bytes"] < 2 * weights  # the weights and a tiny batch's activations
    assert result["mmap_threshold"] == bench.CHILD_ENV["MALLOC_MMAP_THRESHOLD_"]
