"""End-to-end: the real Flower Simulation Engine on a tiny model and real tweets (deployment: test_deployment.py)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from assets import flwr_run_user_path
from fedplora.config import RunConfig
from fedplora.federation.client_app import method_options, plora_config
from fedplora.federation.heterogeneity import assign_budgets, round_budget
from fedplora.federation.strategy import untimed

pytestmark = pytest.mark.slow


def _cfg(assets, tmp_path, **kw):
    base = dict(model=assets["model"], data_dir=assets["data_dir"], rounds=2, num_clients=4, clients_per_round=3,
                rank=4, alpha=8, ranks=[1, 2, 4], rank_shares=[2, 1, 1], local_steps=2, batch_size=8,
                eval_max_examples=40, max_seq_len=32, lr=5e-3, seed=11, budget_fluctuation=0.4, out=str(tmp_path))
    base.update(kw)
    return RunConfig(**base).validate()


def _replay_with_method_core(cfg):
    """The same run without Flower: sampling, budgets, local training and aggregation from the core."""
    from fedplora.adapters import get_plora_model
    from fedplora.methods import ClientInfo, make_method
    from fedplora.tasks import make_task
    from fedplora.tasks.partition import partition_for
    from fedplora import rng
    from fedplora.training import local_seed, train_local

    torch.set_num_threads(1)
    task = make_task(cfg)
    train, _ = task.load_splits()
    parts = partition_for(task, train, cfg)
    method = make_method(cfg.method, plora_config(cfg), **method_options(cfg))
    state = method.init_state(get_plora_model(task.build_model(), plora_config(cfg)))
    base = assign_budgets(cfg.num_clients, cfg.ranks, cfg.rank_shares, cfg.seed)
    budgets = {(rnd, cid): round_budget(base[cid], cfg.ranks, cfg.budget_fluctuation, cfg.seed, rnd, cid)
               for rnd in range(1, cfg.rounds + 1) for cid in range(cfg.num_clients)}
    client_model = get_plora_model(task.build_model(), plora_config(cfg))
    for rnd in range(1, cfg.rounds + 1):
        draw = rng.generator("sampling", cfg.seed, rnd, 0)
        cids = sorted(int(c) for c in draw.choice(cfg.num_clients, size=cfg.clients_per_round, replace=False))
        tasks, updates = [], []
        for cid in cids:
            data = task.encode(parts[cid])
            t = method.configure_client(state, ClientInfo(cid, budgets[rnd, cid], len(data)), rnd)
            method.client_setup(client_model, t)
            train_local(client_model, task, data, steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                        weight_decay=cfg.weight_decay, seed=local_seed(cfg.seed, rnd, cid))
            tasks.append(t)
            updates.append(method.client_update(client_model, t, len(data)))
        state = method.aggregate(state, tasks, updates)
    return state, budgets


def test_simulation_matches_the_method_core_and_is_deterministic(tiny_assets, tmp_path):
    from fedplora.federation.simulation import run_simulation

    cfg = _cfg(tiny_assets, tmp_path / "a")
    first = run_simulation(cfg, tmp_path / "a")
    # the same settings through Flower's own command, as a user types it: `flwr run .` on the default
    # local simulation connection (a managed local SuperLink), with the federation's size given
    (tmp_path / "run.toml").write_text(cfg.to_toml())
    second = flwr_run_user_path({"config-file": str(tmp_path / "run.toml"), "out": str(tmp_path / "b")},
                                cfg.num_clients, tmp_path / "flwr")

    # one app, one seed: identical metrics, clients and traffic
    strip = lambda h: [{k: v for k, v in untimed(r).items() if not k.endswith("agg_noise")} for r in h]
    assert first["final"] == second["final"]
    assert strip(first["history"]) == strip(second["history"])
    for key in ("agg_noise", "fn_agg_noise", "paper_agg_noise"):  # float64 diagnostics: equal to the last bits
        assert [h[key] for h in second["history"]] == pytest.approx([h[key] for h in first["history"]], rel=1e-12)

    # budgets respected, bytes counted from what was sent
    state, budgets = _replay_with_method_core(cfg)
    d_in = d_out = 32
    n_layers = 4  # query and value (the default targets) in 2 layers
    head_bytes = (3 * 32 + 3) * 4
    for h in first["history"][1:]:
        assert len(h["clients"]) == 3 and not h["failures"]
        for c in h["clients"]:
            assert c["budget"] == budgets[h["round"], c["cid"]]  # this round's budget, fluctuation included
            assert c["trained_pairs"] == c["rank"] == c["budget"] <= 4
            assert c["bytes_down"] == n_layers * 4 * (d_in + d_out) * 4 + head_bytes
            assert c["bytes_up"] == n_layers * c["rank"] * (d_in + d_out) * 4 + head_bytes
        assert h["bytes_up"] == sum(c["bytes_up"] for c in h["clients"])
        assert h["init_noise"] == 0.0 and h["agg_noise"] > 0
    assert any(c["rank"] == 1 for h in first["history"][1:] for c in h["clients"])
    assert any(budgets[k] != budgets[1, k[1]] for k in budgets)  # some budget changed between rounds

    # the global state after aggregation equals the core's, through the exported PEFT adapter
    exported = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    for key, value in state.items():
        if key.endswith(".plora_A"):
            got = exported[f"base_model.model.{key[:-len('.plora_A')]}.lora_A.weight"]
        elif key.endswith(".plora_B"):
            got = exported[f"base_model.model.{key[:-len('.plora_B')]}.lora_B.weight"]
        else:
            got = exported[f"base_model.model.{key}"]
        assert torch.allclose(got, value, atol=1e-6), key
    parts = json.loads((tmp_path / "a" / "partitions.json").read_text())
    assert len(parts["sizes"]) == cfg.num_clients and sum(parts["labels_total"].values()) == sum(parts["sizes"])
    for h in first["history"][1:]:
        for c in h["clients"]:
            assert c["num_samples"] == parts["sizes"][c["cid"]]  # the report matches what clients hold
    saved = json.loads((tmp_path / "a" / "summary.json").read_text())
    for k in ("method", "task", "model", "seed", "rounds", "num_clients", "final", "history", "bytes_up_total",
              "bytes_down_total", "wall_s"):
        assert k in saved
    assert (tmp_path / "a" / "metrics.png").stat().st_size > 1000
    # every setting as used: the GPU share made explicit (none on this CPU machine)
    assert RunConfig.from_toml(tmp_path / "a" / "config.toml") == cfg.with_overrides(client_gpus=0.0)
