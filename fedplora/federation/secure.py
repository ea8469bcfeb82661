"""Secure aggregation: one round as Flower's own SecAgg+ workflow (docs/secure-aggregation.md).

Nothing cryptographic is written here. A round runs ``flwr.server.workflow.SecAggPlusWorkflow`` through a
``LegacyContext`` whose strategy is ``SecureRoundStrategy``, a small legacy ``Strategy`` adapter:

* ``configure_fit`` is the round's own sampling, budget query and ``method.configure_client`` (exactly as a
  plain round; ``SecureHost.secure_tasks``), each task as legacy ``FitIns`` (``messages.secure_fitins``);
* the clients train as in a plain round and reply with their fixed-shape contribution
  (``aggregation.secure_upload``: every pair of every layer, zeros where they did not train, and per-pair
  weights), which Flower's ``secaggplus_mod`` quantizes and masks on the client (``client_app.secure_mod``);
* ``aggregate_fit`` receives only what the workflow unmasked: Flower's weighted mean of the uploads. Every
  client declares the weight 1 (``num_examples = 1``, ``max_weight = 1``), so that is sum / K over the K
  clients whose masked vectors were summed; multiplied back by K it is the element-wise sum that
  ``aggregation.secure_decode`` turns into the new global state (``SecureHost.secure_result``).

The server never holds one client's pairs: the replies it receives carry masked integer vectors, key shares and
scalar metrics, and the only arrays this module reads are the unmasked aggregate. A halted or failed
workflow (too few survivors for the reconstruction threshold, a malformed masked vector that makes Flower
raise) never touches the global state: the round is recorded as failed and retried or skipped like any round
with too few replies (``on_too_few_replies``).

``CountingGrid`` wraps the Grid to count the payload that crosses in every SecAgg+ stage, both ways, per node.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow

from ..config import secure_quantization_range
from .history import RoundRecord
from .roster import NoNodeServes


class SecureHost(Protocol):
    """What a secure round needs from the run's strategy (``HeteroLoRAStrategy``): its settings, the round's record,
    the attempt's tasks (with the node each goes to) and the decode of the unmasked sum. The round writes none of
    its attributes; it hands the global arrays and the counted traffic in as arguments."""

    cfg: Any
    record: RoundRecord

    @property
    def pending(self) -> dict[int, tuple[int, Any]]: ...

    def record_for(self, server_round: int, attempt: int) -> RoundRecord: ...

    def secure_tasks(self, server_round: int, attempt: int, arrays: ArrayRecord, grid) -> list[tuple[int, Any]]: ...

    def secure_result(self, server_round: int, results: list, traffic: dict[int, tuple[int, int]]
                      ) -> ArrayRecord | None: ...

    def dp_epsilon(self) -> float | None: ...
MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, CURRENT_ROUND = "config", "parameters", "current_round"  # flwr.server.workflow.constant


def payload_bytes(content: RecordDict) -> int:
    """The bytes of a message's payload: its arrays and the bytes (and lists) of its config records. Strings and
    scalars (settings, task descriptions, metrics) are not counted, as in a plain round's ``nbytes``."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(array.data) for array in record.values())
    for record in content.config_records.values():
        for value in record.values():
            if isinstance(value, bytes):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) if isinstance(v, bytes) else 8 for v in value)
    return total


@dataclasses.dataclass
class StageLog:
    """One send_and_receive of the workflow: which SecAgg+ stage, who was asked, who answered, who failed why."""

    stage: str
    asked: set[int]
    answered: set[int]
    errors: dict[int, str]


class CountingGrid:
    """A Grid that counts every message's payload (``payload_bytes``) per node, both ways, and logs each stage."""

    def __init__(self, grid) -> None:
        self.grid = grid
        self.down: dict[int, int] = defaultdict(int)
        self.up: dict[int, int] = defaultdict(int)
        self.stages: list[StageLog] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        stage = "?"
        for msg in messages:  # read before sending: an in-process client may edit the content it is handed
            self.down[msg.metadata.dst_node_id] += payload_bytes(msg.content)
            configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            if configs is not None and Key.STAGE in configs:
                stage = str(configs[Key.STAGE])
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        log = StageLog(stage, {m.metadata.dst_node_id for m in messages}, set(), {})
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.errors[node] = reply.error.reason
            else:
                self.up[node] += payload_bytes(reply.content)
                log.answered.add(node)
        self.stages.append(log)
        return replies


class SecureRoundStrategy(LegacyStrategy):
    """The legacy Strategy the SecAgg+ workflow drives for one attempt of one round (see the module docstring).

    ``host`` keeps sampling, tasks, the round record and aggregation (``SecureHost``). ``aggregate_fit`` stores
    the new global state (or None) in ``outcome`` and returns no parameters, so the workflow's own context is
    never the place the global state lives.
    """

    def __init__(self, host: SecureHost, grid, counting: "CountingGrid", arrays: ArrayRecord, attempt: int) -> None:
        self.host, self.grid, self.counting, self.arrays, self.attempt = host, grid, counting, arrays, attempt
        self.called = False
        self.outcome: ArrayRecord | None = None

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        """The attempt's tasks, each with a proxy of its node: only the sampled nodes get one (and are registered
        with the client manager, which the workflow reads only to log how many there are), never the federation."""
        out = []
        for node, fitins in self.host.secure_tasks(server_round, self.attempt, self.arrays, self.grid):
            proxy = GridClientProxy(node_id=node, grid=self.counting, run_id=0)
            client_manager.register(proxy)
            out.append((proxy, fitins))
        return out

    def aggregate_fit(self, server_round, results, failures):
        self.called = True
        traffic = {node: (self.counting.down.get(node, 0), self.counting.up.get(node, 0))
                   for node in set(self.counting.down) | set(self.counting.up)}
        self.outcome = self.host.secure_result(server_round, results, traffic)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def threshold(cfg, clients: int) -> tuple[int, int]:
    """(shares, reconstruction threshold) as SecAggPlusWorkflow derives them from its fractions for ``clients``."""
    shares = round(cfg.secure_shares * clients)
    if shares < clients and shares & 1 == 0:
        shares += 1
    if shares <= 2:
        shares = clients
    return shares, max(round(cfg.secure_threshold * shares), 2)


def secure_round(owner: SecureHost, grid, server_round: int, arrays: ArrayRecord, attempt: int,
                 timeout: float | None) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """One attempt of a round under secure aggregation: (new global arrays, metrics), or (None, None) when the
    workflow halted or failed (recorded in the round's record; the global state is unchanged)."""
    cfg, rec = owner.cfg, owner.record_for(server_round, attempt)
    counting = CountingGrid(grid)
    manager = SimpleClientManager()  # the round's sampled nodes only (``SecureRoundStrategy.configure_fit``)
    adapter = SecureRoundStrategy(owner, grid, counting, arrays, attempt)
    workflow = SecAggPlusWorkflow(cfg.secure_shares, cfg.secure_threshold, max_weight=1.0,
                                  clipping_range=float(cfg.secure_clip),
                                  quantization_range=secure_quantization_range(cfg), timeout=timeout)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=adapter, client_manager=manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # the global state is never handed to Flower
    error = None
    try:
        workflow(counting, context)
    except NoNodeServes:  # no node can serve the run at all (roster.py): the run stops, as a plain round's does
        raise
    except Exception as e:  # a malformed masked vector, a broken reply: the round fails, the server goes on
        error = f"secure aggregation failed ({type(e).__name__}: {e})"
    rec.bytes_down += sum(counting.down.values())
    rec.bytes_up += sum(counting.up.values())
    rec.secure = True
    _record_dropouts(owner, counting)
    if not adapter.called or adapter.outcome is None:
        if not adapter.called:
            rec.fail(None, "round", (error or _halt_reason(cfg, counting, owner)) +
                     ": nothing aggregated, global state unchanged")
        elif error:
            rec.fail(None, "round", error + ": nothing aggregated, global state unchanged")
        rec.dp_epsilon = owner.dp_epsilon()
        return None, None
    if error:  # aggregate_fit ran and then Flower raised: the aggregate stands (it was computed from the sum)
        rec.fail(None, "round", error + " after aggregation")
    return adapter.outcome, MetricRecord({"bytes_up": rec.bytes_up, "bytes_down": rec.bytes_down})


def _halt_reason(cfg, counting: CountingGrid, owner: SecureHost) -> str:
    if not counting.stages:
        return (f"secure aggregation needs at least 2 clients to start, {len(owner.pending)} answered "
                "the budget query")
    last = counting.stages[-1]
    sampled = len(counting.stages[0].asked)
    _, t = threshold(cfg, sampled)
    return (f"secure aggregation halted at stage {last.stage}: {len(last.answered)} of the round's {sampled} "
            f"clients left, SecAgg+ needs {t} to rebuild the masks")


def _record_dropouts(owner: SecureHost, counting: CountingGrid) -> None:
    """Each client that left the protocol, once, at the first stage it failed or did not answer in."""
    by_node = {node: cid for node, (cid, _) in owner.pending.items()}
    gone: set[int] = set()
    for log in counting.stages:
        for node in sorted(log.asked - log.answered - gone):
            reason = log.errors.get(node, "no reply within the timeout")
            owner.record.fail(by_node.get(node), f"secure:{log.stage}", reason)
            gone.add(node)
    owner.record.dropouts = sorted(by_node[n] for n in gone if n in by_node)


def unmasked_sums(results, layout: dict[str, tuple[int, ...]]) -> tuple[dict[str, torch.Tensor], int]:
    """The element-wise sum of the K summed uploads from what the workflow hands ``aggregate_fit``: every
    result carries the same unmasked parameters, Flower's mean sum / K (weights 1); times K, per layout key."""
    clients = len(results)
    shared = results[0][1].parameters
    if any(fitres.parameters is not shared for _, fitres in results):
        raise ValueError("aggregate_fit was handed per-client parameters, not the one unmasked aggregate")
    if any(fitres.num_examples != 1 for _, fitres in results):
        raise ValueError("a client declared a SecAgg+ weight other than 1, so the aggregate is not sum / K")
    values = parameters_to_ndarrays(shared)
    if len(values) != len(layout):
        raise ValueError(f"the unmasked aggregate has {len(values)} arrays, the layout {len(layout)}")
    sums = {}
    for (key, shape), value in zip(layout.items(), values):
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"the unmasked aggregate's {key} has shape {tuple(value.shape)}, the layout {shape}")
        sums[key] = torch.from_numpy(np.asarray(value, dtype=np.float64) * clients)
    return sums, clients
