"""A Flower strategy for heterogeneous-rank LoRA: one message per client, the method's own aggregation.

It keeps Flower's ``Strategy`` contract: ``start()`` owns the round loop (as in FedAvg, with a
central ``evaluate_fn``), ``configure_train`` turns the global ``ArrayRecord`` into messages and
``aggregate_train`` turns replies into the next one. What differs from FedAvg: each client gets
its own task (its pairs, its rank) instead of one shared RecordDict, the budget of each sampled
client is asked first, and every reply is checked before the method core aggregates it.
Reading order: ``start`` -> ``configure_train`` -> ``aggregate_train`` -> ``collect`` ->
``check_reply`` -> ``measure``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from .. import rng
from ..config import RunConfig
from ..measure import aggregation_noise, init_noise, nbytes, paper_aggregation_noise, paper_init_noise
from ..methods import ClientInfo, ClientTask, ClientUpdate, FederatedMethod, UpdateRejected
from ..methods.base import State
from ..privacy import update_norm
from . import attacks
from .messages import read_update, secure_fitins, task_content
from .secure import UNAVAILABLE, secure_noise, secure_round, unmasked_sums


def state_to_arrays(state: State) -> ArrayRecord:
    """The global state as Flower's ArrayRecord (exact: the bytes of each tensor, its dtype and shape)."""
    return ArrayRecord(torch_state_dict={k: v.detach().cpu().contiguous() for k, v in state.items()})


def arrays_to_state(arrays: ArrayRecord) -> State:
    return dict(arrays.to_torch_state_dict())


@contextlib.contextmanager
def one_thread():
    """Torch on one thread inside the block (a resumed run must repeat the same float sums, bit for bit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclasses.dataclass
class Accepted:
    """A reply that passed every check: who sent it, for which task, and what it reported."""

    cid: int
    task: ClientTask
    update: ClientUpdate
    metrics: dict[str, Any]
    client: dict[str, Any] | None = None  # its line in the round's history (``describe``)

    @property
    def loss(self) -> float | None:
        return float(self.metrics["train_loss"]) if "train_loss" in self.metrics else None

    def describe(self, global_rank: int) -> dict[str, Any]:
        return {"cid": self.cid, "rank": int(self.task.config.get("rank", global_rank)),
                "budget": int(self.metrics.get("budget", 0)), "trained_pairs": int(self.metrics.get("trained-pairs", 0)),
                "num_samples": self.update.num_samples, "bytes_down": nbytes(self.task.arrays),
                "bytes_up": nbytes(self.update.arrays), "train_loss": self.loss,
                "train_s": float(self.metrics.get("train_s", 0.0)), "client_s": float(self.metrics.get("client-s", 0.0))}


def noise_entry(init_fn: float, agg_fn: float | None, init_paper: float, agg_paper: float | None
                ) -> dict[str, float | None]:
    """A round's noise keys (``measure.NOISE_KEYS``); ``init_noise``/``agg_noise`` repeat the function-level
    figures under the names histories used before the paper's were added, for readers of those."""
    return {"fn_init_noise": init_fn, "fn_agg_noise": agg_fn, "paper_init_noise": init_paper,
            "paper_agg_noise": agg_paper, "init_noise": init_fn, "agg_noise": agg_fn}


TIMINGS = ("wall_s", "agg_s", "measure_s", "eval_s", "train_s", "client_s")  # clock readings in a history


def untimed(entry: dict[str, Any]) -> dict[str, Any]:
    """A history entry without its clock readings (its own and its clients'): what two runs of one seed share."""
    out = {k: v for k, v in entry.items() if k not in TIMINGS}
    if "clients" in out:
        out["clients"] = [{k: v for k, v in c.items() if k not in TIMINGS} for c in out["clients"]]
    return out


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

    def fail(self, cid: int | None, stage: str, reason: str) -> None:
        """Who failed, at which stage, why; ``attempt`` counts retries of the round from 0."""
        self.failures.append({"cid": cid, "stage": stage, "reason": reason, "attempt": self.attempts - 1})

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


class HeteroLoRAStrategy(Strategy):
    """``progress``: where the loop reports what it is doing (``Progress``), or None."""

    def __init__(self, method: FederatedMethod, cfg: RunConfig, progress=None) -> None:
        self.method = method
        self.cfg = cfg
        self.progress = progress
        self.state: State = {}  # the global state of the round being configured (from ``arrays``)
        self.history: list[dict[str, Any]] = []
        self.setup = json.dumps(cfg.to_dict())  # the run's settings, encoded once for every message
        self.nodes: dict[int, int] = {}  # client id -> Flower node id
        self._pending: dict[int, tuple[int, ClientTask]] = {}  # message dst node -> (cid, task)
        self._declared: dict[int, int] = {}  # cid -> the example count its query declared this attempt
        self.record = RoundRecord(round=0)
        attacks.check_task(cfg)  # an attack the task cannot carry is refused before the first round
        self.attackers = attacks.attackers(cfg)  # for the history only; aggregation never reads it
        self.accountant, self.dp_uploads = self._accountant(cfg), {}  # cid -> noisy uploads it was asked for
        self.state_arrays: ArrayRecord | None = None  # secure aggregation: the global arrays of the round
        self.counting = None  # secure aggregation: the attempt's CountingGrid (payload per node)

    # ------------------------------------------------------------ differential privacy
    def _accountant(self, cfg: RunConfig):
        """The run's privacy accountant (None when dp_mode is off); sigma is resolved here, once per run."""
        if cfg.dp_mode == "off":
            return None
        from ..privacy import Accountant
        from .client_app import dp_noise_multiplier

        sigma, dp = dp_noise_multiplier(cfg), getattr(self.method, "dp", None)
        if cfg.dp_mode == "central" and (dp is None or (dp.clip, dp.noise_multiplier) != (cfg.dp_clip, sigma)):
            raise ValueError("dp_mode central: the method was not built with this run's dp option "
                             "(use method_options(cfg)); the accountant must count the noise actually added")
        return Accountant(q=cfg.clients_per_round / cfg.num_clients, noise_multiplier=sigma, delta=cfg.dp_delta,
                          mode=cfg.dp_mode)

    def dp_epsilon(self) -> float | None:
        """Epsilon spent so far at dp_delta. Central: the accountant's (one step per released aggregate). Local:
        the worst client's, over the noisy uploads it was asked for (every attempt it was sent work in)."""
        if self.accountant is None:
            return None
        if self.cfg.dp_mode == "central":
            return self.accountant.epsilon
        return max((self.client_epsilon(c) for c in self.dp_uploads), default=0.0)

    def client_epsilon(self, cid: int) -> float:
        """Local DP: client ``cid``'s epsilon (``privacy.local_epsilon`` over its uploads)."""
        from ..privacy import local_epsilon

        acc = self.accountant
        return local_epsilon(self.dp_uploads.get(cid, 0), acc.noise_multiplier, acc.delta)

    def privacy_state(self) -> dict[str, Any] | None:
        """What a checkpoint keeps of the privacy accounting (JSON), or None when dp_mode is off."""
        if self.accountant is None:
            return None
        return {"accountant": self.accountant.state_dict(),
                "uploads": {str(c): n for c, n in sorted(self.dp_uploads.items())}}

    def load_privacy_state(self, state: dict[str, Any] | None) -> None:
        """Continue a checkpoint's privacy count exactly (a resumed run)."""
        from ..errors import CheckpointError

        if self.accountant is None:
            return
        if state is None:
            raise CheckpointError(f"the checkpoint has no privacy accounting, and this run has dp_mode="
                                  f"{self.cfg.dp_mode}: resume it with the settings it started with")
        self.accountant.load_state_dict(state["accountant"])
        self.dp_uploads = {int(c): int(n) for c, n in state["uploads"].items()}

    # ------------------------------------------------------------ discovery
    def discover(self, grid: Grid, timeout: float) -> dict[int, int]:
        """Wait for the clients to connect and learn which node holds which client id.

        ``timeout`` covers connecting and the first answer (a cold client loads its model and data first).
        """
        deadline = time.monotonic() + timeout
        while len(node_ids := list(grid.get_node_ids())) < self.cfg.num_clients:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(node_ids)} of num_clients={self.cfg.num_clients} nodes connected "
                                   f"within connect_timeout={timeout:g}s")
            time.sleep(0.5)
        replies = list(grid.send_and_receive([self._query(n, 0) for n in node_ids],
                                             timeout=max(1.0, deadline - time.monotonic())))
        if len(replies) < len(node_ids):
            silent = sorted(set(node_ids) - {r.metadata.src_node_id for r in replies})
            raise TimeoutError(f"nodes {silent} did not answer the first query within connect_timeout={timeout:g}s")
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed to answer: {reply.error.reason}")
            cid = int(reply.content["info"]["cid"])
            if cid in self.nodes:
                raise RuntimeError(f"two nodes claim client id (partition-id) {cid}")
            self.nodes[cid] = reply.metadata.src_node_id
        return self.nodes

    def _query(self, node_id: int, server_round: int) -> Message:
        content = RecordDict({"config": ConfigRecord({"setup": self.setup, "round": server_round})})
        return Message(content=content, message_type="query", dst_node_id=node_id)

    def sample(self, server_round: int, attempt: int = 0) -> list[int]:
        """Client ids for this round: seeded, so runs with one seed sample the same clients.

        A retried round (``attempt`` > 0) draws a fresh sample: the clients that failed may still be down.
        """
        cids = sorted(self.nodes)
        k = min(self.cfg.clients_per_round, len(cids))
        draw = rng.generator("sampling", self.cfg.seed, server_round, attempt)
        return sorted(int(c) for c in draw.choice(cids, size=k, replace=False))

    def client_infos(self, grid: Grid, server_round: int, cids: list[int]) -> list[ClientInfo]:
        """Ask the sampled clients for this round's budget (it may change between rounds)."""
        replies = grid.send_and_receive([self._query(self.nodes[c], server_round) for c in cids],
                                        timeout=self.cfg.round_timeout)
        by_node = {v: k for k, v in self.nodes.items()}
        infos, answered = {}, set()
        for reply in replies:
            cid = by_node.get(reply.metadata.src_node_id)
            if cid not in cids or cid in answered:
                continue  # not asked, or a second answer: only the first counts
            answered.add(cid)
            try:
                if reply.has_error():
                    raise ValueError(reply.error.reason)
                info = reply.content["info"]
                if int(info["cid"]) != cid:
                    raise ValueError(f"node of client {cid} answered as client {info['cid']}")
                infos[cid] = ClientInfo(cid=cid, budget=int(info["budget"]), num_samples=int(info["num-examples"]))
            except Exception as e:  # a broken answer drops this client, never the round
                self.record.fail(cid, "query", str(e) or type(e).__name__)
        for cid in cids:
            if cid not in answered:
                self.record.fail(cid, "query", "no reply within the timeout")
        return [infos[c] for c in sorted(infos)]

    # ------------------------------------------------------------ the round loop
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None, *,
              history: list[dict[str, Any]] | None = None,
              on_round: Callable[[dict[str, Any], ArrayRecord], None] | None = None) -> Result:
        """Flower's loop, as in FedAvg: evaluate round 0, then configure -> send -> aggregate -> evaluate.

        Two additions, both keyword-only: ``history`` continues a resumed run after its last round
        (it holds rounds 0..k), and ``on_round(entry, arrays)`` sees every finished round (progress
        and checkpoints). A round with too few valid replies is retried with a fresh sample
        (``on_too_few_replies = "retry"``) or skipped; the global arrays change at most once a round.
        """
        train_config = train_config or ConfigRecord()
        self.history = history = list(history or [])
        result, arrays = Result(arrays=initial_arrays), initial_arrays
        if not history:
            t_eval = time.perf_counter()
            metrics = evaluate_fn(0, arrays) if evaluate_fn else None
            history.append({"round": 0, "metrics": dict(metrics or {}), "bytes_up": 0, "bytes_down": 0,
                            **noise_entry(0.0, 0.0, 0.0, 0.0), "eval_s": time.perf_counter() - t_eval,
                            "wall_s": 0.0, "clients": []})
            if self.accountant is not None:
                history[-1]["dp_epsilon"] = self.dp_epsilon()
            self._finish_round(result, history[-1], metrics, arrays, on_round)
        attempts = 1 + (self.cfg.max_round_retries if self.cfg.on_too_few_replies == "retry" else 0)
        for rnd in range(len(history), num_rounds + 1):
            t0 = time.perf_counter()
            for attempt in range(attempts):
                self._status(f"round {rnd}/{num_rounds}: training" + (f" (retry {attempt})" if attempt else ""))
                if self.cfg.secure_aggregation:  # Flower's SecAgg+ workflow: the server sees only the sum
                    new_arrays, train_metrics = secure_round(self, grid, rnd, arrays, attempt, timeout)
                else:
                    config = ConfigRecord({**dict(train_config), "attempt": attempt})
                    messages = list(self.configure_train(rnd, arrays, config, grid))
                    replies = grid.send_and_receive(messages, timeout=timeout) if messages else []
                    new_arrays, train_metrics = self.aggregate_train(rnd, replies)
                if new_arrays is not None:
                    arrays = result.arrays = new_arrays
                    result.train_metrics_clientapp[rnd] = train_metrics
                    break
            self._status(f"round {rnd}/{num_rounds}: evaluating")
            t_eval = time.perf_counter()
            metrics = evaluate_fn(rnd, arrays) if evaluate_fn else None
            entry = {**self.record.entry(), "metrics": dict(metrics or {}), "eval_s": time.perf_counter() - t_eval,
                     "wall_s": time.perf_counter() - t0}
            history.append(entry)
            self._finish_round(result, entry, metrics, arrays, on_round)
        return result

    @staticmethod
    def _finish_round(result: Result, entry: dict[str, Any], metrics: MetricRecord | None, arrays: ArrayRecord,
                      on_round: Callable[[dict[str, Any], ArrayRecord], None] | None) -> None:
        if metrics is not None:
            result.evaluate_metrics_serverapp[entry["round"]] = metrics
        if on_round is not None:
            on_round(entry, arrays)

    def _status(self, text: str) -> None:
        if self.progress is not None:
            self.progress.status(text)

    # ------------------------------------------------------------ Flower's strategy interface
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One message per sampled client, each with its own task; ``config["attempt"]`` > 0 is a retry."""
        attempt = int(config.get("attempt", 0))
        self.record_for(server_round, attempt)
        messages = []
        for info, task in self.round_tasks(server_round, arrays, attempt, grid):
            content = task_content(task, self.setup, server_round)
            content["config"]["attempt"] = attempt
            messages.append(Message(content=content, message_type="train", dst_node_id=self.nodes[info.cid]))
            self.record.bytes_down += nbytes(task.arrays)
        return messages

    def record_for(self, server_round: int, attempt: int) -> RoundRecord:
        """The round's record: a new one at the first attempt; a retry keeps its failures and traffic."""
        if attempt == 0:
            self.record = RoundRecord(round=server_round)
        self.record.attempts, self.record.clients, self._pending = attempt + 1, [], {}
        return self.record

    def round_tasks(self, server_round: int, arrays: ArrayRecord, attempt: int,
                    grid: Grid) -> list[tuple[ClientInfo, ClientTask]]:
        """Sample, ask the sampled clients' budgets, and build each one's task (plain and secure rounds alike)."""
        self.state = arrays_to_state(arrays)
        cids = self.sample(server_round, attempt)
        self.record.attackers = sorted(set(cids) & self.attackers)
        infos = self.client_infos(grid, server_round, cids)
        self._declared = {info.cid: info.num_samples for info in infos}
        out, self._pending = [], {}
        for info in infos:
            task = self.method.configure_client(self.state, info, server_round)
            self._pending[self.nodes[info.cid]] = (info.cid, task)
            if self.cfg.dp_mode == "local":  # it may upload a noisy update: counted whether or not it arrives
                self.dp_uploads[info.cid] = self.dp_uploads.get(info.cid, 0) + 1
            out.append((info, task))
        return out

    # ------------------------------------------------------------ secure aggregation (secure.py drives these)
    @property
    def secure_pending(self) -> dict[int, tuple[int, ClientTask]]:
        return self._pending

    def secure_configure(self, server_round: int, attempt: int, grid: Grid) -> list[tuple[int, Any]]:
        """(node, FitIns) for this attempt's clients: the same sampling, budgets and tasks as a plain round, the
        upload's layout and the weight scale (the largest sample count the round's clients declared)."""
        pairs = self.round_tasks(server_round, self.state_arrays, attempt, grid)
        layout = self.method.secure_layout(self.state)
        scale = float(max((info.num_samples for info, _ in pairs), default=1))
        return [(self.nodes[info.cid], secure_fitins(task, self.setup, server_round, attempt, layout, scale))
                for info, task in pairs]

    def secure_aggregate(self, server_round: int, results: list) -> ArrayRecord | None:
        """The new global state from the unmasked aggregate of the K clients whose vectors SecAgg+ summed, or
        None (recorded) when it cannot be used. ``results``: (proxy, FitRes) with the aggregate as parameters
        and each client's plain scalar metrics; never a client's own pairs."""
        rec = self.record
        survivors = sorted((self._pending[proxy.node_id][0], self._pending[proxy.node_id][1], proxy.node_id,
                            dict(fitres.metrics)) for proxy, fitres in results)
        rec.clients = [self.describe_secure(cid, task, node, metrics) for cid, task, node, metrics in survivors]
        if len(survivors) < self.cfg.min_replies:
            rec.fail(None, "round", f"only {len(survivors)} clients survived secure aggregation, min_replies="
                                    f"{self.cfg.min_replies}: nothing aggregated, global state unchanged")
            return None
        tasks = [task for _, task, _, _ in survivors]
        with one_thread():
            t0 = time.perf_counter()
            try:
                sums, clients = unmasked_sums(results, self.method.secure_layout(self.state))
                generator = (rng.torch_generator("dp_noise", self.cfg.seed, server_round)
                             if self.cfg.dp_mode == "central" else None)
                new_state = self.method.secure_aggregate(self.state, tasks, sums, clients, generator)
            except Exception as e:
                rec.fail(None, "round", f"the unmasked aggregate cannot be used ({type(e).__name__}: {e}): nothing "
                                        "aggregated, global state unchanged")
                return None
            rec.agg_s = time.perf_counter() - t0
            if not self.finite(new_state):
                return None
            noise = secure_noise(self.method, self.state, tasks)
            rec.fn_init_noise, rec.paper_init_noise = noise["fn_init_noise"], noise["paper_init_noise"]
            rec.fn_agg_noise = rec.paper_agg_noise = None
            rec.measure_s = time.perf_counter() - t0 - rec.agg_s
        losses = [c["train_loss"] for c in rec.clients]
        weights = [float(c["num_samples"]) if self.method.weighting == "samples" else 1.0 for c in rec.clients]
        rec.train_loss = float(np.average(losses, weights=weights)) if None not in losses else None
        self.released()
        return state_to_arrays(new_state)

    def describe_secure(self, cid: int, task: ClientTask, node: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """A survivor's line in the history: what it reported in the clear (scalars), the payload that crossed."""
        def number(key: str, cast=float):
            value = metrics.get(key)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
            return cast(value) if ok else None

        line = {"cid": cid, "rank": int(task.config.get("rank", self.method.rank)), "budget": number("budget", int),
                "trained_pairs": number("trained-pairs", int), "num_samples": self._declared.get(cid),
                "bytes_down": self.counting.down.get(node, 0), "bytes_up": self.counting.up.get(node, 0),
                "train_loss": number("train_loss"), "train_s": number("train_s") or 0.0,
                "client_s": number("client-s") or 0.0, "secure_clipped": number("secure-clipped", int),
                "delta_norm": None}  # the server never holds the update it would measure
        if self.cfg.dp_mode == "local":
            line["dp_epsilon"] = self.client_epsilon(cid)
        return line

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the valid replies; with fewer than ``min_replies`` nothing changes (None, None)."""
        accepted = self.collect(replies)
        if self.cfg.dp_mode == "local":
            for a in accepted:
                a.client["dp_epsilon"] = self.client_epsilon(a.cid)
        if len(accepted) < self.cfg.min_replies:
            self.record.fail(None, "round", f"only {len(accepted)} valid replies, min_replies={self.cfg.min_replies}: "
                                            "nothing aggregated, global state unchanged")
            self.record.dp_epsilon = self.dp_epsilon()
            return None, None
        tasks, updates = [a.task for a in accepted], [a.update for a in accepted]
        with one_thread():  # reductions split across threads round differently under load: bit-reproducible
            t0 = time.perf_counter()
            if self.cfg.dp_mode == "central":  # the noisy sums of clipped deltas, noise seeded by the round
                new_state = self.method.private_aggregate(self.state, tasks, updates,
                                                          rng.torch_generator("dp_noise", self.cfg.seed, server_round))
            else:
                new_state = self.method.aggregate(self.state, tasks, updates)
            self.record.agg_s = time.perf_counter() - t0
            if not self.finite(new_state):
                return None, None
            self.measure(self.state, new_state, accepted)
            self.record.measure_s = time.perf_counter() - t0 - self.record.agg_s
        self.released()
        return state_to_arrays(new_state), MetricRecord({"bytes-up": self.record.bytes_up,
                                                        "bytes-down": self.record.bytes_down})

    def finite(self, new_state: State) -> bool:
        """False (recorded) when aggregation made a value NaN or Inf: such a state never replaces the global one."""
        broken = next((k for k, v in new_state.items() if not bool(torch.isfinite(v).all())), None)
        if broken is not None:
            self.record.fail(None, "round", f"aggregation made {broken} NaN or Inf: nothing aggregated, "
                                            "global state unchanged")
        return broken is None

    def released(self) -> None:
        """The round's aggregate replaces the global state: recorded, and one accountant step per release."""
        self.record.aggregated = True
        if self.accountant is not None:
            self.accountant.step()
            self.record.dp_epsilon = self.dp_epsilon()

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # the global model is evaluated centrally (evaluate_fn) on the server's held-out split

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        pass

    # ------------------------------------------------------------ replies: parse, check, measure
    def collect(self, replies: Iterable[Message]) -> list[Accepted]:
        """The valid replies of this attempt, in client-id order; every rejection is recorded with its reason.

        Replies arrive in any order; client-id order makes float sums reproducible.
        """
        rec, accepted, seen = self.record, [], set()
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in self._pending or node in seen:
                continue  # not asked this attempt, or a second reply: only the first counts
            cid, task = self._pending[node]
            seen.add(node)
            if reply.has_error():
                rec.fail(cid, "train", reply.error.reason)
                continue
            try:
                update, metrics = read_update(reply.content)
                rec.bytes_up += nbytes(update.arrays)
                self.check_reply(task, update)
                self.check_claim(cid, update)
                reply_ok = Accepted(cid, task, update, metrics)
                reply_ok.client = reply_ok.describe(self.method.rank)  # a metric that can't be read rejects it here
                reply_ok.client["delta_norm"] = self.delta_norm(task, update)
            except UpdateRejected as e:
                rec.fail(cid, "validate", str(e))
                continue
            except Exception as e:  # whatever a broken reply makes the checks raise: rejected, never a crash
                rec.fail(cid, "validate", f"malformed reply ({type(e).__name__}: {e})")
                continue
            accepted.append(reply_ok)
        for node, (cid, _) in self._pending.items():
            if node not in seen:
                rec.fail(cid, "train", "no reply within the timeout")
        accepted.sort(key=lambda a: a.cid)
        rec.failures.sort(key=lambda f: (f["attempt"], f["cid"] is None, f["cid"] or 0, f["stage"]))
        rec.clients = [a.client for a in accepted]
        return accepted

    def measure(self, old: State, new: State, accepted: list[Accepted]) -> None:
        """The round's noise figures, both families (docs/method.md), and the weighted train loss, into the record.

        Function level: mean over clients of ||dW_global - dW_start||_F and ||sum_i w_i B_i A_i - B A||_F.
        The paper's: sum over clients of ||A - A_i||_F + ||B - B_i||_F, and ||dW* - B A||_F (the method's dW*).
        """
        tasks, updates = [a.task for a in accepted], [a.update for a in accepted]
        weights = self.method.client_weights(updates)
        g_old, g_new = self.method.global_factors(old), self.method.global_factors(new)
        rec = self.record
        rec.fn_init_noise = float(np.mean([init_noise(g_old, self.method.client_start_factors(t)) for t in tasks]))
        rec.fn_agg_noise = aggregation_noise(
            weights, [self.method.client_end_factors(t, u) for t, u in zip(tasks, updates)], g_new)
        rec.paper_init_noise = paper_init_noise(self.method.global_pairs(old),
                                                [self.method.client_start_pairs(t) for t in tasks])
        rec.paper_agg_noise = paper_aggregation_noise(self.method.paper_ideal_factors(old, tasks, updates), g_new)
        losses = [a.loss for a in accepted]
        self.record.train_loss = float(np.average(losses, weights=weights)) if None not in losses else None

    def delta_norm(self, task: ClientTask, update: ClientUpdate) -> float | None:
        """The L2 norm of what the client's training changed (``method.update_delta``), for the history: the scale
        to choose ``dp_clip`` from. None for a method whose upload is not a change of global values (FLoRA)."""
        try:
            return update_norm(self.method.update_delta(task, update))
        except NotImplementedError:
            return None

    def check_claim(self, cid: int, update: ClientUpdate) -> None:
        """A reply may not claim more samples than its client declared in this round's query.

        The sample count weights a client's update in the average, so an inflated claim (attacks.py,
        ``inflate``) would let one client outweigh all others while every array looks honest. The
        query's ``num-examples`` is the partition size the client declared before it was given work;
        the count it reports after training must not exceed it (an honest client reports exactly it).
        """
        declared = self._declared.get(cid)
        if declared is not None and update.num_samples > declared:
            raise UpdateRejected(f"claims {update.num_samples} samples, more than the {declared} its query declared")

    def check_reply(self, task: ClientTask, update: ClientUpdate) -> None:
        """Every check before aggregation: the method's ``validate_update``, whose rules are the same for
        every method (the reply declares exactly the work it was given, then keys, shapes, the declared
        upload dtype, finiteness, the sample count and the norm bound)."""
        self.method.validate_update(task, update, self.state, self.cfg.max_update_norm)
