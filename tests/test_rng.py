"""Named random streams: no two (stream, keys) share a state, and streams are statistically independent."""

import itertools

import numpy as np
import pytest

from fedplora import rng


def _all_draws(seed=0, span=4):
    """Every stream at every key combination in [0, span)^arity: the first 4 words of each state."""
    out = {}
    for name, keys in rng.STREAMS.items():
        for combo in itertools.product(range(span), repeat=len(keys)):
            out[(name, combo)] = tuple(rng.seed_sequence(name, seed, *combo).generate_state(4).tolist())
    return out


def test_no_two_streams_or_keys_share_a_state():
    draws = _all_draws()
    assert len(set(draws.values())) == len(draws)


def test_the_old_collision_is_gone():
    # before: sampling drew from default_rng([seed, round, 1]) and client 1's selection from
    # default_rng([seed, round, 1, 0]), which numpy pads to the same state
    old_a = np.random.default_rng([0, 3, 1]).random(8)
    old_b = np.random.default_rng([0, 3, 1, 0]).random(8)
    assert np.array_equal(old_a, old_b)
    new_a = rng.generator("sampling", 0, 3, 1).random(8)
    new_b = rng.generator("selection", 0, 3, 1, 0).random(8)
    assert not np.array_equal(new_a, new_b)


def test_streams_are_uncorrelated():
    """Pairwise correlation of 20k uniforms across all streams (same seed, keys 0) stays at noise level."""
    n = 20_000
    samples = {name: rng.generator(name, 7, *([0] * len(keys))).random(n) for name, keys in rng.STREAMS.items()}
    corr = np.corrcoef(np.stack(list(samples.values())))
    off = np.abs(corr[~np.eye(len(samples), dtype=bool)])
    assert off.max() < 5 / np.sqrt(n)  # 5 sigma under independence


def test_same_seed_same_numbers_other_seed_other_numbers():
    assert rng.seed_int("batches", 3, 1, 2) == rng.seed_int("batches", 3, 1, 2)
    assert rng.seed_int("batches", 3, 1, 2) != rng.seed_int("batches", 4, 1, 2)
    assert 0 <= rng.seed_int("init", 0) < 2**63 and 0 <= rng.small_seed("partition", 0) < 2**32


def test_streams_are_declared_with_their_keys():
    with pytest.raises(KeyError, match="unknown random stream"):
        rng.generator("sampl", 0, 1, 0)
    with pytest.raises(TypeError, match="takes keys"):
        rng.generator("sampling", 0, 1)
    with pytest.raises(ValueError, match=">= 0"):
        rng.generator("init", -1)
