"""Robust aggregation (fedplora/robust.py, docs/robustness.md): hand-computed examples per rule and method,
the refusals, mean unchanged bit for bit, and attackers among honest clients. Small tensors: milliseconds."""

import math

import pytest
import torch

from fedplora import ClientInfo, ClientUpdate, PLoRAConfig, make_method
from fedplora.aggregation import Mean, Robust, reducer_for
from fedplora.config import ConfigError, RunConfig
from fedplora.methods import FedIT, FedPLoRA, FlexLoRA, FLoRA, HetLoRA
from fedplora.methods.base import ClientTask
from fedplora.robust import AGGREGATORS, Aggregator, UnitDelta, clip_scales, median, tolerates, trimmed_mean

F64 = torch.float64
CFG = PLoRAConfig(rank=4, alpha=4, target_modules=["query"], modules_to_save=["classifier"])  # scale 1


def t(*rows):
    return torch.tensor(rows, dtype=F64)


# ---------------------------------------------------------------- a Fed-PLoRA round written as deltas
# one adapted layer "L" with d_in = d_out = 1, so pair j is the two numbers (a_j, b_j); a head of one number
STATE = {"L.plora_A": t([1.], [2.], [3.], [4.]), "L.plora_B": t([10., 20., 30., 40.]), "head.weight": t(0.)}
# per client: {pair: (delta a, delta b)} and its head's delta. Pair 0: all five (client 4 an outlier);
# pair 1: clients 0 and 1 (an even count); pair 2: client 2 only; pair 3: nobody.
CLIENTS = [({0: (1, -1), 1: (1, 4)}, 1),
           ({0: (2, -2), 1: (3, 0)}, 2),
           ({0: (3, 0), 2: (5, 7)}, 3),
           ({0: (7, 1)}, 4),
           ({0: (100, 50)}, -100)]


def _round(clients, state=STATE, layers=("L",), samples=None):
    """Tasks and updates of Fed-PLoRA clients, each client's pairs = the global pairs + the given deltas.
    ``clients``: ({pair: (da, db)} or {layer: {pair: (da, db)}}, head delta)."""
    tasks, updates = [], []
    for i, (pairs, dh) in enumerate(clients):
        per_layer = pairs if set(pairs) <= set(layers) and pairs else {layers[0]: pairs}
        arrays, indices = {}, {}
        for layer in layers:
            got = per_layer.get(layer, {})
            idx = sorted(got)
            A_old, B_old = state[layer + ".plora_A"], state[layer + ".plora_B"]
            arrays[layer + ".plora_A"] = torch.stack([A_old[j] + got[j][0] for j in idx]) if idx else A_old[:0]
            arrays[layer + ".plora_B"] = (torch.stack([B_old[:, j] + got[j][1] for j in idx], dim=1) if idx
                                          else B_old[:, :0])
            indices[layer] = idx
        arrays["head.weight"] = state["head.weight"] + dh
        tasks.append(ClientTask(arrays=state, config={"rank": max(map(len, indices.values())), "indices": indices}))
        updates.append(ClientUpdate(arrays, {"indices": indices}, num_samples=samples[i] if samples else 10))
    return tasks, updates


def _agg(aggregator, clients=CLIENTS, **options):
    tasks, updates = _round(clients)
    new = FedPLoRA(CFG, **options).aggregate(STATE, tasks, updates, aggregator)
    return new["L.plora_A"][:, 0], new["L.plora_B"][0], new["head.weight"]


def test_coordinatewise_statistics_by_hand():
    x = t([1., 10.], [4., -2.], [2., 0.], [100., 1.])
    assert torch.equal(median(x), t(1.5 + 1.5, 0.5))  # even count: the mean of the two middle values
    assert torch.equal(median(x[:3]), t(2., 0.))
    assert torch.equal(trimmed_mean(x, 0.25), t(3., 0.5))  # k = floor(0.25 * 4) = 1 at each end
    assert torch.equal(trimmed_mean(x, 0.2), x.mean(0))  # k = floor(0.8) = 0: the plain mean
    zero, big = UnitDelta({"p": t(0.)}), UnitDelta({"p": t(3., 4.)})
    assert clip_scales([zero, zero, big], 2.0) == [1.0, 1.0, 0.0]  # median norm 0: the round changes nothing
    assert clip_scales([zero, big, big], float("inf")) == [1.0, 1.0, 1.0]
    assert clip_scales([big, UnitDelta({"p": t(6., 8.)}), UnitDelta({"p": t(30., 40.)})], 2.0) == [1.0, 1.0, 0.4]


def test_median_per_pair_over_the_clients_that_trained_it():
    A, B, head = _agg("median")
    assert torch.equal(A, t(1 + 3, 2 + (1 + 3) / 2, 3 + 5, 4))  # pair 0: median of 1,2,3,7,100; pair 1: mean of 2
    assert torch.equal(B, t(10 + 0, 20 + (4 + 0) / 2, 30 + 7, 40))  # pair 2: its one trainer; pair 3: kept
    assert torch.equal(head, t(0 + 2))  # heads: the same rule over all clients (median of 1,2,3,4,-100)


def test_trimmed_mean_per_pair():
    A, B, head = _agg(Aggregator("trimmed_mean", trim_fraction=0.2))
    # pair 0: 5 clients, k = 1: A mean(2,3,7), B mean(-1,0,1); pairs 1, 2: k = 0, the mean of their trainers
    assert torch.equal(A, t(1 + 4, 2 + 2, 3 + 5, 4))
    assert torch.equal(B, t(10 + 0, 20 + 2, 30 + 7, 40))
    assert torch.equal(head, t(2.))  # mean(1, 2, 3)
    A, _, head = _agg(Aggregator("trimmed_mean", trim_fraction=0.4))  # k = 2 of 5: the median
    assert torch.equal(A, t(1 + 3, 2 + 2, 3 + 5, 4)) and torch.equal(head, t(2.))


def test_norm_clip_clips_whole_clients_to_the_median_norm():
    # squared norms of the whole deltas: 20, 21, 92, 66, 22500 -> median norm sqrt(66)
    A, B, head = _agg(Aggregator("norm_clip", clip_multiplier=1.0))
    c2, c4 = math.sqrt(66 / 92), math.sqrt(66) / 150
    expect_A = t(1 + (1 + 2 + 3 * c2 + 7 + 100 * c4) / 5, 2 + (1 + 3) / 2, 3 + 5 * c2, 4)
    expect_B = t(10 + (-1 - 2 + 0 + 1 + 50 * c4) / 5, 20 + (4 + 0) / 2, 30 + 7 * c2, 40)
    assert torch.allclose(A, expect_A, atol=1e-12, rtol=0) and torch.allclose(B, expect_B, atol=1e-12, rtol=0)
    assert torch.allclose(head, t((1 + 2 + 3 * c2 + 4 - 100 * c4) / 5), atol=1e-12, rtol=0)
    A, _, _ = _agg(Aggregator("norm_clip", clip_multiplier=2.0))  # bound sqrt(264): only client 4 is clipped
    c4 = 2 * math.sqrt(66) / 150
    assert torch.allclose(A, t(1 + (1 + 2 + 3 + 7 + 100 * c4) / 5, 4, 8, 4), atol=1e-12, rtol=0)


def test_krum_scores_on_shared_pairs_and_keeps_pairs_no_selected_client_trained():
    # mean squared distance per shared coordinate: d(0,1) = 23/5, d(0,2) = 9/3, d(0,3) = 49/3, d(1,2) = 6/3,
    # d(1,3) = 38/3, d(2,3) = 18/3, client 4 far from all. f = 1, n = 5: sum of the 2 nearest:
    # 7.6, 6.6, 5, 18.67, huge -> Krum picks client 2
    A, B, head = _agg(Aggregator("krum", krum_f=1, krum_m=1))
    assert torch.equal(A, t(1 + 3, 2, 3 + 5, 4))  # pair 1: client 2 did not train it, so it keeps its value
    assert torch.equal(B, t(10 + 0, 20, 30 + 7, 40))
    assert torch.equal(head, t(3.))
    A, B, head = _agg(Aggregator("krum", krum_f=1, krum_m=3))  # multi-Krum: clients 2, 1, 0
    assert torch.equal(A, t(1 + 2, 2 + 2, 3 + 5, 4))
    assert torch.equal(B, t(10 - 1, 20 + 2, 30 + 7, 40))
    assert torch.equal(head, t(2.))


def test_robust_rules_ignore_claimed_sample_counts():
    tasks, updates = _round(CLIENTS, samples=[1, 1, 1, 1, 10**6])  # the outlier claims a million examples
    for rule in ("median", "trimmed_mean", "norm_clip", "krum"):
        new = FedPLoRA(CFG, weighting="samples").aggregate(STATE, tasks, updates, rule)
        assert torch.equal(new["L.plora_A"], FedPLoRA(CFG, weighting="uniform").aggregate(
            STATE, *_round(CLIENTS), rule)["L.plora_A"]), rule


def test_aggregate_over_all_counts_non_trainers_as_zero_deltas():
    A, B, head = _agg("median", aggregate_over="all")
    # pair 0 as before; pair 1: A deltas 1,3,0,0,0 -> 0; pair 2: 0,0,5,0,0 -> 0: only pair 0 moves
    assert torch.equal(A, t(4, 2, 3, 4)) and torch.equal(B, t(10, 20, 30, 40)) and torch.equal(head, t(2.))


def test_per_layer_index_lists():
    state = {"L1.plora_A": torch.zeros(3, 1, dtype=F64), "L1.plora_B": torch.zeros(1, 3, dtype=F64),
             "L2.plora_A": torch.ones(3, 1, dtype=F64), "L2.plora_B": torch.ones(1, 3, dtype=F64),
             "head.weight": t(0.)}
    clients = [({"L1": {0: (1, 1), 1: (2, 2)}, "L2": {2: (9, 9)}}, 0),
               ({"L1": {0: (3, 3)}, "L2": {1: (4, 4), 2: (1, 1)}}, 0),
               ({"L1": {0: (8, 8), 1: (4, 4)}, "L2": {2: (2, 2)}}, 0)]
    tasks, updates = _round(clients, state, layers=("L1", "L2"))
    three = PLoRAConfig(rank=3, alpha=3, target_modules=["query"])  # the state holds 3 pairs a layer
    new = FedPLoRA(three, selection="per_layer").aggregate(state, tasks, updates, "median")
    assert torch.equal(new["L1.plora_A"][:, 0], t(3, (2 + 4) / 2, 0))  # L1 pair 2: nobody, kept
    assert torch.equal(new["L2.plora_A"][:, 0], t(1, 1 + 4, 1 + 2))  # L2 pair 0 kept, pair 1 one trainer
    assert torch.equal(new["L2.plora_B"][0], t(1, 1 + 4, 1 + 2))


def _leading(method, state, deltas, budgets, heads=None):
    """LeadingPairs clients: the pairs they were sent + ``deltas[i]`` = [(da, db) per pair]."""
    tasks, updates = [], []
    for cid, (pairs, budget) in enumerate(zip(deltas, budgets)):
        task = method.configure_client(state, ClientInfo(cid, budget), 1)
        r = task.config["rank"]
        assert len(pairs) == r
        arrays = {"L.plora_A": task.arrays["L.plora_A"] + t(*[[da] for da, _ in pairs]),
                  "L.plora_B": task.arrays["L.plora_B"] + t([db for _, db in pairs]),
                  "head.weight": state["head.weight"] + (heads[cid] if heads else 0)}
        tasks.append(task)
        updates.append(ClientUpdate(arrays, {"rank": r}, 10))
    return tasks, updates


def test_fedit_per_index():
    cfg = PLoRAConfig(rank=3, alpha=3)
    state = {"L.plora_A": t([1.], [2.], [0.]), "L.plora_B": t([1., 1., 0.]), "head.weight": t(0.)}
    method = FedIT(cfg, variant="feasible", min_rank=2)
    tasks, updates = _leading(method, state, [[(1, 0), (5, 1)], [(2, 0), (6, 1)], [(30, -9), (7, 1)]],
                              [3, 2, 3], heads=[1, 5, -50])
    new = method.aggregate(state, tasks, updates, "median")
    assert torch.equal(new["L.plora_A"][:, 0], t(1 + 2, 2 + 6, 0))  # pair 2: beyond min_rank, nobody's
    assert torch.equal(new["L.plora_B"][0], t(1 + 0, 1 + 1, 0)) and torch.equal(new["head.weight"], t(1.))


def test_hetlora_per_index_over_the_clients_whose_rank_covers_it():
    cfg = PLoRAConfig(rank=3, alpha=3)
    state = {"L.plora_A": t([1.], [1.], [1.]), "L.plora_B": t([1., 1., 1.]), "head.weight": t(0.)}
    deltas = [[(1, 1)], [(2, 2), (4, 0)], [(100, 3), (8, 2)]]
    tasks, updates = _leading(HetLoRA(cfg), state, deltas, [1, 2, 2])
    new = HetLoRA(cfg).aggregate(state, tasks, updates, "median")
    # pair 0 over all three, pair 1 over the two of rank 2 (not pulled towards a padded zero), pair 2 kept
    assert torch.equal(new["L.plora_A"][:, 0], t(1 + 2, 1 + 6, 1))
    assert torch.equal(new["L.plora_B"][0], t(1 + 2, 1 + 1, 1))
    dropped = HetLoRA(cfg, keep_untrained=False).aggregate(state, tasks, updates, "median")
    assert torch.equal(dropped["L.plora_A"][:, 0], t(3, 7, 0))  # the literal rule still zeroes pair 2


def _product_clients(values):
    """Rank-1 clients of a 1 x 1 layer: (a, b) each."""
    return [ClientUpdate({"L.plora_A": t([a]), "L.plora_B": t([b])}, {"rank": 1}, 10) for a, b in values]


def test_flexlora_norm_clip_and_krum_in_product_space():
    cfg = PLoRAConfig(rank=1, alpha=1)  # scale 1
    state = {"L.plora_A": t([1.]), "L.plora_B": t([1.])}  # global product 1
    updates = _product_clients([(1, 3), (1, 4), (2, 50)])  # products 3, 4, 100: deltas 2, 3, 99
    tasks = [FlexLoRA(cfg).configure_client(state, ClientInfo(i, 1), 1) for i in range(3)]

    def product(aggregator):
        new = FlexLoRA(cfg).aggregate(state, tasks, updates, aggregator)
        return float(new["L.plora_B"] @ new["L.plora_A"])

    # norms 2, 3, 99: bound 2 * 3 = 6, client 2 scaled by 6/99: 1 + (2 + 3 + 6) / 3
    assert product("norm_clip") == pytest.approx(1 + 11 / 3, abs=1e-12)
    # f = 0: each score is the nearest distance: 1, 1, 96^2 -> client 0 (the earlier of a tie); m = 2: 0 and 1
    assert product(Aggregator("krum", krum_f=0)) == pytest.approx(3.0, abs=1e-12)
    assert product(Aggregator("krum", krum_f=0, krum_m=2)) == pytest.approx(3.5, abs=1e-12)


def test_flora_norm_clip_and_krum_in_product_space():
    cfg = PLoRAConfig(rank=1, alpha=1)
    state = {"L.flora_delta": t([0.5]), "head.weight": t(0.)}
    updates = _product_clients([(1, 2), (1, 3), (1, 100)])
    for u, h in zip(updates, (1, 2, 3)):
        u.arrays["head.weight"] = t(float(h))
    # whole-client norms: sqrt(2^2+1), sqrt(3^2+2^2), sqrt(100^2+3^2); median sqrt(13), bound 2 sqrt(13)
    new = FLoRA(cfg).aggregate(state, [None] * 3, updates, "norm_clip")
    c = 2 * math.sqrt(13) / math.sqrt(100 ** 2 + 9)
    assert float(new["L.flora_delta"]) == pytest.approx(0.5 + (2 + 3 + 100 * c) / 3, abs=1e-12)
    assert float(new["head.weight"]) == pytest.approx((1 + 2 + 3 * c) / 3, abs=1e-12)
    new = FLoRA(cfg).aggregate(state, [None] * 3, updates, Aggregator("krum", krum_f=0, krum_m=2))
    assert float(new["L.flora_delta"]) == pytest.approx(0.5 + 2.5, abs=1e-12)
    assert float(new["head.weight"]) == pytest.approx(1.5, abs=1e-12)


# ---------------------------------------------------------------- refusals and checks
@pytest.mark.parametrize("method,rule", [("flora", "median"), ("flora", "trimmed_mean"), ("flexlora", "median"),
                                         ("flexlora", "trimmed_mean")])
def test_coordinatewise_rules_are_refused_for_product_space_methods(method, rule):
    with pytest.raises(ValueError, match=f"^aggregator {rule} is not defined for {method}: .*; "
                                         "use mean, norm_clip or krum$"):
        reducer_for(make_method(method, CFG), rule)
    with pytest.raises(ValueError, match=f"^aggregator {rule} is not defined for {method}: .*; "
                                         "use mean, norm_clip or krum$"):
        make_method(method, CFG).aggregate({}, [], [], rule)
    with pytest.raises(ConfigError, match=f"^aggregator: {rule} is not defined for {method}: .*krum$") as e:
        RunConfig(method=method, aggregator=rule).validate()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs,message", [
    ({"name": "average"}, "aggregator: must be one of mean, "),
    ({"name": "trimmed_mean", "trim_fraction": 0.5}, r"trim_fraction: must be in \[0, 0.5\)"),
    ({"name": "trimmed_mean", "trim_fraction": -0.1}, "trim_fraction: "),
    ({"name": "norm_clip", "clip_multiplier": 0.0}, "clip_multiplier: must be > 0"),
    ({"name": "norm_clip", "clip_multiplier": float("nan")}, "clip_multiplier: "),
    ({"name": "krum", "krum_f": -1}, "krum_f: must be an integer >= 0"),
    ({"name": "krum", "krum_m": 0}, "krum_m: must be an integer >= 1"),
])
def test_parameter_checks_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}") as e:
        Aggregator(**kwargs)
    assert "\n" not in str(e.value)


def test_krum_refuses_a_round_too_small_for_it():
    tasks, updates = _round(CLIENTS[:4])
    with pytest.raises(ValueError, match=r"^aggregator krum: this round has 4 updates, and krum_f=1 needs more "
                                         r"than 2\*krum_f\+2 = 4; lower --krum-f or raise --min-replies$"):
        FedPLoRA(CFG).aggregate(STATE, tasks, updates, "krum")
    with pytest.raises(ValueError, match="^aggregator krum: krum_m=5 is more than the 4 clients"):
        FedPLoRA(CFG).aggregate(STATE, *_round(CLIENTS), Aggregator("krum", krum_m=5))


def test_config_checks_krum_against_min_replies():
    with pytest.raises(ConfigError, match=r"^min_replies: krum with krum_f=1 needs more than 2\*krum_f\+2 = 4 "
                                          r"updates in every aggregated round, got min_replies=4; .*--min-replies"):
        RunConfig(aggregator="krum", clients_per_round=4, min_replies=4).validate()
    with pytest.raises(ConfigError, match="^krum_m: 5 is more than min_replies - krum_f = 4"):
        RunConfig(aggregator="krum", clients_per_round=5, min_replies=5, krum_m=5).validate()
    RunConfig(aggregator="krum", clients_per_round=5, min_replies=5, krum_m=4).validate()
    RunConfig(method="flora", aggregator="norm_clip").validate()
    with pytest.raises(ConfigError, match="^trim_fraction: must be "):
        RunConfig(trim_fraction=0.5).validate()


def test_tolerates():
    assert tolerates("median", 5, 0) is None and tolerates("mean", 5, 0) is None
    assert "tolerates no Byzantine" in tolerates("mean", 5, 1)
    assert tolerates("median", 5, 2) is None and "fewer than half" in tolerates("median", 4, 2)
    assert tolerates("trimmed_mean", 10, 2, trim_fraction=0.2) is None
    assert "drops 2 value(s) at each end of 10, fewer than the 3 Byzantine" in tolerates("trimmed_mean", 10, 3)
    assert tolerates("norm_clip", 5, 2) is None and tolerates("norm_clip", 4, 2) is not None
    assert tolerates("krum", 5, 1, krum_f=1) is None
    assert "more than 2*krum_f+2 = 4" in tolerates("krum", 4, 1, krum_f=1)
    assert "at most krum_f=1" in tolerates("krum", 7, 2, krum_f=1)
    with pytest.raises(ValueError, match="^trim_fraction"):
        tolerates("trimmed_mean", 10, 1, trim_fraction=0.7)


def test_the_run_reducer_carries_the_aggregator():
    # method_options no longer carry the aggregator: the run's reducer does (strategy.run_reducer)
    from fedplora.federation.client_app import method_options
    from fedplora.federation.strategy import run_reducer

    cfg = RunConfig(aggregator="trimmed_mean", trim_fraction=0.3).validate()
    opts = method_options(cfg)
    method = make_method(cfg.method, CFG, **opts)
    reducer = run_reducer(cfg, method)
    assert reducer.aggregator == Aggregator("trimmed_mean", trim_fraction=0.3)
    assert reducer.aggregator.trim_fraction == 0.3 and "trimmed_mean (trim_fraction 0.3)" in reducer.describe()
    default = RunConfig().validate()
    assert run_reducer(default, make_method(default.method, CFG, **method_options(default))).aggregator == Aggregator()
    assert run_reducer(default, make_method(default.method, CFG, **method_options(default))) == Mean()


# ---------------------------------------------------------------- mean unchanged, every method
def _random_round(method, state, budgets, seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks, updates = [], []
    for cid, budget in enumerate(budgets):
        task = method.configure_client(state, ClientInfo(cid, budget, num_samples=5 + cid), 1)
        shapes = method.expected_update_shapes(task, state)
        arrays = {k: torch.randn(*shape, generator=g, dtype=F64) for k, shape in shapes.items()}
        tasks.append(task)
        updates.append(ClientUpdate(arrays, dict(task.config), 5 + cid))
    return tasks, updates


def _random_state(method_name):
    g = torch.Generator().manual_seed(7)
    if method_name == "flora":
        return {"L.flora_delta": torch.randn(3, 3, generator=g, dtype=F64),
                "head.weight": torch.randn(2, 3, generator=g, dtype=F64)}
    return {"L.plora_A": torch.randn(4, 3, generator=g, dtype=F64),
            "L.plora_B": torch.randn(3, 4, generator=g, dtype=F64),
            "head.weight": torch.randn(2, 3, generator=g, dtype=F64)}


@pytest.mark.parametrize("name", ["fedplora", "fedit", "hetlora", "flexlora", "flora"])
def test_mean_is_todays_aggregate_bit_for_bit_and_robust_rules_run(name):
    cfg = PLoRAConfig(rank=4, alpha=8)
    state = _random_state(name)
    default = make_method(name, cfg, seed=1)
    tasks, updates = _random_round(default, state, [1, 2, 4, 3, 4])
    today = default.aggregate(state, tasks, updates)
    rule = Aggregator("mean", trim_fraction=0.1, clip_multiplier=3.0, krum_f=2, krum_m=2)
    explicit = make_method(name, cfg, seed=1)
    new = explicit.aggregate(state, tasks, updates, rule)
    assert today.keys() == new.keys() and all(torch.equal(today[k], new[k]) for k in today)
    assert explicit.describe() == default.describe()
    assert reducer_for(explicit, rule).describe() == reducer_for(default, None).describe()
    for rule in AGGREGATORS[1:]:
        if name in ("flexlora", "flora") and rule in ("median", "trimmed_mean"):
            continue
        out = make_method(name, cfg, seed=1).aggregate(state, tasks, updates, rule)
        assert out.keys() == today.keys() and all(out[k].shape == today[k].shape for k in out), rule
        assert all(bool(torch.isfinite(v).all()) for v in out.values()), rule


def test_per_pair_mean_of_the_engine_is_fedplora_participants_rule():
    state = _random_state("fedplora")
    method = FedPLoRA(PLoRAConfig(rank=4, alpha=8), weighting="uniform", selection="per_layer", seed=3)
    tasks, updates = _random_round(method, state, [1, 2, 3, 2, 1])
    today = method.aggregate(state, tasks, updates)
    # the per-unit engine (robust.combine) with the mean rule over each pair's holders
    engine = method.decode(state, Robust(Aggregator("mean")).reduce(method.contributions(state, tasks, updates)))
    assert all(torch.allclose(today[k], engine[k], atol=1e-12, rtol=0) for k in today)


# ---------------------------------------------------------------- attackers among honest clients
HONEST, RULES = 7, [("median", 0.2), ("trimmed_mean", 0.2), ("krum", 0.2), (Aggregator("krum", krum_m=3), 0.2),
                    ("norm_clip", 0.5)]


@pytest.mark.parametrize("name", ["fedplora", "fedit", "hetlora"])
@pytest.mark.parametrize("scale", [-100.0, 100.0])  # sign flip x 100, and a 100x scaled update
def test_an_attacker_moves_mean_far_but_not_the_robust_rules(name, scale):
    cfg = PLoRAConfig(rank=2, alpha=2)
    state = _random_state("fedplora")
    state = {"L.plora_A": state["L.plora_A"][:2], "L.plora_B": state["L.plora_B"][:, :2],
             "head.weight": state["head.weight"]}
    g = torch.Generator().manual_seed(11)
    method = make_method(name, cfg, weighting="samples")
    tasks = [method.configure_client(state, ClientInfo(cid, 2), 1) for cid in range(HONEST + 1)]
    updates = []
    for cid, task in enumerate(tasks):  # honest delta: 1 + U(-0.1, 0.1) per coordinate; the attacker: scale x 1
        shapes = method.expected_update_shapes(task, state)
        if cid < HONEST:
            delta = {k: 1 + 0.2 * (torch.rand(*s, generator=g, dtype=F64) - 0.5) for k, s in shapes.items()}
        else:
            delta = {k: torch.full(s, scale, dtype=F64) for k, s in shapes.items()}
        arrays = {k: state[k] + delta[k] for k in shapes}
        updates.append(ClientUpdate(arrays, dict(task.config), 10**6 if cid == HONEST else 10))
    honest = {k: sum(u.arrays[k] for u in updates[:HONEST]) / HONEST for k in state}

    def error(aggregator):
        new = make_method(name, cfg, weighting="samples").aggregate(state, tasks, updates, aggregator)
        return max(float((new[k] - honest[k]).abs().max()) for k in state)

    assert error("mean") > 50  # the attacker's claimed samples (HetLoRA: its norm) give it almost all the weight
    for rule, bound in RULES:
        assert error(rule) < bound, rule


@pytest.mark.parametrize("name", ["flexlora", "flora"])
def test_an_attacker_in_product_space(name):
    cfg = PLoRAConfig(rank=1, alpha=1)
    g = torch.Generator().manual_seed(5)
    a0, b0 = torch.ones(1, 3, dtype=F64), torch.ones(3, 1, dtype=F64)
    state = ({"L.flora_delta": torch.zeros(3, 3, dtype=F64)} if name == "flora"
             else {"L.plora_A": torch.zeros(1, 3, dtype=F64), "L.plora_B": torch.zeros(3, 1, dtype=F64)})
    method = make_method(name, cfg)
    tasks = [method.configure_client(state, ClientInfo(cid, 1), 1) for cid in range(HONEST + 1)]
    updates = []
    for cid in range(HONEST + 1):
        B = b0 + 0.05 * torch.randn(3, 1, generator=g, dtype=F64) if cid < HONEST else -100 * b0
        updates.append(ClientUpdate({"L.plora_A": a0.clone(), "L.plora_B": B}, {"rank": 1}, 10))
    honest = sum(u.arrays["L.plora_B"] @ a0 for u in updates[:HONEST]) / HONEST

    def error(aggregator):
        new = make_method(name, cfg).aggregate(state, tasks, updates, aggregator)
        P = new["L.flora_delta"] if name == "flora" else new["L.plora_B"] @ new["L.plora_A"]
        return float((P - honest).abs().max())

    assert error("mean") > 10
    assert error("krum") < 0.2 and error(Aggregator("krum", krum_m=3)) < 0.2
    assert error("norm_clip") < 0.5
