"""Record today's behaviour, so that refactoring the aggregation path can be shown to change no number.

Two recordings, both replayed by tests/test_golden.py:

* ``runs/<variant>/``: one small run per variant through the real server code (``run_federation``, its
  strategy, checkpointing and export) with the real ClientApp answering in this process; the history
  without clock readings (``summary.json``) and the exported PEFT adapter (``adapter.safetensors``).
* ``aggregation/<method>.pt``: real inputs of one round (the global state after round 1, the tasks the method
  configured, the clients' trained updates) and every server-side output the method defines on them: its
  mean, each robust rule it accepts, central DP, the secure sums' decode (plain and with DP), the measured
  noise figures and the update norms.

Run from the project root: ``.venv/bin/python tests/golden/record.py`` (about a minute). Re-recording is
only right when a change is *meant* to change numbers; say so in the commit.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# the settings every golden run shares (tiny BERT, a tweets slice); each variant adds its own
BASE = dict(rounds=2, num_clients=4, clients_per_round=3, rank=4, alpha=8, ranks=[1, 2, 4], rank_shares=[2, 1, 1],
            local_steps=2, batch_size=8, eval_max_examples=40, max_seq_len=32, lr=5e-3, seed=11,
            budget_fluctuation=0.4, checkpoint_every=1)
DP = dict(dp_mode="central", dp_clip=0.5, dp_noise_multiplier=0.3)
RUNS = {
    "fedplora": {},
    "fedplora-all": dict(aggregate_over="all"),
    "fedit": dict(method="fedit"),
    "hetlora": dict(method="hetlora"),
    "flexlora": dict(method="flexlora"),
    "flora": dict(method="flora"),
    "fedplora-median": dict(aggregator="median"),
    "fedplora-dp": DP,
    "fedplora-secure": dict(secure_aggregation=True),
}
# method-level recordings: one per method configuration (all robust rules, DP and secure paths on each)
METHOD_CASES = {
    "fedplora": {},
    "fedplora-all": dict(aggregate_over="all", weighting="samples"),
    "fedplora-fixed": dict(selection="fixed"),
    "fedplora-shared-drop": dict(selection="shared", unselected="drop"),
    "fedit": dict(method="fedit"),
    "fedit-feasible": dict(method="fedit", fedit_variant="feasible"),
    "hetlora": dict(method="hetlora"),
    "flexlora": dict(method="flexlora"),
    "flora": dict(method="flora", weighting="samples"),
}
ROBUST = ("median", "trimmed_mean", "norm_clip", "krum")


def assets(root: Path) -> dict[str, str]:
    from assets import make_tiny_model, make_tweets_slice

    return {"model": str(make_tiny_model(root / "tiny-bert")), "data_dir": str(make_tweets_slice(root / "tweets"))}


def run_config(paths: dict[str, str], overrides: dict, out: Path | None = None):
    from fedplora.config import RunConfig

    return RunConfig(**{**BASE, **paths, **overrides, **({"out": str(out)} if out else {})}).validate()


class identity:
    """Messages made outside a Flower process need a run/node/task identity; clients train on one thread."""

    def __enter__(self):
        from flwr.supercore.task_identity import TaskIdentity

        self.saved = {n: getattr(TaskIdentity, n, None) for n in ("_run_id", "_node_id", "_task_id")}
        for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
            setattr(TaskIdentity, name, value)
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        from flwr.supercore.task_identity import TaskIdentity

        for name, value in self.saved.items():
            setattr(TaskIdentity, name, value)
        torch.set_num_threads(self.threads)


def run_in_process(cfg, out: Path) -> dict:
    """The server side of a run (``run_federation``) on a grid answered by the real ClientApp in this process."""
    from test_secure_flower import SecureGrid

    from fedplora.federation.server_app import run_federation

    with identity():
        return run_federation(SecureGrid(cfg.num_clients), cfg, out)


def comparable(summary: dict) -> dict:
    """What two runs of one seed share: the history without clock readings, the final and initial metrics."""
    from fedplora.federation.strategy import untimed

    return {"final": summary["final"], "initial": summary["initial"],
            "history": [untimed(h) for h in summary["history"]],
            "bytes_up_total": summary["bytes_up_total"], "bytes_down_total": summary["bytes_down_total"],
            **({"dp_epsilon": summary["dp_epsilon"]} if "dp_epsilon" in summary else {})}


def record_runs(paths: dict[str, str], names: list[str]) -> None:
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            summary = run_in_process(run_config(paths, RUNS[name], out), out)
            dest = HERE / "runs" / name
            dest.mkdir(parents=True, exist_ok=True)
            (dest / "summary.json").write_text(json.dumps(comparable(summary), indent=1, sort_keys=True) + "\n")
            shutil.copy(out / "adapter" / "adapter_model.safetensors", dest / "adapter.safetensors")
            print(f"{name}: final {summary['final']}")


# ---------------------------------------------------------------------------------------------- method level
def method_for(cfg, **extra):
    from fedplora.federation.client_app import method_options, plora_config
    from fedplora.methods import make_method

    return make_method(cfg.method, plora_config(cfg), **{**method_options(cfg), **extra})


def round_inputs(cfg):
    """The round-2 inputs of the core without Flower: the state after round 1, round 2's infos, tasks, updates."""
    from fedplora import rng
    from fedplora.adapters import get_plora_model
    from fedplora.federation.client_app import plora_config
    from fedplora.federation.heterogeneity import assign_budgets, round_budget
    from fedplora.methods import ClientInfo
    from fedplora.tasks import make_task
    from fedplora.tasks.partition import partition_for
    from fedplora.training import local_seed, train_local

    torch.manual_seed(rng.seed_int("init", cfg.seed))
    task = make_task(cfg)
    train, _ = task.load_splits()
    parts = partition_for(task, train, cfg)
    method = method_for(cfg)
    state = method.init_state(get_plora_model(task.build_model(), plora_config(cfg)))
    base = assign_budgets(cfg.num_clients, cfg.ranks, cfg.rank_shares, cfg.seed)
    client_model = get_plora_model(task.build_model(), plora_config(cfg))
    for rnd in (1, 2):
        draw = rng.generator("sampling", cfg.seed, rnd, 0)
        cids = sorted(int(c) for c in draw.choice(cfg.num_clients, size=cfg.clients_per_round, replace=False))
        infos, tasks, updates = [], [], []
        for cid in cids:
            data = task.encode(parts[cid])
            budget = round_budget(base[cid], cfg.ranks, cfg.budget_fluctuation, cfg.seed, rnd, cid)
            info = ClientInfo(cid, budget, len(data) + 3 * cid)  # unequal counts: "samples" weighting matters
            t = method.configure_client(state, info, rnd)
            method.client_setup(client_model, t)
            train_local(client_model, task, data, steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                        weight_decay=cfg.weight_decay, seed=local_seed(cfg.seed, rnd, cid))
            infos.append(info)
            tasks.append(t)
            updates.append(method.client_update(client_model, t, info.num_samples))
        if rnd == 1:
            state = method.aggregate(state, tasks, updates)
    return state, infos, tasks, updates


def measured(method, old, new, tasks, updates) -> dict[str, float]:
    """The round's noise figures as the strategy measures them (``HeteroLoRAStrategy.measure``)."""
    from types import SimpleNamespace

    from fedplora.federation.strategy import Accepted, HeteroLoRAStrategy, RoundRecord

    fake = SimpleNamespace(method=method, record=RoundRecord(round=2))
    accepted = [Accepted(i, t, u, {"train_loss": 1.0 + i}) for i, (t, u) in enumerate(zip(tasks, updates))]
    HeteroLoRAStrategy.measure(fake, old, new, accepted)
    rec = fake.record
    return {"fn_init_noise": rec.fn_init_noise, "fn_agg_noise": rec.fn_agg_noise,
            "paper_init_noise": rec.paper_init_noise, "paper_agg_noise": rec.paper_agg_noise}


def outputs(cfg, state, tasks, updates) -> dict:
    """Every server-side output the method defines on these inputs (keys name the path)."""
    from fedplora import rng
    from fedplora.aggregation import reducer_for, refusal, secure_decode, secure_upload
    from fedplora.federation.accounting import central_dp
    from fedplora.privacy import update_norm
    from fedplora.robust import Aggregator

    out: dict = {}
    method = method_for(cfg)
    new = method.aggregate(state, tasks, updates)
    out["aggregate/mean"] = new
    out["measure"] = measured(method, state, new, tasks, updates)
    for rule in ROBUST:
        if refusal(method, rule) is None:
            agg = Aggregator(rule, 0.34 if rule == "trimmed_mean" else cfg.trim_fraction, 1.5, 0, 1)
            out[f"aggregate/{rule}"] = method.aggregate(state, tasks, updates, agg)
    try:
        out["delta_norm"] = [update_norm(method.update_delta(t, u)) for t, u in zip(tasks, updates)]
    except NotImplementedError:
        pass
    dp = central_dp(cfg.with_overrides(**DP)) if method.dp_refusal is None else None
    if dp is not None:
        out["private"] = method.aggregate(state, tasks, updates, dp, rng.torch_generator("dp_noise", 11, 2))
    if method.secure_refusal is None:
        scale = float(max(u.num_samples for u in updates))
        for name, how, clip in (("secure", None, None), ("secure_dp", dp, DP["dp_clip"])):
            if name == "secure_dp" and dp is None:
                continue
            enc = [secure_upload(method, t, u, scale, clip) for t, u in zip(tasks, updates)]
            sums = {k: sum(e[k] for e in enc) for k in enc[0]}
            gen = rng.torch_generator("dp_noise", 11, 2) if clip is not None else None
            out[name + "/sums"] = sums
            out[name] = secure_decode(method, state, sums, len(enc), reducer_for(method, how), gen)
    return out


def record_methods(paths: dict[str, str], names: list[str]) -> None:
    dest = HERE / "aggregation"
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        cfg = run_config(paths, METHOD_CASES[name])
        torch.set_num_threads(1)
        state, infos, tasks, updates = round_inputs(cfg)
        record = {
            "overrides": METHOD_CASES[name], "state": state,
            "infos": [[i.cid, i.budget, i.num_samples] for i in infos],
            "tasks": [{"arrays": t.arrays, "config": json.dumps(t.config, sort_keys=True)} for t in tasks],
            "updates": [{"arrays": u.arrays, "config": json.dumps(u.config, sort_keys=True),
                         "num_samples": u.num_samples} for u in updates],
            "outputs": outputs(cfg, state, tasks, updates),
        }
        torch.save(record, dest / f"{name}.pt")
        print(f"{name}: {sorted(record['outputs'])}")


def main(argv: list[str]) -> None:
    which = argv[0] if argv else "all"
    with tempfile.TemporaryDirectory() as tmp:
        paths = assets(Path(tmp))
        if which in ("all", "methods"):
            record_methods(paths, argv[1:] or list(METHOD_CASES))
        if which in ("all", "runs"):
            record_runs(paths, argv[1:] or list(RUNS))


if __name__ == "__main__":
    main(sys.argv[1:])
