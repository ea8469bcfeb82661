"""``fedplora evaluate PATH --benchmark NAME``: its flags, and the table it prints.

The flags are few on purpose: what to evaluate (PATH, --benchmark, --data, --max-examples), where the results
go (--out), and how the model is held and decoded, each defaulting to what the run used or to the benchmark's
own setting. Errors are raised as FedploraError and printed by fedplora.cli as one line.
"""

from __future__ import annotations

import argparse

from .benchmarks import BENCHMARKS, CHALLENGES, Options
from .runner import Request, evaluate


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise ValueError(text)
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def add_evaluate_parser(sub) -> None:
    d = Options()
    ev = sub.add_parser("evaluate", help="score an exported adapter (or a run folder's) on FlowerTune's benchmarks",
                        description="Score an exported PEFT LoRA adapter, or a run folder's adapter/, on FlowerTune's "
                                    "evaluation benchmarks (docs/tasks.md, 'Evaluating an adapter').")
    ev.add_argument("path", metavar="PATH", help="an exported adapter folder (adapter_config.json) or a run folder")
    ev.add_argument("--benchmark", required=True, metavar="NAME",
                    help=f"one or more, comma-separated: {', '.join(BENCHMARKS)}; or a challenge: "
                         f"{', '.join(CHALLENGES)}")
    ev.add_argument("--data", metavar="FILE", help="the benchmark's rows in its dataset's own format (JSON, JSONL, "
                                                   "Parquet or CSV) instead of the hub")
    ev.add_argument("--max-examples", type=_positive(int), metavar="N",
                    help="score a seeded sample of at most N items (per category for MMLU); default all")
    ev.add_argument("--out", metavar="FILE", help="results JSON (default: evaluate-NAME.json in the run folder, or "
                                                  "ADAPTER-evaluate-NAME.json beside the adapter)")
    ev.add_argument("--model", help="base model folder or hub name (default: the one the adapter names)")
    ev.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    ev.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    help="the base's dtype (default: the run's, else float32)")
    ev.add_argument("--quantization", choices=("none", "8bit", "4bit"),
                    help="quantize the base with bitsandbytes (default: the run's, else none)")
    ev.add_argument("--cache-dir", help="where the embedded SmolLM2 is dequantised (default $FEDPLORA_CACHE or "
                                        "~/.cache/fedplora)")
    ev.add_argument("--batch-size", type=_positive(int), default=d.batch_size, help=f"default {d.batch_size}")
    ev.add_argument("--max-new-tokens", type=_positive(int), metavar="N",
                    help="generated tokens per item for sentiment and code (default 32 and 512)")
    ev.add_argument("--code-timeout", type=_positive(float), default=d.code_timeout,
                    help=f"seconds of wall time per sandboxed program (default {d.code_timeout:g})")
    ev.add_argument("--seed", type=int, default=0, help="seed of the --max-examples sample (default 0)")


def _fig(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def print_table(report: dict, console=None) -> None:
    """One row per benchmark (and per MMLU category), then each complete challenge's average."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['adapter']} on {report['base_model']}")
    for col, justify in (("benchmark", "left"), ("metric", "left"), ("value", "right"), ("FlowerTune greedy", "right"),
                         ("n", "right"), ("source", "left")):
        # a narrow terminal folds the source, never a benchmark's name or a figure
        table.add_column(col, justify=justify, overflow="fold", no_wrap=col != "source")
    for name, r in report["results"].items():
        table.add_row(name, r["metric"], _fig(r["value"]), _fig(r.get("accuracy_greedy")), str(r["n"]), r["source"])
        for group, g in r.get("groups", {}).items():
            table.add_row(f"  {group}", r["metric"], _fig(g[r["metric"]]), _fig(g.get("accuracy_greedy")),
                          str(g["n"]), "")
    for challenge, value in report["averages"].items():
        table.add_row(f"[bold]{challenge} average[/bold]", "", _fig(value), "", "", "")
    (console or Console()).print(table)


def evaluate_main(args: argparse.Namespace) -> int:
    from rich.console import Console

    err = Console(stderr=True, soft_wrap=True)
    opts = Options(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, code_timeout=args.code_timeout)
    req = Request(path=args.path, benchmark=args.benchmark, data=args.data, max_examples=args.max_examples,
                  out=args.out, model=args.model, device=args.device, dtype=args.dtype, quantization=args.quantization,
                  cache_dir=args.cache_dir, seed=args.seed, options=opts)
    report = evaluate(req, status=lambda text: err.print(f"[dim]{text}...[/dim]"))
    print_table(report)
    print(f"results in {report['out']}")
    return 0
