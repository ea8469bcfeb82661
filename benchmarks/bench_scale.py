"""
Does the server's cost follow the round and not the federation? One invocation runs the demo's task (tweets,
all-MiniLM-L6-v2, `make demo`'s settings) on Flower's Simulation Engine at several federation sizes with the
same number of clients a round, and compares each size with the first (smallest) one:

* time to the first round: from calling ``run_simulation`` until round 1's checkpoint is written (SuperLink,
  Ray and ServerApp start-up, waiting for the nodes, round 0's evaluation and round 1 with the clients' cold
  start); target: at most +60 s over the first size;
* wall per round: the mean of rounds 2..R from the run's history (warm rounds); target: at most 1.10x;
* the server's peak RSS: the ``flwr-simulation`` process, which holds the ServerApp and the Simulation Engine
  (its kernel high-water mark, VmHWM); and the peak of the sum of the RSS of every process of the run (the
  SuperLink, the SuperExec, Ray's processes and actors), sampled every 0.5 s; target: at most 1.10x.

Every client does the same work at every size: the batch is the smallest partition at the largest size
(30,526 training tweets over 10,000 clients: 3), so a client's local steps cost the same whether it holds 3
examples or 3,000, and only the federation's size changes. Nothing here is a timed test; the figures are
printed (and written with --out), for an otherwise idle machine.

    .venv/bin/python benchmarks/bench_scale.py                                   # 10, 1,000 and 10,000 clients
    .venv/bin/python benchmarks/bench_scale.py --sizes 10,200 --rounds 2         # a quick check
    .venv/bin/python benchmarks/bench_scale.py --out docs/scale-results.json --out scale.md
    .venv/bin/python benchmarks/bench_scale.py --pool --out docs/scale-results-pool.json   # simulation_nodes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout
for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "FLWR_DISABLE_UPDATE_CHECK"):
    os.environ.setdefault(key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil  # noqa: E402

from fedplora.config import RunConfig  # noqa: E402
from fedplora.federation.simulation import run_simulation  # noqa: E402

TARGETS = {"first_round_extra_s": 60.0, "wall_per_round_ratio": 1.10, "server_peak_rss_ratio": 1.10,
           "sum_peak_rss_ratio": 1.10}


def peak_rss(pid: int) -> int | None:
    """A process's peak resident set (the kernel's VmHWM, bytes), or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Monitor(threading.Thread):
    """Samples this process's descendants every ``every`` seconds: the peak of their summed RSS, the server's
    (``flwr-simulation``) VmHWM, and when round 1's checkpoint appears in ``out``."""

    def __init__(self, out: Path, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.out, self.every = out, every
        self.stop = threading.Event()
        self.t0 = time.perf_counter()
        self.first_round_s: float | None = None
        self.sum_peak = 0
        self.server_peak = 0
        self.processes = 0

    def run(self) -> None:
        marker = self.out / "checkpoint" / "state-r00001.safetensors"
        while not self.stop.is_set():
            total, count = 0, 0
            for proc in psutil.Process().children(recursive=True):
                try:
                    total += proc.memory_info().rss
                    count += 1
                    if "flwr-simulation" in " ".join(proc.cmdline()):
                        self.server_peak = max(self.server_peak, peak_rss(proc.pid) or 0)
                except psutil.Error:
                    continue
            self.sum_peak, self.processes = max(self.sum_peak, total), max(self.processes, count)
            if self.first_round_s is None and (marker.exists() or (self.out / "summary.json").exists()):
                self.first_round_s = time.perf_counter() - self.t0
            self.stop.wait(self.every)


def smallest_partition(cfg: RunConfig, clients: int) -> int:
    """The fewest training examples an IID client holds at ``clients`` clients (partitions differ by at most 1)."""
    from fedplora.tasks import make_task

    train, _ = make_task(cfg).splits()
    return len(train) // clients


def one_size(base: RunConfig, clients: int, rounds: int, per_round: int, pool: bool = False) -> dict:
    k = min(per_round, clients)
    cfg = base.with_overrides(num_clients=clients, clients_per_round=k, rounds=rounds,
                              simulation_nodes=k if pool else 0).validate()
    with tempfile.TemporaryDirectory(prefix=f"bench-scale-{clients}-") as tmp:
        out = Path(tmp) / "run"
        monitor = Monitor(out)
        monitor.start()
        t0 = time.perf_counter()
        try:
            summary = run_simulation(cfg.with_overrides(out=str(out)), out)
        finally:
            monitor.stop.set()
            monitor.join()
        total_s = time.perf_counter() - t0
    history = summary["history"]
    warm = [h["wall_s"] for h in history[2:]] or [history[1]["wall_s"]]
    return {"clients": clients, "clients_per_round": cfg.clients_per_round, "rounds": rounds,
            "simulated_nodes": cfg.simulation_nodes or clients,
            "first_round_s": round(monitor.first_round_s or total_s, 2),
            "startup_s": round((monitor.first_round_s or total_s) - history[1]["wall_s"], 2),
            "wall_per_round_s": round(statistics.fmean(warm), 3), "rounds_timed": [h["round"] for h in history[2:]],
            "server_peak_rss_mb": round(monitor.server_peak / 2**20, 1),
            "sum_peak_rss_mb": round(monitor.sum_peak / 2**20, 1), "processes": monitor.processes,
            "total_s": round(total_s, 2), "failures": summary["failures_total"],
            "final": summary["final"]}


def with_ratios(rows: list[dict]) -> list[dict]:
    base = rows[0]
    for row in rows:
        row["first_round_extra_s"] = round(row["first_round_s"] - base["first_round_s"], 2)
        row["wall_per_round_ratio"] = round(row["wall_per_round_s"] / base["wall_per_round_s"], 3)
        row["server_peak_rss_ratio"] = round(row["server_peak_rss_mb"] / max(base["server_peak_rss_mb"], 1e-9), 3)
        row["sum_peak_rss_ratio"] = round(row["sum_peak_rss_mb"] / max(base["sum_peak_rss_mb"], 1e-9), 3)
        row["within_targets"] = {k: row[k] <= v for k, v in TARGETS.items()}
    return rows


def markdown(rows: list[dict], settings: dict) -> str:
    def mark(row, key):
        return "" if row is rows[0] else (" ok" if row["within_targets"][key] else " **over**")

    nodes = ("a pool of as many simulated nodes as clients a round (simulation_nodes)" if settings.get("pool")
             else "one simulated node per client")
    lines = [f"{settings['clients_per_round']} clients a round on {nodes}, {settings['rounds']} rounds, batch "
             f"{settings['batch_size']}, {settings['cores']} cores; ratios to the {rows[0]['clients']:,}-client run. "
             "Targets: first round at most +60 s, wall per round and peak RSS at most 1.10x.", "",
             "| clients | time to first round | start-up | wall per round (rounds 2..) | server peak RSS "
             "| sum of RSS (peak) | processes |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['clients']:,} | {r['first_round_s']:.1f} s (+{r['first_round_extra_s']:.1f})"
            f"{mark(r, 'first_round_extra_s')} "
            f"| {r['startup_s']:.1f} s "
            f"| {r['wall_per_round_s']:.2f} s ({r['wall_per_round_ratio']:.2f}x){mark(r, 'wall_per_round_ratio')} "
            f"| {r['server_peak_rss_mb']:.0f} MB ({r['server_peak_rss_ratio']:.2f}x){mark(r, 'server_peak_rss_ratio')} "
            f"| {r['sum_peak_rss_mb']:.0f} MB ({r['sum_peak_rss_ratio']:.2f}x){mark(r, 'sum_peak_rss_ratio')} "
            f"| {r['processes']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10,1000,10000", help="federation sizes, comma-separated; the first is the base")
    p.add_argument("--per-round", type=int, default=10, help="clients sampled a round (fewer when a size is smaller)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per run (round 1 is cold: rounds 2.. are timed)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="local batch (default: the smallest partition at the largest size, at most the demo's 16)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a run setting for every size, TOML value syntax (e.g. --set local_steps=5)")
    p.add_argument("--pool", action="store_true",
                   help="simulate each size on a pool of --per-round nodes (simulation_nodes) instead of one node "
                        "per client")
    p.add_argument("--out", action="append", default=[], help="write the results here: FILE.json or FILE.md "
                                                              "(repeatable)")
    args = p.parse_args()
    import tomllib

    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes: {args.sizes!r} is not a comma-separated list of integers")
    if not sizes or min(sizes) < 1 or args.per_round < 1 or args.rounds < 1:
        p.error("--sizes, --per-round and --rounds must be positive")
    if any(not o.endswith((".json", ".md")) for o in args.out):
        p.error("--out: name a .json or .md file")
    extra = {k: tomllib.loads(f"v = {v}")["v"] for k, v in (s.split("=", 1) for s in args.set)}
    base = RunConfig.from_dict({**extra, "num_clients": max(sizes), "clients_per_round": 1}).validate()
    batch = args.batch_size or max(1, min(base.batch_size, smallest_partition(base, max(sizes))))
    base = base.with_overrides(batch_size=batch)
    settings = {"sizes": sizes, "clients_per_round": args.per_round, "rounds": args.rounds, "batch_size": batch,
                "cores": os.cpu_count(), "task": base.task, "local_steps": base.local_steps, "pool": args.pool, **extra}
    print(f"sizes {sizes}, {args.per_round} clients a round, {args.rounds} rounds, batch {batch} "
          f"({base.local_steps} local steps), {os.cpu_count()} cores", flush=True)
    rows = []
    for clients in sizes:
        row = one_size(base, clients, args.rounds, args.per_round, args.pool)
        rows.append(row)
        print(f"  {clients:>6,} clients: first round {row['first_round_s']:.1f} s (start-up {row['startup_s']:.1f} s), "
              f"{row['wall_per_round_s']:.2f} s a round, server peak {row['server_peak_rss_mb']:.0f} MB, "
              f"sum of RSS {row['sum_peak_rss_mb']:.0f} MB over {row['processes']} processes", flush=True)
    rows = with_ratios(rows)
    table = markdown(rows, settings)
    print("\n" + table)
    result = {"settings": settings, "targets": TARGETS, "results": rows}
    for name in args.out:
        Path(name).write_text(json.dumps(result, indent=1) + "\n" if name.endswith(".json") else table)
        print(f"wrote {name}")


if __name__ == "__main__":
    main()
