"""Both noise families on hand-computed examples: function level (today's) and the paper's definitions.

Paper: N_Init = sum_i (||A - A_i||_F + ||B - B_i||_F), rank-wise zero-padded (parameter level);
N_Agg = ||dW* - dW||_F with dW* = (1/v) sum_i B_i A_i, per pair over Q_j for Fed-PLoRA.
"""

import math
import types

import pytest
import torch

from conftest import tiny_bert
from fedplora import (
    ClientInfo, ClientUpdate, PLoRAConfig, aggregation_noise, get_plora_model, get_plora_state_dict, init_noise,
)
from fedplora import measure
from fedplora.methods import FedIT, FedPLoRA, FLoRA, HetLoRA
from fedplora.methods.base import ClientTask

D64 = torch.float64


def t(rows):
    return torch.tensor(rows, dtype=D64)


def fro(X):
    return float(torch.linalg.matrix_norm(X))


def _both_init(method, state, task):
    fn = init_noise(method.global_factors(state), method.client_start_factors(task))
    paper = measure.paper_init_noise(method.global_pairs(state), [method.client_start_pairs(task)])
    return fn, paper


def _fn_agg(method, state, tasks, updates, new):
    ends = [method.client_end_factors(tk, u) for tk, u in zip(tasks, updates)]
    return aggregation_noise(method.client_weights(updates), ends, method.global_factors(new))


def _paper_agg(method, state, tasks, updates, new):
    ideal = method.paper_ideal_factors(state, tasks, updates)
    return measure.paper_aggregation_noise(ideal, method.global_factors(new))


# ------------------------------------------------------------------ initialization


def test_flora_fresh_adapter_is_paper_init_noise_but_no_function_level_noise():
    cfg = PLoRAConfig(rank=4, alpha=4)
    model = get_plora_model(tiny_bert(dtype=D64), cfg)
    method = FLoRA(cfg, seed=3)
    state = method.init_state(model)
    layer0 = next(k for k in state if k.endswith(".flora_delta"))
    state[layer0] = torch.randn(state[layer0].shape, generator=torch.Generator().manual_seed(0), dtype=D64)
    task = method.configure_client(state, ClientInfo(0, budget=2), server_round=5)
    method.client_setup(model, task)
    trained = get_plora_state_dict(model)

    starts = method.client_start_pairs(task)
    for layer, (A, B) in starts.items():  # the hook redraws exactly the adapter client_setup made
        assert torch.equal(A, trained[layer + ".plora_A"][:2]) and not B.any() and B.shape[1] == 2
    fn, paper = _both_init(method, state, task)
    assert fn == 0.0  # B = 0: the client computes W0 + D, the global model
    # the global adapter is empty (all merged into D), so the paper's noise is the fresh A itself
    by_hand = sum(fro(trained[layer + ".plora_A"][:2]) for layer in starts)
    assert paper > 1.0 and paper == pytest.approx(by_hand, rel=1e-12)


def _plora_state(R=4, d_in=3, d_out=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"L.plora_A": torch.randn(R, d_in, generator=g, dtype=D64),
            "L.plora_B": torch.randn(d_out, R, generator=g, dtype=D64)}


def test_fedplora_fold_has_no_init_noise_of_either_family_and_drop_has_both():
    cfg = PLoRAConfig(rank=4, alpha=8, target_modules=["query"])
    state = _plora_state()
    fold = FedPLoRA(cfg, selection="per_layer")
    task = fold.configure_client(state, ClientInfo(1, budget=2), 3)
    assert _both_init(fold, state, task) == (0.0, 0.0)

    drop = FedPLoRA(cfg, selection="fixed", unselected="drop")  # trains pairs 0, 1; pairs 2, 3 start at zero
    task = drop.configure_client(state, ClientInfo(1, budget=2), 3)
    fn, paper = _both_init(drop, state, task)
    A, B = state["L.plora_A"], state["L.plora_B"]
    assert paper == pytest.approx(fro(A[2:]) + fro(B[:, 2:]), rel=1e-12)
    assert fn == pytest.approx(fro(2.0 * B[:, 2:] @ A[2:]), rel=1e-12)  # scale s = alpha / R = 2


def test_hetlora_paper_init_noise_is_the_zero_padded_rank_wise_difference():
    cfg = PLoRAConfig(rank=3, alpha=3, target_modules=["query"])
    state = {"L.plora_A": t([[1., 0.], [0., 2.], [2., 0.]]), "L.plora_B": t([[1., 3., 0.], [0., 0., 4.]])}
    method = HetLoRA(cfg)
    tasks = [method.configure_client(state, ClientInfo(c, budget=b), 2) for c, b in ((0, 1), (1, 3))]
    starts = [method.client_start_pairs(task) for task in tasks]
    assert starts[0]["L"][0].shape == (1, 2) and starts[0]["L"][1].shape == (2, 1)  # r_i pairs, padded by the measure
    # client 0 holds pair 0 only: ||A - pad(A_0)|| = ||[[0,2],[2,0]]|| = sqrt 8, ||B - pad(B_0)|| = ||[[3,0],[0,4]]|| = 5;
    # client 1 holds all three: 0. The paper sums over clients.
    assert measure.paper_init_noise(method.global_pairs(state), starts) == pytest.approx(math.sqrt(8) + 5, rel=1e-12)
    # padding works both ways: a client with more pairs than the global adapter (FLoRA's empty one)
    assert measure.padded_distance((t([[1., 1.]]), t([[2.], [0.]])),
                                   (t([[1., 1.], [3., 4.]]), t([[2., 0.], [0., 0.]]))) == pytest.approx(5.0)
    fn = init_noise(method.global_factors(state), method.client_start_factors(tasks[0]))
    assert fn == pytest.approx(fro(state["L.plora_B"][:, 1:] @ state["L.plora_A"][1:]), rel=1e-12)


# ------------------------------------------------------------------ aggregation


def _plora_round(aggregate_over="participants"):
    """Two clients, R = 2, scale 2: client 0 trains pairs {0, 1}, client 1 pair {0}."""
    cfg = PLoRAConfig(rank=2, alpha=4, target_modules=["query"])
    method = FedPLoRA(cfg, weighting="uniform", aggregate_over=aggregate_over)
    state = {"L.plora_A": t([[1., 1.], [0., 1.]]), "L.plora_B": t([[1., 0.], [1., 1.]])}
    tasks = [ClientTask(dict(state), {"rank": 2, "indices": {"L": [0, 1]}}),
             ClientTask(dict(state), {"rank": 1, "indices": {"L": [0]}})]
    updates = [ClientUpdate({"L.plora_A": t([[1., 0.], [2., 2.]]), "L.plora_B": t([[3., 1.], [0., 5.]])}, {}, 10),
               ClientUpdate({"L.plora_A": t([[0., 1.]]), "L.plora_B": t([[1.], [0.]])}, {}, 30)]
    return method, state, tasks, updates, method.aggregate(state, tasks, updates)


def test_fedplora_paper_aggregation_noise_is_the_per_pair_covariance():
    method, state, tasks, updates, new = _plora_round()
    # pair 0: Q_0 = {0, 1}, a = [1,0], [0,1]; b = [3,0], [1,0]. With two clients the covariance
    # (1/2) sum_i (b_i - b)(a_i - a)^T is (1/4)(b_0 - b_1)(a_0 - a_1)^T; pair 1 has one trainer: none.
    # N_Agg = s ||b_0 - b_1|| ||a_0 - a_1|| / 4 = 2 * 2 * sqrt 2 / 4 = sqrt 2
    assert _paper_agg(method, state, tasks, updates, new) == pytest.approx(math.sqrt(2), rel=1e-12)

    # function level, the docs' one-line algebra: per pair q_j Cov_j - (1 - q_j)(b_j a_j^T - b_j^old a_j^old^T),
    # q_j = |Q_j| / |S| (uniform weights): the second term is the per-trainer mean's larger step
    s, A, B, A0, B0 = 2.0, new["L.plora_A"], new["L.plora_B"], state["L.plora_A"], state["L.plora_B"]
    cov0 = 0.25 * torch.outer(t([2., 0.]), t([1., -1.]))
    step = lambda j: torch.outer(B[:, j], A[j]) - torch.outer(B0[:, j], A0[j])
    by_hand = s * (1.0 * cov0 + (1 - 1.0) * step(0)) - s * (1 - 0.5) * step(1)
    fn = _fn_agg(method, state, tasks, updates, new)
    assert fn == pytest.approx(fro(by_hand), rel=1e-12)
    assert fn > 3 * _paper_agg(method, state, tasks, updates, new)  # the step term dominates here


def test_fedplora_paper_aggregation_noise_over_all_sampled_clients():
    method, state, tasks, updates, new = _plora_round("all")
    # Q_j = S for every pair, client 1 holding pair 1 at its global value a = [0,1], b = [0,1]:
    # pair 0 as before; pair 1: (1/4)(b_0 - b_old)(a_0 - a_old)^T = (1/4)[1,4]^T [2,1] -> s times their sum
    by_hand = 2.0 * (0.25 * torch.outer(t([2., 0.]), t([1., -1.])) + 0.25 * torch.outer(t([1., 4.]), t([2., 1.])))
    paper = _paper_agg(method, state, tasks, updates, new)
    assert paper == pytest.approx(fro(by_hand), rel=1e-12)
    # with uniform weights the function-level ideal is this same mean: the two families agree for "all"
    assert _fn_agg(method, state, tasks, updates, new) == pytest.approx(paper, rel=1e-12)


def test_fedit_paper_aggregation_noise_is_uniform_mean_of_products_minus_the_formed_product():
    cfg = PLoRAConfig(rank=2, alpha=2, target_modules=["query"])  # s = 1
    method = FedIT(cfg, weighting="samples")  # sample weights: 1/4, 3/4
    state = {"L.plora_A": torch.zeros(2, 2, dtype=D64), "L.plora_B": torch.zeros(3, 2, dtype=D64)}
    tasks = [method.configure_client(state, ClientInfo(c, budget=2, num_samples=n), 1) for c, n in ((0, 10), (1, 30))]
    A1, B1 = t([[1., 0.], [0., 1.]]), t([[1., 0.], [0., 2.], [1., 1.]])
    A2, B2 = t([[2., 1.], [1., 0.]]), t([[0., 1.], [1., 0.], [3., 0.]])
    updates = [ClientUpdate({"L.plora_A": A1, "L.plora_B": B1}, {}, 10),
               ClientUpdate({"L.plora_A": A2, "L.plora_B": B2}, {}, 30)]
    new = method.aggregate(state, tasks, updates)
    Abar, Bbar = 0.25 * A1 + 0.75 * A2, 0.25 * B1 + 0.75 * B2
    assert torch.allclose(new["L.plora_A"], Abar) and torch.allclose(new["L.plora_B"], Bbar)
    paper = fro(0.5 * (B1 @ A1 + B2 @ A2) - Bbar @ Abar)  # the paper's dW* is the uniform mean
    fn = fro(0.25 * B1 @ A1 + 0.75 * B2 @ A2 - Bbar @ Abar)  # function level: the method's weights
    assert _paper_agg(method, state, tasks, updates, new) == pytest.approx(paper, rel=1e-12)
    assert _fn_agg(method, state, tasks, updates, new) == pytest.approx(fn, rel=1e-12)
    assert abs(paper - fn) > 1e-3  # they differ exactly by the weights here


def test_flora_paper_aggregation_noise_is_zero_with_uniform_weights():
    cfg = PLoRAConfig(rank=2, alpha=2, target_modules=["query"])
    method = FLoRA(cfg, weighting="uniform")
    state = {"L.flora_delta": t([[1., 2.], [3., 4.]])}
    tasks = [ClientTask(dict(state), {"rank": 1, "init_seed": [0, 1, c]}) for c in (0, 1)]
    updates = [ClientUpdate({"L.plora_A": t([[1., 2.]]), "L.plora_B": t([[1.], [0.]])}, {}, 1),
               ClientUpdate({"L.plora_A": t([[0., 1.]]), "L.plora_B": t([[2.], [2.]])}, {}, 3)]
    new = method.aggregate(state, tasks, updates)
    assert _paper_agg(method, state, tasks, updates, new) < 1e-12  # stacking is the uniform mean exactly
    # sample weights 1/4, 3/4: the paper's uniform dW* differs from the stack by sum_i (1/2 - w_i) B_i A_i
    weighted = FLoRA(cfg, weighting="samples")
    new = weighted.aggregate(state, tasks, updates)
    by_hand = 0.25 * t([[1.], [0.]]) @ t([[1., 2.]]) - 0.25 * t([[2.], [2.]]) @ t([[0., 1.]])
    assert _paper_agg(weighted, state, tasks, updates, new) == pytest.approx(fro(by_hand), rel=1e-9)
    # FLoRA's hook (D stacked once) is the base class's mean of the end adapters (D stacked v times)
    from fedplora.methods.base import FederatedMethod
    default = FederatedMethod.paper_ideal_factors(weighted, state, tasks, updates)
    assert measure.paper_aggregation_noise(default, weighted.global_factors(new)) == \
        pytest.approx(_paper_agg(weighted, state, tasks, updates, new), rel=1e-9)


# ------------------------------------------------------------------ large layers, the per-round record, old histories


def test_large_layer_gram_path_equals_dense(monkeypatch):
    cfg = PLoRAConfig(rank=6, alpha=12, target_modules=["query"])
    g = torch.Generator().manual_seed(7)
    state = {"L.plora_A": torch.randn(6, 40, generator=g, dtype=D64),
             "L.plora_B": torch.randn(30, 6, generator=g, dtype=D64)}
    method = FedPLoRA(cfg, selection="per_layer")
    tasks = [method.configure_client(state, ClientInfo(c, budget=b, num_samples=5 + c), 2)
             for c, b in enumerate((1, 3, 6, 2))]
    updates = [ClientUpdate({"L.plora_A": torch.randn(len(tk.config["indices"]["L"]), 40, generator=g, dtype=D64),
                             "L.plora_B": torch.randn(30, len(tk.config["indices"]["L"]), generator=g, dtype=D64)},
                            {}, 5 + c) for c, tk in enumerate(tasks)]
    new = method.aggregate(state, tasks, updates)
    dense = (_paper_agg(method, state, tasks, updates, new), _fn_agg(method, state, tasks, updates, new))
    monkeypatch.setattr(measure, "DENSE_LIMIT", 0)
    gram = (_paper_agg(method, state, tasks, updates, new), _fn_agg(method, state, tasks, updates, new))
    assert dense[0] > 0 and dense[1] > 0
    assert gram == pytest.approx(dense, rel=1e-9)


def test_the_round_record_carries_both_families_and_the_old_names():
    from fedplora.federation.strategy import Accepted, HeteroLoRAStrategy, RoundRecord

    method, state, tasks, updates, new = _plora_round()
    server = types.SimpleNamespace(method=method, record=RoundRecord(round=1))
    HeteroLoRAStrategy.measure(server, state, new, [Accepted(c, tk, u, {}) for c, (tk, u) in
                                                     enumerate(zip(tasks, updates))])
    entry = server.record.entry()
    assert entry["paper_agg_noise"] == pytest.approx(math.sqrt(2), rel=1e-12)
    assert entry["fn_agg_noise"] == _fn_agg(method, state, tasks, updates, new) == entry["agg_noise"]
    assert entry["fn_init_noise"] == entry["paper_init_noise"] == entry["init_noise"] == 0.0
    assert set(measure.NOISE_KEYS) <= set(entry)


def test_histories_written_before_the_split_still_read_and_compare():
    from fedplora.compare import markdown, summarize
    from fedplora.federation.progress import noise_line

    old = {"round": 1, "metrics": {"accuracy": 0.5}, "init_noise": 1.5, "agg_noise": 2.5, "bytes_up": 1,
           "bytes_down": 1, "wall_s": 1.0}
    assert measure.noise_of(old, "fn_init_noise") == 1.5 and measure.noise_of(old, "fn_agg_noise") == 2.5
    assert math.isnan(measure.noise_of(old, "paper_agg_noise"))
    assert "paper init nan" in noise_line(old)
    new = {**old, "fn_init_noise": 0.5, "fn_agg_noise": 1.0, "paper_init_noise": 3.0, "paper_agg_noise": 4.0}
    summary = lambda h, seed: {"seed": seed, "final": {"accuracy": 0.5}, "bytes_up_total": 1, "bytes_down_total": 1,
                               "wall_s": 1.0, "metric": "accuracy", "history": [{**h, "round": 0}, h]}
    table = summarize({"fedplora": [summary(old, 0), summary(new, 1)]})
    row = table["fedplora"]
    assert row["fn_init_noise_mean"] == pytest.approx(1.0) and row["paper_agg_noise_mean"] == 4.0  # NaN skipped
    assert row["init_noise_mean"] == row["fn_init_noise_mean"]  # the old column name, function level
    cfg = types.SimpleNamespace(task="t", num_clients=2, clients_per_round=2, rounds=1, rank=4, ranks=[1],
                                rank_shares=[1.0], partitioner="iid")
    text = markdown(table, cfg, "cmd")
    assert "init noise (function-level)" in text and "init noise (paper, parameter-level)" in text
