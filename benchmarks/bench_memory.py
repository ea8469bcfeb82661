"""
Peak memory of one client's local training, per configuration, and the planner's fit to it.

What is measured: PLoRA with R=16 pairs on every attention projection (``TARGETS``), r active pairs,
AdamW on the trainables (its states allocated before the first measured step), ``--steps``
training steps (causal-LM loss) on random token batches of batch x seq. Each configuration (a
"cell") runs in its own child process, so no allocator state leaks from one cell to the next:

* CPU: the peak RSS above the child's idle baseline (the RSS after the imports, before the
  model). The kernel's high-water mark (VmHWM) is reset after the model is loaded
  (``/proc/self/clear_refs`` = 5) and the heap's free pages given back (``malloc_trim``), so
  the figure is the training peak (weights + adapters + optimizer + activations), not a
  transient of the loader (a float32 checkpoint converted to bfloat16, a quantizer's scratch).
  A float load with no conversion keeps the weights mapped from the safetensors file and pages
  them in during the step: they count once, as RssFile (VmHWM is anonymous + file + shmem);
  a loader that left over 32 MiB paged in before the reset would have its weights copied to
  anonymous memory first. RssFile and RssAnon are recorded for every cell to show it.
  Children run with a fixed glibc mmap threshold (``CHILD_ENV``) so the RSS follows what
  training holds, not what the heap happened to keep.
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at the same point.

Models: ``smollm2`` (the embedded SmolLM2-135M-Instruct, float32 safetensors in the cache) and
``llama-1b`` (Llama-3.2-1B's shape, random weights: memory does not depend on the values; built
once from its LlamaConfig and saved to the cache, so quantized cells load it through
``from_pretrained`` with the bitsandbytes config as a real checkpoint would be).

The grid is not cartesian (too slow on 2 cores): a rank sweep for each fold, then one factor at
a time around a base cell (dtype, quantization, batch, seq, checkpointing), and rank sweeps
again for the cheapest and the most expensive variant (``cells``). Results are appended to the
JSON file as they come; measured cells are skipped, so an interrupted run resumes.

    .venv/bin/python benchmarks/bench_memory.py --estimate          # time one child per model
    nohup .venv/bin/python benchmarks/bench_memory.py > /tmp/bench_memory.log 2>&1 &
    .venv/bin/python benchmarks/bench_memory.py --table             # the table so far
    .venv/bin/python benchmarks/bench_memory.py --fit               # fit fedplora/memory_model.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = ROOT / "docs" / "memory-results.json"
GLOBAL_RANK = 16
TARGETS = ["attention"]  # every attention projection: what docs/memory-results.json measured
RANKS = (1, 2, 4, 8, 16)
# Llama-3.2-1B's shape (meta-llama/Llama-3.2-1B config.json); the weights here are random
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                max_position_embeddings=131072, head_dim=64, hidden_act="silu", rms_norm_eps=1e-5)
# the base cell of each model: every other cell changes one or two factors of it. Small batches: a
# training step of SmolLM2 on 1024 tokens takes about 45 s on the 2 shared cores of this machine.
BASE = {
    "smollm2": dict(rank=8, fold="branch", dtype="float32", quantization="none", batch=2, seq=128, ckpt=False),
    "llama-1b": dict(rank=8, fold="branch", dtype="float32", quantization="none", batch=1, seq=64, ckpt=False),
}
FACTORS = ("rank", "fold", "dtype", "quantization", "batch", "seq", "ckpt")


def cell_key(model: str, cell: dict) -> str:
    return model + "|" + "|".join(f"{f}={cell[f]}" for f in FACTORS)


def cells(model: str) -> list[tuple[int, dict]]:
    """The measured grid of one model as (tier, cell): tier 0 is the rank sweep of each fold and one factor
    at a time; tier 1 the rank sweep again for the cheapest and the costliest variant (SmolLM2) and a few
    two-factor cells that separate the activation coefficients per dtype and mode. Llama-1B's sweeps are
    r in {1, 4, 8, 16} first and r = 2 last, and it has no float16 or 8bit cell (too slow on this CPU).
    The grid runs tier by tier."""
    base = BASE[model]
    out: list[tuple[int, dict]] = []

    def add(tier, **change):
        cell = {**base, **change}
        if all(cell != c for _, c in out):
            out.append((tier, cell))

    big = model == "llama-1b"
    for fold in ("branch", "merge"):  # what a lower rank saves, under each fold
        for r in RANKS:
            add(2 if big and r == 2 else 0, rank=r, fold=fold)
    # float16 matmuls on this CPU are ~25x slower than float32 (SmolLM2: 65 s a step), and bitsandbytes' CPU
    # int8 path computes in float16: for Llama-1B these cells would take over 10 minutes each
    for dtype in ("bfloat16",) if big else ("bfloat16", "float16"):
        add(0, dtype=dtype)
    for q in ("4bit",) if big else ("8bit", "4bit"):
        add(0, quantization=q)
    b, s = base["batch"], base["seq"]
    add(0, batch=b * 4)
    add(0, ckpt=True)
    add(1, ckpt=True, batch=b * 4)
    cheapest = dict(dtype="bfloat16", quantization="4bit", ckpt=True)  # bf16 compute on an NF4 base
    if big:
        for r in (1, 16):
            add(1, rank=r, **cheapest)
        add(2, dtype="bfloat16", batch=b * 4)
        return out
    add(0, batch=b * 2)
    add(0, batch=b * 8)
    add(0, seq=s * 2)
    costliest = dict(fold="merge", batch=b * 8)
    for r in RANKS:
        add(1, rank=r, **cheapest)
        add(1, rank=r, **costliest)
    add(1, dtype="bfloat16", ckpt=True)
    add(1, dtype="bfloat16", batch=b * 4)
    add(1, quantization="8bit", ckpt=True)
    return out


# ----------------------------------------------------------------------------- models
def cache_dir() -> Path:
    from fedplora.tasks.models import cache_root

    return cache_root()


def llama_1b_path() -> Path:
    """The random Llama-3.2-1B-shaped checkpoint (bfloat16, 2.5 GB), built once."""
    path = cache_dir() / "llama-3.2-1b-shaped-random"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(torch.bfloat16)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    os.rename(tmp, path)
    return path


def model_path(model: str) -> str:
    if model == "smollm2":
        from fedplora.tasks.models import smollm2_path

        return smollm2_path()
    return str(llama_1b_path())


# ----------------------------------------------------------------------------- one cell (child)
def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[name] = int(value.split()[0]) * 1024
    return out


def release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``): a quantizing load frees its
    temporaries into a fragmented heap that would otherwise stay in the RSS (Llama-1B NF4: about 440 MiB)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak(device) -> None:
    gc.collect()
    release_free_heap()
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS


def own_weights(model) -> None:
    """Copy any tensor still backed by the safetensors mapping into anonymous memory (then the map goes)."""
    import torch

    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "cpu" and type(t.data) in (torch.Tensor, torch.nn.Parameter):
            t.data = t.data.clone()


def measure(model_name: str, cell: dict, steps: int, device_name: str) -> dict:
    """Train ``steps`` steps of one cell; returns its peak above the idle baseline and its RSS breakdown."""
    import torch

    from fedplora.adapters import PLoRAConfig, get_plora_model, select_and_fold, trainable_parameters
    from fedplora.hardware import enable_gradient_checkpointing, resolve_device
    from fedplora.tasks.models import load_causal_lm

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)  # the 2 cores are shared: OpenMP threads spinning on a busy core are 10x slower
    device = resolve_device(device_name)
    path = model_path(model_name)
    import transformers.models.llama.modeling_llama  # noqa: F401  (the baseline includes every import)
    if cell["quantization"] != "none":
        from fedplora.hardware import quantization_config

        quantization_config(cell["quantization"], cell["dtype"])  # imports bitsandbytes
    gc.collect()
    idle = proc_status()
    t0 = time.perf_counter()
    model = load_causal_lm(path, dtype=cell["dtype"], quantization=cell["quantization"], device=device)
    loaded_file = proc_status()["RssFile"] - idle["RssFile"]
    if loaded_file > 32 * 2**20:  # weights still mapped from the file: make them the process's own
        own_weights(model)
    load_s = time.perf_counter() - t0
    loaded = proc_status()
    reset_peak(device)
    model = get_plora_model(model, PLoRAConfig(rank=GLOBAL_RANK, alpha=2.0 * GLOBAL_RANK, target_modules=TARGETS,
                                                fold=cell["fold"]))
    select_and_fold(model, range(cell["rank"]))
    if cell["ckpt"]:
        enable_gradient_checkpointing(model)
    model.train()
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    for t in params:  # AdamW's states exist from the first measured step on, as in any step after the first
        t.grad = torch.zeros_like(t)
    opt.step()
    opt.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    t1 = time.perf_counter()
    for _ in range(steps):
        ids = torch.randint(0, vocab, (cell["batch"], cell["seq"]), generator=gen).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step_s = (time.perf_counter() - t1) / steps
    end = proc_status()
    out = {"model": model_name, **cell, "steps": steps, "device": device.type, "malloc_trim": True,
           "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
           "load_s": round(load_s, 1),
           "step_s": round(step_s, 2), "loss": round(loss.item(), 3)}
    if device.type == "cuda":
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    else:
        out.update({"peak_bytes": end["VmHWM"] - idle["VmRSS"], "idle_rss": idle["VmRSS"],
                    "loaded_rss": loaded["VmRSS"] - idle["VmRSS"], "loaded_file_before_copy": loaded_file,
                    "loaded_file": loaded["RssFile"] - idle["RssFile"],
                    "end_anon": end["RssAnon"] - idle["RssAnon"], "end_file": end["RssFile"] - idle["RssFile"]})
    return out


# ----------------------------------------------------------------------------- the grid (parent)
def load_results(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"about": "peak memory of local training per cell; benchmarks/bench_memory.py, docs/memory.md",
            "models": {}, "cells": []}


def model_entry(model: str) -> dict:
    """The architecture the planner needs (config.json's fields), stored beside the figures."""
    from transformers import AutoConfig, LlamaConfig

    config = AutoConfig.from_pretrained(model_path(model)) if model == "smollm2" else LlamaConfig(**LLAMA_1B)
    keep = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "tie_word_embeddings", "head_dim", "max_position_embeddings")
    return {k: getattr(config, k) for k in keep}


# glibc's mmap threshold, fixed at its default starting value instead of growing with every freed block:
# each large tensor then has its own mapping, given back when freed, so the RSS follows what training holds.
# With the dynamic threshold, identical runs differ by up to ~150 MiB (SmolLM2) depending on what the heap
# happened to retain. A client can set the same variable.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_child(model: str, cell: dict, steps: int, device: str, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps({"model": model, "cell": cell}),
           "--steps", str(steps), "--device", device]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **CHILD_ENV})
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"model": model, **cell, "error": " | ".join(tail)}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def run_grid(models: list[str], path: Path, steps: int, device: str, timeout: float, limit: int | None) -> None:
    data = load_results(path)
    data.setdefault("targets", TARGETS)
    done = {cell_key(c["model"], c) for c in data["cells"] if "error" not in c}
    grid = sorted(((tier, i, m, c) for m in models for i, (tier, c) in enumerate(cells(m))),
                  key=lambda t: t[:2])
    todo = [(m, c) for _, _, m, c in grid if cell_key(m, c) not in done]
    print(f"{len(todo)} cells to measure ({len(done)} already in {path})", flush=True)
    for i, (model, cell) in enumerate(todo[:limit]):
        if model not in data["models"]:
            data["models"][model] = model_entry(model)
        result = run_child(model, cell, steps, device, timeout)
        data["cells"] = [c for c in data["cells"] if cell_key(c["model"], c) != cell_key(model, cell)] + [result]
        path.write_text(json.dumps(data, indent=1) + "\n")
        print(f"[{i + 1}/{len(todo)}] {row(result)}", flush=True)


def mib(n: float) -> str:
    return f"{n / 2**20:8.0f}"


def row(c: dict) -> str:
    head = (f"{c['model']:9} r={c['rank']:<2} {c['fold']:6} {c['dtype']:8} {c['quantization']:4} "
            f"b={c['batch']:<2} s={c['seq']:<4} ckpt={'y' if c['ckpt'] else 'n'}")
    if "error" in c:
        return f"{head}  ERROR {c['error']}"
    return f"{head} peak {mib(c['peak_bytes'])} MiB  (step {c['step_s']} s, child {c.get('wall_s', '?')} s)"


def md_row(c: dict) -> str:
    pred = c.get("predicted_bytes")
    fit = f"{pred / 2**20:.0f} | {(pred - c['peak_bytes']) / c['peak_bytes']:+.1%}" if pred else " | "
    return (f"| {c['model']} | {c['rank']} | {c['fold']} | {c['dtype']} | {c['quantization']} | "
            f"{c['batch']} x {c['seq']} | {'on' if c['ckpt'] else 'off'} | {c['peak_bytes'] / 2**20:.0f} | {fit} | "
            f"{c['step_s']} |")


def print_table(path: Path, markdown: bool = False) -> None:
    data = load_results(path)
    measured = [c for c in data["cells"] if "error" not in c]
    if not markdown:
        for c in data["cells"]:
            print(row(c))
        return
    order = {m: [c for _, c in cells(m)] for m in BASE}
    measured.sort(key=lambda c: (c["model"] != "smollm2", order[c["model"]].index({f: c[f] for f in FACTORS})))
    print("| model | r | fold | dtype | quant. | batch x seq | ckpt | peak MiB | predicted MiB | error | step s |")
    print("|---|--:|---|---|---|---|---|--:|--:|--:|--:|")
    for c in measured:
        print(md_row(c))


def fit_and_report(path: Path) -> None:
    """Fit the planner to the measured cells, store the coefficients, add each cell's prediction to the
    results and print predicted vs measured."""
    from fedplora import planner

    data = load_results(path)
    model = planner.fit(data)
    planner.MODEL_FILE.write_text(json.dumps(model, indent=1) + "\n")
    errors = []
    for c in planner.measured_cells(data):
        arch = planner.architecture(data["models"][c["model"]], targets=planner.measured_targets(data))
        c["predicted_bytes"] = planner.predict(arch, c, model["global_rank"], model=model)
        errors.append((c["predicted_bytes"] - c["peak_bytes"]) / c["peak_bytes"])
        print(f"{row(c)}  predicted {mib(c['predicted_bytes'])} MiB ({errors[-1]:+.1%})")
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{len(errors)} cells; max |error| {max(map(abs, errors)):.1%}; mean |error| "
          f"{sum(map(abs, errors)) / len(errors):.1%}; coefficients in {planner.MODEL_FILE}")
    held_out = leave_one_out(data)
    print(f"leave-one-out (each cell predicted by a fit without it): max |error| {max(map(abs, held_out)):.1%}; "
          f"mean |error| {sum(map(abs, held_out)) / len(held_out):.1%}")


def leave_one_out(data: dict) -> list[float]:
    """Each cell's relative error under a fit to all the other cells: how well the model generalizes."""
    from fedplora import planner

    cells_ = planner.measured_cells(data)
    errors = []
    for i, c in enumerate(cells_):
        model = planner.fit({**data, "cells": cells_[:i] + cells_[i + 1:]})
        arch = planner.architecture(data["models"][c["model"]], targets=planner.measured_targets(data))
        errors.append((planner.predict(arch, c, model["global_rank"], model=model) - c["peak_bytes"])
                      / c["peak_bytes"])
    return errors


def estimate(models: list[str], steps: int, device: str, timeout: float) -> None:
    """One base cell per model, timed, times the grid's size: how long the whole run takes."""
    for m in models:
        if m == "llama-1b":
            llama_1b_path()
        r = run_child(m, BASE[m], steps, device, timeout)
        print(row(r))
        if "error" not in r:
            print(f"  {len(cells(m))} cells x ~{r['wall_s']} s = ~{len(cells(m)) * r['wall_s'] / 60:.0f} min "
                  "(quantized and float32 merge cells are slower)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,llama-1b")
    p.add_argument("--steps", type=int, default=1, help="training steps per cell (AdamW states made before)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=str(RESULTS), help="results file (appended to, resumable)")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per child")
    p.add_argument("--limit", type=int, default=None, help="measure at most this many new cells")
    p.add_argument("--estimate", action="store_true", help="time one child per model and exit")
    p.add_argument("--table", action="store_true", help="print the measured cells and exit")
    p.add_argument("--markdown", action="store_true", help="with --table: the table of docs/memory.md")
    p.add_argument("--fit", action="store_true",
                   help="fit the planner's coefficients to the results, write fedplora/memory_model.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    models = [m for m in args.models.split(",") if m]
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(spec["model"], spec["cell"], args.steps, args.device)))
    elif args.estimate:
        estimate(models, args.steps, args.device, args.timeout)
    elif args.table:
        print_table(Path(args.json), args.markdown)
    elif args.fit:
        fit_and_report(Path(args.json))
    else:
        if "llama-1b" in models:
            llama_1b_path()
        run_grid(models, Path(args.json), args.steps, args.device, args.timeout, args.limit)
        print_table(Path(args.json))


if __name__ == "__main__":
    main()
