"""fedplora.privacy: accounting equals the library's own, clipping, noisy fixed-denominator means, local DP, checks."""

import json
import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

from fedplora import privacy
from fedplora.errors import CheckpointError, ConfigError, UpdateRejected


def _library_epsilon(rounds, q, sigma, delta, orders=privacy.ORDERS):
    curve = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=rounds, orders=list(orders))
    eps, _ = opacus_rdp.get_privacy_spent(orders=list(orders), rdp=curve, delta=delta)
    return float(eps)


# ------------------------------------------------------------------ accounting
@pytest.mark.parametrize("rounds,q,sigma,delta", [
    (100, 0.1, 1.0, 1e-5), (1000, 0.01, 0.8, 1e-5), (10, 0.3, 5.0, 1e-6), (7, 1.0, 2.0, 1e-5), (50, 0.02, 20.0, 1e-5),
])
def test_epsilon_equals_the_library_for_the_same_parameters(rounds, q, sigma, delta):
    assert privacy.epsilon_spent(rounds, q, sigma, delta) == _library_epsilon(rounds, q, sigma, delta)


def test_epsilon_equals_opacus_accountant_where_its_default_orders_suffice():
    acc = RDPAccountant()
    for _ in range(40):
        acc.step(noise_multiplier=1.1, sample_rate=0.05)
    # Opacus's default orders are a subset of ours; at this (q, sigma) the optimum lies inside them
    assert privacy.epsilon_spent(40, 0.05, 1.1, 1e-5) == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)


def test_epsilon_edge_cases_and_monotonicity():
    assert privacy.epsilon_spent(0, 0.1, 1.0) == 0.0
    assert privacy.epsilon_spent(5, 0.0, 1.0) == 0.0
    assert privacy.epsilon_spent(5, 0.1, 0.0) == math.inf
    assert privacy.epsilon_spent(20, 0.1, 1.0) < privacy.epsilon_spent(40, 0.1, 1.0)  # more rounds spend more
    assert privacy.epsilon_spent(20, 0.1, 2.0) < privacy.epsilon_spent(20, 0.1, 1.0)  # more noise spends less
    assert privacy.epsilon_spent(20, 0.05, 1.0) < privacy.epsilon_spent(20, 0.1, 1.0)  # fewer clients spend less


@pytest.mark.parametrize("target,rounds,q", [(8.0, 100, 0.1), (1.0, 30, 0.02)])
def test_noise_for_target_epsilon_is_the_smallest_sigma_that_meets_it(target, rounds, q):
    sigma = privacy.noise_for_target_epsilon(target, rounds, q)
    assert privacy.epsilon_spent(rounds, q, sigma) <= target
    assert privacy.epsilon_spent(rounds, q, sigma * (1 - 1e-3)) > target


def test_noise_for_target_epsilon_needs_none_without_rounds():
    assert privacy.noise_for_target_epsilon(1.0, 0, 0.1) == 0.0


def test_local_epsilon_is_the_unsampled_gaussian_at_twice_the_sensitivity():
    assert privacy.local_epsilon(10, 4.0, 1e-5) == _library_epsilon(10, 1.0, 2.0, 1e-5)
    assert privacy.local_epsilon(0, 4.0) == 0.0
    # no subsampling amplification: local DP spends far more than central at the same sigma
    assert privacy.local_epsilon(10, 4.0) > privacy.epsilon_spent(10, 0.1, 4.0)
    sigma = privacy.local_noise_for_target_epsilon(10.0, 10)
    assert privacy.local_epsilon(10, sigma) <= 10.0 < privacy.local_epsilon(10, sigma * (1 - 1e-3))


def test_accountant_steps_and_survives_a_checkpoint():
    acc = privacy.Accountant(q=0.1, noise_multiplier=1.0, delta=1e-5)
    assert acc.epsilon == 0.0
    for _ in range(3):
        acc.step()
    assert acc.rounds == 3 and acc.epsilon == privacy.epsilon_spent(3, 0.1, 1.0, 1e-5)
    state = json.loads(json.dumps(acc.state_dict()))  # the checkpoint record is JSON
    resumed = privacy.Accountant(q=0.1, noise_multiplier=1.0, delta=1e-5)
    resumed.load_state_dict(state)
    assert resumed.rounds == 3 and resumed.step(2) == privacy.epsilon_spent(5, 0.1, 1.0, 1e-5)
    assert privacy.Accountant.from_state_dict(state) == acc
    with pytest.raises(CheckpointError, match="noise_multiplier"):
        privacy.Accountant(q=0.1, noise_multiplier=2.0).load_state_dict(state)
    with pytest.raises(CheckpointError, match="clients_per_round"):
        privacy.Accountant(q=0.2, noise_multiplier=1.0).load_state_dict(state)
    local = privacy.Accountant(q=0.1, noise_multiplier=4.0, mode="local", rounds=10)
    assert local.epsilon == privacy.local_epsilon(10, 4.0)


# ------------------------------------------------------------------ central DP math
def test_clip_delta_on_a_hand_example():
    delta = {"l.plora_A": torch.tensor([[3.0, 0.0]]), "l.plora_B": torch.tensor([[0.0], [4.0]]), "head": torch.zeros(2)}
    clipped, norm, scale = privacy.clip_delta(delta, 2.5)  # norm over all tensors: sqrt(9 + 16) = 5
    assert norm == 5.0 and scale == 0.5
    assert torch.equal(clipped["l.plora_A"], torch.tensor([[1.5, 0.0]], dtype=torch.float64))
    assert torch.equal(clipped["l.plora_B"], torch.tensor([[0.0], [2.0]], dtype=torch.float64))
    assert torch.equal(clipped["head"], torch.zeros(2, dtype=torch.float64))
    assert privacy.update_norm(clipped) == 2.5
    _, _, scale = privacy.clip_delta(delta, 1.0)
    assert scale == 0.2
    same, norm, scale = privacy.clip_delta(delta, 10.0)  # within the bound: untouched
    assert norm == 5.0 and scale == 1.0 and torch.equal(same["l.plora_A"], delta["l.plora_A"].double())
    zero, norm, scale = privacy.clip_delta({"x": torch.zeros(3)}, 1.0)
    assert norm == 0.0 and scale == 1.0
    with pytest.raises(UpdateRejected, match="non-finite"):
        privacy.clip_delta({"x": torch.tensor([float("nan")])}, 1.0)


def test_noisy_pair_mean_without_noise_is_sum_over_expected_count_exactly():
    sums = {"l.plora_A": torch.randn(4, 3, dtype=torch.float64), "l.plora_B": torch.randn(5, 4, dtype=torch.float64),
            "head": torch.randn(2, dtype=torch.float64)}
    counts = torch.tensor([10.0, 20 / 3, 10 / 3, 10 / 3], dtype=torch.float64)
    out = privacy.noisy_pair_mean(sums, privacy.pair_divisors(list(sums), counts, 10), 0.0)
    assert torch.equal(out["l.plora_A"], sums["l.plora_A"] / counts[:, None])
    assert torch.equal(out["l.plora_B"], sums["l.plora_B"] / counts[None, :])
    assert torch.equal(out["head"], sums["head"] / 10.0)
    scalar = privacy.noisy_pair_mean(sums, 4.0, 0.0)
    assert torch.equal(scalar["head"], sums["head"] / 4.0)


def test_noisy_pair_mean_noise_std_is_sigma_c_over_expected_count():
    sigma, clip, count = 1.5, 0.4, torch.tensor([8.0, 2.0], dtype=torch.float64)
    sums = {"l.plora_A": torch.zeros(2, 100_000, dtype=torch.float64)}
    gen = torch.Generator().manual_seed(0)
    out = privacy.noisy_pair_mean(sums, {"l.plora_A": count[:, None]}, sigma * clip, gen)["l.plora_A"]
    for j in range(2):
        assert out[j].std().item() == pytest.approx(sigma * clip / count[j].item(), rel=0.02)
        assert abs(out[j].mean().item()) < 5 * sigma * clip / count[j].item() / math.sqrt(100_000)


def test_noisy_pair_mean_coordinates_nobody_trains_stay_zero():
    sums = {"l.plora_A": torch.tensor([[1.0], [0.0]], dtype=torch.float64)}
    counts = {"l.plora_A": torch.tensor([[2.0], [0.0]], dtype=torch.float64)}
    out = privacy.noisy_pair_mean(sums, counts, 1.0, torch.Generator().manual_seed(0))["l.plora_A"]
    assert out[1, 0] == 0.0 and out[0, 0] != 0.5  # pair 1: no noise, nothing released; pair 0 noised
    with pytest.raises(ValueError, match="nonzero sum"):
        privacy.noisy_pair_mean({"x": torch.ones(2)}, {"x": torch.tensor([1.0, 0.0])}, 0.0)
    with pytest.raises(ValueError, match="broadcast"):
        privacy.noisy_pair_mean({"x": torch.ones(2, 3)}, {"x": torch.ones(4)}, 0.0)
    with pytest.raises(ValueError, match="Generator"):
        privacy.noisy_pair_mean({"x": torch.ones(2)}, 1.0, 1.0)


def test_same_seed_same_noise():
    sums = {"b": torch.zeros(3, 4), "a": torch.zeros(5)}
    delta = {"a": torch.ones(5), "b": torch.ones(3, 4)}

    def draw(seed, reorder=False):
        s = dict(reversed(list(sums.items()))) if reorder else sums
        central = privacy.noisy_pair_mean(s, 2.0, 0.7, torch.Generator().manual_seed(seed))
        local = privacy.privatize_local(delta, 1.0, 0.7, torch.Generator().manual_seed(seed))
        return central, local

    (c1, l1), (c2, l2), (c3, _) = draw(3), draw(3, reorder=True), draw(4)
    assert all(torch.equal(c1[k], c2[k]) and torch.equal(l1[k], l2[k]) for k in sums)
    assert not torch.equal(c1["a"], c3["a"])


def test_the_vector_of_all_pair_sums_has_sensitivity_c_with_heterogeneous_pairs():
    """Clients of ranks 1/4/16 train different pairs; removing any one moves all the sums together by <= C."""
    R, clip, gen = 16, 0.5, torch.Generator().manual_seed(0)
    clients = []
    for cid, r in enumerate([1, 4, 16, 1, 4, 16]):
        idx = torch.randperm(R, generator=gen)[:r]
        delta = {"l.plora_A": torch.randn(r, 3, generator=gen), "l.plora_B": torch.randn(5, r, generator=gen),
                 "head": torch.randn(2, generator=gen)}
        clients.append((idx, privacy.clip_delta(delta, clip)[0]))

    def sums(members):
        out = {"l.plora_A": torch.zeros(R, 3, dtype=torch.float64), "l.plora_B": torch.zeros(5, R, dtype=torch.float64),
               "head": torch.zeros(2, dtype=torch.float64)}
        for idx, c in members:
            out["l.plora_A"][idx] += c["l.plora_A"]
            out["l.plora_B"][:, idx] += c["l.plora_B"]
            out["head"] += c["head"]
        return out

    full = sums(clients)
    for i in range(len(clients)):
        without = sums(clients[:i] + clients[i + 1:])
        moved = privacy.update_norm({k: full[k] - without[k] for k in full})
        assert moved <= clip * (1 + 1e-12)


# ------------------------------------------------------------------ expected pair counts
def test_expected_pair_counts_on_hand_examples():
    random = privacy.expected_pair_counts(10, 16, [1, 4, 16], [1, 1, 1], "random")
    assert random.shape == (16,) and torch.allclose(random, torch.full((16,), 10 * (1 + 4 + 16) / (3 * 16),
                                                                       dtype=torch.float64))
    leading = privacy.expected_pair_counts(10, 16, [1, 4, 16], [1, 1, 1], "leading")
    expected = [10.0] + [10 * 2 / 3] * 3 + [10 / 3] * 12  # pair 0: all; 1..3: ranks 4 and 16; 4..15: rank 16
    assert torch.allclose(leading, torch.tensor(expected, dtype=torch.float64))
    everyone = privacy.expected_pair_counts(10, 16, [1, 4, 16], [1, 1, 1], "everyone")
    assert torch.equal(everyone, torch.full((16,), 10.0, dtype=torch.float64))
    # the method's selection names map onto these; budgets above R are capped at R; shares weight the groups
    assert torch.equal(privacy.expected_pair_counts(10, 16, [1, 4, 16], selection="shared"), random)
    assert torch.equal(privacy.expected_pair_counts(10, 16, [1, 4, 16], selection="fixed"), leading)
    capped = privacy.expected_pair_counts(4, 8, [2, 32], [3, 1], "leading")
    assert torch.allclose(capped, torch.tensor([4.0, 4.0] + [1.0] * 6, dtype=torch.float64))
    # the mean count over pairs equals the expected number of pairs trained in a round / R, for both selections
    assert leading.mean().item() == pytest.approx(random.mean().item())


# ------------------------------------------------------------------ local DP
def test_privatize_local_clips_then_noises_in_the_upload_dtype():
    delta = {"a": torch.full((4,), 2.0, dtype=torch.float32), "b": torch.zeros(2, dtype=torch.bfloat16)}
    noiseless = privacy.privatize_local(delta, 1.0, 0.0)
    assert list(noiseless) == ["a", "b"]
    assert noiseless["a"].dtype == torch.float32 and noiseless["b"].dtype == torch.bfloat16
    assert torch.allclose(noiseless["a"], torch.full((4,), 0.5))  # norm 4 -> 1
    big = {"a": torch.zeros(200_000)}
    noisy = privacy.privatize_local(big, 0.5, 2.0, torch.Generator().manual_seed(1))["a"]
    assert noisy.std().item() == pytest.approx(2.0 * 0.5, rel=0.02)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("call,match", [
    (lambda: privacy.clip_delta({"x": torch.ones(1)}, 0.0), "dp_clip"),
    (lambda: privacy.clip_delta({"x": torch.ones(1)}, -1.0), "dp_clip"),
    (lambda: privacy.epsilon_spent(10, 0.1, 1.0, 0.0), "dp_delta"),
    (lambda: privacy.epsilon_spent(10, 0.1, 1.0, 1.0), "dp_delta"),
    (lambda: privacy.epsilon_spent(10, 0.1, -0.5), "dp_noise_multiplier"),
    (lambda: privacy.epsilon_spent(10, 1.5, 1.0), "clients_per_round / num_clients"),
    (lambda: privacy.epsilon_spent(-1, 0.1, 1.0), "rounds"),
    (lambda: privacy.noise_for_target_epsilon(0.0, 10, 0.1), "target_epsilon"),
    (lambda: privacy.noise_for_target_epsilon(-2.0, 10, 0.1), "target_epsilon"),
    (lambda: privacy.noise_for_target_epsilon(1e-4, 10_000, 1.0, 1e-9), "raise target_epsilon"),
    (lambda: privacy.resolve_noise_multiplier(0.0, 1.0, 10, 0.1), "dp_noise_multiplier=0"),
    (lambda: privacy.resolve_noise_multiplier(1.0, 1.0, 10, 0.1), "not both"),
    (lambda: privacy.resolve_noise_multiplier(None, None, 10, 0.1), "set one"),
    (lambda: privacy.check_dp_settings(1.0, 0.0, target_epsilon=2.0), "dp_noise_multiplier=0"),
    (lambda: privacy.check_dp_settings(1.0, 1.0, dp_mode="both"), "dp_mode"),
    (lambda: privacy.privatize_local({"x": torch.ones(1)}, 1.0, -1.0), "dp_noise_multiplier"),
    (lambda: privacy.Accountant(q=0.1, noise_multiplier=1.0, delta=2.0), "dp_delta"),
    (lambda: privacy.expected_pair_counts(10, 16, [0, 4]), "ranks"),
    (lambda: privacy.expected_pair_counts(10, 16, [1, 4], [1.0]), "rank_shares"),
    (lambda: privacy.expected_pair_counts(10, 16, [1, 4], selection="best"), "selection"),
])
def test_each_bad_setting_is_one_clear_error(call, match):
    with pytest.raises(ConfigError, match=match) as err:
        call()
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_resolve_noise_multiplier_uses_the_given_sigma_or_the_target():
    assert privacy.resolve_noise_multiplier(1.3, None, 10, 0.1) == 1.3
    assert privacy.resolve_noise_multiplier(0.0, None, 10, 0.1) == 0.0  # clipping only: allowed, spends inf
    assert privacy.resolve_noise_multiplier(None, 5.0, 0, 0.1) == 0.0
    privacy.check_dp_settings(1.0, None, 1e-5, 3.0, "local")  # a valid combination passes
