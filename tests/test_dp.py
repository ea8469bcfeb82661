"""Client-level differential privacy wired into aggregation and the server loop (docs/robustness.md,
"Differential privacy"; the pure pieces are tested in tests/test_privacy.py).

Hand-computed central-DP rounds per method (small tensors: milliseconds), the refusals and the settings'
one-line errors, then real rounds in one process (the strategy against the real ClientApp functions): the
epsilon in the history, resume continuing the accountant's count, and local DP's noisy uploads."""

import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from test_fault_tolerance import InProcessGrid, _small_cfg, _strategy, in_process  # noqa: F401 (a fixture)

from fedplora import PLoRAConfig, privacy, rng
from fedplora.aggregation import reducer_for
from fedplora.config import ConfigError, RunConfig
from fedplora.methods import FedIT, FedPLoRA, FlexLoRA, FLoRA, HetLoRA
from fedplora.methods.base import ClientTask, ClientUpdate
from fedplora.privacy import CentralDP

F64 = torch.float64
CFG = PLoRAConfig(rank=4, alpha=4, target_modules=["query"], modules_to_save=["classifier"])  # scale 1


def t(*rows):
    return torch.tensor(rows, dtype=F64)


# one adapted layer "L" with d_in = d_out = 1, so pair j is the two numbers (a_j, b_j); a head of one number
STATE = {"L.plora_A": t([1.], [2.], [3.], [4.]), "L.plora_B": t([10., 20., 30., 40.]), "head.weight": t(0.)}
# per client: {pair: (delta a, delta b)} and its head's delta. Pair 0: all three; pair 1: client 0; pair 2:
# client 2; pair 3: nobody this round.
CLIENTS = [({0: (1., -1.), 1: (1., 4.)}, 1.),
           ({0: (2., -2.)}, 2.),
           ({0: (3., 0.), 2: (5., 7.)}, 3.)]


def _round(clients, state=STATE, leading=False):
    """Tasks and updates, each client's pairs = the global pairs + the given deltas (Fed-PLoRA indices, or the
    leading pairs 0..r-1 of a plain LoRA with ``leading``)."""
    tasks, updates = [], []
    for pairs, dh in clients:
        idx = sorted(pairs)
        if leading:
            assert idx == list(range(len(idx)))
        A_old, B_old = state["L.plora_A"], state["L.plora_B"]
        arrays = {"L.plora_A": torch.stack([A_old[j] + pairs[j][0] for j in idx]),
                  "L.plora_B": torch.stack([B_old[:, j] + pairs[j][1] for j in idx], dim=1),
                  "head.weight": state["head.weight"] + dh}
        config = {"rank": len(idx)} if leading else {"rank": len(idx), "indices": {"L": idx}}
        tasks.append(ClientTask(arrays=state, config=config))
        updates.append(ClientUpdate(arrays, dict(config), num_samples=10))
    return tasks, updates


def _dp(clip=1e6, sigma=0.0, m=3, budgets=(2, 4), shares=None):
    return CentralDP(clip=clip, noise_multiplier=sigma, clients_per_round=m, budgets=budgets, shares=shares)


def _pairs(new):
    return new["L.plora_A"][:, 0], new["L.plora_B"][0], new["head.weight"]


# ---------------------------------------------------------------- central DP, by hand
def test_central_dp_without_noise_is_the_unweighted_per_pair_sum_over_the_fixed_expected_count():
    tasks, updates = _round(CLIENTS)
    method, dp = FedPLoRA(CFG, weighting="samples", selection="shared"), _dp()
    # random selection, budgets 2 and 4 of R = 4 at equal shares, 3 clients a round: every pair expects
    # 3 * (2 + 4) / (2 * 4) = 2.25 trainers; the heads expect all 3
    assert torch.equal(method.dp_pair_counts(dp), torch.full((4,), 2.25, dtype=F64))
    A, B, head = _pairs(method.aggregate(STATE, tasks, updates, dp, torch.Generator().manual_seed(0)))
    assert torch.equal(A, t(1 + (1 + 2 + 3) / 2.25, 2 + 1 / 2.25, 3 + 5 / 2.25, 4))  # pair 3: nobody, no noise
    assert torch.equal(B, t(10 + (-1 - 2 + 0) / 2.25, 20 + 4 / 2.25, 30 + 7 / 2.25, 40))
    assert torch.equal(head, t((1 + 2 + 3) / 3))
    # the same as the unweighted per-pair mean except for the denominators: mean * realised / expected count
    mean_A, _, _ = _pairs(FedPLoRA(CFG, weighting="uniform", selection="shared").aggregate(STATE, tasks, updates))
    realised = t(3, 1, 1, 0)
    step = (mean_A - STATE["L.plora_A"][:, 0]) * realised / 2.25
    assert torch.allclose(A - STATE["L.plora_A"][:, 0], step, rtol=1e-15, atol=0)
    # sample weights are ignored (DP sums count every client once): uniform weighting gives the same release
    same = FedPLoRA(CFG, weighting="uniform", selection="shared")
    assert torch.equal(A, _pairs(same.aggregate(STATE, tasks, updates, _dp(), None))[0])
    # aggregate_over="all" divides every pair by all 3 sampled clients; fixed selection by the budgets covering j
    every = FedPLoRA(CFG, selection="shared", aggregate_over="all")
    assert torch.equal(_pairs(every.aggregate(STATE, tasks, updates, _dp(), None))[0],
                       t(1 + 6 / 3, 2 + 1 / 3, 3 + 5 / 3, 4))
    assert torch.equal(FedPLoRA(CFG, selection="fixed").dp_pair_counts(_dp()), t(3, 3, 1.5, 1.5))


def test_the_whole_update_is_clipped_as_one_vector():
    # one client: pair 0 moves by (3, 0), the head by 4; norm 5 over everything, clipped to 1: scale 1/5
    tasks, updates = _round([({0: (3., 0.)}, 4.)])
    dp = _dp(clip=1.0, m=1, budgets=(4,))  # one client of rank R a round: every pair expects 1 trainer
    A, B, head = _pairs(FedPLoRA(CFG, selection="shared").aggregate(STATE, tasks, updates, dp, None))
    assert torch.allclose(A, t(1 + 0.6, 2, 3, 4)) and torch.equal(B, STATE["L.plora_B"][0])
    assert torch.allclose(head, t(0.8))  # clipping each tensor on its own would have left 3 and 1 (not 0.6, 0.8)
    assert math.isclose(math.hypot(A[0] - 1, head), 1.0)


def test_pairs_trained_by_different_numbers_of_clients_leading_selection():
    # HetLoRA: ranks 1, 2, 4, each client the leading pairs; divisors 3, 2, 1, 1 (the budgets covering j)
    clients = [({0: (3., 3.)}, 3.), ({0: (6., 0.), 1: (2., 2.)}, 0.),
               ({0: (0., 0.), 1: (4., 4.), 2: (1., 1.), 3: (2., -2.)}, 0.)]
    tasks, updates = _round(clients, leading=True)
    method, dp = HetLoRA(CFG), _dp(budgets=(1, 2, 4))
    assert torch.equal(method.dp_pair_counts(dp), t(3, 2, 1, 1))
    A, B, head = _pairs(method.aggregate(STATE, tasks, updates, dp, None))
    assert torch.equal(A, t(1 + 9 / 3, 2 + 6 / 2, 3 + 1 / 1, 4 + 2 / 1))  # no norm weights, no zero padding
    assert torch.equal(B, t(10 + 3 / 3, 20 + 6 / 2, 30 + 1 / 1, 40 - 2 / 1))
    assert torch.equal(head, t(3 / 3))


def test_noise_is_seeded_reproducible_and_on_every_pair_that_could_be_trained():
    tasks, updates = _round(CLIENTS)
    dp = _dp(clip=2.0, sigma=0.5)
    method = FedPLoRA(CFG, selection="shared")
    quiet = FedPLoRA(CFG, selection="shared")
    noisy = method.aggregate(STATE, tasks, updates, dp, rng.torch_generator("dp_noise", 7, 3))
    again = method.aggregate(STATE, tasks, updates, dp, rng.torch_generator("dp_noise", 7, 3))
    other = method.aggregate(STATE, tasks, updates, dp, rng.torch_generator("dp_noise", 7, 4))
    clean = quiet.aggregate(STATE, tasks, updates, _dp(clip=2.0), None)
    assert all(torch.equal(noisy[k], again[k]) for k in STATE)
    assert not torch.equal(noisy["L.plora_A"], other["L.plora_A"])
    # the noise: N(0, (sigma C)^2) per coordinate of each sum, drawn key by key in sorted order, / the divisor
    g = rng.torch_generator("dp_noise", 7, 3)
    draws = {k: 0.5 * 2.0 * torch.randn(STATE[k].shape, dtype=F64, generator=g) for k in sorted(STATE)}
    assert torch.allclose(noisy["L.plora_A"] - clean["L.plora_A"], draws["L.plora_A"] / 2.25, rtol=1e-12)
    assert torch.allclose(noisy["head.weight"] - clean["head.weight"], draws["head.weight"] / 3, rtol=1e-12)
    assert (noisy["L.plora_A"][3] != STATE["L.plora_A"][3]).all()  # pair 3: nobody trained it, it could have
    with pytest.raises(ValueError, match="Generator"):
        method.aggregate(STATE, tasks, updates, dp, None)


def test_pairs_no_client_can_train_get_neither_noise_nor_update():
    # FedIT feasible at rank 2 of R = 4: pairs 2 and 3 are zero from round 0 and stay zero, with noise on
    state = dict(STATE, **{"L.plora_A": t([1.], [2.], [0.], [0.]), "L.plora_B": t([10., 20., 0., 0.])})
    tasks, updates = _round([({0: (1., 1.), 1: (1., 1.)}, 1.)] * 3, state=state, leading=True)
    method, dp = FedIT(CFG, variant="feasible", min_rank=2), _dp(clip=10.0, sigma=1.0)
    assert torch.equal(method.dp_pair_counts(dp), t(3, 3, 0, 0))
    new = method.aggregate(state, tasks, updates, dp, torch.Generator().manual_seed(1))
    A, B, _ = _pairs(new)
    assert torch.equal(A[2:], t(0, 0)) and torch.equal(B[2:], t(0, 0)) and (A[:2] != t(2., 3.)).all()


def test_central_dp_refusals_are_one_line():
    with pytest.raises(ValueError, match="central DP is not defined for flexlora"):
        reducer_for(FlexLoRA(CFG), _dp())
    with pytest.raises(ValueError, match="central DP is not defined for flora"):
        reducer_for(FLoRA(CFG), _dp())
    # a round has one reducer (central DP or a robust rule): the combination is refused by the run's settings
    with pytest.raises(ConfigError, match="central DP releases the noisy sum of clipped updates, which median "
                                          "does not compute"):
        RunConfig(**CENTRAL, aggregator="median").validate()
    with pytest.raises(ValueError, match="keep_untrained=False"):
        reducer_for(HetLoRA(CFG, keep_untrained=False), _dp())
    # no private release without what it needs: noisy central DP without a generator is refused
    with pytest.raises(ValueError, match="needs a torch.Generator"):
        FedPLoRA(CFG).aggregate(STATE, *_round(CLIENTS), _dp(sigma=1.0), None)


# ---------------------------------------------------------------- settings
CENTRAL = dict(dp_mode="central", dp_clip=1.0, dp_noise_multiplier=1.0)


@pytest.mark.parametrize("settings, match", [
    (dict(CENTRAL, dp_clip=-1.0), "dp_clip: must be a number > 0 when set"),
    (dict(CENTRAL, dp_clip=float("inf")), "dp_clip: must be finite"),
    (dict(CENTRAL, dp_delta=1.5), r"dp_delta: must be a number in \(0, 1\)"),
    (dict(CENTRAL, dp_noise_multiplier=-0.5), "dp_noise_multiplier: must be a number >= 0"),
    (dict(CENTRAL, dp_noise_multiplier=0.0, target_epsilon=2.0), "cannot be met with dp_noise_multiplier=0"),
    (dict(CENTRAL, target_epsilon=2.0), "not both"),
    (dict(CENTRAL, target_epsilon=-2.0, dp_noise_multiplier=None), "target_epsilon: must be a number > 0"),
    (dict(dp_mode="central", dp_noise_multiplier=1.0), "dp_clip: dp_mode=central needs the L2 clipping norm"),
    (dict(dp_mode="local", dp_clip=1.0), "dp_noise_multiplier: dp_mode=local needs"),
    (dict(dp_mode="everywhere"), "dp_mode: must be 'off', 'central' or 'local'"),
    (dict(dp_clip=1.0), "dp_clip: is set but dp_mode is off"),
    (dict(target_epsilon=3.0), "target_epsilon: is set but dp_mode is off"),
    (dict(CENTRAL, aggregator="median"), "aggregator: central DP releases the noisy sum"),
    (dict(CENTRAL, method="flexlora"), "dp_mode: central DP is not defined for flexlora"),
    (dict(CENTRAL, method="flora"), "dp_mode: central DP is not defined for flora"),
    (dict(num_clients=10, clients_per_round=4, byzantine_fraction=0.5, aggregator="median"),
     r"byzantine_fraction: 0.5 of 10 clients puts about 2 Byzantine in a round of 4, and aggregator median needs"),
    (dict(num_clients=10, clients_per_round=10, min_replies=5, byzantine_fraction=0.2, aggregator="krum"),
     "byzantine_fraction: .* krum assumes at most krum_f=1 Byzantine clients, got 2; raise --krum-f"),
    (dict(num_clients=10, clients_per_round=10, byzantine_fraction=0.3, aggregator="trimmed_mean"),
     "trimmed_mean with trim_fraction=0.2 drops 2 value"),
])
def test_each_bad_setting_is_one_config_error_line(settings, match):
    with pytest.raises(ConfigError, match=match) as e:
        RunConfig(**settings).validate()
    assert "\n" not in str(e.value)


def test_valid_dp_and_byzantine_settings_pass():
    RunConfig(**CENTRAL).validate()
    RunConfig(dp_mode="central", dp_clip=1.0, target_epsilon=3.0).validate()
    RunConfig(dp_mode="local", dp_clip=1.0, dp_noise_multiplier=1.0, method="flora", aggregator="krum",
              clients_per_round=5, min_replies=5).validate()  # local DP: the server's rule is post-processing
    RunConfig(byzantine_fraction=0.5).validate()  # the plain mean is the undefended baseline: measured, not refused
    RunConfig(num_clients=10, clients_per_round=10, byzantine_fraction=0.2, aggregator="median").validate()


def test_the_strategy_adds_exactly_the_noise_its_accountant_counts():
    # the strategy builds its DP reducer from the run's settings (strategy.run_reducer), so a method can no longer
    # carry other DP settings than the run's: what that refusal protected is that the noise released is the noise
    # the accountant counts
    from fedplora.federation.client_app import central_dp, method_options
    from fedplora.federation.strategy import HeteroLoRAStrategy

    cfg = RunConfig(rank=4, ranks=[2, 4], rank_shares=[1.0, 1.0], **CENTRAL).validate()
    assert central_dp(cfg) == CentralDP(1.0, 1.0, 2, (2, 4), (5.0, 5.0))  # 10 clients, budgets 2 and 4 at 1:1
    strategy = HeteroLoRAStrategy(FedPLoRA(CFG, **method_options(cfg)), cfg)
    assert strategy.reducer.dp == central_dp(cfg)
    assert strategy.reducer.dp.noise_multiplier == strategy.accountant.noise_multiplier
    assert strategy.reducer.dp.clip == cfg.dp_clip


# ---------------------------------------------------------------- real rounds in one process
def _central(assets, **kw):
    return _small_cfg(assets, **{**dict(num_clients=4, clients_per_round=2, dp_mode="central", dp_clip=0.5,
                                        dp_noise_multiplier=1.1), **kw})


def test_the_epsilon_in_the_history_is_the_accountants_and_opacus(tiny_assets, in_process):
    from fedplora.federation.strategy import arrays_to_state

    cfg = _central(tiny_assets)
    grid = InProcessGrid(cfg.num_clients)
    strategy, arrays = _strategy(cfg, grid)
    result = strategy.start(grid, arrays, num_rounds=cfg.rounds, timeout=cfg.round_timeout)
    eps = [h["dp_epsilon"] for h in strategy.history]
    assert eps == [privacy.epsilon_spent(k, 0.5, 1.1, 1e-5) for k in range(3)] and eps[0] == 0.0 < eps[1] < eps[2]
    acc = RDPAccountant()
    for k in (1, 2):
        acc.step(noise_multiplier=1.1, sample_rate=0.5)
        assert eps[k] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert all(h["aggregated"] for h in strategy.history[1:])
    assert strategy.accountant.rounds == 2 and set(arrays_to_state(result.arrays)) == set(arrays_to_state(arrays))
    # with dp off the history has no dp_epsilon at all (its entries are as before)
    off = _small_cfg(tiny_assets, num_clients=4, clients_per_round=2, rounds=1)
    plain, plain_arrays = _strategy(off, grid)
    plain.start(grid, plain_arrays, num_rounds=1, timeout=off.round_timeout)
    assert plain.accountant is None and all("dp_epsilon" not in h for h in plain.history)


def test_resume_continues_the_accountant_count_exactly(tiny_assets, in_process, tmp_path):
    from fedplora.errors import CheckpointError
    from fedplora.federation.checkpoint import load_checkpoint, save_checkpoint
    from fedplora.federation.strategy import arrays_to_state, state_to_arrays

    cfg = _central(tiny_assets, target_epsilon=4.0, dp_noise_multiplier=None)
    grid = InProcessGrid(cfg.num_clients)
    whole, arrays = _strategy(cfg, grid)
    reference = arrays_to_state(arrays)
    full = whole.start(grid, arrays, num_rounds=2, timeout=cfg.round_timeout)
    sigma = whole.accountant.noise_multiplier
    assert sigma == privacy.noise_for_target_epsilon(4.0, cfg.rounds, 0.5, 1e-5)  # chosen for the planned rounds
    assert whole.history[-1]["dp_epsilon"] <= 4.0

    first, arrays = _strategy(cfg, grid)
    stopped = first.start(grid, arrays, num_rounds=1, timeout=cfg.round_timeout)
    save_checkpoint(tmp_path, 1, arrays_to_state(stopped.arrays), first.history, cfg, "tiny", 1.0,
                    privacy=first.privacy_state())
    ckpt = load_checkpoint(tmp_path, cfg, "tiny", reference)
    assert ckpt.privacy["accountant"]["rounds"] == 1
    resumed, _ = _strategy(cfg, grid)
    resumed.load_privacy_state(ckpt.privacy)
    rest = resumed.start(grid, state_to_arrays(ckpt.state), num_rounds=2, timeout=cfg.round_timeout,
                         history=ckpt.history)
    assert resumed.accountant.rounds == 2 and resumed.history[-1]["dp_epsilon"] == whole.history[-1]["dp_epsilon"]
    a, b = arrays_to_state(rest.arrays), arrays_to_state(full.arrays)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the noise of round 2 is seeded by the round: the same release
    fresh, _ = _strategy(cfg, grid)
    with pytest.raises(CheckpointError, match="no privacy accounting"):
        fresh.load_privacy_state(None)


def test_a_checkpoint_loads_in_the_runs_key_order(tmp_path):
    # safetensors does not keep the key order, and Fed-PLoRA's per_layer selection numbers the layers in the
    # state's order: a resumed run drew other pairs than the uninterrupted one before load_checkpoint reordered
    from fedplora.federation.checkpoint import load_checkpoint, save_checkpoint

    cfg = RunConfig(rounds=3, rank=4, ranks=[1, 2, 4])
    state = {f"m.layer{i}.plora_A": torch.full((4, 3), float(i)) for i in (3, 1, 2, 0)}
    state.update({f"m.layer{i}.plora_B": torch.full((2, 4), float(i)) for i in (3, 1, 2, 0)}, **{"z.w": torch.ones(2)})
    save_checkpoint(tmp_path, 1, state, [], cfg, "tiny", 1.0)
    assert list(load_checkpoint(tmp_path, cfg, "tiny", state).state) == list(state)


def test_local_dp_clips_and_noises_before_upload(tiny_assets, in_process):
    from fedplora.federation.messages import read_task, read_update
    from fedplora.federation.strategy import untimed

    base = dict(method="fedit", rounds=1, num_clients=4, clients_per_round=4, local_steps=1)

    def uploads(cfg):
        seen = {}

        def capture(cid, msg, reply):
            if not reply.has_error():
                seen[cid] = (read_task(msg.content)[0], read_update(reply.content)[0])
            return [reply]

        grid = InProcessGrid(cfg.num_clients, tamper=capture)
        strategy, arrays = _strategy(cfg, grid)
        strategy.start(grid, arrays, num_rounds=cfg.rounds, timeout=cfg.round_timeout)
        return [untimed(h) for h in strategy.history], seen

    _, honest = uploads(_small_cfg(tiny_assets, **base))
    cfg = _small_cfg(tiny_assets, dp_mode="local", dp_clip=0.01, dp_noise_multiplier=0.5, **base)
    history, private = uploads(cfg)
    for cid, (task, update) in private.items():
        start, trained = task.arrays, honest[cid][1].arrays  # FedIT ideal uploads what it received, trained
        delta = {k: trained[k].double() - start[k].double() for k in trained}
        assert privacy.update_norm(delta) > 0.01  # the honest update is larger than the clip: it is clipped
        noisy = privacy.privatize_local(delta, 0.01, 0.5, rng.torch_generator("dp_local_noise", cfg.seed, 1, cid))
        for k, v in update.arrays.items():
            assert v.dtype == trained[k].dtype
            assert torch.allclose(v.double(), start[k].double() + noisy[k], atol=1e-6, rtol=0), (cid, k)
    eps = privacy.local_epsilon(1, 0.5, 1e-5)
    assert [c["dp_epsilon"] for c in history[1]["clients"]] == [eps] * 4 and history[1]["dp_epsilon"] == eps


@pytest.mark.slow
def test_simulation_with_central_dp_reports_epsilon(tiny_assets, tmp_path):
    import json

    from fedplora.federation.simulation import run_simulation

    cfg = _central(tiny_assets, out=str(tmp_path))
    summary = run_simulation(cfg, tmp_path)
    eps = [h["dp_epsilon"] for h in summary["history"]]
    assert eps == [privacy.epsilon_spent(k, 0.5, 1.1, 1e-5) for k in range(3)]
    assert summary["dp_epsilon"] == eps[-1] and summary["dp"]["rounds_accounted"] == 2
    record = json.loads((tmp_path / "checkpoint" / "checkpoint.json").read_text())
    assert record["privacy"]["accountant"]["rounds"] == 2
