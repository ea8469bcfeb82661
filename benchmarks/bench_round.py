"""
Where a simulated round's wall time goes: the Simulation Engine's wall time per round against the
pure training compute of the same round, and the round's fixed overhead, from one run per setup.

1. A real ``fedplora run`` (Flower's Simulation Engine, the ServerApp and ClientApps as in any run)
   of ``--rounds`` rounds. Its history gives, per round: the wall time, each client's own time in
   its ``train`` handler and in ``train_local`` alone, and the server's evaluation, aggregation and
   noise-measurement times. Round 1 pays the clients' cold start (loading the model and data), so
   the figures are over the warm rounds 2..N.
2. The same rounds' local training replayed in this one process, with no Flower, with every core:
   the same clients, budgets, tasks (``configure_client``), Select-N-Fold (``client_setup``) and
   seeded batches (``train_local``), back to back. Its time is the round's compute: what a round
   would cost with zero overhead.

Printed per setup: the mean warm round's wall time (evaluation rounds included), its compute, their ratio (the target is
wall <= 1.25 x compute), and the wall time split into training (the clients' handler time, summed, over the
number of actors that run them side by side), evaluation, aggregation, measurement and the rest (messages, Ray
scheduling, the ServerApp's bookkeeping). Both parts run in one invocation, one after the other,
on an otherwise idle machine; the ratio is what the benchmark asserts nothing about (no timed test),
it prints it.

    .venv/bin/python benchmarks/bench_round.py                       # the demo and a GLUE study cell
    .venv/bin/python benchmarks/bench_round.py --setups demo --rounds 4
    .venv/bin/python benchmarks/bench_round.py --allocators --json docs/speed-results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout
for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "FLWR_DISABLE_UPDATE_CHECK"):
    os.environ.setdefault(key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from fedplora.config import RunConfig  # noqa: E402
from fedplora.federation.client_app import method_options, plora_config  # noqa: E402
from fedplora.federation.simulation import run_simulation  # noqa: E402
from fedplora.methods import ClientInfo, make_method  # noqa: E402
from fedplora.adapters import get_plora_model  # noqa: E402
from fedplora.tasks import make_task  # noqa: E402
from fedplora.tasks.partition import partition_for  # noqa: E402
from fedplora.training import local_seed, train_local  # noqa: E402

# The setups: the demo as `make demo` runs it, and one cell of studies/glue-paper.toml's protocol at the
# scale of studies/glue-cpu.toml (100 clients, 10 a round, ranks 1/4/16 of R = 16; 6 local steps, the grid has 5; the whole
# SST-2 validation split evaluated every 3rd round, from ../shared/data).
SETUPS = {
    "demo": {},
    "glue-cell": dict(task="sst2", data_dir=str(ROOT.parent / "shared" / "data" / "sst2"), num_clients=100,
                      clients_per_round=10, rank=16, ranks=[1, 4, 16], lr=1e-3, local_steps=6, eval_every=3,
                      eval_max_examples=2000, max_seq_len=64),
}


def simulate(cfg: RunConfig, out: Path) -> list[dict]:
    return run_simulation(cfg.with_overrides(out=str(out)), out)["history"]


def replay(cfg: RunConfig, history: list[dict]) -> dict[int, float]:
    """Per round: the seconds the round's local training takes in this process, client after client."""
    torch.set_num_threads(os.cpu_count() or 1)
    task = make_task(cfg)
    train, _ = task.splits()
    parts = partition_for(task, train, cfg)
    model = get_plora_model(task.build_model(), plora_config(cfg))
    method = make_method(cfg.method, plora_config(cfg), **method_options(cfg))
    state = method.init_state(model)
    encoded = {}
    seconds = {}
    for entry in history[1:]:
        t = 0.0
        for c in entry["clients"]:
            cid = c["cid"]
            if cid not in encoded:
                encoded[cid] = task.encode(parts[cid])
            info = ClientInfo(cid=cid, budget=c["budget"], num_samples=len(encoded[cid]))
            t0 = time.perf_counter()
            ctask = method.configure_client(state, info, entry["round"])
            method.client_setup(model, ctask)
            train_local(model, task, encoded[cid], steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                        weight_decay=cfg.weight_decay, seed=local_seed(cfg.seed, entry["round"], cid))
            method.client_update(model, ctask, num_samples=len(encoded[cid]))
            t += time.perf_counter() - t0
        seconds[entry["round"]] = t
    return seconds


def summarise(name: str, cfg: RunConfig, history: list[dict], compute: dict[int, float]) -> dict:
    warm = [e for e in history if e["round"] >= 2] or history[1:]
    rows = []
    for e in warm:
        clients = e["clients"]
        # clients run side by side on floor(cores / client_cpus) actors: the training's critical path is about
        # the clients' handler time divided by that (exact with one actor, where they run one after another)
        actors = max(1, min(len(clients), (os.cpu_count() or 1) // max(1, math.ceil(cfg.client_cpus))))
        training = sum(c.get("client_s", 0.0) for c in clients) / actors
        parts = {"wall": e["wall_s"], "compute": compute[e["round"]],
                 "train_clients_per_actor": training,
                 "train_sum_clients": sum(c.get("train_s", 0.0) for c in clients),
                 "eval": e.get("eval_s", 0.0), "aggregate": e.get("agg_s", 0.0), "measure": e.get("measure_s", 0.0)}
        parts["rest"] = parts["wall"] - training - parts["eval"] - parts["aggregate"] - parts["measure"]
        rows.append(parts)
    med = {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}  # the mean: evaluation rounds count
    return {"setup": name, "rounds_timed": [e["round"] for e in warm], "clients_per_round": cfg.clients_per_round,
            "local_steps": cfg.local_steps, "batch_size": cfg.batch_size, "cores": os.cpu_count(),
            "client_cpus": cfg.client_cpus, "eval_examples": cfg.eval_max_examples, "eval_every": cfg.eval_every,
            "mean_s": {k: round(v, 3) for k, v in med.items()},
            "wall_over_compute": round(med["wall"] / med["compute"], 3),
            "per_round": [{k: round(v, 3) for k, v in r.items()} for r in rows]}


def show(result: dict) -> None:
    m = result["mean_s"]
    print(f"\n{result['setup']}: {result['clients_per_round']} clients x {result['local_steps']} steps (batch "
          f"{result['batch_size']}) a round, {result['cores']} cores; mean of warm rounds {result['rounds_timed']}")
    print(f"  wall {m['wall']:.2f} s   compute (in-process replay) {m['compute']:.2f} s   "
          f"wall / compute = {result['wall_over_compute']:.2f}   (target <= 1.25)")
    print(f"  wall = clients' handlers per actor {m['train_clients_per_actor']:.2f} + evaluation {m['eval']:.2f} + aggregation "
          f"{m['aggregate']:.3f} + measurement {m['measure']:.3f} + rest {m['rest']:.2f} s")
    print(f"  the clients' own train_local time, summed: {m['train_sum_clients']:.2f} s")


def allocator_step(mode: str, threads: int, steps: int) -> float:
    """Seconds per demo training step in this (fresh) process, under glibc's default allocator or the fixed
    mmap threshold (``steady_allocator``); run by ``--allocators`` in child processes, one per figure."""
    from fedplora.adapters import select_and_fold
    from fedplora.hardware import steady_allocator

    torch.set_num_threads(threads)
    if mode == "steady":
        steady_allocator()
    cfg = RunConfig().validate()
    task = make_task(cfg)
    data = task.encode(partition_for(task, task.splits()[0], cfg)[0])
    model = get_plora_model(task.build_model(), plora_config(cfg))
    select_and_fold(model, range(4))
    train_local(model, task, data, steps=3, batch_size=16, lr=1e-3, weight_decay=0.0, seed=0)  # warm-up
    return train_local(model, task, data, steps=steps, batch_size=16, lr=1e-3, weight_decay=0.0, seed=1)["train_s"] / steps


def compare_allocators(repeats: int = 2, steps: int = 15) -> dict:
    """The demo's training step under each allocator, 1 and 2 threads, alternating child processes."""
    import subprocess

    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for threads in (1, 2):
            for mode in ("default", "steady"):
                out = subprocess.run([sys.executable, __file__, "--child-step", f"{mode},{threads},{steps}"],
                                     capture_output=True, text=True, check=True).stdout
                times.setdefault(f"{mode}-{threads}t", []).append(float(out.strip().splitlines()[-1]))
    result = {k: round(statistics.median(v), 4) for k, v in times.items()}
    for t in (1, 2):
        print(f"demo step, {t} thread(s): glibc default {result[f'default-{t}t']:.3f} s, fixed mmap threshold "
              f"{result[f'steady-{t}t']:.3f} s: {result[f'steady-{t}t'] / result[f'default-{t}t']:.2f}x slower")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", default="demo,glue-cell", help=f"comma list of {sorted(SETUPS)}, or none")
    p.add_argument("--rounds", type=int, default=9, help="rounds per run (round 1 is cold and not timed)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a run setting for every setup, TOML value syntax (e.g. --set eval_every=5)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--allocators", action="store_true",
                   help="also time a demo step under glibc's default allocator and the planner's fixed mmap "
                        "threshold (child processes, side by side)")
    p.add_argument("--child-step", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_step:
        mode, threads, steps = args.child_step.split(",")
        print(allocator_step(mode, int(threads), int(steps)))
        return
    import tomllib

    extra = {k: tomllib.loads(f"v = {v}")["v"] for k, v in (s.split("=", 1) for s in args.set)}
    results = []
    for name in [n for n in args.setups.split(",") if n and n != "none"]:
        cfg = RunConfig.from_dict({**SETUPS[name], **extra, "rounds": args.rounds}).validate()
        with tempfile.TemporaryDirectory(prefix="bench-round-") as tmp:
            history = simulate(cfg, Path(tmp) / "run")
        result = summarise(name, cfg, history, replay(cfg, history))
        result["settings"] = {**SETUPS[name], **extra}
        show(result)
        results.append(result)
    allocators = compare_allocators() if args.allocators else None
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "results": results,
                                               "allocator_step_s": allocators}, indent=1) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
