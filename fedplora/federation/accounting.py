"""The run's privacy: the noise it adds and what that spends (docs/robustness.md, "Differential privacy").

Kept beside the round loop, not in it: the strategy tells the ledger when a client is asked for a noisy upload
(local DP) and when an aggregate is released (central DP); the ledger answers how much epsilon is spent and
what a checkpoint must keep to continue the count exactly.
"""

from __future__ import annotations

import functools
from typing import Any

from ..config import RunConfig
from ..errors import CheckpointError
from ..privacy import Accountant, CentralDP, local_epsilon, resolve_noise_multiplier
from .heterogeneity import group_sizes


@functools.lru_cache(maxsize=16)
def _resolve_noise(noise_multiplier, target_epsilon, rounds, q, delta, mode) -> float:
    return resolve_noise_multiplier(noise_multiplier, target_epsilon, rounds, q, delta, mode)


def dp_noise_multiplier(cfg: RunConfig) -> float | None:
    """The run's sigma, resolved once per process: ``dp_noise_multiplier``, or the one ``target_epsilon`` chooses
    for the planned ``rounds`` at q = clients_per_round / num_clients (central) or q = 1 (local); None when off."""
    if cfg.dp_mode == "off":
        return None
    return _resolve_noise(cfg.dp_noise_multiplier, cfg.target_epsilon, cfg.rounds,
                          cfg.clients_per_round / cfg.num_clients, cfg.dp_delta, cfg.dp_mode)


def central_dp(cfg: RunConfig) -> CentralDP:
    """Central DP's settings under ``dp_mode = "central"``: clip, sigma and the declared budget profile (the exact
    group sizes of ``ranks``/``rank_shares`` over ``num_clients``, as the simulation assigns them)."""
    return CentralDP(clip=cfg.dp_clip, noise_multiplier=dp_noise_multiplier(cfg),
                     clients_per_round=cfg.clients_per_round, budgets=tuple(cfg.ranks),
                     shares=tuple(float(n) for n in group_sizes(cfg.num_clients, cfg.rank_shares)))


class PrivacyLedger:
    """Epsilon spent so far at ``dp_delta``. Central: the accountant's (one step per released aggregate). Local:
    the worst client's, over the noisy uploads it was asked for (every attempt it was sent work in)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.mode = cfg.dp_mode
        self.accountant: Accountant | None = None
        self.uploads: dict[int, int] = {}  # local DP: cid -> noisy uploads it was asked for
        if cfg.dp_mode != "off":
            self.accountant = Accountant(q=cfg.clients_per_round / cfg.num_clients,
                                         noise_multiplier=dp_noise_multiplier(cfg), delta=cfg.dp_delta,
                                         mode=cfg.dp_mode)

    def asked(self, cid: int) -> None:
        """Local DP: the client was sent work, so it may upload a noisy update (counted whether or not it arrives)."""
        if self.mode == "local":
            self.uploads[cid] = self.uploads.get(cid, 0) + 1

    def released(self) -> None:
        """An aggregate replaced the global state: one accountant step."""
        if self.accountant is not None:
            self.accountant.step()

    def epsilon(self) -> float | None:
        if self.accountant is None:
            return None
        if self.mode == "central":
            return self.accountant.epsilon
        return max((self.client_epsilon(c) for c in self.uploads), default=0.0)

    def client_epsilon(self, cid: int) -> float:
        """Local DP: client ``cid``'s epsilon (``privacy.local_epsilon`` over its uploads)."""
        acc = self.accountant
        return local_epsilon(self.uploads.get(cid, 0), acc.noise_multiplier, acc.delta)

    def state_dict(self) -> dict[str, Any] | None:
        """What a checkpoint keeps of the accounting (JSON), or None when dp_mode is off."""
        if self.accountant is None:
            return None
        return {"accountant": self.accountant.state_dict(),
                "uploads": {str(c): n for c, n in sorted(self.uploads.items())}}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue a checkpoint's privacy count exactly (a resumed run)."""
        if self.accountant is None:
            return
        if state is None:
            raise CheckpointError(f"the checkpoint has no privacy accounting, and this run has dp_mode={self.mode}: "
                                  "resume it with the settings it started with")
        self.accountant.load_state_dict(state["accountant"])
        self.uploads = {int(c): int(n) for c, n in state["uploads"].items()}
