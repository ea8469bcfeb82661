"""One evaluation: resolve PATH, read and check every benchmark's rows, then load the model once and score them.

The order matters to the user: everything that can be wrong with the input (the path, a benchmark name, a data
file's columns, a row's answer) is found before the model is loaded, so a mistake costs a second, not a model
load and half an evaluation.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import rng
from ..errors import ConfigError, DataError
from . import adapter as adapters
from .benchmarks import BENCHMARKS, CHALLENGES, Benchmark, Options
from .data import check_columns, load_hub, read_rows

SPLIT_FRACTION, SPLIT_SEED = 0.25, 42  # FlowerTune's finance/utils.load_data


@dataclass
class Request:
    path: str
    benchmark: str
    data: str | None = None
    max_examples: int | None = None
    out: str | None = None
    model: str | None = None
    device: str = "auto"
    dtype: str | None = None  # None: the run's, else float32
    quantization: str | None = None  # None: the run's, else none
    cache_dir: str | None = None
    seed: int = 0
    options: Options = Options()


def select(names: str) -> list[Benchmark]:
    """``--benchmark``: benchmark and challenge names, comma-separated, in the order given, each once."""
    chosen: list[Benchmark] = []
    for name in (n.strip() for n in names.split(",")):
        if name in CHALLENGES:
            chosen += [BENCHMARKS[b] for b in CHALLENGES[name]]
        elif name in BENCHMARKS:
            chosen.append(BENCHMARKS[name])
        else:
            raise ConfigError(f"--benchmark: unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} "
                              f"(or a challenge: {', '.join(CHALLENGES)})")
    return list({b.name: b for b in chosen}.values())


def flowertune_split(rows: list[dict], what: str, source: str) -> list[dict]:
    """The test part of ``datasets``' ``train_test_split(test_size=0.25, seed=42)``: FlowerTune's rows of FPB
    and FIQA, made the same way from a local file as from the hub."""
    from datasets import Dataset

    if len(rows) < 2:
        raise DataError(f"{what}: {source} has {len(rows)} row; FlowerTune evaluates 25% of the rows, so at least 2")
    try:
        dataset = Dataset.from_list(rows)
    except Exception as e:  # noqa: BLE001 - pyarrow: a column whose values do not share one type
        raise DataError(f"{what}: {source}: the rows do not form a table ({str(e).splitlines()[0]})") from None
    return dataset.train_test_split(test_size=SPLIT_FRACTION, seed=SPLIT_SEED)["test"].to_list()


def subsample(items: list, n: int | None, seed: int) -> list:
    """At most ``n`` items per group (MMLU's categories; one group elsewhere), seeded, in their original order."""
    if n is None:
        return items
    keep: list[int] = []
    for group in dict.fromkeys(getattr(it, "group", "") for it in items):
        idx = [i for i, it in enumerate(items) if getattr(it, "group", "") == group]
        if len(idx) > n:
            picked = rng.generator("benchmark_subset", seed).choice(len(idx), size=n, replace=False)
            idx = [idx[int(k)] for k in picked]
        keep += idx
    return [items[i] for i in sorted(keep)]


def load_items(bench: Benchmark, data: str | None, max_examples: int | None, seed: int) -> tuple[list, str]:
    """The benchmark's scored items and a description of their source."""
    if data is not None:
        rows, source = read_rows(data, bench.name), str(Path(data).expanduser())
    elif bench.local_default is not None:
        path = bench.local_default()
        rows, source = read_rows(path, bench.name), path
    else:
        rows, source = load_hub(bench.hub, bench.name), f"hub {bench.hub.describe()}"
    fmt = check_columns(rows, bench.formats, bench.name, source)
    if bench.split:
        rows = flowertune_split(rows, bench.name, source)
    items = bench.build(rows, fmt, source)
    if not items:
        raise DataError(f"{bench.name}: {source} gives no item to evaluate")
    return subsample(items, max_examples, seed), source


def headline(bench: Benchmark, metrics: dict[str, Any]) -> float | None:
    """The benchmark's figure: its metric, or for MMLU the mean over its categories (FlowerTune's average)."""
    groups = metrics.get("groups")
    if groups:
        values = [g[bench.metric] for g in groups.values() if g[bench.metric] is not None]
        return sum(values) / len(values) if values else None
    return metrics.get(bench.metric)


def default_out(target: adapters.Target, label: str) -> Path:
    """Inside the run folder, else beside the adapter folder."""
    if target.run is not None:
        return target.run / f"evaluate-{label}.json"
    return target.adapter.parent / f"{target.adapter.name}-evaluate-{label}.json"


def evaluate(req: Request, status=lambda text: None) -> dict[str, Any]:
    """Score the adapter at ``req.path`` on ``req.benchmark``; the results (also written to the out file)."""
    target = adapters.resolve(req.path)
    benches = select(req.benchmark)
    if req.data is not None and len(benches) > 1:
        raise ConfigError(f"--data: one file holds one benchmark's rows, but --benchmark {req.benchmark} names "
                          f"{len(benches)}; evaluate them one at a time")
    loaded = {b.name: load_items(b, req.data, req.max_examples, req.seed) for b in benches}
    base = adapters.base_model(target, req.model, req.cache_dir)
    run = target.run_settings
    dtype = req.dtype or run.get("dtype", "float32")
    quantization = req.quantization or run.get("quantization", "none")
    status(f"loading {base} with the adapter {target.adapter}")
    model, tokenizer = adapters.load(target, base, device=req.device, dtype=dtype, quantization=quantization)
    results: dict[str, Any] = {}
    t_all = time.perf_counter()
    for bench in benches:
        items, source = loaded[bench.name]
        status(f"{bench.name}: {len(items)} items from {source}")
        t0 = time.perf_counter()
        metrics = bench.score(bench, model, tokenizer, items, req.options)
        results[bench.name] = {"challenge": bench.challenge, "metric": bench.metric,
                               "value": headline(bench, metrics), "source": source,
                               "wall_s": time.perf_counter() - t0, **metrics}
    averages = {c: sum(results[b]["value"] for b in names) / len(names) for c, names in CHALLENGES.items()
                if len(names) > 1 and all(b in results and results[b]["value"] is not None for b in names)}
    out = Path(req.out).expanduser() if req.out else default_out(target, req.benchmark.replace(",", "+"))
    report = {"adapter": str(target.adapter), "run": str(target.run) if target.run else None, "base_model": base,
              "dtype": dtype, "quantization": quantization, "device": str(next(model.parameters()).device),
              "settings": {"max_examples": req.max_examples, "seed": req.seed, "data": req.data,
                           **asdict(req.options)},
              "results": results, "averages": averages, "wall_s": time.perf_counter() - t_all, "out": str(out)}
    from ..reports import write_json

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, report)
    except OSError as e:
        raise DataError(f"--out: cannot write {out} ({e})") from None
    return report
