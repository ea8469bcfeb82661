import copy

import pytest
import torch

from conftest import MODELS, logits, randomize_pairs, tiny_bert
from fedplora import (
    ClientInfo, ClientUpdate, PLoRAConfig, UpdateRejected, aggregation_noise, get_plora_model, get_plora_state_dict,
    init_noise, make_method, nbytes, plora_layers, select_and_fold,
)
from fedplora.methods import METHODS, FedIT, FlexLoRA, FLoRA, HetLoRA
from fedplora.methods.pairs import stack_pairs
from fedplora.methods.flexlora import dense_svd_truncation, svd_truncation
from test_fedplora_method import _train_locally

CFG = PLoRAConfig(rank=4, alpha=8)
BUDGETS = [1, 2, 4]
FACTORIES = {
    "fedit-ideal": lambda: FedIT(CFG),
    "fedit-feasible": lambda: FedIT(CFG, variant="feasible", min_rank=1),
    "hetlora": lambda: HetLoRA(CFG),
    "flexlora": lambda: FlexLoRA(CFG),
    "flora": lambda: FLoRA(CFG, seed=3),
}


def _wrapped():
    return get_plora_model(tiny_bert(dtype=torch.float64), CFG)


def _manual_model(factors, arrays):
    """Tiny BERT with every adapted weight += B' @ A by hand, and the heads found in ``arrays``."""
    model = tiny_bert(dtype=torch.float64)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for layer, (B, A) in factors.items():
            model.get_submodule(layer).weight += B.double() @ A.double()
        for key, value in arrays.items():
            if key in params:
                params[key].copy_(value)
    return model


def _run_round(method, state, ids, server_round, budgets=BUDGETS):
    """One round through the interface, checking each client starts where client_start_factors says."""
    tasks, updates = [], []
    for cid, budget in enumerate(budgets):
        task = method.configure_client(state, ClientInfo(cid, budget, num_samples=10 * (cid + 1)), server_round)
        model = _wrapped()
        method.client_setup(model, task)
        expected = _manual_model(method.client_start_factors(task), task.arrays)
        assert torch.allclose(logits(model, ids), logits(expected, ids), atol=1e-10, rtol=0)
        for _, layer in plora_layers(model):  # optimizer state for r pairs only
            assert layer.active_A.shape[0] == layer.active_B.shape[1] == task.config["rank"]
        g = torch.Generator().manual_seed(100 * server_round + cid)
        _train_locally(model, ids, torch.randint(0, 3, (ids.shape[0],), generator=g))
        update = method.client_update(model, task, 10 * (cid + 1))
        method.validate_update(task, update, state)
        tasks.append(task)
        updates.append(update)
    return tasks, updates


def _product(method, state, layer):
    B, A = method.global_factors(state)[layer]
    return B.double() @ A.double()


# ---------------------------------------------------------------- registration


def test_baselines_are_registered_and_describe_themselves():
    assert {"fedit", "hetlora", "flexlora", "flora"} <= set(METHODS)
    assert isinstance(make_method("flexlora", CFG, svd="dense"), FlexLoRA)
    assert "budgets ignored" in FedIT(CFG).describe()
    assert "rank 2" in FedIT(CFG, variant="feasible", min_rank=2).describe()
    with pytest.raises(ValueError, match="min_rank"):
        FedIT(CFG, variant="feasible")
    with pytest.raises(ValueError, match="min_rank"):
        FedIT(CFG, min_rank=2)
    with pytest.raises(ValueError, match="svd"):
        FlexLoRA(CFG, svd="randomized")


# ---------------------------------------------------------------- hand-computed aggregations


def _pairs(A, B, n, heads=None):
    arrays = {"L.plora_A": torch.tensor(A, dtype=torch.float64), "L.plora_B": torch.tensor(B, dtype=torch.float64)}
    return ClientUpdate(arrays | (heads or {}), {}, num_samples=n)


def test_fedit_fedavgs_factors_and_feasible_keeps_the_tail_zero():
    cfg = PLoRAConfig(rank=2, alpha=2, target_modules=["query"])
    state = {"L.plora_A": torch.zeros(2, 2, dtype=torch.float64), "L.plora_B": torch.zeros(3, 2, dtype=torch.float64),
             "head.w": torch.zeros(2)}
    u1 = _pairs([[1., 1.], [2., 2.]], [[1., 2.]] * 3, 30, {"head.w": torch.ones(2)})
    u2 = _pairs([[5., 9.], [6., 10.]], [[5., 10.]] * 3, 10, {"head.w": 5 * torch.ones(2)})
    fedit = FedIT(cfg, weighting="samples")
    tasks = [fedit.configure_client(state, ClientInfo(c, 2, n), 1) for c, n in enumerate([30, 10])]
    new = fedit.aggregate(state, tasks, [u1, u2])
    assert torch.allclose(new["L.plora_A"], torch.tensor([[2., 3.], [3., 4.]], dtype=torch.float64))
    assert torch.allclose(new["L.plora_B"], torch.tensor([[2., 4.]] * 3, dtype=torch.float64))
    assert torch.allclose(new["head.w"], torch.full((2,), 2.))
    # feasible at rank 1: the clients hold pair 0 only, pair 1 stays zero
    f1, f2 = _pairs([[1., 1.]], [[1.]] * 3, 30), _pairs([[5., 9.]], [[5.]] * 3, 10)
    feasible_method = FedIT(cfg, weighting="samples", variant="feasible", min_rank=1)
    pairs_only = {k: v for k, v in state.items() if "L" in k}
    tasks = [feasible_method.configure_client(pairs_only, ClientInfo(c, 2, n), 1) for c, n in enumerate([30, 10])]
    feasible = feasible_method.aggregate(pairs_only, tasks, [f1, f2])
    assert torch.allclose(feasible["L.plora_A"], torch.tensor([[2., 3.], [0., 0.]], dtype=torch.float64))
    assert torch.allclose(feasible["L.plora_B"], torch.tensor([[2., 0.]] * 3, dtype=torch.float64))


def test_hetlora_zero_pads_and_weights_by_product_norm():
    cfg = PLoRAConfig(rank=3, alpha=3, target_modules=["query"])
    state = {"L.plora_A": torch.full((3, 2), 7., dtype=torch.float64),
             "L.plora_B": torch.full((2, 3), 7., dtype=torch.float64)}
    u1 = _pairs([[3., 4.]], [[1.], [0.]], n=100)                      # ||B A|| = ||[[3, 4], [0, 0]]|| = 5
    u2 = _pairs([[1., 0.], [0., 1.]], [[9., 0.], [0., 12.]], n=1)     # ||B A|| = ||diag(9, 12)|| = 15
    tasks = [HetLoRA(cfg).configure_client(state, ClientInfo(c, r, n), 1) for c, r, n in [(0, 1, 100), (1, 2, 1)]]
    new = HetLoRA(cfg).aggregate(state, tasks, [u1, u2])              # weights 1/4, 3/4 whatever the samples
    A, B = new["L.plora_A"], new["L.plora_B"]
    assert torch.allclose(A[:2], torch.tensor([[1.5, 1.0], [0.0, 0.75]], dtype=torch.float64))
    assert torch.allclose(B[:, :2], torch.tensor([[7.0, 0.0], [0.0, 9.0]], dtype=torch.float64))
    assert torch.equal(A[2], state["L.plora_A"][2]) and torch.equal(B[:, 2], state["L.plora_B"][:, 2])
    literal = HetLoRA(cfg, keep_untrained=False).aggregate(state, tasks, [u1, u2])
    assert not literal["L.plora_A"][2].any() and not literal["L.plora_B"][:, 2].any()
    assert state["L.plora_A"][0, 0] == 7.  # not mutated


def test_flexlora_aggregates_in_product_space_and_stores_the_svd():
    cfg = PLoRAConfig(rank=2, alpha=4, target_modules=["query"])   # s = 2
    state = {"L.plora_A": torch.zeros(2, 3, dtype=torch.float64), "L.plora_B": torch.zeros(3, 2, dtype=torch.float64)}
    u1 = _pairs([[1., 0., 0.]], [[2.], [0.], [0.]], n=5)           # s B A = 4 e1 e1^T
    u2 = _pairs([[0., 1., 0.]], [[0.], [1.], [0.]], n=5)           # s B A = 2 e2 e2^T
    method = FlexLoRA(cfg)
    new = method.aggregate(state, [], [u1, u2])
    assert torch.allclose(_product(method, new, "L"), torch.diag(torch.tensor([2., 1., 0.], dtype=torch.float64)))
    assert torch.allclose(new["L.plora_A"].abs(), torch.eye(3, dtype=torch.float64)[:2])  # V^T, singular order
    assert torch.allclose(new["L.plora_B"].abs(), torch.tensor([[1., 0.], [0., .5], [0., 0.]], dtype=torch.float64))
    top = method.configure_client(new, ClientInfo(0, budget=1), 2)   # the rank-1 truncation is the first pair
    assert torch.allclose(2 * top.arrays["L.plora_B"] @ top.arrays["L.plora_A"],
                          torch.diag(torch.tensor([2., 0., 0.], dtype=torch.float64)))
    # one rank-1 client: the second pair gets B = 0 and a unit A row orthogonal to the first
    lone = method.aggregate(state, [], [u1])
    A = lone["L.plora_A"]
    assert torch.allclose(A @ A.T, torch.eye(2, dtype=torch.float64)) and not lone["L.plora_B"][:, 1].any()
    assert torch.allclose(_product(method, lone, "L"), torch.diag(torch.tensor([4., 0., 0.], dtype=torch.float64)))


def test_flora_merges_the_weighted_stack_into_the_delta():
    cfg = PLoRAConfig(rank=2, alpha=4, target_modules=["query"])   # s = 2
    state = {"L.flora_delta": torch.ones(2, 2, dtype=torch.float64), "head.w": torch.zeros(2)}
    u1 = _pairs([[1., 2.]], [[1.], [0.]], 30, {"head.w": torch.ones(2)})
    u2 = _pairs([[0., 1.], [1., 0.]], [[1., 0.], [0., 1.]], 10, {"head.w": 5 * torch.ones(2)})
    new = FLoRA(cfg, weighting="samples").aggregate(state, [], [u1, u2])
    # 1 + 2 * (0.75 [[1, 2], [0, 0]] + 0.25 [[0, 1], [1, 0]])
    assert torch.allclose(new["L.flora_delta"], torch.tensor([[2.5, 4.5], [1.5, 1.0]], dtype=torch.float64))
    assert torch.allclose(new["head.w"], torch.full((2,), 2.))
    assert torch.equal(state["L.flora_delta"], torch.ones(2, 2, dtype=torch.float64))


def test_flora_stack_product_is_the_weighted_sum_of_client_products():
    g = torch.Generator().manual_seed(0)
    updates = [ClientUpdate({"L.plora_A": torch.randn(r, 30, generator=g, dtype=torch.float64),
                             "L.plora_B": torch.randn(20, r, generator=g, dtype=torch.float64)}, {}, n)
               for r, n in [(1, 3), (2, 5), (4, 9)]]
    weights = [3 / 17, 5 / 17, 9 / 17]
    B, A = stack_pairs(weights, updates, "L")
    assert B.shape == (20, 7) and A.shape == (7, 30)
    direct = sum(w * u.arrays["L.plora_B"] @ u.arrays["L.plora_A"] for w, u in zip(weights, updates))
    assert torch.allclose(B @ A, direct, atol=1e-13, rtol=0)


# ---------------------------------------------------------------- FlexLoRA: QR path == dense path


@pytest.mark.parametrize("rank,K", [(4, 7), (6, 3)])
def test_flexlora_qr_path_equals_dense_svd(rank, K):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(20, K, generator=g, dtype=torch.float64)
    Y = torch.randn(K, 30, generator=g, dtype=torch.float64)
    qr_B, qr_A = svd_truncation(X, Y, rank, torch.Generator().manual_seed(0))
    de_B, de_A = dense_svd_truncation(X, Y, rank, torch.Generator().manual_seed(0))
    assert qr_B.shape == de_B.shape == (20, rank) and qr_A.shape == de_A.shape == (rank, 30)
    assert torch.allclose(qr_B @ qr_A, de_B @ de_A, atol=1e-10, rtol=0)
    assert torch.allclose(qr_B.norm(dim=0), de_B.norm(dim=0), atol=1e-10)          # singular values
    assert torch.allclose(qr_A @ qr_A.T, torch.eye(rank, dtype=torch.float64), atol=1e-10)
    k = min(rank, K)
    assert torch.allclose((qr_A[:k] * de_A[:k]).sum(1).abs(), torch.ones(k, dtype=torch.float64))  # same V up to sign
    if rank <= K:  # the truncation really is the best rank-r approximation of the dense product
        U, S, Vh = torch.linalg.svd(X @ Y)
        assert torch.allclose(qr_B @ qr_A, (U[:, :rank] * S[:rank]) @ Vh[:rank], atol=1e-10)


def test_flexlora_qr_and_dense_methods_agree_on_real_updates(ids):
    state = get_plora_state_dict(_wrapped())
    method = FlexLoRA(CFG)
    tasks, updates = _run_round(method, state, ids, 1)
    qr = method.aggregate(state, tasks, updates)
    dense = FlexLoRA(CFG, svd="dense").aggregate(state, tasks, updates)
    for layer in method.global_factors(state):
        assert torch.allclose(_product(method, qr, layer), _product(method, dense, layer), atol=1e-12)


# ---------------------------------------------------------------- HetLoRA reduces to FedAvg


def test_hetlora_with_all_clients_at_rank_R_and_equal_norms_is_fedavg(ids):
    state = get_plora_state_dict(_wrapped())
    tasks, updates = _run_round(HetLoRA(CFG), state, ids, 1, budgets=[4, 4, 4])
    for u in updates:  # rescale each client's B so every ||B_i A_i||_F is 1 in every layer
        for layer, (B, A) in HetLoRA(CFG).client_end_factors(None, u).items():
            u.arrays[layer + ".plora_B"] = u.arrays[layer + ".plora_B"] / float(torch.linalg.matrix_norm(B @ A))
    het = HetLoRA(CFG, weighting="uniform").aggregate(state, tasks, updates)
    fedavg = FedIT(CFG, weighting="uniform").aggregate(state, tasks, updates)
    assert het.keys() == fedavg.keys()
    for key in het:
        assert torch.allclose(het[key], fedavg[key], atol=1e-12, rtol=0), key


# ---------------------------------------------------------------- a full round of every method


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_two_rounds_through_the_interface(name, ids):
    method = FACTORIES[name]()
    server = _wrapped()
    state = method.init_state(server)
    frozen = copy.deepcopy(state)
    tasks, updates = _run_round(method, state, ids, 1)
    new = method.aggregate(state, tasks, updates)
    assert all(torch.equal(state[k], frozen[k]) for k in frozen) and state.keys() == frozen.keys()
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in state.items()}
    assert all(new[k].dtype == state[k].dtype for k in state)

    method.load_global(server, new)
    expected = _manual_model(method.global_factors(new), new)
    assert torch.allclose(logits(server, ids), logits(expected, ids), atol=1e-10, rtol=0)

    # bytes: what is really sent, and the client trains exactly r pairs
    layers = {n: (l.d_in, l.d_out) for n, l in plora_layers(server)}
    head_bytes = sum(p.numel() * 8 for p in server.classifier.parameters())
    for task, update, budget in zip(tasks, updates, BUDGETS):
        r = {"fedit-ideal": 4, "fedit-feasible": 1}.get(name, budget)
        assert task.config["rank"] == r
        assert nbytes(update.arrays) == sum(r * (i + o) * 8 for i, o in layers.values()) + head_bytes
        down = sum((i * o if name == "flora" else r * (i + o)) * 8 for i, o in layers.values()) + head_bytes
        assert nbytes(task.arrays) == down

    # round 2: the global adapter is non-zero now
    noise = [init_noise(method.global_factors(new), method.client_start_factors(method.configure_client(
        new, ClientInfo(cid, b, 1), 2))) for cid, b in enumerate(BUDGETS)]
    if name in ("hetlora", "flexlora"):
        assert noise[0] > 1e-6 and noise[1] > 1e-6 and noise[2] < 1e-9  # only the rank-R client starts exactly
    else:
        assert noise == [0.0, 0.0, 0.0]
    tasks2, updates2 = _run_round(method, new, ids, 2)
    newer = method.aggregate(new, tasks2, updates2)
    ends = [method.client_end_factors(t, u) for t, u in zip(tasks2, updates2)]
    agg = aggregation_noise(method.client_weights(updates2), ends, method.global_factors(newer))
    if name == "flora":
        assert agg < 1e-9  # stacking is the exact product-space mean
    else:
        assert agg > 1e-9


def test_flora_client_trains_a_fresh_seeded_lora():
    method = FLoRA(CFG, seed=5)
    g = torch.Generator().manual_seed(0)
    state = {k: 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype)
             for k, v in method.init_state(_wrapped()).items()}
    models = []
    for cid, rnd in [(0, 1), (0, 1), (1, 1), (0, 2)]:
        model = _wrapped()
        method.client_setup(model, method.configure_client(state, ClientInfo(cid, 2), rnd))
        models.append(model)
    first = {n: l.active_A.detach() for n, l in plora_layers(models[0])}
    for _, layer in plora_layers(models[0]):
        assert layer.active_A.shape == (2, layer.d_in) and layer.active_A.any() and not layer.active_B.any()
    for other, same in zip(models[1:], [True, False, False]):  # same (seed, round, cid) -> same draw
        for n, layer in plora_layers(other):
            assert torch.equal(layer.active_A, first[n]) == same


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_wrong_shapes_are_rejected(name, ids):
    method = FACTORIES[name]()
    state = method.init_state(_wrapped())
    tasks, updates = _run_round(method, state, ids, 1, budgets=[2])
    task, good = tasks[0], updates[0]
    key = next(k for k in good.arrays if k.endswith(".plora_A"))
    for shape in [(3, good.arrays[key].shape[1]), (good.arrays[key].shape[1], 2)]:  # one pair too many; transposed
        bad = copy.deepcopy(good)
        bad.arrays[key] = torch.zeros(shape, dtype=torch.float64)
        with pytest.raises(UpdateRejected, match="expected shape"):
            method.validate_update(task, bad, state)
    bad = copy.deepcopy(good)
    bad.arrays.pop(key.replace("plora_A", "plora_B"))
    with pytest.raises(UpdateRejected, match="missing"):
        method.validate_update(task, bad, state)
    method.validate_update(task, good, state)


def test_fedit_feasible_refuses_a_budget_below_min_rank():
    method = FedIT(CFG, variant="feasible", min_rank=2)
    state = method.init_state(_wrapped())
    assert all(not v[2:].any() for k, v in state.items() if k.endswith("plora_A"))
    with pytest.raises(ValueError, match="min_rank"):
        method.configure_client(state, ClientInfo(0, budget=1), 1)


# ---------------------------------------------------------------- the layer's base offset (FLoRA)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_base_offset_adds_a_delta_under_the_pairs_and_restores_w0_bit_exactly(arch, ids):
    model = get_plora_model(MODELS[arch](dtype=torch.float64), PLoRAConfig(rank=4, alpha=8))
    w0 = {n: l.base_layer.weight.detach().clone() for n, l in plora_layers(model)}
    state = randomize_pairs(model)
    reference = MODELS[arch](dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, layer in plora_layers(model):
            D = torch.randn(layer.d_out, layer.d_in, generator=g, dtype=torch.float64) * 0.1
            layer.set_base_offset(D)
            full = D + layer.scale * state[name + ".plora_B"] @ state[name + ".plora_A"]
            reference.get_submodule(name).weight += full.T if layer.transposed else full
        params = dict(reference.named_parameters())
        for key in state:
            if key in params:
                params[key].copy_(state[key])
    assert torch.allclose(logits(model, ids), logits(reference, ids), atol=1e-10, rtol=0)
    select_and_fold(model, [1, 3])  # folding on top of the offset keeps the function
    assert torch.allclose(logits(model, ids), logits(reference, ids), atol=1e-10, rtol=0)
    for name, layer in plora_layers(model):
        assert torch.equal(layer.pristine_weight(), w0[name])
        layer.set_base_offset(None)
    select_and_fold(model, range(4))
    for name, layer in plora_layers(model):
        assert torch.equal(layer.base_layer.weight, w0[name]) and layer.base_weight0 is None
    with pytest.raises(ValueError, match="base offset"):
        next(iter(plora_layers(model)))[1].set_base_offset(torch.zeros(2, 2))


def test_flora_export_reproduces_the_merged_global_model(tmp_path, ids):
    """FLoRA's global model is W0 + D (not rank R): its export must still load through PeftModel exactly."""
    from peft import PeftModel

    from fedplora import ClientInfo, PLoRAConfig, get_plora_model, trainable_parameters
    from fedplora.methods import make_method

    cfg = PLoRAConfig(rank=4, alpha=8)
    method = make_method("flora", cfg, seed=0)
    state = method.init_state(get_plora_model(tiny_bert(dtype=torch.float64), cfg))
    tasks, updates = [], []
    for cid, budget in enumerate([1, 2, 4]):
        task = method.configure_client(state, ClientInfo(cid, budget, 10), 1)
        model = get_plora_model(tiny_bert(dtype=torch.float64), cfg)
        method.client_setup(model, task)
        opt = torch.optim.AdamW(trainable_parameters(model), lr=0.05)
        model.train()
        model(input_ids=ids, labels=torch.tensor([0, 1, 2])).loss.backward()
        opt.step()
        model.eval()
        tasks.append(task)
        updates.append(method.client_update(model, task, 10))
    state = method.aggregate(state, tasks, updates)
    server = get_plora_model(tiny_bert(dtype=torch.float64), cfg)
    method.load_global(server, state)
    expected = logits(server, ids)
    method.export_adapter(server, state, tmp_path / "flora")
    loaded = PeftModel.from_pretrained(tiny_bert(dtype=torch.float64), str(tmp_path / "flora")).eval()
    assert torch.allclose(logits(loaded, ids), expected, atol=1e-8)
