"""Client-level differential privacy: DP-FedAvg's pure pieces (clip, noise, account).

Nothing here knows about Flower or a method: the aggregation path and the server loop call
these functions (docs/robustness.md, "Differential privacy"). The privacy unit is one
*client*: neighbouring federations differ by adding or removing one client's whole data.

Central DP (trusted server, ``dp_mode = "central"``)
    Each client's update is its delta from the global state, ``delta_i``. The server clips it
    as one vector over all the tensors it carries (``clip_delta``: ``||delta_i||_2 <= C``),
    sums the clipped deltas without weights, adds ``N(0, sigma^2 C^2)`` to every coordinate of
    every sum and divides by a FIXED expected count (``noisy_pair_mean``).

    Sensitivity with heterogeneous pairs. Fed-PLoRA's pair j is averaged over the clients that
    trained it, and that number differs from pair to pair. Look at the vector of ALL sums at
    once: every pair's A row and B column, and every head tensor. Adding or removing client i
    changes only the coordinates of the pairs i trained (and the heads), and changes them by
    exactly its clipped delta, whose L2 norm over all of them together is at most C. So the
    whole vector of sums has L2 sensitivity C, however many clients trained each pair and
    whichever pairs i trained. Independent ``N(0, sigma^2 C^2)`` on every coordinate is then the
    Gaussian mechanism with noise multiplier sigma. Dividing pair j's noisy sum by a number
    that does not depend on the data or on who was sampled (``expected_pair_counts``) is
    post-processing and costs nothing. Dividing by the realised count would not be: that count
    reveals which clients were sampled and breaks the subsampling argument below. The
    divisor's choice only moves the estimate's bias, never the privacy.

    Two consequences. (1) The sums are unweighted: ``weighting = "samples"`` would let a client
    with many examples move a sum by more than C, so DP aggregation counts every client once.
    (2) A pair few clients train (the last pairs of a "leading" selection) has a small expected
    count, so its averaged update carries noise of std ``sigma C / count``: more noise than the
    pairs everyone trains. That is the price of heterogeneity under DP, not a bug.

Accounting (``epsilon_spent``, ``noise_for_target_epsilon``, ``Accountant``)
    One round is a subsampled Gaussian mechanism: sampling rate ``q = clients_per_round /
    num_clients``, noise multiplier sigma. k rounds compose. We use Opacus's RDP analysis of
    the sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019), converted to (epsilon, delta)
    by Balle et al. 2020 (Thm. 21), over a wider set of RDP orders than Opacus's default
    (``ORDERS``), so small epsilons are not loosened by a capped order.

    What it assumes, honestly: POISSON subsampling (each client joins a round independently
    with probability q) under add/remove-one adjacency. Our server samples a FIXED number of
    clients without replacement. Treating that as Poisson at q = m/N is the standard
    approximation (DP-FedAvg practice and Opacus's own fixed-size batches make it), but it is
    not a proof for fixed-size sampling: the known analyses of sampling without replacement use
    replace-one adjacency, under which one client moves the sum by up to 2C, and their epsilon
    can be larger. For a guarantee that holds exactly as reported, sample clients by Poisson;
    the fixed divisor here is then McMahan et al.'s (2018) estimator. Opacus's one option for
    sampling without replacement, its GDP accountant with ``poisson=False``, is a central-limit
    approximation (Bu et al.), not an upper bound, so it is not used. dp-accounting supports
    fixed-size sampling (replace-one), but it does not install next to our pins (it requires
    attrs<24 and would downgrade the installed attrs 26.1.0).

Local DP (untrusted server, ``dp_mode = "local"``)
    ``privatize_local`` clips and noises on the client, before upload. The server sees each
    client's noisy delta, so there is no amplification by subsampling: the accounting is per
    client, over the rounds that client took part in, at q = 1. For local DP any two of the
    client's possible (clipped) updates are neighbours, and two vectors of norm <= C are up to
    2C apart: ``local_epsilon`` therefore accounts at sensitivity 2C, i.e. noise multiplier
    sigma / 2 relative to that sensitivity. Only the delta is protected: ``num_samples``,
    training metrics, or a pre-clip norm sent beside it are not.

Randomness: every noise draw takes an explicit ``torch.Generator``, so a seeded run repeats
exactly. A seeded stream (fedplora.rng) is right for simulation and research; a deployment
whose privacy matters must seed from a secret (``secrets``/``os.urandom``), since whoever
knows the seed can subtract the noise, and floating-point Gaussian samplers are not hardened
against side channels.

Parameter checks raise ``ConfigError`` (a ``ValueError``) with one line naming the setting:
``dp_clip``, ``dp_noise_multiplier``, ``dp_delta``, ``target_epsilon``, ``dp_mode``.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .adapters.model import A_SUFFIX, B_SUFFIX
from .errors import CheckpointError, ConfigError, UpdateRejected

Tensor = torch.Tensor

DEFAULT_DELTA = 1e-5
MODES = ("central", "local")
# RDP orders: Opacus's default (1.1 .. 10.9, 12 .. 63) plus large orders for high privacy
ORDERS: tuple[float, ...] = (tuple(1 + x / 10.0 for x in range(1, 100)) + tuple(float(a) for a in range(12, 64))
                             + (80.0, 96.0, 128.0, 160.0, 192.0, 256.0, 384.0, 512.0, 1024.0))
MAX_NOISE_MULTIPLIER = 1e4  # noise_for_target_epsilon searches sigma in (0, this]
NOISE_RTOL = 1e-5  # ... to this relative precision


# ------------------------------------------------------------------ validation
def _real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _integer(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_clip(clip: float) -> float:
    if not (_real(clip) and math.isfinite(clip) and clip > 0):
        raise ConfigError(f"dp_clip: the L2 clipping norm must be a finite number > 0, got {clip!r}")
    return float(clip)


def check_delta(delta: float) -> float:
    if not (_real(delta) and 0 < delta < 1):
        raise ConfigError(f"dp_delta: must be in (0, 1) (typically below 1/num_clients, e.g. 1e-5), got {delta!r}")
    return float(delta)


def check_noise_multiplier(noise_multiplier: float) -> float:
    if not (_real(noise_multiplier) and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ConfigError(f"dp_noise_multiplier: must be a finite number >= 0 (0 = clipping only, no privacy), "
                          f"got {noise_multiplier!r}")
    return float(noise_multiplier)


def check_target_epsilon(target_epsilon: float) -> float:
    if not (_real(target_epsilon) and math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(f"target_epsilon: must be a finite number > 0, got {target_epsilon!r}")
    return float(target_epsilon)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"dp_mode: must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def _check_rate(q: float) -> float:
    if not (_real(q) and 0 <= q <= 1):
        raise ConfigError(f"the sampling rate q = clients_per_round / num_clients must be in [0, 1], got {q!r}")
    return float(q)


def _check_rounds(rounds: int) -> int:
    if not _integer(rounds) or rounds < 0:
        raise ConfigError(f"rounds must be an integer >= 0, got {rounds!r}")
    return int(rounds)


def resolve_noise_multiplier(noise_multiplier: float | None, target_epsilon: float | None, rounds: int, q: float,
                             delta: float = DEFAULT_DELTA, mode: str = "central") -> float:
    """The sigma a run uses: ``dp_noise_multiplier`` as given, or the one ``target_epsilon`` chooses.

    ``target_epsilon`` picks the smallest sigma that spends at most it over the ``rounds``
    planned (``noise_for_target_epsilon``; in local mode ``local_noise_for_target_epsilon``).
    Give one of the two: a target with ``dp_noise_multiplier = 0`` asks for privacy with no
    noise, and both at once would leave it unclear which one wins.
    """
    check_mode(mode)
    if target_epsilon is None:
        if noise_multiplier is None:
            raise ConfigError("differential privacy needs dp_noise_multiplier or target_epsilon: set one of them")
        return check_noise_multiplier(noise_multiplier)
    check_target_epsilon(target_epsilon)
    if noise_multiplier is not None:
        if noise_multiplier == 0:
            raise ConfigError(f"target_epsilon={target_epsilon!r} cannot be met with dp_noise_multiplier=0 (no noise): "
                              "unset dp_noise_multiplier so target_epsilon chooses it, or unset target_epsilon")
        raise ConfigError("set dp_noise_multiplier or target_epsilon, not both (target_epsilon chooses the noise "
                          "multiplier for the planned rounds)")
    if mode == "local":
        return local_noise_for_target_epsilon(target_epsilon, rounds, delta)
    return noise_for_target_epsilon(target_epsilon, rounds, q, delta)


def check_dp_settings(dp_clip: float, dp_noise_multiplier: float | None = None, dp_delta: float = DEFAULT_DELTA,
                      target_epsilon: float | None = None, dp_mode: str = "central") -> None:
    """Every DP setting's range, one ConfigError line for the first that is wrong (no accounting)."""
    check_mode(dp_mode)
    check_clip(dp_clip)
    check_delta(dp_delta)
    if dp_noise_multiplier is not None:
        check_noise_multiplier(dp_noise_multiplier)
    if target_epsilon is not None:
        check_target_epsilon(target_epsilon)
        if dp_noise_multiplier == 0:
            raise ConfigError(f"target_epsilon={target_epsilon!r} cannot be met with dp_noise_multiplier=0 (no noise): "
                              "unset dp_noise_multiplier so target_epsilon chooses it, or unset target_epsilon")
        if dp_noise_multiplier is not None:
            raise ConfigError("set dp_noise_multiplier or target_epsilon, not both (target_epsilon chooses the noise "
                              "multiplier for the planned rounds)")


# ------------------------------------------------------------------ accounting
def _rdp():
    # imported on first use: importing opacus loads its whole training engine (seconds)
    from opacus.accountants.analysis import rdp
    return rdp


@functools.lru_cache(maxsize=4096)
def _epsilon(rounds: int, q: float, noise_multiplier: float, delta: float) -> float:
    rdp = _rdp()
    with warnings.catch_warnings():
        # "optimal order is the largest alpha": the bound is still valid (only looser); ORDERS reaches 1024
        warnings.filterwarnings("ignore", message="Optimal order")
        curve = rdp.compute_rdp(q=q, noise_multiplier=noise_multiplier, steps=rounds, orders=list(ORDERS))
        eps, _ = rdp.get_privacy_spent(orders=list(ORDERS), rdp=curve, delta=delta)
    return float(eps)


def epsilon_spent(rounds: int, q: float, noise_multiplier: float, delta: float = DEFAULT_DELTA) -> float:
    """Epsilon (at ``delta``) after ``rounds`` rounds of the sampled Gaussian mechanism at rate ``q``.

    Poisson subsampling at rate q, add/remove-one client adjacency (see the module docstring
    for how that treats our fixed-size sampling). 0 rounds (or q = 0) spend 0; no noise spends inf.
    """
    rounds, q = _check_rounds(rounds), _check_rate(q)
    noise_multiplier, delta = check_noise_multiplier(noise_multiplier), check_delta(delta)
    if rounds == 0 or q == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    return _epsilon(rounds, q, noise_multiplier, delta)


def noise_for_target_epsilon(target_epsilon: float, rounds: int, q: float, delta: float = DEFAULT_DELTA) -> float:
    """The smallest sigma (to ``NOISE_RTOL``) whose ``epsilon_spent`` over ``rounds`` is at most the target.

    Bisection on the accountant (epsilon falls monotonically as sigma grows); the result
    always meets the target. 0 rounds (or q = 0) need no noise: 0.0.
    """
    target_epsilon = check_target_epsilon(target_epsilon)
    rounds, q, delta = _check_rounds(rounds), _check_rate(q), check_delta(delta)
    if rounds == 0 or q == 0:
        return 0.0
    spent = functools.partial(epsilon_spent, rounds, q, delta=delta)
    if spent(MAX_NOISE_MULTIPLIER) > target_epsilon:
        raise ConfigError(f"target_epsilon={target_epsilon:g} is out of reach over {rounds} rounds at q={q:g} "
                          f"(even dp_noise_multiplier={MAX_NOISE_MULTIPLIER:g} spends more): raise target_epsilon or "
                          f"dp_delta, or plan fewer rounds{' or fewer clients_per_round' if q < 1 else ''}")
    hi = 1.0  # bracket [lo, hi] with spent(lo) > target >= spent(hi)
    while spent(hi) > target_epsilon:
        hi *= 2.0
    lo = hi / 2.0
    while spent(lo) <= target_epsilon:
        lo, hi = lo / 2.0, lo
        if lo < 1e-6:  # a target this loose is met by (almost) no noise; sigma must still be > 0
            return hi
    while hi - lo > NOISE_RTOL * hi:
        mid = (lo + hi) / 2.0
        if spent(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def local_epsilon(rounds: int, noise_multiplier: float, delta: float = DEFAULT_DELTA) -> float:
    """Local DP: one client's epsilon after releasing ``rounds`` noisy updates (``privatize_local``).

    No subsampling amplification (q = 1: the server sees the client's own update), and the
    neighbours are any two clipped updates, up to 2C apart: the Gaussian mechanism with noise
    sigma C at sensitivity 2C, i.e. noise multiplier sigma / 2. ``rounds`` counts the rounds
    the client took part in (the run's rounds bound it).
    """
    rounds, noise_multiplier = _check_rounds(rounds), check_noise_multiplier(noise_multiplier)
    return epsilon_spent(rounds, 1.0, noise_multiplier / 2.0, delta)


def local_noise_for_target_epsilon(target_epsilon: float, rounds: int, delta: float = DEFAULT_DELTA) -> float:
    """The smallest sigma for ``privatize_local`` whose ``local_epsilon`` over ``rounds`` meets the target."""
    return 2.0 * noise_for_target_epsilon(target_epsilon, rounds, 1.0, delta)


@dataclass
class Accountant:
    """The privacy a run has spent: step once per aggregate the server releases.

    Its state is the number of rounds composed; epsilon is recomputed from it, so a
    checkpoint stores ``state_dict()`` (JSON-friendly) and a resumed run ``load_state_dict``s
    it. In local mode ``epsilon`` is the worst case of a client that took part every round.
    A round whose aggregate was never released (a failed attempt) is not stepped.
    """

    q: float
    noise_multiplier: float
    delta: float = DEFAULT_DELTA
    mode: str = "central"
    rounds: int = 0

    def __post_init__(self) -> None:
        self.q, self.delta = _check_rate(self.q), check_delta(self.delta)
        self.noise_multiplier, self.mode = check_noise_multiplier(self.noise_multiplier), check_mode(self.mode)
        self.rounds = _check_rounds(self.rounds)

    def step(self, rounds: int = 1) -> float:
        """Compose ``rounds`` more rounds; returns the epsilon spent so far."""
        self.rounds += _check_rounds(rounds)
        return self.epsilon

    @property
    def epsilon(self) -> float:
        if self.mode == "local":
            return local_epsilon(self.rounds, self.noise_multiplier, self.delta)
        return epsilon_spent(self.rounds, self.q, self.noise_multiplier, self.delta)

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "q": self.q, "noise_multiplier": self.noise_multiplier,
                "delta": self.delta, "mode": self.mode}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take the rounds a checkpoint composed; its q, sigma and mode must be this run's (delta may differ)."""
        for key in ("q", "noise_multiplier", "mode"):
            if state[key] != getattr(self, key):
                raise CheckpointError(f"the checkpoint's privacy accounting used {key}={state[key]!r}, this run has "
                                      f"{getattr(self, key)!r}: resume with the same dp settings and clients_per_round")
        self.rounds = _check_rounds(int(state["rounds"]))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], delta: float | None = None) -> Accountant:
        return cls(q=state["q"], noise_multiplier=state["noise_multiplier"],
                   delta=state["delta"] if delta is None else delta, mode=state["mode"], rounds=int(state["rounds"]))


# ------------------------------------------------------------------ central DP: clip, expected counts, noisy mean
def update_norm(delta: Mapping[str, Tensor]) -> float:
    """The L2 norm of a whole update, over all its tensors, in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for t in delta.values():
        total += t.detach().to(torch.float64).pow(2).sum()
    return float(total.sqrt())


def clip_delta(delta: Mapping[str, Tensor], clip: float) -> tuple[dict[str, Tensor], float, float]:
    """Scale a client's whole update to L2 norm <= ``clip``: (clipped float64 tensors, original norm, scale).

    One norm over every tensor the client sends (all its pairs and heads), so the bound holds
    for the update as a whole; scale = min(1, clip / norm) (1 for a zero update). The tensors
    come back in float64, the dtype the server sums in.
    """
    clip = check_clip(clip)
    norm = update_norm(delta)
    if not math.isfinite(norm):
        raise UpdateRejected("a client update with a non-finite value cannot be clipped: reject it before aggregation")
    scale = 1.0 if norm <= clip else clip / norm
    return {k: t.detach().to(torch.float64) * scale for k, t in delta.items()}, norm, scale


_SELECTIONS = {"random": "random", "shared": "random", "per_layer": "random",
               "leading": "leading", "fixed": "leading", "everyone": "everyone"}


def expected_pair_counts(clients_per_round: int, rank: int, budgets: Sequence[int],
                         shares: Sequence[float] | None = None, selection: str = "random") -> Tensor:
    """Expected number of sampled clients that train each pair index 0..R-1 (float64, shape (R,)).

    ``budgets`` are the rank groups' budgets (capped at ``rank``, as the methods do) and
    ``shares`` their shares of the clients (default equal; pass the actual number of clients
    per group for the exact value). ``selection``:

    * ``random`` (Fed-PLoRA's ``shared`` / ``per_layer``): a rank-r client trains each pair with
      probability r/R, so every pair expects ``m * sum_g p_g r_g / R``;
    * ``leading`` (``fixed``, HetLoRA): pair j is trained by the clients with r > j;
    * ``everyone`` (FedIT ideal, or ``aggregate_over = "all"``): every sampled client counts, m.

    These are fixed in advance, so dividing by them is post-processing (module docstring).
    A budget that fluctuates by a seeded draw only makes them slightly biased, never less private.
    """
    if not _integer(clients_per_round) or clients_per_round < 1:
        raise ConfigError(f"clients_per_round must be an integer >= 1, got {clients_per_round!r}")
    if not _integer(rank) or rank < 1:
        raise ConfigError(f"rank must be an integer >= 1, got {rank!r}")
    if selection not in _SELECTIONS:
        raise ConfigError(f"selection must be one of {', '.join(_SELECTIONS)}, got {selection!r}")
    if not budgets or any(not _integer(b) or b < 1 for b in budgets):
        raise ConfigError(f"ranks: every rank budget must be an integer >= 1, got {list(budgets)!r}")
    shares = [1.0] * len(budgets) if shares is None else [float(s) for s in shares]
    if len(shares) != len(budgets) or any(s < 0 for s in shares) or sum(shares) <= 0:
        raise ConfigError(f"rank_shares: need one share >= 0 per rank group ({len(budgets)}), not all 0, "
                          f"got {shares!r}")
    m, rank = float(clients_per_round), int(rank)
    p = [s / sum(shares) for s in shares]
    r = [min(int(b), rank) for b in budgets]
    kind = _SELECTIONS[selection]
    if kind == "everyone":
        return torch.full((rank,), m, dtype=torch.float64)
    if kind == "random":
        return torch.full((rank,), m * sum(pg * rg for pg, rg in zip(p, r)) / rank, dtype=torch.float64)
    return torch.tensor([m * sum(pg for pg, rg in zip(p, r) if rg > j) for j in range(rank)], dtype=torch.float64)


def pair_divisors(keys: Sequence[str], pair_counts: Tensor, head_count: float) -> dict[str, Tensor]:
    """Each state key's divisor for ``noisy_pair_mean``: a layer's A (R, in) divides row j by
    ``pair_counts[j]``, its B (out, R) column j; any other key (a head) by ``head_count``
    (every sampled client trains the heads: clients_per_round)."""
    counts = torch.as_tensor(pair_counts, dtype=torch.float64)
    out = {}
    for key in keys:
        if key.endswith(A_SUFFIX):
            out[key] = counts[:, None]
        elif key.endswith(B_SUFFIX):
            out[key] = counts[None, :]
        else:
            out[key] = torch.tensor(float(head_count), dtype=torch.float64)
    return out


def noisy_pair_mean(sums: Mapping[str, Tensor], expected_counts: Mapping[str, Tensor | float] | float,
                    noise_std: float, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """(sum + N(0, noise_std^2) per coordinate) / expected count, in float64.

    ``sums`` are the unweighted sums over the round's clients of their ``clip_delta``-ed
    updates; ``noise_std`` is sigma * C (``dp_noise_multiplier * dp_clip``). ``expected_counts``
    is one number for every tensor, or per key a number or a tensor that broadcasts to that
    sum (``pair_divisors``). Where the expected count is 0 no client can train the coordinate:
    its sum must be 0 and its mean is 0 (nothing is released there, so no noise). Noise is
    drawn key by key in sorted order from ``generator``: the same seed gives the same noise.
    """
    noise_std = float(noise_std)
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ConfigError(f"the noise std (dp_noise_multiplier * dp_clip) must be finite and >= 0, got {noise_std!r}")
    if noise_std > 0 and generator is None:
        raise ValueError("noisy_pair_mean needs a torch.Generator to draw noise from (seeded: reproducible runs)")
    out = {}
    for key in sorted(sums):
        total = sums[key].detach().to(torch.float64)
        count = expected_counts if not isinstance(expected_counts, Mapping) else expected_counts[key]
        count = torch.as_tensor(count, dtype=torch.float64)
        try:
            count = torch.broadcast_to(count, total.shape)
        except RuntimeError:
            raise ValueError(f"{key}: expected count of shape {tuple(count.shape)} does not broadcast to its sum "
                             f"{tuple(total.shape)}") from None
        if (count < 0).any() or not torch.isfinite(count).all():
            raise ValueError(f"{key}: expected counts must be finite and >= 0")
        none = count == 0
        if (total[none] != 0).any():
            raise ValueError(f"{key}: a coordinate whose expected count is 0 has a nonzero sum: the expected "
                             "counts do not match who can train it")
        if noise_std > 0:
            total = total + noise_std * torch.randn(total.shape, dtype=torch.float64, generator=generator)
        out[key] = torch.where(none, torch.zeros((), dtype=torch.float64), total / torch.where(none, 1.0, count))
    return out


@dataclass(frozen=True)
class CentralDP:
    """A method's central-DP option: the clip C, the resolved sigma and the budget profile the fixed divisors
    come from (``expected_pair_counts``): the run's ``clients_per_round``, its rank groups' budgets and their
    shares of the clients (the exact group sizes, or the declared shares). The method decides the selection."""

    clip: float
    noise_multiplier: float
    clients_per_round: int
    budgets: tuple[int, ...]
    shares: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_clip(self.clip)
        check_noise_multiplier(self.noise_multiplier)

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip

    def pair_counts(self, rank: int, selection: str, budgets: Sequence[int] | None = None,
                    shares: Sequence[float] | None = None) -> Tensor:
        """``expected_pair_counts`` for this profile (or the given ``budgets``/``shares``, e.g. FedIT's one rank)."""
        if budgets is None:
            budgets, shares = self.budgets, self.shares
        return expected_pair_counts(self.clients_per_round, rank, list(budgets), shares, selection)


# ------------------------------------------------------------------ local DP
def privatize_local(delta: Mapping[str, Tensor], clip: float, noise_multiplier: float,
                    generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Client side, before upload: clip the whole update to ``clip`` and add N(0, (sigma clip)^2) to each coordinate.

    Computed in float64, returned in each tensor's own dtype (the upload's). Accounting is the
    client's own (``local_epsilon``). Do not send the pre-clip norm: it is not protected.
    """
    noise_multiplier = check_noise_multiplier(noise_multiplier)
    clipped, _, _ = clip_delta(delta, clip)
    if noise_multiplier > 0 and generator is None:
        raise ValueError("privatize_local needs a torch.Generator to draw noise from")
    std = noise_multiplier * float(clip)
    out = {}
    for key in sorted(clipped):
        t = clipped[key]
        if std > 0:
            t = t + std * torch.randn(t.shape, dtype=torch.float64, generator=generator)
        out[key] = t.to(delta[key].dtype)
    return {k: out[k] for k in delta}


__all__ = [
    "DEFAULT_DELTA", "MODES", "ORDERS", "Accountant", "CentralDP", "check_clip", "check_delta", "check_dp_settings", "check_mode",
    "check_noise_multiplier", "check_target_epsilon", "clip_delta", "epsilon_spent", "expected_pair_counts",
    "local_epsilon", "local_noise_for_target_epsilon", "noise_for_target_epsilon", "noisy_pair_mean", "pair_divisors",
    "privatize_local", "resolve_noise_multiplier", "update_norm",
]
