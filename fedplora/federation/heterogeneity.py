"""Who can train how many pairs: budgets from a heterogeneity profile, or from the device itself.

A real device declares ``max-rank`` in its node config. In simulation the
profile (rank groups and their shares, e.g. ranks [2,4,8] at 1:1:1) assigns
budgets to client ids; ``budget_fluctuation`` lets a client drop one group in
a round (a device short of memory today), seeded.
"""

from __future__ import annotations

import functools

import numpy as np

from .. import rng


def group_sizes(num_clients: int, shares: list[float]) -> list[int]:
    """Largest-remainder split of num_clients by shares (sums exactly to num_clients)."""
    total = float(sum(shares))
    exact = [num_clients * s / total for s in shares]
    sizes = [int(np.floor(x)) for x in exact]
    order = sorted(range(len(shares)), key=lambda k: (exact[k] - sizes[k]), reverse=True)
    for k in order[: num_clients - sum(sizes)]:
        sizes[k] += 1
    return sizes


def assign_budgets(num_clients: int, ranks: list[int], shares: list[float], seed: int) -> list[int]:
    """Budget per client id: group sizes from the shares, members drawn with the seed."""
    budgets = np.repeat(ranks, group_sizes(num_clients, shares))
    perm = rng.generator("budgets", seed).permutation(num_clients)
    return [int(b) for b in budgets[perm]]


@functools.lru_cache(maxsize=8)
def _profile(num_clients: int, ranks: tuple[int, ...], shares: tuple[float, ...], seed: int) -> tuple[int, ...]:
    return tuple(assign_budgets(num_clients, list(ranks), list(shares), seed))


def base_budget(num_clients: int, ranks: list[int], shares: list[float], seed: int, cid: int) -> int:
    """``assign_budgets(...)[cid]``, the profile computed once per process: a client answers every message in O(1),
    not in O(num_clients) (the whole profile is a permutation of all clients)."""
    return _profile(num_clients, tuple(ranks), tuple(float(s) for s in shares), seed)[cid]


def round_budget(base: int, ranks: list[int], fluctuation: float, seed: int, server_round: int, cid: int) -> int:
    """This round's budget: the base, or one group lower with probability ``fluctuation``."""
    if fluctuation <= 0:
        return base
    if rng.generator("fluctuation", seed, server_round, cid).random() >= fluctuation:
        return base
    lower = sorted(r for r in set(ranks) if r < base)
    return lower[-1] if lower else max(1, base // 2)
