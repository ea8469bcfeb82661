"""
What does Flower's Simulation Engine spend, during a round, on a federation of many nodes that are not sampled?

bench_scale.py finds the wall per round at 10,000 simulated clients 1.32x the 10-client figure with the same
10 clients a round. The loop measured here is the one cost inside a round that grows with the federation:
flwr 1.42's ``vce_api.add_messages_to_queue`` (``flwr/server/superlink/fleet/vce/vce_api.py``), a thread of
the ``flwr-simulation`` process that, every 0.1 s, asks the in-memory link state for each registered node's
next message, one node at a time. Each ask (``InMemoryLinkState.get_message_ins``) takes the state's lock and
checks every message in the store (expiry, federation membership) before filtering by destination, so a sweep
costs nodes x stored messages. A round keeps its instructions in the store until the replies are pulled: 10
of them at 10 clients a round.

This replays that loop on Flower's own state class (the same factory, federation manager and run record
``run_simulation`` sets up) with N registered nodes and 0 or 10 stored instructions addressed to nodes the
loop never matches, for 2 s each, and prints the time per sweep and the share of one core the thread then
keeps busy (sweep / (sweep + 0.1 s)), while holding the GIL of the process that also runs the ServerApp.
The stored instructions carry only the metadata fields the store's checks read. Run it on an idle machine:

    .venv/bin/python benchmarks/bench_flower_poll.py
    .venv/bin/python benchmarks/bench_flower_poll.py --sizes 10,10000 --seconds 1
"""

from __future__ import annotations

import argparse
import time
import types

from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager

POLL_S = 0.1  # add_messages_to_queue's f_stop.wait(0.1)


def link_state(pending: int):
    """Flower's in-memory link state as run_simulation builds it, one run, ``pending`` stored instructions."""
    state = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()).state()
    run = Run.create_empty(run_id=1)
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[1] = RunRecord(run=run)
    for k in range(pending):  # delivered instructions waiting for their replies, as in a round in flight
        meta = types.SimpleNamespace(created_at=time.time(), ttl=3600.0, run_id=1, src_node_id=0,
                                     dst_node_id=-(k + 1), delivered_at="delivered")
        state.message_ins_store[f"ins-{k}"] = types.SimpleNamespace(metadata=meta)
    return state


def sweep_seconds(nodes: int, pending: int, seconds: float) -> float:
    state = link_state(pending)
    node_ids = range(1, nodes + 1)
    start, sweeps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds or sweeps < 2:
        for node_id in node_ids:  # the body of add_messages_to_queue, without its queue.put (nothing matches)
            state.get_message_ins(node_id=node_id, limit=1)
        sweeps += 1
    return (time.perf_counter() - start) / sweeps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--sizes", default="10,1000,10000", help="registered nodes, comma-separated")
    parser.add_argument("--pending", default="0,10", help="stored instructions, comma-separated")
    parser.add_argument("--seconds", type=float, default=2.0, help="time spent on each cell")
    args = parser.parse_args()
    print("| nodes | stored instructions | one sweep | busy share of one core |")
    print("|---|---|---|---|")
    for nodes in (int(s) for s in args.sizes.split(",")):
        for pending in (int(p) for p in args.pending.split(",")):
            s = sweep_seconds(nodes, pending, args.seconds)
            print(f"| {nodes:,} | {pending} | {s * 1000:.2f} ms | {s / (s + POLL_S):.0%} |", flush=True)


if __name__ == "__main__":
    main()
