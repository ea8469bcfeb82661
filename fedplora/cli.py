"""``fedplora`` command line: ``fedplora run`` (one federated run on the Simulation Engine), ``compare``,
``deploy-local``, ``plan``, ``study`` and ``evaluate`` (an exported adapter on FlowerTune's benchmarks)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import SETTINGS, RunConfig
from .errors import ConfigError, FedploraError


def add_setting_flags(parser: argparse.ArgumentParser, settings=SETTINGS) -> None:
    """One flag per RunConfig setting, from its declaration (fedplora/config.py); they override --config."""
    for s in settings:
        kwargs: dict = {"dest": s.name, "default": None, "help": s.help_text().replace("%", "%%")}
        if s.type is bool and not s.is_list:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _named(s.parse, f"{s.type.__name__} list" if s.is_list else s.type.__name__)
            kwargs["metavar"] = s.rule.metavar or ("{" + ",".join(map(str, s.allowed())) + "}" if s.rule.choices
                                                   else s.name.upper())
        parser.add_argument(*s.flags, **kwargs)


def _named(fn, name: str):
    """``fn`` under ``name``: argparse's "invalid <name> value" message uses it."""
    def parse(text: str):
        return fn(text)

    parse.__name__ = name
    return parse


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(":", ",").split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedplora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one federated fine-tuning run (Flower Simulation Engine)")
    run.add_argument("--config", help="TOML file with any setting (flags override it)")
    add_setting_flags(run)
    cmp = sub.add_parser("compare", parents=[run], add_help=False,
                         help="run several methods on identical clients, partitions, budgets and seeds")
    from .methods import METHODS

    cmp.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m], default=list(METHODS),
                     help="comma-separated methods (also fedit-feasible); default every registered method")
    cmp.add_argument("--seeds", type=_int_list, help="seeds to repeat every method with, e.g. 0,1,2 (default: --seed)")
    from .study.summary import TARGET_FRACTION

    cmp.add_argument("--target-fraction", type=float, default=TARGET_FRACTION, metavar="F",
                     help="time to target: the round and seconds at which each method first reaches this fraction "
                          f"of the best method's final mean (default {TARGET_FRACTION})")
    dep = sub.add_parser("deploy-local", parents=[run], add_help=False,
                         help="the same run on Flower's Deployment Engine: a SuperLink and one SuperNode "
                              "per --max-ranks entry, on loopback")
    dep.add_argument("--max-ranks", type=_int_list, required=True,
                     help="each SuperNode's own budget (its node config max-rank), e.g. 2,4,8")
    dep.add_argument("--timeout", type=float, default=1800.0, help="seconds before the run is abandoned")
    add_plan_parser(sub)
    from .study import add_study_parser

    add_study_parser(sub)
    from .evaluate import add_evaluate_parser

    add_evaluate_parser(sub)
    # added after the parsers that copy ``run``'s flags: only ``fedplora run`` resumes
    run.add_argument("--resume", metavar="DIR", help="continue the stopped run in DIR after its last checkpointed "
                                                      "round, with its own settings (DIR/config.toml)")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def add_plan_parser(sub) -> None:
    """``fedplora plan``: its own few flags (a plan needs no data, task or federation settings)."""
    d = RunConfig()
    plan = sub.add_parser("plan", help="the largest local-training configuration whose predicted peak memory "
                                       "fits --memory (docs/memory.md)")
    plan.add_argument("--model", help="local folder or hub name (its config.json is enough; default: the "
                                      "embedded SmolLM2-135M-Instruct)")
    plan.add_argument("--memory", required=True, help="memory for training, e.g. 2GB (10^9), 1.5GiB, 800M (2^20)")
    plan.add_argument("--batch-size", type=_named(_positive, "positive int"), default=d.batch_size,
                      help=f"requested batch (lowered only if nothing fits with it; default {d.batch_size})")
    plan.add_argument("--max-seq-len", type=_named(_positive, "positive int"), default=d.max_seq_len,
                      help=f"tokens per example (default {d.max_seq_len})")
    plan.add_argument("--rank", type=_named(_positive, "positive int"), default=d.rank,
                      help=f"global rank R: the plan's rank is the largest r <= R that fits (default {d.rank})")
    plan.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=d.dtype)
    plan.add_argument("--fold", choices=("branch", "merge"), default=d.fold)
    plan.add_argument("--device", default="cpu", help="cpu (the peak RSS) or cuda (device memory; the merge "
                                                      "copy is on the CPU); default cpu")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    base = RunConfig.from_toml(args.config) if args.config else RunConfig()
    cfg = base.with_overrides(**{s.name: getattr(args, s.name) for s in SETTINGS})
    if args.ranks is not None and args.rank_shares is None and len(cfg.rank_shares) != len(cfg.ranks):
        cfg.rank_shares = [1.0] * len(cfg.ranks)  # --ranks alone: equal shares
    return cfg.validate()


def resume_config_from_args(args: argparse.Namespace) -> RunConfig:
    """``--resume DIR``: the run keeps the settings it started with; a flag that would change them is refused."""
    from .federation.checkpoint import resume_config

    given = [s.flags[0] for s in SETTINGS if s.name != "out" and getattr(args, s.name) is not None]
    if args.config is not None:
        given.append("--config")
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
    run_compare(cfg, args.methods, seeds, out, command=command, progress=Progress.console(),
                target_fraction=args.target_fraction)
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


def cmd_plan(args: argparse.Namespace) -> int:
    from .planner import architecture, device_kind, format_bytes, load_config, memory_model, parse_memory, plan

    memory = parse_memory(args.memory)
    arch = architecture(load_config(args.model))
    device = device_kind(args.device)
    chosen, alternatives = plan(arch, memory, global_rank=args.rank, batch=args.batch_size, seq=args.max_seq_len,
                                dtype=args.dtype, fold=args.fold, device=device)
    print(f"model: {args.model or 'embedded SmolLM2-135M-Instruct'} ({arch.model_type}, "
          f"{arch.parameters / 1e6:.1f}M parameters, {len(arch.targets)} adapted layers)")
    print(f"memory: {args.memory} = {format_bytes(memory)} for R={args.rank}, batch {args.batch_size} x {args.max_seq_len} tokens, "
          f"{args.dtype}, fold {args.fold}, {device}")
    print(f"plan: {chosen.describe()}")
    print("alternatives (the best fit of each mode):")
    print(f"  {'quantization':12} {'checkpointing':13} {'rank':>4} {'batch':>5} {'predicted peak':>15}")
    for p in alternatives:
        print(f"  {p.quantization:12} {'on' if p.ckpt else 'off':13} {p.rank:4d} {p.batch:5d} "
              f"{format_bytes(p.peak):>15}")
    if device == "cpu":
        print(f"(peak RSS above the idle process: torch and transformers take about "
              f"{format_bytes(memory_model()['runtime_bytes'])} more)")
    elif args.dtype == "float32":  # docs/memory.md, "On a GPU": fitted on the CPU, checked once on an H200
        print("(on CUDA, measured once on an H200: float32 peaks were 1.3x to 1.9x this planner's figures, which "
              "come from CPU kernels; bfloat16 bases of 135M-1B parameters came out 1% to 18% below them. Leave "
              "a float32 plan a 2x margin: docs/memory.md, 'On a GPU')")
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
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "evaluate":
            from .evaluate import evaluate_main

            return evaluate_main(args)
        if args.command == "study":
            from .study import study_main

            return study_main(args)
    except FedploraError as e:  # a problem the user can fix: one line, no traceback
        print(f"fedplora: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
