"""One round's line in a run's history: who took part, what crossed the wire, what was measured.

Kept apart from the round loop (``strategy.py``) so that a reader of the loop sees control flow only, and so that
plain and secure rounds describe a client with one function (``client_line``) and measure noise with one
(``measure_round``; a secure round has no per-client update, so its aggregation noise is None).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..measure import aggregation_noise, init_noise, paper_aggregation_noise, paper_init_noise
from ..methods import ClientTask, ClientUpdate, FederatedMethod
from ..state import State

TIMINGS = ("wall_s", "agg_s", "measure_s", "eval_s", "train_s", "client_s")  # clock readings in a history
UNAVAILABLE = "secure aggregation: the server never holds an individual client's update"


def untimed(entry: dict[str, Any]) -> dict[str, Any]:
    """A history entry without its clock readings (its own and its clients'): what two runs of one seed share."""
    out = {k: v for k, v in entry.items() if k not in TIMINGS}
    if "clients" in out:
        out["clients"] = [{k: v for k, v in c.items() if k not in TIMINGS} for c in out["clients"]]
    return out


def noise_entry(init_fn: float, agg_fn: float | None, init_paper: float, agg_paper: float | None
                ) -> dict[str, float | None]:
    """A round's noise keys (``measure.NOISE_KEYS``); ``init_noise``/``agg_noise`` repeat the function-level
    figures under the names histories used before the paper's were added, for readers of those."""
    return {"fn_init_noise": init_fn, "fn_agg_noise": agg_fn, "paper_init_noise": init_paper,
            "paper_agg_noise": agg_paper, "init_noise": init_fn, "agg_noise": agg_fn}


def client_line(cid: int, rank: int, metrics: dict[str, Any], num_samples: int | None, bytes_down: int,
                bytes_up: int, strict: bool = True) -> dict[str, Any]:
    """A client's line in the round's history from what it reported (its reply's metrics) and what crossed.

    ``strict`` (a plain round): a metric that cannot be read raises, which rejects the reply. A secure round's
    metrics arrive in the clear beside a masked upload that is already summed, so there an unreadable metric is
    recorded as None instead (and the server holds no update to take a norm of)."""
    def number(key: str, cast=float, default=None):
        value = metrics.get(key, default)
        if strict:
            return None if value is None else cast(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
        return cast(value) if ok else None

    line = {"cid": cid, "rank": rank, "budget": number("budget", int, 0 if strict else None),
            "trained_pairs": number("trained_pairs", int, 0 if strict else None), "num_samples": num_samples,
            "bytes_down": bytes_down, "bytes_up": bytes_up, "train_loss": number("train_loss"),
            "train_s": number("train_s", float, 0.0) or 0.0, "client_s": number("client_s", float, 0.0) or 0.0}
    if not strict:
        line.update(secure_clipped=number("secure_clipped", int), delta_norm=None)
    return line


@dataclasses.dataclass
class Accepted:
    """A reply that passed every check: who sent it, for which task, and what it reported."""

    cid: int
    task: ClientTask
    update: ClientUpdate
    metrics: dict[str, Any]
    client: dict[str, Any] | None = None  # its line in the round's history (``client_line``)

    @property
    def loss(self) -> float | None:
        return float(self.metrics["train_loss"]) if "train_loss" in self.metrics else None


@dataclasses.dataclass
class RoundRecord:
    """What happened in one round, for the history."""

    round: int
    clients: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    failures: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    # noise, two families (docs/method.md, "Measurements"): function level, and the paper's definitions
    fn_init_noise: float = 0.0
    fn_agg_noise: float | None = 0.0  # None: not measurable (secure aggregation)
    paper_init_noise: float = 0.0
    paper_agg_noise: float | None = 0.0
    agg_s: float = 0.0
    measure_s: float = 0.0
    train_loss: float | None = None
    aggregated: bool = False
    attempts: int = 1
    # the sampled clients that are Byzantine (attacks.py): for measuring an aggregator, which never sees it
    attackers: list[int] = dataclasses.field(default_factory=list)
    dp_epsilon: float | None = None  # the privacy spent after this round (dp_mode on only)
    # secure aggregation (secure.py): the server held only the sum; agg noise is then None (noise_unavailable)
    secure: bool = False
    dropouts: list[int] = dataclasses.field(default_factory=list)  # clients that left the SecAgg+ protocol

    def fail(self, cid: int | None, stage: str, reason: str, node: int | None = None) -> None:
        """Who failed, at which stage, why; ``attempt`` counts retries of the round from 0. ``node``: the Flower node,
        named only where no client id is known (a node left out at its first query, ``roster.py``)."""
        entry = {"cid": cid, "stage": stage, "reason": reason, "attempt": self.attempts - 1}
        if node is not None:
            entry["node"] = node
        self.failures.append(entry)

    def measured(self, noise: dict[str, float | None], losses: list[float | None], weights: list[float]) -> None:
        """The round's noise figures and its clients' weighted train loss (None when one did not report it)."""
        self.fn_init_noise, self.fn_agg_noise = noise["fn_init_noise"], noise["fn_agg_noise"]
        self.paper_init_noise, self.paper_agg_noise = noise["paper_init_noise"], noise["paper_agg_noise"]
        self.train_loss = float(np.average(losses, weights=weights)) if losses and None not in losses else None

    def entry(self) -> dict[str, Any]:
        """The round's history entry (metrics and wall time are added by the server loop)."""
        entry = {"round": self.round, "metrics": {}, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                 **noise_entry(self.fn_init_noise, self.fn_agg_noise, self.paper_init_noise, self.paper_agg_noise),
                 "agg_s": self.agg_s, "measure_s": self.measure_s,
                 "train_loss": self.train_loss, "aggregated": self.aggregated, "attempts": self.attempts,
                 "clients": self.clients, "failures": self.failures, "attackers": self.attackers}
        if self.dp_epsilon is not None:
            entry["dp_epsilon"] = self.dp_epsilon
        if self.secure:
            entry.update(secure=True, survivors=len(self.clients), dropouts=self.dropouts,
                         noise_unavailable={"fn_agg_noise": UNAVAILABLE, "paper_agg_noise": UNAVAILABLE,
                                            "agg_noise": UNAVAILABLE})
        return entry


def measure_round(method: FederatedMethod, old: State, tasks: list[ClientTask],
                  new: State | None = None, updates: list[ClientUpdate] | None = None) -> dict[str, float | None]:
    """The round's noise figures, both families (docs/method.md, "Measurements").

    Function level: mean over clients of ||dW_global - dW_start||_F and ||sum_i w_i B_i A_i - B A||_F. The
    paper's: sum over clients of ||A - A_i||_F + ||B - B_i||_F, and ||dW* - B A||_F (the method's dW*). Without
    the clients' updates (a secure round) the aggregation figures are None.
    """
    g_old = method.global_factors(old)
    out: dict[str, float | None] = {
        "fn_init_noise": float(np.mean([init_noise(g_old, method.client_start_factors(t)) for t in tasks])),
        "paper_init_noise": paper_init_noise(method.global_pairs(old), [method.client_start_pairs(t) for t in tasks]),
        "fn_agg_noise": None, "paper_agg_noise": None}
    if updates is not None and new is not None:
        g_new = method.global_factors(new)
        out["fn_agg_noise"] = aggregation_noise(
            method.client_weights(updates), [method.client_end_factors(t, u) for t, u in zip(tasks, updates)], g_new)
        out["paper_agg_noise"] = paper_aggregation_noise(method.paper_ideal_factors(old, tasks, updates), g_new)
    return out
