"""The server's cost follows the round, not the federation (fedplora/federation/roster.py, docs/speed.md "Scale").

In one process: the real strategy and round loop, the real ClientApp functions answering each message, and a
federation numbered as Flower's Simulation Engine numbers it (``_register_nodes`` on a real LinkState: random
node ids, partition-ids 0..N-1 in registration order), so that the node a client lands on is not its
partition-id. The deployment-side refusal through real processes is tests/test_deployment.py.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from fedplora import rng
from fedplora.federation import client_app
from fedplora.errors import FedploraError
from fedplora.federation.roster import NoNodeServes, Roster
from fedplora.tasks import make_task
from fedplora.tasks.partition import partition_for
from test_fault_tolerance import (  # noqa: F401 (in_process: a fixture)
    InProcessGrid, _rounds, _small_cfg, flower_process, in_process)


def flower_numbered_nodes(num_nodes: int) -> dict[int, int]:
    """node id -> partition-id, as the Simulation Engine registers its nodes (random ids, partitions in order)."""
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    return _register_nodes(num_nodes, factory)


class CountingGrid(InProcessGrid):
    """The in-process grid on Flower-numbered nodes (``flower_numbered_nodes``), counting every message each node
    receives, by type. Nodes are named below by their client id, their position in node-id order (how the server
    addresses them): ``refuse`` adds node config to some (a device's own declarations, e.g. a task list without
    the run's task, so that the real ClientApp refuses); the ``mute`` ones never answer anything."""

    def __init__(self, num_clients: int, refuse: dict[int, dict] | None = None, mute=(), gone=()):
        super().__init__(num_clients)
        self.partition_of = flower_numbered_nodes(num_clients)
        self.order = sorted(self.partition_of)
        config = {"num-partitions": num_clients, "cpus": torch.get_num_threads()}
        refuse = {self.order[c]: extra for c, extra in (refuse or {}).items()}
        self.contexts = {node: Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                                       node_config={"partition-id": p, **config, **refuse.get(node, {})})
                         for node, p in self.partition_of.items()}
        self.mute = {self.order[c] for c in mute}
        self.gone = {self.order[c] for c in gone}  # Flower answers for these itself: "Node Unavailable"
        self.received: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        self.asked_as: dict[int, set[int]] = collections.defaultdict(set)  # node -> the client ids it was sent

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.received[node][msg.metadata.message_type] += 1
            self.asked_as[node].add(int(msg.content["config"]["cid"]))
        live = [m for m in messages if m.metadata.dst_node_id not in self.mute | self.gone]
        replies = super().send_and_receive(live, timeout=timeout)
        for msg in messages:  # the SuperLink's own reply for a node whose heartbeat stopped (from its own id)
            if msg.metadata.dst_node_id in self.gone:
                self.sent += 1
                msg.metadata.__dict__["_message_id"] = f"m{self.sent}"
                replies.append(create_message_error_unavailable_res_message(msg.metadata, "node_unavail"))
        return replies


@pytest.fixture(scope="module")
def many(tmp_path_factory, tiny_assets):
    """A tweets slice with a training example for each of 200 clients (the shared slice has 144)."""
    from assets import make_tweets_slice

    return {"model": tiny_assets["model"],
            "data_dir": str(make_tweets_slice(tmp_path_factory.mktemp("tweets-300"), per_label=100))}


def test_200_clients_2_a_round_message_only_the_sampled_nodes(many, in_process):
    cfg = _small_cfg(many, num_clients=200, clients_per_round=2, rounds=2, local_steps=1, eval_max_examples=8)
    grid = CountingGrid(cfg.num_clients)
    client_app._runtimes.clear()
    _, entries = _rounds(cfg, grid)

    order = sorted(grid.contexts)  # the server addresses client c to the c-th node in node-id order
    sampled = {e["round"]: [c["cid"] for c in e["clients"]] for e in entries}
    for rnd, cids in sampled.items():  # the client ids the seed sampled before: the same stream, the same draw
        assert cids == sorted(int(c) for c in rng.generator("sampling", cfg.seed, rnd, 0).choice(200, 2, replace=False))
    expected = collections.Counter(order[c] for cids in sampled.values() for c in cids)
    # every node that got a message was sampled, and got one query and one train message per round it was sampled
    assert set(grid.received) == set(expected) and len(expected) <= 4
    for node, rounds in expected.items():
        assert grid.received[node] == {"query": rounds, "train": rounds}, node
        assert grid.asked_as[node] == {order.index(node)}  # always as the same client
    # the other 196 or more nodes got nothing; clients served by nodes Flower numbered otherwise
    assert sum(1 for n in grid.contexts if n not in grid.received) >= 196
    assert any(grid.partition_of[order[c]] != c for cids in sampled.values() for c in cids)
    # each client trained its own partition (its example count), and the client side loaded one runtime and
    # encoded only the sampled partitions, never one per node
    task = make_task(cfg)
    parts = partition_for(task, task.load_splits()[0], cfg)
    assert all(c["num_samples"] == len(parts[c["cid"]]) for e in entries for c in e["clients"])
    (rt,) = client_app._runtimes.values()
    assert set(rt.encoded) == {c for cids in sampled.values() for c in cids}
    assert all(e["aggregated"] and not e["failures"] for e in entries)


def test_a_node_refusing_its_first_query_is_left_out_and_replaced(tiny_assets, in_process):
    """Client 3's node is a device that does not hold the run's task (the real ClientApp refuses), client 5's node
    never answers, and client 7's is gone (Flower itself answers "Node Unavailable", from the SuperLink's id): each
    is left out at its first query with its reason, the round draws the next candidates of the seeded order in
    their place, and none is asked again. Everything else is the run without them."""
    cfg = _small_cfg(tiny_assets, num_clients=8, clients_per_round=3, rounds=3, local_steps=1,
                     eval_max_examples=8, round_timeout=5.0, connect_timeout=5.0)
    grid = CountingGrid(8, refuse={3: {"tasks": "sst2"}}, mute=[5], gone=[7])
    order = grid.order
    refusing, silent, gone = order[3], order[5], order[7]
    _, entries = _rounds(cfg, grid)

    left = {f["node"]: (e["round"], f) for e in entries for f in e["failures"]}
    assert set(left) == {refusing, silent, gone}  # all sampled (seed 3 samples them) and left out
    for node, (rnd, f) in left.items():
        assert f["cid"] is None and f["stage"] == "query"
        assert f["reason"].startswith(f"node {node} left out of sampling")
        assert grid.received[node] == {"query": 1}  # asked once, never again
    assert "refused its first query: ValueError: this device does not hold task 'tweets'" in left[refusing][1]["reason"]
    assert left[silent][1]["reason"].endswith("no reply to its first query within 5s")
    assert "refused its first query: Error: Node Unavailable" in left[gone][1]["reason"]
    for e in entries:  # every round still has its 3 clients: a replacement came in for each node left out
        assert e["aggregated"] and len(e["clients"]) == 3 and not {3, 5, 7} & {c["cid"] for c in e["clients"]}
        roster = Roster(8, 3, cfg.seed)
        roster.refresh(order)
        roster.left_out = {n for n, (rnd, _) in left.items() if rnd < e["round"]}
        taken, wanted = [], 3
        for p, node in roster.candidates(e["round"], 0):  # the seeded order, as the strategy walked it
            taken.append(p)
            if node in left and left[node][0] == e["round"]:
                wanted += 1
            if len(taken) == wanted:
                break
        assert [c["cid"] for c in e["clients"]] == sorted(p for p in taken if p not in (3, 5, 7))


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
def test_a_federation_in_which_no_node_answers_stops_with_the_reason(tiny_assets, in_process, secure):
    """No node can serve the run (here: none holds its task): the run stops with one line (a FedploraError, which the
    CLI prints as ``fedplora: error: ...``), also from inside SecAgg+'s workflow, after the sample and one
    replacement batch, not after asking the whole federation."""
    cfg = _small_cfg(tiny_assets, num_clients=4, clients_per_round=3 if secure else 2, rounds=1, local_steps=1,
                     eval_max_examples=8, secure_aggregation=secure)
    grid = CountingGrid(4, refuse={p: {"tasks": "bbc"} for p in range(4)})
    with pytest.raises(NoNodeServes, match=r"no node has answered a query, so the run cannot train: node \d+ left "
                                           r"out of sampling: refused its first query: .*does not hold task"):
        _rounds(cfg, grid)
    assert issubclass(NoNodeServes, FedploraError)
    assert sum(c["query"] for c in grid.received.values()) == 4  # the sample, then replacements up to the rest


def test_the_roster_samples_the_seeded_client_ids_and_replaces_in_stream_order():
    nodes = {int(n) for n in np.random.default_rng(0).integers(0, 2**64, size=50, dtype=np.uint64)}  # Flower's range
    roster = Roster(50, 4, seed=7)
    assert roster.refresh(nodes) == 50 and max(nodes) > 2**63
    order = sorted(nodes)
    first = list(roster.candidates(2, 1))
    assert len(first) == 50 and sorted(p for p, _ in first) == list(range(50))  # every node, once
    assert [node for p, node in first] == [order[p] for p, _ in first]
    assert sorted(p for p, _ in first[:4]) == sorted(
        int(c) for c in rng.generator("sampling", 7, 2, 1).choice(50, 4, replace=False))
    roster.leave_out(first[1][1])
    assert list(roster.candidates(2, 1)) == first[:1] + first[2:]  # the others' draws do not move
    # identities: a first answer fixes a node's client; a conflicting or foreign claim is refused
    assert roster.identify(order[0], 12) == 12
    for node, claim, text in ((order[0], 13, "node of client 12 answered as client 13"),
                              (order[1], 12, f"answered client id 12, which node {order[0]} holds"),
                              (order[2], 50, r"outside \[0, num_clients=50\)"), (order[2], True, "not an integer")):
        with pytest.raises(ValueError, match=text):
            roster.identify(node, claim)
    roster.refresh(order[1:])  # the holder left: a node that comes back under a new id may take its client
    assert roster.identify(order[1], 12) == 12 and roster.node_of[12] == order[1] and order[0] not in roster.client_of


def test_a_simulated_node_serves_the_client_it_is_asked_a_device_its_own():
    from fedplora.config import RunConfig

    cfg = RunConfig(num_clients=10)
    simulated = Context(run_id=1, node_id=5, state=RecordDict(), run_config={},
                        node_config={"partition-id": 2, "num-partitions": 10})
    device = Context(run_id=1, node_id=6, state=RecordDict(), run_config={},
                     node_config={"partition-id": 2, "num-partitions": 10, "max-rank": 4})
    assert client_app.client_id(simulated, cfg, 7) == 7 and client_app.client_id(simulated, cfg) == 2
    assert client_app.client_id(device, cfg, 7) == 2
    with pytest.raises(ValueError, match=r"asked to serve client 10, outside \[0, num_clients=10\)"):
        client_app.client_id(simulated, cfg, 10)


def test_a_reply_error_on_a_known_node_drops_it_for_the_round_only(tiny_assets, in_process):
    """A node that answered before and fails a later query is not left out: it misses that round, as before."""
    cfg = _small_cfg(tiny_assets, num_clients=3, clients_per_round=3, rounds=2, local_steps=1, eval_max_examples=8)

    class FlakyQuery(CountingGrid):  # client 0's node (the first in node-id order) fails round 2's query
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            replies = super().send_and_receive(messages, timeout=timeout)
            first = min(self.contexts)
            asked = [m for m in messages if m.metadata.dst_node_id == first]
            if not asked or asked[0].metadata.message_type != "query" or int(asked[0].content["config"]["round"]) != 2:
                return replies
            return [r for r in replies if r.metadata.src_node_id != first] + [
                Message(Error(code=0, reason="connection reset"), reply_to=asked[0])]

    _, (one, two) = _rounds(cfg, FlakyQuery(3))
    assert [c["cid"] for c in one["clients"]] == [0, 1, 2] and not one["failures"]
    assert two["failures"] == [{"cid": 0, "stage": "query", "reason": "connection reset", "attempt": 0}]
    assert [c["cid"] for c in two["clients"]] == [1, 2] and two["aggregated"]


# ------------------------------------------------------------------------ a pool of simulated nodes (simulation_nodes)
@pytest.fixture(scope="module")
def pooled(many):
    """One run of 200 clients, 2 a round, three times: with one node per client, and with a pool of 2 nodes."""
    runs = {}
    with pytest.MonkeyPatch.context() as mp, flower_process(mp):  # ``in_process``, for the module
        for pool in (0, 2):
            cfg = _small_cfg(many, num_clients=200, clients_per_round=2, rounds=3, local_steps=1,
                             eval_max_examples=8, simulation_nodes=pool)
            grid = CountingGrid(pool or cfg.num_clients)
            runs[pool] = (cfg, grid, *_rounds(cfg, grid))
    return runs


def test_a_pool_trains_the_clients_one_node_per_client_trains_to_the_same_state(pooled):
    (_, _, state, entries), (cfg, _, pool_state, pool_entries) = pooled[0], pooled[2]
    for e in pool_entries:  # the seed's clients, as with 200 nodes
        assert [c["cid"] for c in e["clients"]] == sorted(
            int(c) for c in rng.generator("sampling", cfg.seed, e["round"], 0).choice(200, 2, replace=False))
    assert len(entries) == cfg.rounds and pool_entries == entries
    assert all(e["aggregated"] and not e["failures"] for e in entries)
    assert state.keys() == pool_state.keys() and all(torch.equal(state[k], pool_state[k]) for k in state)
    from fedplora.federation.simulation import federation_config

    assert federation_config(cfg, cpus=2).startswith("num-supernodes=2 ")  # Flower registers the pool only


def test_every_message_goes_to_a_pool_node_each_serving_other_clients_over_rounds(pooled):
    cfg, grid, _, entries = pooled[2]
    assert set(grid.received) == set(grid.contexts) and len(grid.contexts) == 2
    assert all(grid.received[n] == {"query": cfg.rounds, "train": cfg.rounds} for n in grid.contexts)
    assert all(len(grid.asked_as[n]) == cfg.rounds for n in grid.contexts)  # a different client each round
    assert set().union(*grid.asked_as.values()) == {c["cid"] for e in entries for c in e["clients"]}
    # the i-th client drawn goes to the i-th pool node in node-id order
    for rnd in range(1, cfg.rounds + 1):
        drawn = [int(c) for c in rng.generator("sampling", cfg.seed, rnd, 0).choice(200, 2, replace=False)]
        assert all(drawn[i] in grid.asked_as[node] for i, node in enumerate(grid.order))


def test_the_pool_gives_the_seeded_clients_to_its_nodes_in_order_and_keeps_state_per_pool_node():
    nodes = sorted(int(n) for n in np.random.default_rng(1).integers(0, 2**64, size=4, dtype=np.uint64))
    roster = Roster(200, 3, seed=7, pool=4)
    roster.refresh(nodes)
    drawn = [int(c) for c in rng.generator("sampling", 7, 2, 0).choice(200, 3, replace=False)]
    assert roster.pool_sample(2, 0) == (list(zip(drawn, nodes)), [])  # the i-th client drawn, the i-th node
    roster.leave_out(nodes[0])
    assert roster.pool_sample(2, 0) == (list(zip(drawn, nodes[1:])), [])  # a spare steps in, the clients stay
    roster.leave_out(nodes[2])
    assert roster.pool_sample(2, 0) == ([(drawn[0], nodes[1]), (drawn[1], nodes[3])], [drawn[2]])
    # a pool node answers as the client it is asked, a different one each round; the state stays per pool node
    for rnd, cid in enumerate((5, 9, 5, 11)):
        assert roster.identify(nodes[1], cid, cid) == cid and roster.identify(nodes[3], 100 + rnd, 100 + rnd)
    assert roster.client_of == {nodes[1]: 11, nodes[3]: 103} and roster.node_of == {11: nodes[1], 103: nodes[3]}
    with pytest.raises(ValueError, match=r"answered as client 4 when asked to serve client 6: only simulated nodes"):
        roster.identify(nodes[1], 4, 6)


@pytest.mark.parametrize("overrides,match", [
    ({"simulation_nodes": 1}, r"simulation_nodes: 1 pool nodes for 2 clients a round of 10; use 0 \(one node per "
                              r"client\) or a pool between clients_per_round and num_clients \(--simulation-nodes 2 "
                              r"to 10\)"),
    ({"simulation_nodes": 11}, r"simulation_nodes: 11 pool nodes for 2 clients a round of 10; use 0"),
    ({"simulation_nodes": -1}, r"simulation_nodes: must be an integer >= 0 \(0 = one node per client\), got -1"),
    ({"simulation_nodes": 3, "min_nodes": 4}, r"min_nodes: 4 is more than the simulation_nodes=3 the pool registers"),
])
def test_a_bad_pool_size_is_one_line(overrides, match, capsys):
    from fedplora.cli import main
    from fedplora.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match=match):
        RunConfig(**overrides).validate()
    argv = ["run"] + [f for k, v in overrides.items() for f in (f"--{k.replace('_', '-')}", str(v))]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedplora: error: ") and err.count("\n") == 1, err


def test_a_deployment_refuses_a_pool(tmp_path):
    from fedplora.config import ConfigError, RunConfig
    from fedplora.federation.deployment import prepare

    with pytest.raises(ConfigError, match=r"^simulation_nodes: 2 is a simulation setting .* drop --simulation-nodes$"):
        prepare(RunConfig(simulation_nodes=2), tmp_path, 3)
    assert not (tmp_path / "deployment").exists()


def test_a_pool_node_that_refuses_is_left_out_and_its_client_fails_that_round(tiny_assets, in_process):
    """The first pool node in node-id order cannot serve the run (here, as a device without the run's task): it is
    left out at its first query with its reason, the client it was asked to serve fails round 1 (not replaced),
    and the two other nodes serve every later round's clients, the ones one node per client would sample."""
    cfg = _small_cfg(tiny_assets, num_clients=8, clients_per_round=2, rounds=3, local_steps=1, eval_max_examples=8,
                     simulation_nodes=3)
    grid = CountingGrid(3, refuse={0: {"tasks": "sst2"}})
    refusing = grid.order[0]
    _, entries = _rounds(cfg, grid)

    drawn = {e["round"]: [int(c) for c in rng.generator("sampling", cfg.seed, e["round"], 0).choice(8, 2,
                                                                                                   replace=False)]
             for e in entries}
    one = entries[0]
    (failure,) = one["failures"]
    assert failure["node"] == refusing and failure["cid"] == drawn[1][0] and failure["stage"] == "query"
    assert failure["reason"].startswith(f"node {refusing} left out of the pool: refused its first query: ValueError: "
                                        "this device does not hold task 'tweets'")
    assert [c["cid"] for c in one["clients"]] == [drawn[1][1]] and one["aggregated"]
    assert grid.received[refusing] == {"query": 1}  # asked once, never again
    for e in entries[1:]:
        assert sorted(drawn[e["round"]]) == [c["cid"] for c in e["clients"]] and e["aggregated"] and not e["failures"]
    assert all(grid.received[n] == {"query": 3, "train": 3} if n == grid.order[1] else {"query": 2, "train": 2}
               for n in grid.order[1:])


def test_a_pool_whose_nodes_all_refuse_stops_with_the_reason(tiny_assets, in_process):
    cfg = _small_cfg(tiny_assets, num_clients=8, clients_per_round=2, rounds=1, local_steps=1, eval_max_examples=8,
                     simulation_nodes=2)
    grid = CountingGrid(2, refuse={0: {"tasks": "bbc"}, 1: {"tasks": "bbc"}})
    with pytest.raises(NoNodeServes, match=r"no node has answered a query, so the run cannot train: node \d+ left "
                                           r"out of the pool: refused its first query: .*does not hold task"):
        _rounds(cfg, grid)
    assert sum(c["query"] for c in grid.received.values()) == 2
