"""Which Flower node serves which client, learned from the nodes a round asks and never from all of them.

Flower numbers nodes at random: the Simulation Engine registers node ids from a random source and numbers
their partitions 0..N-1 in registration order (``flwr/server/superlink/fleet/vce/vce_api.py``,
``_register_nodes``), and a SuperLink gives a SuperNode a random id when it registers. So the server cannot
compute which node holds which client, and asking every node (what the server did before) costs a message, and
in simulation a ClientApp call, per node of the federation before the first round.

What the server keeps instead (``Roster``):

* ``order``: the connected node ids, sorted; one unsigned 64-bit integer a node, read from
  ``grid.get_node_ids()`` (Flower's own O(nodes) call) at the start of every round attempt;
* for the nodes a round has asked: the client id each one answered (node -> client and back), and the nodes
  left out of sampling. Nodes never sampled cost nothing here.

A round samples *positions* in ``order`` with the run's seeded stream (``candidates``): first
``choice(P, k)`` over the P connected nodes, then single draws for replacements. The node at position p is
asked as client p (the message carries p):

* a simulated node serves client p. Every simulated node can serve any partition: they share one dataset and
  one ClientApp, so the node config's ``partition-id`` is only Flower's numbering, not the client. With the
  federation's ``num_clients`` nodes connected, the sampled positions are exactly the client ids the same seed
  sampled before this module existed (same generator, same draw), so a run's numbers do not change;
* a device (a SuperNode whose node config declares its own data) serves only its own client: it answers with
  its node config's ``partition-id`` whatever p was, and the server learns that node's client id then, from the
  query it sends a sampled node anyway. In a deployment the sample is therefore a seeded draw of the connected
  nodes; which client ids that gives depends on the node ids the SuperLink assigned.

A node whose first answer is a refusal (an error reply, or a client id that another connected node holds), or
that does not answer its first query in time, is left out of sampling for the rest of the run (the strategy
records why and draws a replacement, ``HeteroLoRAStrategy.client_infos``).

A pool (``simulation_nodes`` K > 0, ``pool_sample``): the simulation registers only K nodes, because Flower's
own costs grow with the registered nodes (a Context each; the Simulation Engine's message poll scans every
stored message for every node, every 0.1 s), not because the server needs them. The round's clients are then
drawn from the same stream as if ``num_clients`` nodes were connected (so the same clients, in the same order)
and the i-th client drawn is asked of the i-th pool node, in node-id order, that is not left out. A pool node
answers as the client it was asked, a different one each round; ``client_of`` holds its latest client and
``node_of`` only the clients the pool serves now, so the state stays per pool node. A pool node whose first
query fails is left out of the pool as above; its client fails that round, not replaced (the sample stays the
one-node-per-client run's).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import numpy as np

from .. import rng
from ..errors import FedploraError


class NoNodeServes(FedploraError):
    """Every node asked so far was left out and none has ever answered: no node can serve this run (a setting or
    file every client lacks), so the run stops with the first node's reason instead of sampling on."""


class Roster:
    """The server's view of the federation: O(1) state per node (``order``), more only for nodes a round asked."""

    def __init__(self, num_clients: int, clients_per_round: int, seed: int, pool: int = 0) -> None:
        self.num_clients, self.clients_per_round, self.seed = num_clients, clients_per_round, seed
        self.pool = pool  # simulation_nodes: > 0, the nodes are interchangeable workers (``pool_sample``)
        self.order = np.empty(0, dtype=np.uint64)  # connected node ids, sorted (Flower's ids are unsigned 64-bit)
        self.client_of: dict[int, int] = {}  # node -> the client id it answered (nodes that answered only)
        self.node_of: dict[int, int] = {}  # client id -> the node that answered as it
        self.left_out: set[int] = set()  # nodes whose first query failed: never sampled again this run

    def refresh(self, node_ids: Iterable[int]) -> int:
        """The connected nodes, as ``grid.get_node_ids()`` lists them; returns how many."""
        self.order = np.sort(np.fromiter((int(n) for n in node_ids), dtype=np.uint64))
        return len(self.order)

    def connected(self, node: int) -> bool:
        i = int(np.searchsorted(self.order, np.uint64(node)))
        return i < len(self.order) and int(self.order[i]) == node

    def candidates(self, server_round: int, attempt: int) -> Iterator[tuple[int, int]]:
        """(position, node) in the round's seeded order, left-out nodes skipped: the first ``clients_per_round`` are
        the round's sample, the ones after it its replacements.

        The order is the stream ``sampling`` (seed, round, attempt): ``choice(P, min(k, P))`` first, exactly the
        sample drawn before (``choice`` over the sorted client ids 0..P-1 gives the same indices), then one
        position a draw, repeats skipped, until every position was seen. A replacement is therefore the same
        whichever earlier candidate was left out, and a left-out node changes no other client's draw.
        """
        for p in self._positions(len(self.order), server_round, attempt):
            node = int(self.order[p])
            if node not in self.left_out:
                yield p, node

    def pool_sample(self, server_round: int, attempt: int) -> tuple[list[tuple[int, int]], list[int]]:
        """A pool's round: (client, node) for the round's clients, and the clients no pool node is left for.

        The clients are the first ``clients_per_round`` of the stream ``candidates`` walks with ``num_clients``
        nodes connected (``choice(num_clients, k)``), so a pool samples exactly the clients one node per client
        samples; the i-th of them goes to the i-th pool node, in node-id order, that is not left out. No
        replacements are drawn: the sample never depends on which pool node failed.
        """
        clients = list(itertools.islice(self._positions(self.num_clients, server_round, attempt),
                                        self.clients_per_round))
        nodes = [int(n) for n in self.order if int(n) not in self.left_out]
        return list(zip(clients, nodes)), clients[len(nodes):]

    def _positions(self, size: int, server_round: int, attempt: int) -> Iterator[int]:
        """Every position in [0, size) once, in the round's seeded order (``candidates``)."""
        if size == 0:
            return
        draw = rng.generator("sampling", self.seed, server_round, attempt)
        first = draw.choice(size, size=min(self.clients_per_round, size), replace=False)
        seen: set[int] = set()

        def positions() -> Iterator[int]:
            yield from (int(p) for p in first)
            while len(seen) < size:
                yield int(draw.integers(size))

        for p in positions():
            if p not in seen:
                seen.add(p)
                yield p

    def identify(self, node: int, claimed, asked: int | None = None) -> int:
        """Record the client id ``node`` answered (its first answer fixes it) and return it; ``ValueError`` naming
        the conflict when the answer is not a client id of this run, differs from the node's earlier answer, or
        names a client that another connected node answered as. In a pool, a node serves whichever client it is
        ``asked``, so only an answer other than that one is a conflict (a device, which cannot be pooled)."""
        if isinstance(claimed, bool) or not isinstance(claimed, (int, np.integer)):
            raise ValueError(f"answered client id {claimed!r}, not an integer")
        cid = int(claimed)
        if not 0 <= cid < self.num_clients:
            raise ValueError(f"answered client id {cid}, outside [0, num_clients={self.num_clients})")
        if self.pool:
            if cid != asked:
                raise ValueError(f"answered as client {cid} when asked to serve client {asked}: only simulated "
                                 f"nodes can serve as a pool (simulation_nodes={self.pool})")
            if self.node_of.get(self.client_of.get(node, -1)) == node:
                del self.node_of[self.client_of[node]]  # its client of an earlier round is no longer served by it
            self.client_of[node], self.node_of[cid] = cid, node
            return cid
        known = self.client_of.get(node)
        if known is not None:
            if known != cid:
                raise ValueError(f"node of client {known} answered as client {cid}")
            return cid
        holder = self.node_of.get(cid)
        if holder is not None and holder != node and self.connected(holder):
            raise ValueError(f"answered client id {cid}, which node {holder} holds")
        if holder is not None:  # the earlier holder left the federation: a device that came back under a new id
            self.client_of.pop(holder, None)
        self.client_of[node], self.node_of[cid] = cid, node
        return cid

    def leave_out(self, node: int) -> None:
        self.left_out.add(node)
