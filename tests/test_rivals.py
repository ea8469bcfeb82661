"""FSLoRA, RB-LoRA and FedEx-LoRA (issue 25): their aggregation by hand, and where each must equal FedIT."""

import pytest
import torch

from conftest import tiny_bert
from fedplora import PLoRAConfig, get_plora_model, get_plora_state_dict
from fedplora.aggregation import reducer_for, secure_decode, secure_upload
from fedplora.config import ConfigError, RunConfig
from fedplora.methods import ClientInfo, ClientUpdate, FedExLoRA, FedIT, FSLoRA, RBLoRA
from fedplora.methods.fslora import sketch_indices
from fedplora.privacy import CentralDP
from test_fedplora_method import _round
from test_fault_tolerance import in_process  # noqa: F401 (a fixture)

F64 = torch.float64
CFG = PLoRAConfig(rank=4, alpha=4, target_modules=["query"], modules_to_save=["classifier"])  # scale 1


def _state(seed=0, d_in=3, d_out=2):
    g = torch.Generator().manual_seed(seed)
    return {"L.plora_A": torch.randn(4, d_in, generator=g, dtype=F64),
            "L.plora_B": torch.randn(d_out, 4, generator=g, dtype=F64), "head.weight": torch.zeros(2, dtype=F64)}


def _moved(task, da=1.0, db=-2.0, dh=1.0, scale=1.0):
    """A client that moved every pair it holds by (da, db) and its head by dh."""
    arrays = {k: v + (da if k.endswith("plora_A") else db if k.endswith("plora_B") else dh) * scale
              for k, v in task.arrays.items()}
    return arrays


# ------------------------------------------------------------------------------------------------- FSLoRA
def test_fslora_sends_only_the_sketch_and_averages_over_every_sampled_client():
    method, state = FSLoRA(CFG, seed=3), _state()
    tasks = [method.configure_client(state, ClientInfo(c, b, 10), 2) for c, b in enumerate([1, 2, 4])]
    for c, (task, b) in enumerate(zip(tasks, [1, 2, 4])):
        idx = task.config["indices"]["L"]
        assert idx == sketch_indices(b, 4, 3, 2, c, 1) and len(idx) == b
        assert task.arrays["L.plora_A"].shape == (b, 3) and task.arrays["L.plora_B"].shape == (2, b)  # only those
        assert torch.equal(task.arrays["L.plora_A"], state["L.plora_A"][idx])
    # the local model is the sketch: drawn pairs with B scaled by R/m, the others dropped (zero)
    sketch = method.sketch(tasks[1])
    idx = tasks[1].config["indices"]["L"]
    assert torch.equal(sketch["L.plora_B"][:, idx], 2.0 * state["L.plora_B"][:, idx])
    rest = [j for j in range(4) if j not in idx]
    assert not sketch["L.plora_A"][rest].any() and not sketch["L.plora_B"][:, rest].any()
    # client c moves its drawn pairs by (c+1, -(c+1)): pair j moves by the sum over its drawers / 3 clients
    updates = [ClientUpdate(_moved(t, c + 1.0, -(c + 1.0), c + 1.0), {"indices": t.config["indices"]}, 10)
               for c, t in enumerate(tasks)]
    new = method.aggregate(state, tasks, updates)
    for j in range(4):
        step = sum(c + 1.0 for c, t in enumerate(tasks) if j in t.config["indices"]["L"]) / 3
        assert torch.allclose(new["L.plora_A"][j], state["L.plora_A"][j] + step), j
        assert torch.allclose(new["L.plora_B"][:, j], state["L.plora_B"][:, j] - step), j
    assert torch.allclose(new["head.weight"], torch.full((2,), 2.0, dtype=F64))  # (1 + 2 + 3) / 3
    # under SecAgg+ the sums decode to the same state
    sums = [secure_upload(method, t, u, 10.0) for t, u in zip(tasks, updates)]
    total = {k: sum(s[k] for s in sums) for k in sums[0]}
    secure = secure_decode(method, state, total, 3, reducer_for(method))
    assert all(torch.allclose(secure[k], new[k], atol=1e-12) for k in state)


def test_fslora_with_every_client_at_full_rank_is_fedit_bit_for_bit(ids):
    cfg = PLoRAConfig(rank=4, alpha=8)
    state = get_plora_state_dict(get_plora_model(tiny_bert(dtype=F64), cfg))
    clients = [ClientInfo(cid=i, budget=4, num_samples=n) for i, n in enumerate([10, 30, 20])]
    fs, fedit = FSLoRA(cfg, seed=0), FedIT(cfg, seed=0)
    fs_tasks, fs_updates = _round(fs, state, clients, ids)
    it_tasks, it_updates = _round(fedit, state, clients, ids)
    for key in fs_updates[0].arrays:
        assert all(torch.equal(a.arrays[key], b.arrays[key]) for a, b in zip(fs_updates, it_updates)), key
    one, other = fs.aggregate(state, fs_tasks, fs_updates), fedit.aggregate(state, it_tasks, it_updates)
    assert all(torch.equal(one[k], other[k]) for k in state)


# ------------------------------------------------------------------------------------------------- RB-LoRA
def test_rblora_averages_each_index_over_the_clients_whose_rank_covers_it_by_data():
    method, state = RBLoRA(CFG), _state()
    budgets, samples = [1, 2, 4], [10, 20, 30]
    tasks = [method.configure_client(state, ClientInfo(c, b, n), 1) for c, (b, n) in enumerate(zip(budgets, samples))]
    updates = [ClientUpdate(_moved(t, c + 1.0, 2.0 * (c + 1)), {"rank": t.config["rank"]}, n)
               for c, (t, n) in enumerate(zip(tasks, samples))]
    new = method.aggregate(state, tasks, updates)
    for j, covering in enumerate([[0, 1, 2], [1, 2], [2], [2]]):
        n = sum(samples[c] for c in covering)
        step = sum(samples[c] * (c + 1.0) for c in covering) / n
        assert torch.allclose(new["L.plora_A"][j], state["L.plora_A"][j] + step), j
        assert torch.allclose(new["L.plora_B"][:, j], state["L.plora_B"][:, j] + 2 * step), j
    # the data weights are RB-LoRA's rule: the run's uniform weighting does not change them
    assert RBLoRA(CFG, weighting="uniform").client_weights(updates) == pytest.approx([1 / 6, 2 / 6, 3 / 6])


def test_rblora_with_every_client_at_full_rank_is_fedit(ids):
    cfg = PLoRAConfig(rank=4, alpha=8)
    state = get_plora_state_dict(get_plora_model(tiny_bert(dtype=F64), cfg))
    clients = [ClientInfo(cid=i, budget=4, num_samples=n) for i, n in enumerate([10, 30, 20])]
    rb, fedit = RBLoRA(cfg), FedIT(cfg, weighting="samples")
    rb_tasks, rb_updates = _round(rb, state, clients, ids)
    it_tasks, it_updates = _round(fedit, state, clients, ids)
    one, other = rb.aggregate(state, rb_tasks, rb_updates), fedit.aggregate(state, it_tasks, it_updates)
    assert all(torch.equal(one[k], other[k]) for k in state)


# ------------------------------------------------------------------------------------------------- FedEx-LoRA
def test_fedexlora_global_model_is_the_mean_of_the_clients_models(ids):
    cfg = PLoRAConfig(rank=4, alpha=8)
    model = get_plora_model(tiny_bert(dtype=F64), cfg)
    method = FedExLoRA(cfg, weighting="samples")
    state = method.init_state(model)
    clients = [ClientInfo(cid=i, budget=b, num_samples=n) for i, (b, n) in enumerate([(1, 10), (2, 30), (4, 20)])]
    for server_round in (1, 2):  # round 2 starts from a non-zero residual
        tasks, updates = _round(method, state, clients, ids, seed_offset=server_round)
        new = method.aggregate(state, tasks, updates)
        weights = method.client_weights(updates)
        before, after = method.dense_update(state), method.dense_update(new)
        for layer in after:
            mean = sum(w * (state[layer + ".fedex_residual"]
                            + method.plora.scale * (lambda A, B: B @ A)(*method.full_factors(state, layer, u)))
                       for w, u in zip(weights, updates))
            assert torch.allclose(after[layer], mean, atol=1e-12, rtol=1e-10), layer
            assert not torch.allclose(after[layer], before[layer])
        # the downlink carries the residual: every client is sent all R pairs, the heads and d_out x d_in a layer
        assert all(k.endswith(".fedex_residual") or k in state for k in tasks[0].arrays)
        state = new
    # a client starts exactly at the global model: its untrained pairs are folded, the residual under them
    task = method.configure_client(state, clients[0], 3)
    client, server = get_plora_model(tiny_bert(dtype=F64), cfg), get_plora_model(tiny_bert(dtype=F64), cfg)
    method.client_setup(client, task)
    method.load_global(server, state)
    with torch.no_grad():
        assert torch.allclose(client(input_ids=ids).logits, server(input_ids=ids).logits, atol=1e-10)


def test_capabilities_refuse_what_a_method_cannot_do_in_one_line():
    dp = CentralDP(clip=1.0, noise_multiplier=1.0, clients_per_round=3, budgets=(1, 2, 4))
    with pytest.raises(ValueError, match="central DP is not defined for fedexlora"):
        reducer_for(FedExLoRA(CFG), dp)
    with pytest.raises(ValueError, match="aggregator median is not defined for fedexlora"):
        reducer_for(FedExLoRA(CFG), "median")
    assert reducer_for(FSLoRA(CFG), dp).pair_counts.tolist() == [3.0] * 4  # every sampled client counts
    assert reducer_for(RBLoRA(CFG), "median").name == "median"
    with pytest.raises(ConfigError, match="secure_aggregation: not defined for fedexlora"):
        RunConfig(method="fedexlora", clients_per_round=3, secure_aggregation=True).validate()
    with pytest.raises(ConfigError, match="dp_mode: central DP is not defined for fedexlora"):
        RunConfig(method="fedexlora", dp_mode="central", dp_clip=1.0, dp_noise_multiplier=1.0).validate()
    for name in ("fslora", "rblora"):
        RunConfig(method=name, clients_per_round=3, secure_aggregation=True).validate()


@pytest.mark.parametrize("name", ["fslora", "rblora", "fedexlora"])
def test_every_rivals_export_reproduces_its_global_model_through_peft(name, tmp_path, ids):
    from peft import PeftModel

    from conftest import logits
    from fedplora.methods import make_method
    from test_fedplora_method import _train_locally

    cfg = PLoRAConfig(rank=4, alpha=8)
    method = make_method(name, cfg, seed=0)
    state = method.init_state(get_plora_model(tiny_bert(dtype=F64), cfg))
    for server_round in (1, 2):
        tasks, updates = [], []
        for cid, budget in enumerate([1, 2, 4]):
            task = method.configure_client(state, ClientInfo(cid, budget, 10), server_round)
            model = get_plora_model(tiny_bert(dtype=F64), cfg)
            method.client_setup(model, task)
            _train_locally(model, ids, torch.tensor([0, 1, 2]))
            tasks.append(task)
            updates.append(method.client_update(model, task, 10))
        state = method.aggregate(state, tasks, updates)
    server = get_plora_model(tiny_bert(dtype=F64), cfg)
    method.load_global(server, state)
    method.export_adapter(server, state, tmp_path / name)
    loaded = PeftModel.from_pretrained(tiny_bert(dtype=F64), str(tmp_path / name)).eval()
    assert torch.allclose(logits(loaded, ids), logits(server, ids), atol=1e-8)


@pytest.mark.parametrize("name", ["fslora", "rblora", "fedexlora"])
def test_each_rival_runs_through_the_server_and_the_real_client(name, tiny_assets, in_process, tmp_path):
    """The server's code (strategy, checks, checkpoints, export) with the real ClientApp answering in this process;
    fedplora run is the same code under Flower's processes (test_flower_runs_a_rival_end_to_end)."""
    from fedplora.federation.server_app import run_federation
    from test_fault_tolerance import InProcessGrid, _small_cfg

    cfg = _small_cfg(tiny_assets, method=name, rounds=2)
    summary = run_federation(InProcessGrid(cfg.num_clients), cfg, tmp_path / name)
    rounds = summary["history"][1:]
    assert all(h["aggregated"] and not h["failures"] for h in rounds), rounds
    assert (tmp_path / name / "adapter" / "adapter_model.safetensors").is_file()
    if name == "fslora":  # only the drawn pairs go down (and up): r of the R pairs of 4 layers 32 x 32, the head
        head = (3 * 32 + 3) * 4
        assert all(c["bytes_down"] == c["bytes_up"] == 4 * c["rank"] * (32 + 32) * 4 + head
                   for h in rounds for c in h["clients"])
    if name == "fedexlora":  # the residual is sent down: more than the pairs and heads alone
        assert all(c["bytes_down"] > c["bytes_up"] for h in rounds for c in h["clients"])


def test_select_n_drop_sends_only_the_selected_pairs(tiny_assets, in_process, tmp_path):
    """Select-N-Drop's client model holds only its r_i selected pairs, so only those go down: its download is its
    upload (pairs and head), where the published rule (fold) sends all R pairs down for the fold."""
    from fedplora.federation.server_app import run_federation
    from test_fault_tolerance import InProcessGrid, _small_cfg

    clients = {}
    for unselected in ("drop", "fold"):
        cfg = _small_cfg(tiny_assets, method="fedplora", unselected=unselected, rounds=2)
        summary = run_federation(InProcessGrid(cfg.num_clients), cfg, tmp_path / unselected)
        clients[unselected] = [c for h in summary["history"][1:] for c in h["clients"]]
    head = (3 * 32 + 3) * 4
    assert all(c["bytes_down"] == c["bytes_up"] == 4 * c["rank"] * (32 + 32) * 4 + head for c in clients["drop"])
    assert all(c["bytes_down"] == 4 * cfg.rank * (32 + 32) * 4 + head for c in clients["fold"])
    assert any(c["rank"] < cfg.rank for c in clients["fold"])  # so the two differ


@pytest.mark.slow
def test_flower_runs_a_rival_end_to_end(tiny_assets, tmp_path):
    from fedplora.cli import main

    code = main(["run", "--method", "fslora", "--model", tiny_assets["model"], "--data-dir",
                 tiny_assets["data_dir"], "--rounds", "2", "--clients", "4", "--clients-per-round", "3", "--rank", "4",
                 "--ranks", "1,2,4", "--local-steps", "2", "--batch-size", "8", "--eval-max-examples", "20",
                 "--max-seq-len", "32", "--server-optimizer", "adam", "--out", str(tmp_path / "run")])
    assert code == 0 and (tmp_path / "run" / "summary.json").is_file()
