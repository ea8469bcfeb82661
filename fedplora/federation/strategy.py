"""A Flower strategy for heterogeneous-rank LoRA: one message per client, one aggregation path.

It keeps Flower's ``Strategy`` contract: ``start()`` owns the round loop (as in FedAvg, with a central
``evaluate_fn``), ``configure_train`` turns the global ``ArrayRecord`` into messages and ``aggregate_train`` turns
replies into the next one. What differs from FedAvg: each client gets its own task (its pairs, its rank) instead
of one shared RecordDict, the budget of each sampled client is asked first, and every reply is checked before
the aggregation pipeline (``fedplora.aggregation``) combines it with the reducer chosen once, here, for the run.

Beside the loop: ``roster.py`` (which node serves which client, learned only from the nodes a round samples, so
that starting a run and each round cost what the sampled clients cost), ``history.py`` (a round's record and
measurements), ``accounting.py`` (privacy spent) and ``secure.py`` (a round as Flower's SecAgg+ workflow, driving
this strategy through ``secure_tasks`` and ``secure_result``). Reading order: ``start`` -> ``configure_train`` ->
``client_infos`` -> ``aggregate_train`` -> ``collect``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from .. import rng
from ..aggregation import Reducer, ServerOptimizer, aggregate, layout, reducer_for, secure_decode
from ..config import RunConfig
from ..measure import nbytes
from ..methods import ClientInfo, ClientTask, ClientUpdate, FederatedMethod, UpdateRejected
from ..privacy import update_norm
from ..robust import Aggregator
from ..state import State
from .accounting import PrivacyLedger, central_dp
from .history import Accepted, RoundRecord, client_line, measure_round, noise_entry, untimed  # noqa: F401
from .messages import read_update, secure_fitins, task_content
from .roster import NoNodeServes, Roster
from .secure import secure_round, unmasked_sums


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


def run_reducer(cfg: RunConfig, method: FederatedMethod) -> Reducer:
    """How this run combines its clients, chosen in this one place: central DP's noisy sum, a robust rule, or the
    method's mean (SecAgg+ computes the mean's sum, or central DP's, in Flower instead of here)."""
    if cfg.dp_mode == "central":
        return reducer_for(method, central_dp(cfg))
    return reducer_for(method, Aggregator(cfg.aggregator, cfg.trim_fraction, cfg.clip_multiplier,
                                          cfg.krum_f, cfg.krum_m))


def run_server_optimizer(cfg: RunConfig) -> ServerOptimizer:
    """The run's server optimizer (``server_optimizer``; ``none``: the aggregate itself)."""
    return ServerOptimizer(cfg.server_optimizer, cfg.server_lr, cfg.server_momentum, cfg.server_beta1,
                           cfg.server_beta2, cfg.server_tau)


class HeteroLoRAStrategy(Strategy):
    """``progress``: where the loop reports what it is doing (``Progress``), or None. ``attackers``: the clients a
    test injected as Byzantine (``attacks.attackers``), recorded in the history for measuring only."""

    def __init__(self, method: FederatedMethod, cfg: RunConfig, progress=None, attackers: Iterable[int] = ()) -> None:
        self.method, self.cfg, self.progress = method, cfg, progress
        self.reducer = run_reducer(cfg, method)  # a combination the method does not define: one line, here
        self.server_opt = run_server_optimizer(cfg)  # its moments are checkpointed with the state
        self.privacy = PrivacyLedger(cfg)  # with DP: sigma resolved here, once per run
        self.attackers = set(attackers)
        self.state: State = {}  # the global state of the round being configured (from ``arrays``)
        self.history: list[dict[str, Any]] = []
        self.setup = json.dumps(cfg.to_dict())  # the run's settings, encoded once for every message
        # which node serves which client: learned from the nodes a round asks (roster.py), O(1) per node
        self.roster = Roster(cfg.num_clients, cfg.clients_per_round, cfg.seed, pool=cfg.simulation_nodes)
        self.first_refusal: str | None = None  # why the first node was left out (the line a run stops with
        # when no node has ever answered: ``client_infos``)
        self._pending: dict[int, tuple[int, ClientTask]] = {}  # message dst node -> (cid, task)
        self._declared: dict[int, int] = {}  # cid -> the example count its query declared this attempt
        self.record = RoundRecord(round=0)

    # ------------------------------------------------------------ privacy (accounting.py)
    @property
    def accountant(self):
        return self.privacy.accountant

    def dp_epsilon(self) -> float | None:
        return self.privacy.epsilon()

    def privacy_state(self) -> dict[str, Any] | None:
        return self.privacy.state_dict()

    def load_privacy_state(self, state: dict[str, Any] | None) -> None:
        self.privacy.load_state_dict(state)

    # ------------------------------------------------------------ nodes, sampling and the budget query
    def wait_for_nodes(self, grid: Grid, timeout: float) -> int:
        """Wait until ``min_nodes`` nodes (default ``num_clients``, or the pool's ``simulation_nodes``) are
        connected; returns how many are.

        No node is asked anything here: a node is asked its client id, budget and example count only when a round
        samples it (``client_infos``). In simulation Flower registers every node right after the ServerApp starts,
        so this waits a fraction of a second, and waiting for all of them makes the positions the rounds sample
        the client ids 0..num_clients-1 (``roster``). A deployment of many devices may start with fewer.
        """
        need = self.cfg.min_nodes if self.cfg.min_nodes is not None else (self.cfg.simulation_nodes
                                                                            or self.cfg.num_clients)
        deadline = time.monotonic() + timeout
        while (count := self.roster.refresh(grid.get_node_ids())) < need:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {count} of min_nodes={need} nodes connected within "
                                   f"connect_timeout={timeout:g}s")
            time.sleep(0.5)
        return count

    def _query(self, node_id: int, server_round: int, cid: int) -> Message:
        """The budget query, asking ``node_id`` as client ``cid`` (a device answers as its own client instead)."""
        content = RecordDict({"config": ConfigRecord({"setup": self.setup, "round": server_round, "cid": cid})})
        return Message(content=content, message_type="query", dst_node_id=node_id)

    def client_infos(self, grid: Grid, server_round: int, attempt: int = 0) -> list[ClientInfo]:
        """Sample this round's clients and ask each its budget (it may change between rounds) and example count.

        The sample is seeded (``Roster.candidates``), so runs with one seed sample the same clients; a retried round
        (``attempt`` > 0) draws afresh, since the clients that failed may still be down. A node left out at its
        first query is replaced once, by the next candidates of the same seeded order; the replacements' own
        refusals are recorded and not replaced again (a round waits for at most two queries). A node that answered
        before and fails now only misses this round, as any client that fails.

        A pool (``simulation_nodes``) asks its nodes as the clients one node per client would sample
        (``Roster.pool_sample``); a client whose pool node fails, or for which no pool node is left, fails this
        round and is not replaced, so that the clients trained stay those of the one-node-per-client run.
        """
        self.roster.refresh(grid.get_node_ids())
        if self.roster.pool:
            pairs, unserved = self.roster.pool_sample(server_round, attempt)
            if not pairs:
                raise NoNodeServes(f"no node of the pool (simulation_nodes={self.roster.pool}) can serve the run: "
                                   + (self.first_refusal or "none is connected"))
            for cid in unserved:
                self.record.fail(cid, "query", f"no pool node left to serve it: {len(self.roster.left_out)} of "
                                               f"simulation_nodes={self.roster.pool} were left out")
            infos, asked = self._ask(grid, server_round, pairs)
            asked["cids"] |= set(unserved)
        else:
            candidates = self.roster.candidates(server_round, attempt)
            infos, asked = self._ask(grid, server_round,
                                     list(itertools.islice(candidates, self.cfg.clients_per_round)))
            if asked["left_out"]:
                more, again = self._ask(grid, server_round, list(itertools.islice(candidates, asked["left_out"])))
                infos.update(more)
                asked["cids"] |= again["cids"]
        if not self.roster.client_of and self.first_refusal is not None:
            raise NoNodeServes(f"no node has answered a query, so the run cannot train: {self.first_refusal}")
        self.record.attackers = sorted(asked["cids"] & self.attackers)
        return [infos[c] for c in sorted(infos)]

    def _ask(self, grid: Grid, server_round: int, nodes: list[tuple[int, int]]
             ) -> tuple[dict[int, ClientInfo], dict[str, Any]]:
        """Query ``nodes`` ((position, node) pairs; in a pool, (client, node)); their infos by client id, and what
        happened: the client ids known for the asked nodes and how many were left out. A node's first query may
        take ``connect_timeout`` (it may load its model and data first), later ones ``round_timeout``."""
        if not nodes:
            return {}, {"cids": set(), "left_out": 0}
        first = any(node not in self.roster.client_of for _, node in nodes)
        timeout = max(self.cfg.connect_timeout, self.cfg.round_timeout) if first else self.cfg.round_timeout
        messages = [self._query(node, server_round, p) for p, node in nodes]
        replies = grid.send_and_receive(messages, timeout=timeout)
        # Flower answers for a node it knows to be gone itself ("Node Unavailable", from the SuperLink's own id):
        # a reply belongs to the node its message went to (pushing a message gives it its id)
        sent = {m.metadata.message_id: node for m, (_, node) in zip(messages, nodes)
                if getattr(getattr(m, "metadata", None), "message_id", None)}
        wanted = {node: p for p, node in nodes}
        pool = self.roster.pool

        def client(node: int) -> int | None:  # the client a failure of ``node`` costs this round, when known
            return wanted[node] if pool else self.roster.client_of.get(node)
        infos: dict[int, ClientInfo] = {}
        answered: set[int] = set()
        left_out = 0
        for reply in replies:
            node = sent.get(getattr(reply.metadata, "reply_to_message_id", None), reply.metadata.src_node_id)
            if node not in wanted or node in answered:
                continue  # not asked, or a second answer: only the first counts
            answered.add(node)
            try:
                if reply.has_error():
                    raise ValueError(reply.error.reason)
                info = reply.content["info"]
                cid = self.roster.identify(node, info["cid"], wanted[node])
                budget, examples = info["budget"], info["num_examples"]
                if not (isinstance(budget, int) and budget >= 1 and isinstance(examples, int) and examples >= 1):
                    raise ValueError(f"declared budget {budget!r} and example count {examples!r}: both must be "
                                     "integers >= 1")
                infos[cid] = ClientInfo(cid=cid, budget=budget, num_samples=examples)
            except Exception as e:  # a broken answer drops this client, never the round
                reason = str(e) or type(e).__name__
                if node in self.roster.client_of:  # it is known (now or before): it misses this round only
                    self.record.fail(client(node), "query", reason)
                else:
                    left_out += self._leave_out(node, f"refused its first query: {reason}", client(node))
        for _, node in nodes:
            if node in answered:
                continue
            if node in self.roster.client_of:
                self.record.fail(client(node), "query", "no reply within the timeout")
            else:
                left_out += self._leave_out(node, f"no reply to its first query within {timeout:g}s", client(node))
        cids = {c for _, node in nodes if (c := client(node)) is not None}
        return infos, {"cids": cids, "left_out": left_out}

    def _leave_out(self, node: int, reason: str, cid: int | None = None) -> int:
        """Leave ``node`` out of sampling (of the pool) for the rest of the run, with the reason in this round's
        failures; ``cid``: the client a pool node was asked to serve, which fails this round (a node's own client
        id is unknown: it never answered one)."""
        self.roster.leave_out(node)
        line = f"node {node} left out of {'the pool' if self.roster.pool else 'sampling'}: {reason}"
        self.record.fail(cid, "query", line, node=node)
        if self.first_refusal is None:
            self.first_refusal = line
        return 1

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
            over = self.over_budget(history + [entry])
            if over:
                entry["comm_budget_exceeded"] = over
            history.append(entry)
            self._finish_round(result, entry, metrics, arrays, on_round)
            if over and self.cfg.comm_budget_action == "stop":
                break
        return result

    def over_budget(self, history: list[dict[str, Any]]) -> str | None:
        """Past ``comm_budget_mb`` (every round's bytes up and down so far): the line the history and the console
        carry, else None. FlowerTune's templates warn at 200,000 MB."""
        if self.cfg.comm_budget_mb is None:
            return None
        used = sum(h.get("bytes_up", 0) + h.get("bytes_down", 0) for h in history) / 1e6
        if used <= self.cfg.comm_budget_mb:
            return None
        line = (f"communication budget exceeded: {used:.1f} MB of comm_budget_mb={self.cfg.comm_budget_mb:g} after "
                f"round {history[-1]['round']}" + (", run stopped" if self.cfg.comm_budget_action == "stop" else ""))
        self._status(line)
        return line

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

    # ------------------------------------------------------------ configure: sample, ask budgets, build tasks
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One message per sampled client, each with its own task; ``config["attempt"]`` > 0 is a retry."""
        attempt = int(config.get("attempt", 0))
        self.record_for(server_round, attempt)
        messages = []
        for info, task in self.round_tasks(server_round, arrays, attempt, grid):
            content = task_content(task, self.setup, server_round)
            content["config"]["attempt"] = attempt
            content["config"]["cid"] = info.cid  # the client this node serves (a simulated node can serve any)
            messages.append(Message(content=content, message_type="train", dst_node_id=self.roster.node_of[info.cid]))
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
        infos = self.client_infos(grid, server_round, attempt)
        self._declared = {info.cid: info.num_samples for info in infos}
        out, self._pending = [], {}
        for info in infos:
            try:
                task = self.method.configure_client(self.state, info, server_round)
            except ValueError as e:  # a budget the method cannot serve (FedIT feasible below its rank): this client
                self.record.fail(info.cid, "configure", str(e))
                continue
            self._pending[self.roster.node_of[info.cid]] = (info.cid, task)
            self.privacy.asked(info.cid)  # local DP: it may upload a noisy update, counted whether or not it arrives
            out.append((info, task))
        return out

    # ------------------------------------------------------------ aggregate: check, reduce, measure
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the valid replies; with fewer than ``min_replies`` nothing changes (None, None)."""
        accepted = self.collect(replies)
        if self.cfg.dp_mode == "local":
            for a in accepted:
                a.client["dp_epsilon"] = self.privacy.client_epsilon(a.cid)
        if len(accepted) < self.cfg.min_replies:
            self.record.fail(None, "round", f"only {len(accepted)} valid replies, min_replies={self.cfg.min_replies}: "
                                            "nothing aggregated, global state unchanged")
            self.record.dp_epsilon = self.dp_epsilon()
            return None, None
        tasks, updates = [a.task for a in accepted], [a.update for a in accepted]
        with one_thread():  # reductions split across threads round differently under load: bit-reproducible
            t0 = time.perf_counter()
            generator = rng.torch_generator("dp_noise", self.cfg.seed, server_round)  # central DP's noise
            moments = self.server_opt.state_dict()
            try:
                new_state = aggregate(self.method, self.state, tasks, updates, self.reducer, generator,
                                      self.server_opt)
                self.record.agg_s = time.perf_counter() - t0
                usable = self.finite(new_state)  # a NaN or Inf is recorded there
                if usable:
                    self.measure(self.state, new_state, accepted)
            except Exception as e:  # whatever aggregation raised: the round fails, the global state stays
                self.record.fail(None, "round", f"aggregation failed ({type(e).__name__}: {e}): nothing "
                                                "aggregated, global state unchanged")
                usable = False
            if not usable:
                self.server_opt.load_state_dict(moments)  # a rejected aggregate leaves no trace, moments included
                return None, None
            self.record.measure_s = time.perf_counter() - t0 - self.record.agg_s
        self.released()
        return state_to_arrays(new_state), MetricRecord({"bytes_up": self.record.bytes_up,
                                                        "bytes_down": self.record.bytes_down})

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
                ok = Accepted(cid, task, update, metrics)
                ok.client = client_line(cid, int(task.config.get("rank", self.method.rank)), metrics,
                                        update.num_samples, nbytes(task.arrays), nbytes(update.arrays))
                ok.client["delta_norm"] = self.delta_norm(task, update)
            except UpdateRejected as e:
                rec.fail(cid, "validate", str(e))
                continue
            except Exception as e:  # whatever a broken reply makes the checks raise: rejected, never a crash
                rec.fail(cid, "validate", f"malformed reply ({type(e).__name__}: {e})")
                continue
            accepted.append(ok)
        for node, (cid, _) in self._pending.items():
            if node not in seen:
                rec.fail(cid, "train", "no reply within the timeout")
        accepted.sort(key=lambda a: a.cid)
        rec.failures.sort(key=lambda f: (f["attempt"], f["cid"] is None, f["cid"] or 0, f["stage"]))
        rec.clients = [a.client for a in accepted]
        return accepted

    def check_reply(self, task: ClientTask, update: ClientUpdate) -> None:
        """Every check before aggregation (``aggregation.validate_update``, the same rules for every method)."""
        self.method.validate_update(task, update, self.state, self.cfg.max_update_norm)

    def check_claim(self, cid: int, update: ClientUpdate) -> None:
        """A reply may not claim more samples than its client declared in this round's query: the sample count
        weights its update, so an inflated claim (attacks.py, ``inflate``) would let one client outweigh all others
        while every array looks honest. An honest client reports exactly the partition size it declared."""
        declared = self._declared.get(cid)
        if declared is not None and update.num_samples > declared:
            raise UpdateRejected(f"claims {update.num_samples} samples, more than the {declared} its query declared")

    def delta_norm(self, task: ClientTask, update: ClientUpdate) -> float | None:
        """The L2 norm of what the client's training changed (``method.update_delta``), for the history: the scale
        to choose ``dp_clip`` from. None for a method whose upload is not a change of global values (FLoRA)."""
        try:
            return update_norm(self.method.update_delta(task, update))
        except NotImplementedError:
            return None

    def measure(self, old: State, new: State, accepted: list[Accepted]) -> None:
        """The round's noise figures, both families (``history.measure_round``), and the weighted train loss."""
        tasks, updates = [a.task for a in accepted], [a.update for a in accepted]
        self.record.measured(measure_round(self.method, old, tasks, new, updates), [a.loss for a in accepted],
                             self.method.client_weights(updates))

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
            self.privacy.released()
            self.record.dp_epsilon = self.dp_epsilon()

    # ------------------------------------------------------------ secure aggregation (secure.py's ``SecureHost``)
    @property
    def pending(self) -> dict[int, tuple[int, ClientTask]]:
        """This attempt's sampled clients: Flower node -> (client id, task)."""
        return self._pending

    def secure_tasks(self, server_round: int, attempt: int, arrays: ArrayRecord, grid: Grid) -> list[tuple[int, Any]]:
        """(node, FitIns) for this attempt's clients: the same sampling, budgets and tasks as a plain round, the
        upload's layout and the weight scale (the largest sample count the round's clients declared)."""
        pairs = self.round_tasks(server_round, arrays, attempt, grid)
        shapes = layout(self.state, self.method.rank)
        scale = float(max((info.num_samples for info, _ in pairs), default=1))
        return [(self.roster.node_of[info.cid],
                 secure_fitins(task, self.setup, server_round, attempt, shapes, scale, cid=info.cid))
                for info, task in pairs]

    def secure_result(self, server_round: int, results: list, traffic: dict[int, tuple[int, int]]
                      ) -> ArrayRecord | None:
        """The new global state from the unmasked aggregate of the K clients whose vectors SecAgg+ summed, or
        None (recorded) when it cannot be used. ``results``: (proxy, FitRes) with the aggregate as parameters and
        each client's plain scalar metrics, never a client's own pairs; ``traffic``: node -> (bytes down, up)."""
        rec = self.record
        survivors = sorted((*self._pending[proxy.node_id], proxy.node_id, dict(fitres.metrics))
                           for proxy, fitres in results)
        rec.clients = [client_line(cid, int(task.config.get("rank", self.method.rank)), metrics,
                                   self._declared.get(cid), *traffic.get(node, (0, 0)), strict=False)
                       for cid, task, node, metrics in survivors]
        if self.cfg.dp_mode == "local":
            for line in rec.clients:
                line["dp_epsilon"] = self.privacy.client_epsilon(line["cid"])
        if len(survivors) < self.cfg.min_replies:
            rec.fail(None, "round", f"only {len(survivors)} clients survived secure aggregation, min_replies="
                                    f"{self.cfg.min_replies}: nothing aggregated, global state unchanged")
            return None
        tasks = [task for _, task, _, _ in survivors]
        with one_thread():
            t0 = time.perf_counter()
            moments = self.server_opt.state_dict()
            try:
                sums, clients = unmasked_sums(results, layout(self.state, self.method.rank))
                generator = rng.torch_generator("dp_noise", self.cfg.seed, server_round)
                new_state = secure_decode(self.method, self.state, sums, clients, self.reducer, generator,
                                          self.server_opt)
            except Exception as e:
                self.server_opt.load_state_dict(moments)
                rec.fail(None, "round", f"the unmasked aggregate cannot be used ({type(e).__name__}: {e}): nothing "
                                        "aggregated, global state unchanged")
                return None
            rec.agg_s = time.perf_counter() - t0
            if not self.finite(new_state):
                self.server_opt.load_state_dict(moments)
                return None
            weights = [self.method.client_weight(ClientUpdate({}, {}, c["num_samples"])) for c in rec.clients]
            rec.measured(measure_round(self.method, self.state, tasks), [c["train_loss"] for c in rec.clients],
                         weights)
            rec.measure_s = time.perf_counter() - t0 - rec.agg_s
        self.released()
        return state_to_arrays(new_state)

    # ------------------------------------------------------------ evaluation is central (evaluate_fn)
    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # the global model is evaluated centrally (evaluate_fn) on the server's held-out split

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        pass


__all__ = ["Accepted", "HeteroLoRAStrategy", "RoundRecord", "arrays_to_state", "noise_entry", "one_thread",
           "run_reducer", "state_to_arrays", "untimed"]
