"""
What secure aggregation (Flower's SecAgg+, docs/secure-aggregation.md) costs and changes, from real runs in
Flower's Simulation Engine (``run_simulation``: the ServerApp and ClientApps as in any ``fedplora run``), one
at a time. The setup, "the secure demo": the demo's task and model (3-class tweets, MiniLM) and its other
defaults, with num_clients = clients_per_round = 10 (SecAgg+ needs >= 3 a round; 10 makes the dropout
fractions whole clients), 6 rounds, local_steps 8, R = 8 with budgets 2/4/8, 300 evaluation examples, seed 0.

1. ``precision``: one round plain and one round secure, same seed and settings (the same clients, tasks and
   batches: the clients train identically; the script checks the clients, ranks and losses agree). The two
   global states after the round (checkpoint/state-r00001.safetensors: pairs and heads) are compared per
   tensor: ||secure - plain|| / ||plain|| (A, B and heads separately: the max over layers and the overall
   figure) and the same error over the round's change, ||secure - plain|| / ||plain - initial||. The initial
   (round-0) state is rebuilt in this process as the ServerApp builds it (seed, task, model, method's
   ``init_state``) and checked against the plain run's round-0 evaluation. Target: below 1e-4 on the pairs.
2. ``demo``: the secure demo plain and secure: final accuracy, uplink bytes per client per round and per round
   and the secure/plain factor, the mean warm round's wall time (rounds 2..N) and its factor, and the secure
   run's clipped-coordinate count (must be 0).
3. ``dropouts``: the secure demo with fail_fraction 0.1 and 0.3 (1 and 3 of the round's 10 clients fail while
   training, i.e. in SecAgg+'s stage 2, after the key exchange; default secure_threshold 0.7 tolerates 3), each
   beside the plain run with the same failures: rounds aggregated, survivors per round, final accuracy, warm
   round wall time against the no-dropout secure run, and the final global state's distance secure vs plain
   (they differ only by quantization, carried through the later rounds' training).
4. ``beyond``: fail_fraction 0.4 (4 of 10: below the threshold of 7) for 2 rounds: every round halts, is
   skipped (on_too_few_replies = skip) and the global state stays the initial one (checked exactly).

Printed: a Markdown table per part, ready for docs/secure-aggregation.md; ``--json`` writes every figure.
Run on an otherwise idle machine; the full benchmark (9 runs, 40 rounds) takes about 16 minutes on 2 idle
CPU cores (the script prints its estimate first; ``--dry-run`` prints only the runs and the estimate):

    .venv/bin/python benchmarks/bench_secure.py --out runs/bench-secure --json docs/secure-results.json
    .venv/bin/python benchmarks/bench_secure.py --only precision          # the same-round precision alone
    .venv/bin/python benchmarks/bench_secure.py --quick                   # a short smoke run of every part
    .venv/bin/python benchmarks/bench_secure.py --out runs/bench-secure --reuse   # finish an interrupted one

``--quick``: 5 clients, 2 local steps, 50 evaluation examples, 1 round, dropouts of 1 client in 5 (0.2) and
2 in 5 (0.4, beyond the threshold of 4): checks the script, measures nothing worth publishing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
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
from safetensors.torch import load_file  # noqa: E402

from fedplora import rng  # noqa: E402
from fedplora.config import RunConfig, secure_quantization_range  # noqa: E402
from fedplora.federation.checkpoint import FOLDER, RECORD  # noqa: E402
from fedplora.federation.simulation import run_simulation, with_gpu_share  # noqa: E402

# the secure demo: the demo's defaults (RunConfig's) except these
SECURE_DEMO = dict(num_clients=10, clients_per_round=10, local_steps=8, rank=8, ranks=[2, 4, 8],
                   eval_max_examples=300, seed=0)
QUICK = dict(num_clients=5, clients_per_round=5, local_steps=2, eval_max_examples=50)
PARTS = ("precision", "demo", "dropouts", "beyond")
# measured on 2 idle cores: a demo round of 10 clients x 8 local steps ~15-20 s; a run's startup ~15 s
STARTUP_S, ROUND_S_PER_CLIENT_STEP, SECURE_FACTOR_GUESS = 15.0, 18.0 / 80, 1.3


# ------------------------------------------------------------------------------------------- the runs
def plan(args, base: dict) -> list[dict]:
    """The runs the chosen parts need, in order: name, settings, rounds, parts."""
    runs: dict[str, dict] = {}

    def add(name: str, part: str, rounds: int, **settings) -> None:
        runs.setdefault(name, {"name": name, "settings": {**base, **settings}, "rounds": rounds, "parts": []})
        runs[name]["parts"].append(part)

    parts = args.parts
    if "precision" in parts:
        add("plain-1round", "precision", 1)
        add("secure-1round", "precision", 1, secure_aggregation=True)
    if "demo" in parts or "dropouts" in parts:
        add("plain", "demo", args.rounds)
        add("secure", "demo", args.rounds, secure_aggregation=True)
    if "dropouts" in parts:
        for f in args.fail_fractions:
            add(f"plain-fail{f:g}", "dropouts", args.rounds, fail_fraction=f)
            add(f"secure-fail{f:g}", "dropouts", args.rounds, fail_fraction=f, secure_aggregation=True)
    if "beyond" in parts:
        add(f"secure-fail{args.beyond:g}", "beyond", args.beyond_rounds, fail_fraction=args.beyond,
            secure_aggregation=True)
    return list(runs.values())


def estimate_s(runs: list[dict]) -> float:
    total = 0.0
    for r in runs:
        s = r["settings"]
        per_round = s["clients_per_round"] * s["local_steps"] * ROUND_S_PER_CLIENT_STEP
        total += STARTUP_S + r["rounds"] * per_round * (SECURE_FACTOR_GUESS if s.get("secure_aggregation") else 1.0)
    return total


def config_of(run: dict) -> RunConfig:
    return RunConfig.from_dict({**run["settings"], "rounds": run["rounds"]}).validate()


def execute(run: dict, folder: Path, reuse: bool) -> dict:
    """Run it (or, with ``reuse``, take a finished run with the same settings from ``folder``); its summary."""
    cfg = config_of(run).with_overrides(out=str(folder))
    summary_file = folder / "summary.json"
    if reuse and summary_file.is_file() and (folder / "config.toml").is_file():
        done = RunConfig.from_toml(folder / "config.toml").with_overrides(out=str(folder)).to_dict()
        if done == with_gpu_share(cfg).to_dict():  # the run saved its resolved GPU share
            print(f"  {run['name']}: reusing the finished run in {folder}", flush=True)
            return json.loads(summary_file.read_text())
    shutil.rmtree(folder, ignore_errors=True)  # this benchmark's own run folder
    t0 = time.perf_counter()
    summary = run_simulation(cfg, folder)
    print(f"  {run['name']}: {run['rounds']} round(s) in {time.perf_counter() - t0:.0f} s", flush=True)
    return summary


def final_state(folder: Path) -> dict[str, torch.Tensor]:
    """The global state (pairs and heads) of the run's last checkpoint."""
    record = json.loads((folder / FOLDER / RECORD).read_text())
    return load_file(str(folder / FOLDER / record["state_file"]))


def initial_state(cfg: RunConfig, round0_metrics: dict | None) -> tuple[dict[str, torch.Tensor], bool | None]:
    """The round-0 global state, built as ``server_app.run_federation`` builds it, and whether evaluating it
    reproduces the run's round-0 metrics (None: not checked)."""
    from fedplora.adapters import get_plora_model
    from fedplora.federation.client_app import method_options, plora_config
    from fedplora.federation.server_app import evaluation_set
    from fedplora.methods import make_method
    from fedplora.tasks import make_task

    torch.manual_seed(rng.seed_int("init", cfg.seed))
    task = make_task(cfg)
    train, test = task.splits()
    eval_data = evaluation_set(task, test, cfg)
    model = get_plora_model(task.build_model(), plora_config(cfg))
    method = make_method(cfg.method, plora_config(cfg), **method_options(cfg))
    state = {k: v.detach().clone() for k, v in method.init_state(model).items()}
    if not round0_metrics:
        return state, None
    method.load_global(model, state)
    with torch.no_grad():
        metrics = task.evaluate(model, eval_data)
    same = all(math.isclose(metrics[k], v, rel_tol=1e-5, abs_tol=1e-6) for k, v in round0_metrics.items() if k in metrics)
    return state, same


# ------------------------------------------------------------------------------------------- the figures
def group_of(key: str) -> str:
    return "A" if key.endswith("plora_A") else "B" if key.endswith("plora_B") else "heads"


def norm(t: torch.Tensor) -> float:
    return float(t.double().norm())


def compare_states(plain: dict, secure: dict, initial: dict | None) -> dict:
    """Per group (A, B, heads, all): max over tensors and overall of ||s - p|| / ||p|| and ||s - p|| / ||p - init||."""
    assert plain.keys() == secure.keys(), "the two runs' states have different keys"
    out = {}
    for group in ("A", "B", "heads", "all"):
        keys = [k for k in plain if group == "all" or group_of(k) == group]
        if not keys:
            continue
        diff = {k: norm(secure[k].double() - plain[k].double()) for k in keys}
        ref = {k: norm(plain[k]) for k in keys}
        row = {"tensors": len(keys),
               "max_abs": max(float((secure[k].double() - plain[k].double()).abs().max()) for k in keys),
               "rel_max": max(diff[k] / ref[k] if ref[k] else (0.0 if diff[k] == 0 else math.inf) for k in keys),
               "rel_overall": math.sqrt(sum(d * d for d in diff.values())) / math.sqrt(sum(r * r for r in ref.values()))}
        if initial is not None:
            change = {k: norm(plain[k].double() - initial[k].double()) for k in keys}
            row["change_max"] = max(diff[k] / change[k] if change[k] else (0.0 if diff[k] == 0 else math.inf)
                                    for k in keys)
            row["change_overall"] = (math.sqrt(sum(d * d for d in diff.values())) /
                                     math.sqrt(sum(c * c for c in change.values())))
        out[group] = row
    return out


def describe(run: dict, summary: dict) -> dict:
    """One run's figures from its summary's history."""
    history = summary["history"]
    rounds = history[1:]
    warm = [e for e in rounds if e["round"] >= 2] or rounds
    secure = bool(run["settings"].get("secure_aggregation"))
    client_up = [c.get("bytes_up", 0) for e in rounds for c in e["clients"]]
    clipped = [c.get("secure_clipped") for e in rounds for c in e["clients"]] if secure else []
    metric = summary["metric"]
    return {
        "name": run["name"], "secure": secure, "fail_fraction": run["settings"].get("fail_fraction", 0.0),
        "settings": run["settings"], "rounds": len(rounds),
        "aggregated": sum(bool(e.get("aggregated")) for e in rounds),
        "attempts": [e.get("attempts", 1) for e in rounds],
        "survivors": [(e.get("survivors", len(e["clients"])) if e.get("aggregated") else 0) for e in rounds],
        "dropouts": [e.get("dropouts", []) for e in rounds] if secure else None,
        "failure_stages": sorted({f["stage"] for e in rounds for f in e.get("failures", [])}),
        "failures": sum(len(e.get("failures", [])) for e in rounds),
        "metric": metric, "initial": summary["initial"].get(metric), "final": summary["final"].get(metric),
        "final_metrics": summary["final"],
        "bytes_up_per_client_round": statistics.fmean(client_up) if client_up else 0.0,
        "bytes_up_per_round": statistics.fmean(e["bytes_up"] for e in rounds),
        "bytes_down_per_round": statistics.fmean(e["bytes_down"] for e in rounds),
        "wall_s_per_round": [round(e["wall_s"], 3) for e in rounds],
        "warm_rounds": [e["round"] for e in warm], "warm_wall_s": statistics.fmean(e["wall_s"] for e in warm),
        "secure_clipped": (sum(c for c in clipped if c is not None) if secure and clipped else None),
        "secure_clipped_unreported": sum(c is None for c in clipped),
        "run_wall_s": summary.get("wall_s"),
    }


def fmt_bytes(n: float) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_acc(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} ({x!r})"


# ------------------------------------------------------------------------------------------- the parts
def report_precision(results: dict, folders: dict, cfg: RunConfig) -> dict:
    plain_s, secure_s = results["plain-1round"]["summary"], results["secure-1round"]["summary"]
    pe, se = plain_s["history"][1], secure_s["history"][1]
    same_clients = ([(c["cid"], c["rank"]) for c in pe["clients"]] == [(c["cid"], c["rank"]) for c in se["clients"]])
    loss_gap = max((abs(a["train_loss"] - b["train_loss"]) for a, b in zip(pe["clients"], se["clients"])
                    if a.get("train_loss") is not None and b.get("train_loss") is not None), default=None)
    plain, secure = final_state(folders["plain-1round"]), final_state(folders["secure-1round"])
    initial, init_ok = initial_state(cfg, plain_s["history"][0].get("metrics"))
    figures = compare_states(plain, secure, initial)
    q = secure_quantization_range(cfg)
    level = 2 * cfg.secure_clip / q
    out = {"same_clients_and_ranks": same_clients, "max_train_loss_gap": loss_gap, "initial_state_checked": init_ok,
           "quantization_levels": q, "clip": cfg.secure_clip, "level": level,
           "clients": len(se["clients"]), "groups": figures,
           "secure_clipped": sum(c.get("secure_clipped") or 0 for c in se["clients"]),
           "pairs_below_1e-4": all(figures[g]["rel_max"] < 1e-4 for g in ("A", "B") if g in figures)}
    print(f"\n### Same-round precision ({cfg.clients_per_round} clients x {cfg.local_steps} steps, seed {cfg.seed}, "
          f"one round)\n")
    print(f"Same clients and ranks in both runs: {'yes' if same_clients else 'NO'}; largest training-loss gap "
          f"{loss_gap!r} (0 = trained identically). Initial state rebuilt"
          f"{' and checked against the round-0 evaluation' if init_ok else (' (NOT matching the round-0 evaluation)' if init_ok is False else '')}. "
          f"Quantization: q = 2^{int(math.log2(q))} levels over [-{cfg.secure_clip:g}, {cfg.secure_clip:g}], one "
          f"level = {level:.3g}, {len(se['clients'])} levels = {len(se['clients']) * level:.3g}; clipped "
          f"coordinates: {out['secure_clipped']}.\n")
    print("| tensors | count | max abs error | rel. error, max over layers | rel. error, overall "
          "| error / round's change, max | error / round's change, overall |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for g, row in figures.items():
        name = {"A": "A (pairs)", "B": "B (pairs)", "heads": "heads", "all": "whole state"}[g]
        print(f"| {name} | {row['tensors']} | {row['max_abs']:.2e} | {row['rel_max']:.2e} | {row['rel_overall']:.2e} "
              f"| {row.get('change_max', math.nan):.2e} | {row.get('change_overall', math.nan):.2e} |")
    print(f"\nPairs below the 1e-4 target (||secure - plain|| / ||plain||, every A and B): "
          f"{'yes' if out['pairs_below_1e-4'] else 'NO'}")
    return out


def report_runs(title: str, rows: list[dict], reference: dict | None) -> None:
    print(f"\n### {title}\n")
    print("| run | rounds aggregated | survivors per round | final accuracy | uplink per client per round "
          "| uplink per round | warm round wall (s) | vs secure, no dropouts | clipped |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        vs = f"{r['warm_wall_s'] / reference['warm_wall_s']:.2f}x" if reference and r is not reference else ""
        print(f"| {r['name']} | {r['aggregated']}/{r['rounds']} | {','.join(map(str, r['survivors']))} "
              f"| {fmt_acc(r['final'])} | {fmt_bytes(r['bytes_up_per_client_round'])} "
              f"| {fmt_bytes(r['bytes_up_per_round'])} | {r['warm_wall_s']:.1f} | {vs} "
              f"| {('n/a' if r['secure'] else '') if r['secure_clipped'] is None else r['secure_clipped']} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", "--setups", dest="only", default=",".join(PARTS),
                   help=f"comma list of parts to run: {','.join(PARTS)} (default all)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of the demo and dropout runs (default 6; "
                                                            "--quick: 1)")
    p.add_argument("--fail-fractions", default=None, help="dropout part's fail_fraction values (default 0.1,0.3; "
                                                          "--quick: 0.2)")
    p.add_argument("--beyond", type=float, default=0.4, help="fail_fraction beyond the threshold (default 0.4)")
    p.add_argument("--beyond-rounds", type=int, default=None, help="its rounds (default 2; --quick: 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a run setting for every run, TOML value syntax (e.g. --set local_steps=15)")
    p.add_argument("--quick", action="store_true", help="a short smoke run: 5 clients, 2 steps, 1 round")
    p.add_argument("--out", help="folder for the run folders (default: a temporary folder, removed after)")
    p.add_argument("--reuse", action="store_true", help="with --out: take a finished run with the same settings "
                                                        "from its folder instead of running it again")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--dry-run", action="store_true", help="print the runs and the time estimate, run nothing")
    args = p.parse_args()
    import tomllib

    args.parts = [x for x in args.only.split(",") if x]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"--only: unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    args.rounds = args.rounds or (1 if args.quick else 6)
    args.beyond_rounds = args.beyond_rounds or (1 if args.quick else 2)
    args.fail_fractions = [float(x) for x in (args.fail_fractions or ("0.2" if args.quick else "0.1,0.3")).split(",")]
    extra = {k: tomllib.loads(f"v = {v}")["v"] for k, v in (s.split("=", 1) for s in args.set)}
    base = {**SECURE_DEMO, **(QUICK if args.quick else {}), **extra}
    runs = plan(args, base)
    for r in runs:
        config_of(r)  # refuse a bad setting before anything runs

    est = estimate_s(runs)
    k = base["clients_per_round"]
    print(f"bench_secure: {len(runs)} runs, {sum(r['rounds'] for r in runs)} rounds of {k} clients x "
          f"{base['local_steps']} local steps, one run at a time; expected about {est / 60:.0f} min "
          f"({est:.0f} s: {STARTUP_S:.0f} s startup a run, ~{ROUND_S_PER_CLIENT_STEP * 80:.0f} s per 80 client-steps "
          f"on 2 idle cores, x{SECURE_FACTOR_GUESS} guessed for secure rounds; a busy machine takes several times "
          "longer)", flush=True)
    for f in args.fail_fractions + ([args.beyond] if "beyond" in args.parts else []):
        n = int(round(f * base["num_clients"]))
        t = max(round(RunConfig.from_dict(base).secure_threshold * k), 2)
        print(f"  fail_fraction {f:g}: {n} of {base['num_clients']} clients down each round; SecAgg+ needs {t} of {k}: "
              f"{'aggregates' if k - n >= t else 'halts'}", flush=True)

    for r in runs:
        print(f"  run {r['name']}: {r['rounds']} round(s), "
              + ", ".join(f"{k}={v}" for k, v in r["settings"].items() if k not in base or base[k] != v), flush=True)
    if args.dry_run:
        return
    tmp = None
    if args.out:
        root = Path(args.out).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-secure-")
        root = Path(tmp.name)
    t_start = time.perf_counter()
    results, folders = {}, {}
    try:
        for run in runs:
            folders[run["name"]] = root / run["name"]
            summary = execute(run, folders[run["name"]], args.reuse and bool(args.out))
            results[run["name"]] = {"summary": summary, "figures": describe(run, summary)}

        figures = {"settings": base, "rounds": args.rounds, "torch": torch.__version__, "cores": os.cpu_count(),
                   "runs": {n: r["figures"] for n, r in results.items()}}
        if "precision" in args.parts:
            figures["precision"] = report_precision(results, folders, config_of(
                next(r for r in runs if r["name"] == "secure-1round")))
        if "demo" in args.parts or "dropouts" in args.parts:
            plain, secure = results["plain"]["figures"], results["secure"]["figures"]
            demo = {"final_plain": plain["final"], "final_secure": secure["final"],
                    "uplink_factor_per_client": secure["bytes_up_per_client_round"] / plain["bytes_up_per_client_round"],
                    "uplink_factor_per_round": secure["bytes_up_per_round"] / plain["bytes_up_per_round"],
                    "downlink_factor_per_round": secure["bytes_down_per_round"] / plain["bytes_down_per_round"],
                    "wall_factor": secure["warm_wall_s"] / plain["warm_wall_s"],
                    "secure_clipped": secure["secure_clipped"],
                    "final_state": compare_states(final_state(folders["plain"]), final_state(folders["secure"]),
                                                  None)["all"]["rel_overall"]}
            figures["demo"] = demo
            report_runs(f"The secure demo, plain vs secure ({args.rounds} rounds, {k} clients x "
                        f"{base['local_steps']} steps)", [plain, secure], None)
            print(f"\nSecure / plain: uplink x{demo['uplink_factor_per_client']:.2f} per client "
                  f"(x{demo['uplink_factor_per_round']:.2f} per round), downlink x{demo['downlink_factor_per_round']:.2f} "
                  f"per round, warm round wall time x{demo['wall_factor']:.2f} (rounds {secure['warm_rounds']}); "
                  f"final accuracy {fmt_acc(plain['final'])} plain, {fmt_acc(secure['final'])} secure; final global "
                  f"state ||secure - plain|| / ||plain|| = {demo['final_state']:.2e}; clipped coordinates in the "
                  f"secure run: {secure['secure_clipped']}"
                  + (f" ({secure['secure_clipped_unreported']} client lines without the count)"
                     if secure["secure_clipped_unreported"] else ""))
        if "dropouts" in args.parts:
            rows, pairs = [results["secure"]["figures"]], {}
            for f in args.fail_fractions:
                pl, se = results[f"plain-fail{f:g}"]["figures"], results[f"secure-fail{f:g}"]["figures"]
                rows += [pl, se]
                pairs[f"{f:g}"] = {
                    "final_plain": pl["final"], "final_secure": se["final"],
                    "wall_vs_secure_no_dropouts": se["warm_wall_s"] / results["secure"]["figures"]["warm_wall_s"],
                    "same_survivors": pl["survivors"] == se["survivors"], "secure_failure_stages": se["failure_stages"],
                    "final_state": compare_states(final_state(folders[pl["name"]]), final_state(folders[se["name"]]),
                                                  None)["all"]["rel_overall"]}
            figures["dropouts"] = pairs
            report_runs(f"Dropouts mid-protocol (fail_fraction of the {base['num_clients']} clients fail while "
                        f"training, SecAgg+'s stage 2; secure_threshold {RunConfig.from_dict(base).secure_threshold})",
                        rows, results["secure"]["figures"])
            print()
            for f, d in pairs.items():
                print(f"- fail_fraction {f}: survivors the same as plain's: {'yes' if d['same_survivors'] else 'NO'}; "
                      f"secure failure stages {d['secure_failure_stages']}; final accuracy {d['final_secure']:.4f} "
                      f"secure vs {d['final_plain']:.4f} plain; final global state ||secure - plain|| / ||plain|| = "
                      f"{d['final_state']:.2e}")
        if "beyond" in args.parts:
            name = f"secure-fail{args.beyond:g}"
            b = results[name]["figures"]
            cfg = config_of(next(r for r in runs if r["name"] == name))
            initial, _ = initial_state(cfg, None)
            final = final_state(folders[name])
            unchanged = final.keys() == initial.keys() and all(torch.equal(final[k], initial[k]) for k in final)
            reasons = sorted({f["reason"] for e in results[name]["summary"]["history"][1:]
                              for f in e.get("failures", []) if f["cid"] is None})
            figures["beyond"] = {**b, "global_unchanged": unchanged, "round_failures": reasons}
            report_runs(f"Beyond the threshold (fail_fraction {args.beyond:g}, {args.beyond_rounds} rounds, "
                        f"on_too_few_replies {cfg.on_too_few_replies})", [b], None)
            print(f"\nGlobal state after the run equals the initial one exactly: {'yes' if unchanged else 'NO'}; "
                  f"final accuracy {fmt_acc(b['final'])} (round 0: {fmt_acc(b['initial'])}); attempts per round "
                  f"{b['attempts']}; the rounds' failure: {reasons[0] if reasons else 'none'}")
        figures["bench_wall_s"] = time.perf_counter() - t_start
        print(f"\nbench_secure: {figures['bench_wall_s']:.0f} s in all (estimated {est:.0f} s)")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1, default=float) + "\n")
            print(f"wrote {args.json}")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
