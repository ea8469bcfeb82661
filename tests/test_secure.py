"""Secure aggregation's core (fedplora/aggregation/pipeline.py, docs/secure-aggregation.md): the fixed-shape upload and
the aggregate computed from nothing but the sum of the uploads. Hand-computed examples (a pair trained by
several clients, by one, by none), equality with every supported method's own ``aggregate`` on random rounds,
central DP's release from client-clipped sums, and the refusals. Small tensors: milliseconds."""

import itertools

import pytest
import torch

from fedplora import ClientInfo, PLoRAConfig
from fedplora.aggregation import layout, reducer_for, secure_decode, secure_upload
from fedplora.methods import FedIT, FedPLoRA, FlexLoRA, FLoRA, HetLoRA
from fedplora.methods.base import ClientTask, ClientUpdate
from fedplora.privacy import CentralDP

F64 = torch.float64
CFG = PLoRAConfig(rank=4, alpha=4, target_modules=["query"], modules_to_save=["classifier"])  # scale 1


def t(*rows):
    return torch.tensor(rows, dtype=F64)


def summed(method, tasks, updates, weight_scale=1.0, clip=None):
    """What SecAgg+ hands the server: the element-wise sum of every client's upload."""
    uploads = [secure_upload(method, task, u, weight_scale, clip) for task, u in zip(tasks, updates)]
    return {k: sum(up[k] for up in uploads) for k in uploads[0]}


# ---------------------------------------------------------------- by hand
# one adapted layer "L" with d_in = d_out = 1, so pair j is the two numbers (a_j, b_j); a head of one number
STATE = {"L.plora_A": t([1.], [2.], [3.], [4.]), "L.plora_B": t([10., 20., 30., 40.]), "head.weight": t(0.)}
# per client: {pair: (delta a, delta b)}, head delta, sample count. Pair 0: all three; pair 1: client 0 only;
# pair 2: client 2 only; pair 3: nobody this round.
CLIENTS = [({0: (1., -1.), 1: (1., 4.)}, 1., 10),
           ({0: (2., -2.)}, 2., 30),
           ({0: (3., 0.), 2: (5., 7.)}, 3., 60)]


def _round(clients=CLIENTS):
    tasks, updates = [], []
    for pairs, dh, n in clients:
        idx = sorted(pairs)
        arrays = {"L.plora_A": torch.stack([STATE["L.plora_A"][j] + pairs[j][0] for j in idx]),
                  "L.plora_B": torch.stack([STATE["L.plora_B"][:, j] + pairs[j][1] for j in idx], dim=1),
                  "head.weight": STATE["head.weight"] + dh}
        config = {"rank": len(idx), "indices": {"L": idx}}
        tasks.append(ClientTask(arrays=STATE, config=config))
        updates.append(ClientUpdate(arrays, dict(config), num_samples=n))
    return tasks, updates


def test_the_upload_is_fixed_shape_with_zeros_where_the_client_did_not_train():
    tasks, updates = _round()
    method = FedPLoRA(CFG, weighting="uniform")
    up = secure_upload(method, tasks[2], updates[2], weight_scale=60)
    assert list(up) == sorted(up) == ["L.count", "L.plora_A", "L.plora_B", "L.w", "head.weight", "heads.count",
                                      "heads.w"]
    assert {k: tuple(v.shape) for k, v in up.items()} == layout(STATE, method.rank)
    assert torch.equal(up["L.plora_A"][:, 0], t(3, 0, 5, 0)) and torch.equal(up["L.plora_B"][0], t(0, 0, 7, 0))
    assert torch.equal(up["L.w"], t(1, 0, 1, 0)) and torch.equal(up["L.count"], t(1, 0, 1, 0))
    assert torch.equal(up["head.weight"], t(3.)) and up["heads.w"].item() == up["heads.count"].item() == 1
    # every client sends the same keys and shapes, whatever it trained
    assert all({k: v.shape for k, v in secure_upload(method, task, u, 60).items()} ==
               {k: v.shape for k, v in up.items()} for task, u in zip(tasks, updates))


def test_per_pair_mean_from_the_sums_by_hand():
    tasks, updates = _round()
    method = FedPLoRA(CFG, weighting="uniform")
    new = secure_decode(method, STATE, summed(method, tasks, updates), 3, reducer_for(method, None))
    # pair 0: mean over its 3 trainers; pair 1: client 0's value; pair 2: client 2's; pair 3: nobody, unchanged
    assert torch.equal(new["L.plora_A"][:, 0], t(1 + 2, 2 + 1, 3 + 5, 4))
    assert torch.equal(new["L.plora_B"][0], t(10 - 1, 20 + 4, 30 + 7, 40))
    assert torch.equal(new["head.weight"], t(2.))
    # sample weights 10, 30, 60 (scale 60: weights 1/6, 1/2, 1): pair 0 moves by (10*1 + 30*2 + 60*3) / 100
    method = FedPLoRA(CFG, weighting="samples")
    new = secure_decode(method, STATE, summed(method, tasks, updates, weight_scale=60), 3, reducer_for(method, None))
    assert torch.allclose(new["L.plora_A"][:, 0], t(1 + 2.5, 2 + 1, 3 + 5, 4), rtol=1e-15, atol=0)
    assert torch.allclose(new["head.weight"], t(2.5), rtol=1e-15, atol=0)
    # the "all" reading: every client counts for every pair with a zero delta where it did not train
    method = FedPLoRA(CFG, weighting="uniform", aggregate_over="all")
    new = secure_decode(method, STATE, summed(method, tasks, updates), 3, reducer_for(method, None))
    assert torch.allclose(new["L.plora_A"][:, 0], t(1 + 2, 2 + 1 / 3, 3 + 5 / 3, 4), rtol=1e-15, atol=0)


# ---------------------------------------------------------------- every supported method, random rounds
def _layers_state(gen, R=4, layers=("q", "v"), d_in=5, d_out=3):
    state = {}
    for name in layers:
        state[name + ".plora_A"] = torch.randn(R, d_in, generator=gen, dtype=F64)
        state[name + ".plora_B"] = torch.randn(d_out, R, generator=gen, dtype=F64)
    state["classifier.weight"] = torch.randn(2, d_in, generator=gen, dtype=F64)
    state["classifier.bias"] = torch.randn(2, generator=gen, dtype=F64)
    return state


def _random_round(method, state, gen, budgets=(1, 2, 4, 2, 1), samples=(7, 50, 13, 90, 21)):
    tasks, updates = [], []
    for cid, (budget, n) in enumerate(zip(budgets, samples)):
        task = method.configure_client(state, ClientInfo(cid=cid, budget=budget, num_samples=n), server_round=3)
        arrays = {}
        # the trained pairs' start values as the task sends them (all R pairs, or with Select-N-Drop the drawn ones)
        starts = method.start_pairs(task, task.config["indices"]) if "indices" in task.config else {}
        for key, shape in method.expected_update_shapes(task, state).items():
            start = task.arrays[key]
            if "indices" in task.config and key.endswith(".plora_A"):
                start = starts[key[: -len(".plora_A")]][0]
            elif "indices" in task.config and key.endswith(".plora_B"):
                start = starts[key[: -len(".plora_B")]][1]
            assert tuple(start.shape) == tuple(shape)
            arrays[key] = start + 0.1 * torch.randn(shape, generator=gen, dtype=F64)
        tasks.append(task)
        updates.append(ClientUpdate(arrays, method.expected_update_config(task), num_samples=n))
    return tasks, updates


def _methods():
    for weighting in ("samples", "uniform"):
        for selection, over, unselected in itertools.product(("random", "fixed"), ("participants", "all"),
                                                              ("fold", "drop")):
            yield FedPLoRA(CFG, weighting=weighting, seed=1, selection=selection, aggregate_over=over,
                           unselected=unselected)
        yield FedIT(CFG, weighting=weighting)
        yield FedIT(CFG, weighting=weighting, variant="feasible", min_rank=1)
        yield HetLoRA(CFG, weighting=weighting)
        yield HetLoRA(CFG, weighting=weighting, keep_untrained=False)


def _name(m) -> str:
    options = {"fedplora": lambda: f"{m.selection}-{m.aggregate_over}-{m.unselected}",
               "fedit": lambda: m.variant, "hetlora": lambda: f"keep_untrained={m.keep_untrained}"}[m.name]()
    return f"{m.name}-{options}-{m.weighting}"


@pytest.mark.parametrize("method", list(_methods()), ids=_name)
def test_the_aggregate_from_the_sums_equals_the_methods_own_aggregate(method):
    gen = torch.Generator().manual_seed(7)
    state = _layers_state(gen)
    if isinstance(method, FedIT) and method.variant == "feasible":
        state = {k: v.clone() for k, v in state.items()}
        for layer in ("q", "v"):
            state[layer + ".plora_A"][1:] = 0
            state[layer + ".plora_B"][:, 1:] = 0
    tasks, updates = _random_round(method, state, gen)
    scale = max(u.num_samples for u in updates)
    expected = method.aggregate(state, tasks, updates)
    got = secure_decode(method, state, summed(method, tasks, updates, scale), len(updates), reducer_for(method, None))
    assert set(got) == set(expected)
    for key in expected:
        assert torch.allclose(got[key], expected[key], rtol=1e-12, atol=1e-12), key
    # the layout the server computes from the global state is the one every client fills from its task
    assert all(list(secure_upload(method, tk, u, scale)) == list(layout(state, method.rank))
               for tk, u in zip(tasks, updates))


@pytest.mark.parametrize("make", [lambda: FedPLoRA(CFG, seed=1, selection="shared"),
                                  lambda: FedPLoRA(CFG, seed=1, selection="shared", aggregate_over="all"),
                                  lambda: FedIT(CFG), lambda: HetLoRA(CFG)],
                         ids=["fedplora", "fedplora-all", "fedit", "hetlora"])
def test_central_dp_from_client_clipped_sums_equals_the_servers_release(make):
    """Under secure aggregation the clients clip (the server never sees a delta to clip); the server adds the
    same noise to the sums and divides by the same fixed counts: the release is the one ``aggregate`` with central
    DP makes from the individual updates, draw for draw."""
    dp = CentralDP(clip=0.3, noise_multiplier=0.8, clients_per_round=5, budgets=(1, 2, 4))
    method = make()
    gen = torch.Generator().manual_seed(3)
    state = _layers_state(gen)
    tasks, updates = _random_round(method, state, gen)
    expected = method.aggregate(state, tasks, updates, dp, torch.Generator().manual_seed(11))
    sums = summed(method, tasks, updates, weight_scale=90, clip=dp.clip)
    got = secure_decode(method, state, sums, 5, reducer_for(method, dp), torch.Generator().manual_seed(11))
    for key in expected:
        assert torch.allclose(got[key], expected[key], rtol=1e-12, atol=1e-12), key


def test_a_layer_whose_sums_are_malformed_is_refused_by_name():
    tasks, updates = _round()
    method = FedPLoRA(CFG)
    sums = summed(method, tasks, updates)
    with pytest.raises(ValueError, match=r"L.plora_A has shape \(3, 1\), expected \(4, 1\)"):
        secure_decode(method, STATE, {**sums, "L.plora_A": sums["L.plora_A"][:3]}, 3, reducer_for(method, None))
    with pytest.raises(ValueError, match="head.weight contains NaN"):
        secure_decode(method, STATE, {**sums, "head.weight": t(float("nan"))}, 3, reducer_for(method, None))
    with pytest.raises(ValueError, match="missing"):
        secure_decode(method, STATE, {k: v for k, v in sums.items() if k != "L.w"}, 3, reducer_for(method, None))
    # an upload that declared another SecAgg+ weight scales the whole sum: the counts stop being whole numbers
    # of the summed uploads (every upload holds exactly 1 for the heads, 0 or 1 per pair)
    with pytest.raises(ValueError, match="3 uploads were summed but heads.count counts 2"):
        secure_decode(method, STATE, {**sums, "heads.count": sums["heads.count"] * 2 / 3}, 3, reducer_for(method, None))
    with pytest.raises(ValueError, match="L.count is not a count of at most 3 uploads"):
        secure_decode(method, STATE, {k: v * 1.1 for k, v in sums.items()}, 3, reducer_for(method, None))
    assert secure_decode(method, STATE, sums, 3, reducer_for(method, None))  # the honest sums pass


def test_methods_that_need_individual_updates_refuse_secure_aggregation():
    assert FedPLoRA.secure_refusal is FedIT.secure_refusal is HetLoRA.secure_refusal is None
    assert "SVD" in FlexLoRA.secure_refusal and "stacks" in FLoRA.secure_refusal


def test_summed_weights_that_no_honest_clients_could_upload_are_refused():
    """A weight steers pair j's division: one client's negative weight would shrink the sum and inflate the step."""
    tasks, updates = _round()
    method = FedPLoRA(CFG)
    sums = summed(method, tasks, updates)
    forged = {**sums, "L.w": sums["L.w"] - torch.where(sums["L.count"] > 0, 1.999, 0.0)}
    with pytest.raises(ValueError, match="L.w is not a sum of 3 clients' weights"):
        secure_decode(method, STATE, forged, 3, reducer_for(method, None))
    with pytest.raises(ValueError, match="L.w is not a sum of 3 clients' weights"):
        secure_decode(method, STATE, {**sums, "L.w": sums["L.w"] * 4}, 3, reducer_for(method, None))
