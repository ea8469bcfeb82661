"""A Flower strategy for heterogeneous-rank LoRA: one message per client, the method's own aggregation.

Flower's FedAvg shares one RecordDict among all messages and rejects replies
whose keys differ; here each client gets its own task (its pairs, its rank) and
the reply is validated and aggregated by the method core. The strategy keeps the
global state between rounds (``aggregate_train`` is not handed it by Flower).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..config import RunConfig
from ..measure import aggregation_noise, init_noise, nbytes
from ..methods import ClientInfo, ClientTask, FederatedMethod, UpdateRejected
from ..methods.base import State
from .messages import read_update, task_content


@dataclasses.dataclass
class RoundRecord:
    """What happened in one round, for the history."""

    round: int
    clients: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    failures: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    init_noise: float = 0.0
    agg_noise: float = 0.0
    agg_s: float = 0.0
    train_loss: float | None = None
    aggregated: bool = False


class HeteroLoRAStrategy(Strategy):
    def __init__(self, method: FederatedMethod, cfg: RunConfig, state: State) -> None:
        self.method = method
        self.cfg = cfg
        self.state = state
        self.setup = cfg.to_dict()
        self.nodes: dict[int, int] = {}  # client id -> Flower node id
        self._pending: dict[int, tuple[int, ClientTask]] = {}  # message dst node -> (cid, task)
        self.record = RoundRecord(round=0)

    # ------------------------------------------------------------ discovery
    def discover(self, grid: Grid, timeout: float) -> dict[int, int]:
        """Wait for the clients to connect and learn which node holds which client id."""
        deadline = time.monotonic() + timeout
        while len(node_ids := list(grid.get_node_ids())) < self.cfg.num_clients:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(node_ids)} of num_clients={self.cfg.num_clients} nodes connected "
                                   f"within {timeout:.0f}s")
            time.sleep(0.5)
        replies = grid.send_and_receive([self._query(n, 0) for n in node_ids], timeout=timeout)
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed to answer: {reply.error.reason}")
            cid = int(reply.content["info"]["cid"])
            if cid in self.nodes:
                raise RuntimeError(f"two nodes claim client id (partition-id) {cid}")
            self.nodes[cid] = reply.metadata.src_node_id
        return self.nodes

    def _query(self, node_id: int, server_round: int) -> Message:
        content = RecordDict({"config": ConfigRecord({"setup": _json(self.setup), "round": server_round})})
        return Message(content=content, message_type="query", dst_node_id=node_id)

    def sample(self, server_round: int) -> list[int]:
        """Client ids for this round: seeded, so runs with one seed sample the same clients."""
        cids = sorted(self.nodes)
        k = min(self.cfg.clients_per_round, len(cids))
        rng = np.random.default_rng([self.cfg.seed, server_round, 1])
        return sorted(int(c) for c in rng.choice(cids, size=k, replace=False))

    def client_infos(self, grid: Grid, server_round: int, cids: list[int]) -> list[ClientInfo]:
        """Ask the sampled clients for this round's budget (it may change between rounds)."""
        replies = grid.send_and_receive([self._query(self.nodes[c], server_round) for c in cids],
                                        timeout=self.cfg.round_timeout)
        by_node = {v: k for k, v in self.nodes.items()}
        infos = []
        for reply in replies:
            cid = by_node.get(reply.metadata.src_node_id)
            if reply.has_error():
                self.record.failures.append({"cid": cid, "stage": "query", "reason": reply.error.reason})
                continue
            info = reply.content["info"]
            infos.append(ClientInfo(cid=int(info["cid"]), budget=int(info["budget"]),
                                    num_samples=int(info["num-examples"])))
        answered = {i.cid for i in infos} | {f["cid"] for f in self.record.failures}
        for cid in cids:
            if cid not in answered:
                self.record.failures.append({"cid": cid, "stage": "query", "reason": "no reply within the timeout"})
        return sorted(infos, key=lambda i: i.cid)

    # ------------------------------------------------------------ Flower's strategy interface
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.record = RoundRecord(round=server_round)
        infos = self.client_infos(grid, server_round, self.sample(server_round))
        messages, self._pending = [], {}
        for info in infos:
            task = self.method.configure_client(self.state, info, server_round)
            node = self.nodes[info.cid]
            self._pending[node] = (info.cid, task)
            messages.append(Message(content=task_content(task, self.setup, server_round),
                                    message_type="train", dst_node_id=node))
            self.record.bytes_down += nbytes(task.arrays)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rec = self.record
        tasks, updates, accepted, losses = [], [], [], []
        seen = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in self._pending:
                continue
            cid, task = self._pending[node]
            seen.add(node)
            if reply.has_error():
                rec.failures.append({"cid": cid, "stage": "train", "reason": reply.error.reason})
                continue
            try:
                update, metrics = read_update(reply.content)
                rec.bytes_up += nbytes(update.arrays)
                self.method.validate_update(task, update, self.state, self.cfg.max_update_norm)
            except (UpdateRejected, ValueError, KeyError, TypeError) as e:
                rec.failures.append({"cid": cid, "stage": "validate", "reason": str(e)})
                continue
            tasks.append(task)
            updates.append(update)
            losses.append(metrics.get("train_loss"))
            accepted.append({"cid": cid, "rank": int(task.config.get("rank", self.method.rank)),
                             "budget": int(metrics.get("budget", 0)), "trained_pairs": int(metrics.get("trained-pairs", 0)),
                             "num_samples": update.num_samples, "bytes_down": nbytes(task.arrays),
                             "bytes_up": nbytes(update.arrays), "train_loss": metrics.get("train_loss")})
        for node, (cid, _) in self._pending.items():
            if node not in seen:
                rec.failures.append({"cid": cid, "stage": "train", "reason": "no reply within the timeout"})
        # replies arrive in any order; aggregate in client-id order so float sums are reproducible
        order = sorted(range(len(accepted)), key=lambda k: accepted[k]["cid"])
        tasks, updates = [tasks[k] for k in order], [updates[k] for k in order]
        losses, accepted = [losses[k] for k in order], [accepted[k] for k in order]
        rec.failures.sort(key=lambda f: (f["cid"] is None, f["cid"] or 0, f["stage"]))
        rec.clients = accepted
        if len(updates) < self.cfg.min_replies:
            rec.failures.append({"cid": None, "stage": "round",
                                 "reason": f"only {len(updates)} valid replies, min_replies={self.cfg.min_replies}: "
                                           "round skipped, global state unchanged"})
            return None, None
        t0 = time.perf_counter()
        new_state = self.method.aggregate(self.state, tasks, updates)
        rec.agg_s = time.perf_counter() - t0
        weights = self.method.client_weights(updates)
        g_old = self.method.global_factors(self.state)
        rec.init_noise = float(np.mean([init_noise(g_old, self.method.client_start_factors(t)) for t in tasks]))
        rec.agg_noise = aggregation_noise(weights, [self.method.client_end_factors(t, u) for t, u in zip(tasks, updates)],
                                          self.method.global_factors(new_state))
        rec.train_loss = float(np.average([l for l in losses], weights=weights)) if None not in losses else None
        rec.aggregated = True
        self.state = new_state  # only now: a failed aggregation leaves the old state in place
        return None, MetricRecord({"bytes-up": rec.bytes_up, "bytes-down": rec.bytes_down})

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # the global model is evaluated centrally on the server's held-out split

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        pass


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj)
