import copy

import pytest
import torch

from conftest import logits, randomize_pairs, tiny_bert
from fedplora import (
    ClientInfo, ClientUpdate, FedPLoRA, PLoRAConfig, UpdateRejected, get_plora_model, get_plora_state_dict,
    init_noise, select_and_fold, set_plora_state_dict, trainable_parameters,
)
from fedplora.methods.fedplora import select_indices


def _train_locally(model, ids, labels, steps=2, lr=0.05):
    model.train()
    opt = torch.optim.AdamW(trainable_parameters(model), lr=lr)
    for _ in range(steps):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _round(method, state, clients, ids, seed_offset=0):
    """One full round through the method interface on real (tiny) models."""
    tasks, updates = [], []
    for c in clients:
        task = method.configure_client(state, c, server_round=1)
        model = get_plora_model(tiny_bert(dtype=torch.float64), method.plora)
        method.client_setup(model, task)
        g = torch.Generator().manual_seed(c.cid + seed_offset)
        _train_locally(model, ids, torch.randint(0, 3, (ids.shape[0],), generator=g))
        tasks.append(task)
        updates.append(method.client_update(model, task, c.num_samples))
    return tasks, updates


def test_selection_is_seeded_distinct_and_within_budget():
    a = select_indices(3, 8, seed=1, server_round=2, cid=5)
    assert a == select_indices(3, 8, seed=1, server_round=2, cid=5)
    assert len(set(a)) == 3 and all(0 <= i < 8 for i in a)
    draws = {tuple(select_indices(3, 8, seed=1, server_round=r, cid=5)) for r in range(20)}
    assert len(draws) > 5  # anew every round
    with pytest.raises(ValueError, match="budget"):
        select_indices(9, 8, 0, 1, 0)


def test_client_starts_exactly_at_global_model(ids):
    cfg = PLoRAConfig(rank=6, alpha=12)
    server_model = get_plora_model(tiny_bert(dtype=torch.float64), cfg)
    state = randomize_pairs(server_model)
    method = FedPLoRA(cfg, seed=3)
    global_out = logits(server_model, ids)
    task = method.configure_client(state, ClientInfo(cid=4, budget=2), server_round=1)
    client = get_plora_model(tiny_bert(dtype=torch.float64), cfg)
    method.client_setup(client, task)
    assert torch.allclose(logits(client, ids), global_out, atol=1e-10, rtol=0)
    assert sum(p.numel() for p in trainable_parameters(client)) < sum(
        p.numel() for p in trainable_parameters(server_model))
    assert init_noise(method.global_factors(state), method.client_start_factors(task)) == 0.0


def test_all_ranks_equal_is_exactly_fedit(ids):
    cfg = PLoRAConfig(rank=4, alpha=8)
    state = get_plora_state_dict(get_plora_model(tiny_bert(dtype=torch.float64), cfg))
    method = FedPLoRA(cfg, weighting="samples", seed=0)
    clients = [ClientInfo(cid=i, budget=4, num_samples=n) for i, n in enumerate([10, 30, 20])]
    tasks, updates = _round(method, state, clients, ids)
    new = method.aggregate(state, tasks, updates)
    # FedIT written independently: FedAvg of A and B (and the head) with sample-count weights
    total = sum(c.num_samples for c in clients)
    for key in state:
        fedavg = torch.zeros_like(state[key], dtype=torch.float64)
        for c, u in zip(clients, updates):
            fedavg += (c.num_samples / total) * u.arrays[key].double()
        assert torch.equal(new[key], fedavg.to(state[key].dtype)), key


def test_aggregation_matches_hand_computed_example():
    cfg = PLoRAConfig(rank=4, alpha=4, target_modules=["query"], modules_to_save=["classifier"])
    layer = "L"
    state, (t1, t2), (u1, u2) = _two_client_example()
    method = FedPLoRA(cfg, weighting="samples")
    new = method.aggregate(state, [t1, t2], [u1, u2])
    A, B = new[layer + ".plora_A"], new[layer + ".plora_B"]
    assert torch.equal(A[0], torch.tensor([1., 1.]))                    # only client 1 trained pair 0
    assert torch.allclose(A[1], torch.tensor([0.75 * 2 + 0.25 * 6, 0.75 * 2 + 0.25 * 10]))
    assert torch.equal(A[2:], state[layer + ".plora_A"][2:])             # nobody trained 2, 3: kept
    assert torch.allclose(B[:, 1], torch.full((3,), 0.75 * 2 + 0.25 * 10))
    assert torch.equal(B[:, 0], torch.ones(3))
    assert torch.equal(B[:, 2:], state[layer + ".plora_B"][:, 2:])
    assert torch.allclose(new["head.weight"], torch.full((2, 2), 0.75 * 1 + 0.25 * 5))
    uniform = FedPLoRA(cfg, weighting="uniform").aggregate(state, [t1, t2], [u1, u2])
    assert torch.allclose(uniform[layer + ".plora_A"][1], torch.tensor([4., 6.]))
    assert state[layer + ".plora_A"][0, 0] == 0  # the old state was not touched


def _one_update(ids):
    cfg = PLoRAConfig(rank=4, alpha=8)
    state = get_plora_state_dict(get_plora_model(tiny_bert(dtype=torch.float64), cfg))  # as the clients of _round
    method = FedPLoRA(cfg)
    tasks, updates = _round(method, state, [ClientInfo(cid=0, budget=2, num_samples=5)], ids)
    return method, state, tasks[0], updates[0]


@pytest.mark.parametrize("breakage,message", [
    (lambda u: u.arrays.__setitem__(next(iter(u.arrays)), torch.zeros(3, 3)), "expected shape"),
    (lambda u: u.arrays.__setitem__(next(iter(u.arrays)), next(iter(u.arrays.values())) * float("nan")), "NaN"),
    (lambda u: u.arrays.__setitem__(next(iter(u.arrays)), next(iter(u.arrays.values())) + float("inf")), "NaN or Inf"),
    (lambda u: u.arrays.pop(next(iter(u.arrays))), "missing"),
    (lambda u: u.arrays.__setitem__("bogus", torch.zeros(1)), "unexpected"),
    (lambda u: setattr(u, "num_samples", -3), "num_samples"),
    (lambda u: setattr(u, "num_samples", 0), "num_samples"),
    (lambda u: u.config.__setitem__("indices", {k: [0, 0] for k in u.config["indices"]}), "indices"),
    (lambda u: u.arrays.__setitem__(next(iter(u.arrays)), next(iter(u.arrays.values())).long()), "float64 values"),
    (lambda u: u.arrays.__setitem__(next(iter(u.arrays)), next(iter(u.arrays.values())).float()),
     r"expected float64 values \(the declared upload dtype\), got float32"),
])
def test_bad_updates_are_rejected_with_a_reason(ids, breakage, message):
    method, state, task, update = _one_update(ids)
    bad = copy.deepcopy(update)
    breakage(bad)
    with pytest.raises(UpdateRejected, match=message):
        method.validate_update(task, bad, state)
    method.validate_update(task, update, state)  # the good one passes


def test_norm_bound(ids):
    method, state, task, update = _one_update(ids)
    with pytest.raises(UpdateRejected, match="norm"):
        method.validate_update(task, update, state, max_norm=1e-6)


def test_per_layer_selection_option(ids):
    cfg = PLoRAConfig(rank=8, alpha=8)
    state = get_plora_state_dict(get_plora_model(tiny_bert(), cfg))
    task = FedPLoRA(cfg, selection="per_layer").configure_client(state, ClientInfo(0, 3), 1)
    draws = {tuple(v) for v in task.config["indices"].values()}
    assert len(draws) > 1 and all(len(d) == 3 for d in draws)


def _two_client_example():
    """The hand example above: pairs 0..3, client 1 (30 samples) trained [0, 1], client 2 (10) trained [1]."""
    from fedplora.methods.base import ClientTask

    layer = "L"
    state = {layer + ".plora_A": torch.arange(8, dtype=torch.float32).reshape(4, 2),
             layer + ".plora_B": -torch.arange(12, dtype=torch.float32).reshape(3, 4), "head.weight": torch.zeros(2, 2)}
    t1 = ClientTask(arrays=state, config={"rank": 2, "indices": {layer: [0, 1]}})
    t2 = ClientTask(arrays=state, config={"rank": 1, "indices": {layer: [1]}})
    u1 = ClientUpdate({layer + ".plora_A": torch.tensor([[1., 1.], [2., 2.]]),
                       layer + ".plora_B": torch.tensor([[1., 2.], [1., 2.], [1., 2.]]),
                       "head.weight": torch.ones(2, 2)}, {"indices": {layer: [0, 1]}}, num_samples=30)
    u2 = ClientUpdate({layer + ".plora_A": torch.tensor([[6., 10.]]),
                       layer + ".plora_B": torch.tensor([[10.], [10.], [10.]]),
                       "head.weight": 5 * torch.ones(2, 2)}, {"indices": {layer: [1]}}, num_samples=10)
    return state, [t1, t2], [u1, u2]


def test_aggregate_over_all_counts_every_sampled_client_for_every_pair():
    cfg = PLoRAConfig(rank=4, alpha=4, target_modules=["query"], modules_to_save=["classifier"])
    state, tasks, updates = _two_client_example()
    new = FedPLoRA(cfg, weighting="samples", aggregate_over="all").aggregate(state, tasks, updates)
    A, B = new["L.plora_A"], new["L.plora_B"]
    # pair 0: client 1 trained it (weight 0.75), client 2 holds the global row [0, 1] (weight 0.25)
    assert torch.allclose(A[0], torch.tensor([0.75 * 1 + 0.25 * 0, 0.75 * 1 + 0.25 * 1]))
    assert torch.allclose(B[:, 0], 0.75 * torch.ones(3) + 0.25 * torch.tensor([0., -4., -8.]))
    # pair 1: both trained it: the same as "participants"
    assert torch.allclose(A[1], torch.tensor([0.75 * 2 + 0.25 * 6, 0.75 * 2 + 0.25 * 10]))
    # pairs 2, 3: nobody trained them: every client holds the global value, so they stay, bit for bit
    assert torch.equal(A[2:], state["L.plora_A"][2:]) and torch.equal(B[:, 2:], state["L.plora_B"][:, 2:])
    # uniform weights: pair 0 = (trained + global) / 2
    uniform = FedPLoRA(cfg, weighting="uniform", aggregate_over="all").aggregate(state, tasks, updates)
    assert torch.allclose(uniform["L.plora_A"][0], torch.tensor([0.5, 1.0]))


def test_fixed_selection_trains_the_first_pairs_in_every_layer_every_round():
    cfg = PLoRAConfig(rank=8, alpha=8)
    state = get_plora_state_dict(get_plora_model(tiny_bert(), cfg))
    method = FedPLoRA(cfg, selection="fixed")
    for rnd in (1, 2, 7):
        task = method.configure_client(state, ClientInfo(cid=3, budget=3), rnd)
        assert all(idx == [0, 1, 2] for idx in task.config["indices"].values())


def test_per_layer_draws_differ_across_layers_and_are_reproducible():
    cfg = PLoRAConfig(rank=8, alpha=8)
    state = get_plora_state_dict(get_plora_model(tiny_bert(), cfg))
    method = FedPLoRA(cfg, selection="per_layer", seed=5)
    first = method.configure_client(state, ClientInfo(cid=2, budget=3), 4).config["indices"]
    again = FedPLoRA(cfg, selection="per_layer", seed=5).configure_client(state, ClientInfo(cid=2, budget=3), 4)
    assert again.config["indices"] == first
    assert len({tuple(v) for v in first.values()}) > 1
    for k, name in enumerate(first):  # each layer's draw is the "selection" stream of its own layer key
        assert first[name] == select_indices(3, 8, seed=5, server_round=4, cid=2, layer=k + 1)


@pytest.mark.parametrize("fold", ["branch", "merge"])
def test_select_n_drop_starts_from_the_selected_pairs_only(ids, fold):
    cfg = PLoRAConfig(rank=4, alpha=8, fold=fold)
    server = get_plora_model(tiny_bert(dtype=torch.float64), cfg)
    g = torch.Generator().manual_seed(1)
    state = {k: (torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.3 if "plora" in k else v)
             for k, v in get_plora_state_dict(server).items()}
    drop = FedPLoRA(cfg, unselected="drop", selection="fixed")
    task = drop.configure_client(state, ClientInfo(cid=0, budget=2), 1)
    client = get_plora_model(tiny_bert(dtype=torch.float64), cfg)
    drop.client_setup(client, task)
    # the model a client starts from: only pairs 0 and 1 of the global adapter, the others absent
    expected = get_plora_model(tiny_bert(dtype=torch.float64), cfg)
    kept = {k: (v.clone() if "plora" in k else v) for k, v in state.items()}
    for k, v in kept.items():
        if k.endswith("plora_A"):
            v[2:] = 0
        elif k.endswith("plora_B"):
            v[:, 2:] = 0
    set_plora_state_dict(expected, kept)
    assert torch.allclose(logits(client, ids), logits(expected, ids), atol=1e-12, rtol=0)
    folded = get_plora_model(tiny_bert(dtype=torch.float64), cfg)
    fold = FedPLoRA(cfg, selection="fixed")  # the same pairs selected; a fold task also carries the others
    fold.client_setup(folded, fold.configure_client(state, ClientInfo(cid=0, budget=2), 1))
    assert not torch.allclose(logits(folded, ids), logits(client, ids))  # fold keeps pairs 2, 3; drop does not
    # what the server measures as the client's start is that same adapter (initialization noise > 0)
    start = drop.client_start_factors(task)
    name = next(iter(start))
    assert torch.equal(start[name][1], kept[name + ".plora_A"])
