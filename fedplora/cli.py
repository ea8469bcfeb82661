"""``fedplora`` command line: ``fedplora run`` (one federated run on the Simulation Engine)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import ConfigError, RunConfig

# flag -> RunConfig field (flags override the --config file)
RUN_FLAGS: dict[str, tuple[str, type, str]] = {
    "--method": ("method", str, "federated method (fedplora)"),
    "--task": ("task", str, "task: tweets, bbc, sst2, instruct or code"),
    "--model": ("model", str, "model: local path or hub name (default: the task's embedded model)"),
    "--data-dir": ("data_dir", str, "folder with the task's data files"),
    "--rounds": ("rounds", int, "number of rounds"),
    "--clients": ("num_clients", int, "number of clients"),
    "--clients-per-round": ("clients_per_round", int, "clients sampled per round"),
    "--seed": ("seed", int, "seed for sampling, selection, partitions and init"),
    "--rank": ("rank", int, "global rank R (number of one-rank pairs)"),
    "--alpha": ("alpha", float, "LoRA alpha (scale = alpha / R)"),
    "--partitioner": ("partitioner", str, "iid, dirichlet, pathological or natural"),
    "--dirichlet-alpha": ("dirichlet_alpha", float, "Dirichlet label-skew concentration"),
    "--local-steps": ("local_steps", int, "local AdamW steps per round"),
    "--batch-size": ("batch_size", int, "local batch size"),
    "--lr": ("lr", float, "local learning rate"),
    "--max-seq-len": ("max_seq_len", int, "max tokens per example"),
    "--eval-max-examples": ("eval_max_examples", int, "held-out examples evaluated per round"),
    "--weighting": ("weighting", str, "aggregation weights: samples or uniform"),
    "--dataset": ("dataset", str, "data file/folder or hub name (sst2: glue/sst2; instruct: JSON/JSONL or org/name)"),
    "--cache-dir": ("cache_dir", str, "cache for dequantised embedded models (default ~/.cache/fedplora)"),
    "--pathological-classes": ("pathological_classes", int, "labels per client with --partitioner pathological"),
    "--partition-column": ("partition_column", str, "column the dirichlet/pathological/natural partitioners split by"),
    "--test-fraction": ("test_fraction", float, "share of the data held out when a task has no test split"),
    "--eval-every": ("eval_every", int, "evaluate the global model every k rounds (and after the last)"),
    "--gen-max-examples": ("gen_max_examples", int, "generation tasks: held-out examples generated per evaluation"),
    "--gen-max-new-tokens": ("gen_max_new_tokens", int, "generation tasks: greedy tokens per example"),
    "--code-timeout": ("code_timeout", float, "code task: seconds per sandboxed program"),
}


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(":", ",").split(",") if x.strip()]


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.replace(":", ",").split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedplora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one federated fine-tuning run (Flower Simulation Engine)")
    run.add_argument("--config", help="TOML file with any setting (flags override it)")
    run.add_argument("--out", help="output folder (default runs/<method>-<task>-<time>)")
    for flag, (_, typ, helptext) in RUN_FLAGS.items():
        run.add_argument(flag, type=typ, help=helptext)
    run.add_argument("--ranks", type=_int_list, help="rank budgets of the client groups, e.g. 2,4,8")
    run.add_argument("--rank-shares", type=_float_list, help="share of clients per group, e.g. 1:1:1 or 6:3:1")
    run.add_argument("--targets", type=lambda s: s.split(","), help="target module names, e.g. query,value")
    cmp = sub.add_parser("compare", parents=[run], add_help=False,
                         help="run several methods on identical clients, partitions, budgets and seeds")
    cmp.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m],
                     default=["fedplora", "fedit", "hetlora", "flexlora", "flora"],
                     help="comma-separated methods (also fedit-feasible); default all five")
    cmp.add_argument("--seeds", type=_int_list, help="seeds to repeat every method with, e.g. 0,1,2 (default: --seed)")
    dep = sub.add_parser("deploy-local", parents=[run], add_help=False,
                         help="the same run on Flower's Deployment Engine: a SuperLink and one SuperNode "
                              "per --max-ranks entry, on loopback")
    dep.add_argument("--max-ranks", type=_int_list, required=True,
                     help="each SuperNode's own budget (its node config max-rank), e.g. 2,4,8")
    dep.add_argument("--timeout", type=float, default=1800.0, help="seconds before the run is abandoned")
    # added after the parsers that copy ``run``'s flags: only ``fedplora run`` resumes
    run.add_argument("--resume", metavar="DIR", help="continue the stopped run in DIR after its last checkpointed "
                                                      "round, with its own settings (DIR/config.toml)")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    base = RunConfig.from_toml(args.config) if args.config else RunConfig()
    overrides = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in RUN_FLAGS.items()}
    overrides.update(ranks=args.ranks, rank_shares=args.rank_shares, targets=args.targets, out=args.out)
    cfg = base.with_overrides(**overrides)
    if args.ranks is not None and args.rank_shares is None and len(cfg.rank_shares) != len(cfg.ranks):
        cfg.rank_shares = [1.0] * len(cfg.ranks)  # --ranks alone: equal shares
    return cfg.validate()


def resume_config_from_args(args: argparse.Namespace) -> RunConfig:
    """``--resume DIR``: the run keeps the settings it started with; a flag that would change them is refused."""
    from .federation.checkpoint import resume_config

    flags = [*RUN_FLAGS, "--ranks", "--rank-shares", "--targets", "--config"]
    given = [f for f in flags if getattr(args, f[2:].replace("-", "_")) is not None]
    if args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
        given.append("--out")
    if given:
        raise ConfigError(f"--resume: a resumed run keeps the settings in {Path(args.resume) / 'config.toml'}; "
                          f"drop {', '.join(given)}")
    return resume_config(Path(args.resume))


def cmd_run(args: argparse.Namespace) -> int:
    cfg = resume_config_from_args(args) if args.resume else config_from_args(args)
    out = Path(cfg.out or f"runs/{cfg.method}-{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    from .federation.progress import Progress
    from .federation.simulation import run_simulation

    run_simulation(cfg, out, Progress.console(), resume=bool(args.resume))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = Path(cfg.out or f"runs/compare-{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    from .compare import run_compare
    from .federation.progress import Progress

    seeds = args.seeds or [cfg.seed]
    command = "fedplora " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("fedplora") else ""
    run_compare(cfg, args.methods, seeds, out, command=command, progress=Progress.console())
    print((out / "comparison.md").read_text())
    print(f"outputs in {out}/ (comparison.json, comparison.md, comparison_metric.png, comparison_noise.png)")
    return 0


def cmd_deploy_local(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = Path(cfg.out or f"runs/deploy-{cfg.method}-{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    from .federation.deployment import run_loopback

    run_loopback(cfg, out, args.max_ranks, timeout=args.timeout)
    print(f"done: outputs in {out}/ (summary.json, metrics.png, adapter/); Flower logs in {out}/deployment/")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "deploy-local":
            return cmd_deploy_local(args)
    except ConfigError as e:
        print(f"fedplora: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        from .federation.checkpoint import CheckpointError
        from .tasks.base import DataError

        if isinstance(e, (DataError, FileNotFoundError, CheckpointError)):
            print(f"fedplora: error: {e}", file=sys.stderr)
            return 2
        raise
    return 1


if __name__ == "__main__":
    sys.exit(main())
