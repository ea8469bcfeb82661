"""Every random draw of a run comes from one seed through a named, independent stream.

Why: hand-salted seeds collide. numpy pads short entropy with zeros, so
``default_rng([seed, round, 1])`` (client sampling) and ``default_rng([seed, round, 1, 0])``
(client 1's pair selection) used to produce the same bits. Here each stream has a fixed
name and a fixed number of keys; both are hashed into the seed sequence's spawn key, so
two different (stream, keys) never share a state, and adding a stream never shifts another.

    rng.generator("sampling", seed, server_round, attempt).choice(...)
    torch.manual_seed(rng.seed_int("batches", seed, server_round, cid))
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

# name -> the keys its draws are indexed by (beyond the run's seed); the arity is part of the stream
STREAMS: dict[str, tuple[str, ...]] = {
    "budgets": (),                                 # which client gets which rank budget (simulation profile)
    "fluctuation": ("round", "cid"),               # a client's budget dropping one group this round
    "sampling": ("round", "attempt"),              # the clients of a round (a retry draws afresh)
    "selection": ("round", "cid", "layer"),        # Fed-PLoRA's pair indices (layer 0 = the shared draw)
    "partition": (),                               # data partitions (flwr-datasets partitioners)
    "split": (),                                   # train/test split of tasks without a test split
    "validation": (),                              # the validation split carved from train (eval_split)
    "init": (),                                    # a new head's init, method-side initial state
    "batches": ("round", "cid"),                   # a client's local batches and dropout
    "failures": ("round", "attempt"),              # injected failures (tests, drills)
    "byzantine": (),                               # which clients are Byzantine (fixed for the run)
    "attack_noise": ("round", "cid"),              # a Byzantine client's noise attack
    "eval_subset": (),                             # the held-out examples evaluated every round
    "generation_subset": (),                       # the held-out examples generated per evaluation
    "problem_order": (),                           # the order of code problems
    "benchmark_subset": (),                        # `fedplora evaluate --max-examples`: the rows scored
    "svd": (),                                     # randomized linear algebra in a method (FlexLoRA)
    "flora_init": ("round", "cid", "layer"),       # FLoRA's fresh A of a client's layer each round
    "dp_noise": ("round",),                        # central DP: the server's noise on a round's sums
    "dp_local_noise": ("round", "cid"),            # local DP: a client's noise on its upload
    "secure_quantization": ("round", "attempt", "cid"),  # SecAgg+: a client's stochastic rounding
}
_IDS = {name: zlib.crc32(name.encode()) for name in STREAMS}
assert len(set(_IDS.values())) == len(_IDS), "two stream names hash alike: rename one"


def seed_sequence(stream: str, seed: int, *keys: int) -> np.random.SeedSequence:
    """The seed sequence of one stream at ``keys``; the names and arity are checked."""
    if stream not in STREAMS:
        raise KeyError(f"unknown random stream {stream!r}; declare it in fedplora.rng.STREAMS")
    if len(keys) != len(STREAMS[stream]):
        raise TypeError(f"stream {stream!r} takes keys {STREAMS[stream]}, got {len(keys)} value(s)")
    if seed < 0 or any(k < 0 for k in keys):
        raise ValueError(f"seeds and stream keys must be >= 0, got seed={seed}, keys={keys}")
    return np.random.SeedSequence(int(seed), spawn_key=(_IDS[stream], len(keys), *(int(k) for k in keys)))


def generator(stream: str, seed: int, *keys: int) -> np.random.Generator:
    """A numpy Generator for one stream."""
    return np.random.default_rng(seed_sequence(stream, seed, *keys))


def seed_int(stream: str, seed: int, *keys: int) -> int:
    """A 63-bit integer seed for libraries that take one (torch.manual_seed, flwr-datasets, datasets)."""
    return int(seed_sequence(stream, seed, *keys).generate_state(1, np.uint64)[0] >> np.uint64(1))


def small_seed(stream: str, seed: int, *keys: int) -> int:
    """A 32-bit seed, for libraries whose seed must fit in uint32 (``datasets``' shuffles and splits)."""
    return int(seed_sequence(stream, seed, *keys).generate_state(1, np.uint32)[0])


def torch_generator(stream: str, seed: int, *keys: int) -> torch.Generator:
    """A torch CPU Generator for one stream."""
    return torch.Generator().manual_seed(seed_int(stream, seed, *keys))
