"""How much memory a client's local training takes, and the largest configuration that fits a budget.

Why a model and not a lookup: a device declares "2GB", not a rank, and the architecture it trains may be
one nobody measured. The peak is split into parts that are exact from the architecture's parameter shapes
and parts fitted to ``benchmarks/bench_memory.py``'s measurements (docs/memory.md):

* frozen weights: every parameter of the base in the load's dtype, or packed by bitsandbytes (8bit: one
  byte a weight plus a float32 scale per row; 4bit NF4: half a byte plus the double-quantized block
  scales), counted from a meta-device model built from the config, so config.json is enough;
* the merge copy (fold="merge" with pairs folded, CPU only: the pristine W0 of each adapted layer),
  exact in size but with a fitted coefficient (the rebuild's temporaries stay in the heap);
* the adapters: the float32 masters of all R pairs, the folded pairs' frozen copy (fold="branch") and
  r active pairs x (param, grad, two AdamW states);
* activations: batch x seq x (layers x hidden, layers x intermediate, vocab, layers x heads x seq)
  scaled by the dtype's bytes, with one coefficient set per checkpointing mode, fitted by least squares
  (non-negative) on the measured cells, plus a constant (``memory_model.json``).

On the CPU the figure is the process's peak RSS above its idle baseline (torch and transformers
imported: ``runtime_bytes`` more); on CUDA, what torch allocates on the device.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

from .errors import ConfigError, DataError

MODEL_FILE = Path(__file__).with_name("memory_model.json")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MASTER_BYTES = 4  # adapter masters, grads and AdamW states are float32 whatever the base
# the settings a plan may change, least aggressive first: checkpointing costs compute only, 8bit a little
# accuracy, 4bit more
MODES = (("none", False), ("none", True), ("8bit", False), ("8bit", True), ("4bit", False), ("4bit", True))
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str | int | float) -> int:
    """Bytes from "2GB" (10^9), "2GiB" or "2G" (2^30), "512MB", "1.5gb" or a plain number of bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in UNITS:
            raise ConfigError(f"memory: cannot read {text!r}; write it like 2GB, 1.5GiB, 512MB or 800M")
        value, unit = float(m.group(1)), m.group(2).lower()
    if value <= 0:
        raise ConfigError(f"memory: {text!r} must be more than 0")
    return int(value * UNITS[unit])


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------- the architecture
@dataclass(frozen=True)
class Arch:
    """What memory depends on, read off a meta-device model of the config."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int  # 0 for a classifier: no vocabulary-sized logits
    plain: int  # parameters never quantized (embeddings, norms, heads), elements
    buffers: int  # elements of the buffers (rotary frequencies), float32 whatever the dtype
    linear: tuple[tuple[int, int], ...]  # (d_in, d_out) of every quantizable Linear weight
    linear_bias: int  # elements of their biases (kept in the dtype)
    targets: tuple[tuple[int, int], ...]  # (d_in, d_out) of the adapted layers

    @property
    def parameters(self) -> int:
        return self.plain + self.buffers + self.linear_bias + sum(i * o for i, o in self.linear)


def load_config(ref: str | dict | None = None, cache_dir: str | None = None):
    """A transformers config from a dict of its fields, a local folder, a hub name, or None (the embedded
    SmolLM2)."""
    from transformers import AutoConfig

    if isinstance(ref, dict):
        fields = dict(ref)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    from .tasks.models import check_model_ref, smollm2_path

    path = smollm2_path(cache_dir) if ref is None else check_model_ref(ref)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())  # one line, whatever the hub client wrote
        raise DataError(f"model: cannot read the config of {ref or path!r} ({reason})") from None


@lru_cache(maxsize=16)
def _arch(config_json: str, head: str, targets: tuple[str, ...] | None) -> Arch:
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from .adapters.config import resolve_targets
    from .adapters.model import _matches

    fields = json.loads(config_json)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    cls = AutoModelForCausalLM if head == "causal" else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = cls.from_config(config)
    wanted = resolve_targets(list(targets) if targets else None, config.model_type)
    linear, bias, target_dims, quantized = [], 0, [], set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in ("lm_head", "score", "classifier"):
            linear.append((module.in_features, module.out_features))
            quantized.add(id(module.weight))
            if module.bias is not None:
                bias += module.bias.numel()
                quantized.add(id(module.bias))
        if isinstance(module, nn.Linear) and _matches(name, wanted):
            target_dims.append((module.in_features, module.out_features))
    plain = sum(p.numel() for p in model.parameters() if id(p) not in quantized)  # tied weights counted once
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return Arch(model_type=config.model_type, layers=text.num_hidden_layers, hidden=text.hidden_size,
                intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
                heads=text.num_attention_heads, vocab=text.vocab_size if head == "causal" else 0, plain=plain,
                buffers=sum(b.numel() for b in model.buffers()),
                linear=tuple(linear), linear_bias=bias, targets=tuple(target_dims))


def architecture(config, head: str = "causal", targets: list[str] | None = None) -> Arch:
    """The Arch of a transformers config (cached: building even a meta model takes a moment)."""
    fields = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    fields = {k: v for k, v in fields.items() if k not in ("transformers_version", "architectures", "dtype",
                                                           "torch_dtype", "quantization_config")}
    try:
        return _arch(json.dumps(fields, sort_keys=True, default=str), head, tuple(targets) if targets else None)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


# ----------------------------------------------------------------------------- the exact parts
def weight_bytes(arch: Arch, dtype: str, quantization: str) -> int:
    """The frozen base as loaded (bitsandbytes' packing for the Linear weights of a quantized load)."""
    size = DTYPE_BYTES[dtype]
    fixed = (arch.plain + arch.linear_bias) * size + arch.buffers * 4
    if quantization == "none":
        return fixed + sum(i * o for i, o in arch.linear) * size
    if quantization == "8bit":  # int8 weights + a float32 scale per output row (SCB)
        return fixed + sum(i * o + 4 * o for i, o in arch.linear)
    # NF4: two weights a byte; double quantization: one uint8 absmax per 64 weights, a float32 per 256 of those
    return fixed + sum((i * o + 1) // 2 + -(-i * o // 64) + 4 * -(-i * o // (64 * 256)) for i, o in arch.linear)


def merge_copy_bytes(arch: Arch, dtype: str, fold: str, rank: int, global_rank: int) -> int:
    """fold="merge" keeps the pristine W0 of every adapted layer while any pair is folded."""
    if fold != "merge" or rank >= global_rank:
        return 0
    return sum(i * o for i, o in arch.targets) * DTYPE_BYTES[dtype]


def adapter_bytes(arch: Arch, fold: str, rank: int, global_rank: int) -> int:
    """Masters of all R pairs, the folded pairs' frozen copy (branch), r active pairs x (param, grad, m, v)."""
    pairs = global_rank + 4 * rank + ((global_rank - rank) if fold == "branch" else 0)
    return pairs * sum(i + o for i, o in arch.targets) * MASTER_BYTES


# ----------------------------------------------------------------------------- the fitted part
FEATURES = ("layers_hidden", "layers_intermediate", "vocab_base", "vocab_fp32", "attention")


def activation_features(arch: Arch, dtype: str, batch: int, seq: int) -> list[float]:
    """Per-cell activation terms (elements x bytes), one coefficient each per checkpointing mode."""
    tokens, size = batch * seq, DTYPE_BYTES[dtype]
    return [tokens * arch.layers * arch.hidden * size, tokens * arch.layers * arch.intermediate * size,
            tokens * arch.vocab * size, tokens * arch.vocab * MASTER_BYTES,
            tokens * arch.layers * arch.heads * seq * size]


def fixed_bytes(arch: Arch, c: dict, global_rank: int) -> int:
    """The exact parts: the frozen weights and the adapters."""
    return weight_bytes(arch, c["dtype"], c["quantization"]) + adapter_bytes(arch, c["fold"], c["rank"], global_rank)


def design_row(arch: Arch, c: dict, global_rank: int, device: str = "cpu") -> list[float]:
    """[constant, merge copy, quantized weights (8bit, 4bit), activation features without checkpointing, the
    same with checkpointing]. The merge copy and the quantized weights get fitted coefficients beside their
    exact size: on the CPU the rebuilt layers' temporaries stay in the process's heap beside the copy, and
    bitsandbytes holds more than the packed weights (docs/memory.md)."""
    merge = merge_copy_bytes(arch, c["dtype"], c["fold"], c["rank"], global_rank) if device == "cpu" else 0
    linear = sum(i * o for i, o in arch.linear)
    quantized = [linear if c["quantization"] == q else 0 for q in ("8bit", "4bit")]
    f = activation_features(arch, c["dtype"], c["batch"], c["seq"])
    zero = [0.0] * len(f)
    return [1.0, float(merge), *map(float, quantized)] + (zero + f if c["ckpt"] else f + zero)


@lru_cache(maxsize=1)
def memory_model() -> dict:
    if not MODEL_FILE.is_file():
        raise DataError(f"{MODEL_FILE} is missing: run `python benchmarks/bench_memory.py --fit`")
    return json.loads(MODEL_FILE.read_text())


def predict(arch: Arch, c: dict, global_rank: int, device: str = "cpu", model: dict | None = None) -> int:
    """Predicted peak (bytes) of one cell: {rank, fold, dtype, quantization, batch, seq, ckpt}."""
    coef = (model or memory_model())["coefficients"]
    fitted = sum(a * b for a, b in zip(coef, design_row(arch, c, global_rank, device)))
    return int(fixed_bytes(arch, c, global_rank) + fitted)


def _nnls(rows: list[list[float]], rest: list[float], peaks: list[float]) -> list[float]:
    """Least squares of ``rest`` (measured peak - exact parts) weighted by 1 / measured peak, so each cell's
    relative error counts (the acceptance is 10% of every cell), with every coefficient but the constant
    (column 0) kept non-negative: drop the most negative one and refit until none is."""
    import numpy as np

    X, y, w = np.asarray(rows, dtype=float), np.asarray(rest, dtype=float), 1.0 / np.asarray(peaks, dtype=float)
    scale = np.maximum(np.abs(X).max(axis=0), 1e-12)
    active = [j for j in range(X.shape[1]) if np.abs(X[:, j]).max() > 0]
    while True:
        sol, *_ = np.linalg.lstsq((X[:, active] / scale[active]) * w[:, None], y * w, rcond=None)
        negative = [(v, k) for k, (v, j) in enumerate(zip(sol, active)) if j != 0 and v < 0]
        if not negative:
            coef = np.zeros(X.shape[1])
            coef[active] = sol / scale[active]
            return coef.tolist()
        active.pop(min(negative)[1])


def measured_cells(results: dict) -> list[dict]:
    return [c for c in results["cells"] if "error" not in c and c.get("device", "cpu") == "cpu"]


def measured_targets(results: dict) -> list[str]:
    """The targets the benchmark adapted: every attention projection (the default before it became query/value)."""
    return list(results.get("targets", ["attention"]))


def fit(results: dict) -> dict:
    """Coefficients that best fit the measured CPU cells."""
    cells = measured_cells(results)
    rank = results.get("global_rank", 16)
    rows, rest = [], []
    for c in cells:
        arch = architecture(results["models"][c["model"]], targets=measured_targets(results))
        rows.append(design_row(arch, c, rank))
        rest.append(c["peak_bytes"] - fixed_bytes(arch, c, rank))
    idle = sorted(c["idle_rss"] for c in cells if "idle_rss" in c)
    return {"about": "fitted by benchmarks/bench_memory.py --fit; fedplora/planner.py, docs/memory.md",
            "global_rank": rank,
            "features": ["constant", "merge_copy", "weights_8bit", "weights_4bit", *FEATURES,
                         *(f"{f}_ckpt" for f in FEATURES)],
            "coefficients": _nnls(rows, rest, [c["peak_bytes"] for c in cells]),
            "runtime_bytes": idle[len(idle) // 2] if idle else 0, "cells": len(cells)}


# ----------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class Plan:
    rank: int
    batch: int
    quantization: str
    ckpt: bool
    peak: int  # predicted, bytes

    def describe(self) -> str:
        return (f"rank {self.rank}, batch {self.batch}, quantization {self.quantization}, "
                f"gradient checkpointing {'on' if self.ckpt else 'off'}: {format_bytes(self.peak)}")


def _batches(batch: int) -> list[int]:
    out = [batch]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def candidates(arch: Arch, *, global_rank: int, batch: int, seq: int, dtype: str, fold: str,
               device: str = "cpu") -> list[Plan]:
    """Every configuration a plan may pick, best first: the largest rank r <= R, then the largest batch
    (halving from the requested one), then the least aggressive mode (``MODES``). Quantized modes need
    fold="branch" (a merge adds pairs into a float weight)."""
    modes = [m for m in MODES if fold == "branch" or m[0] == "none"]
    out = []
    for r in range(global_rank, 0, -1):
        for b in _batches(batch):
            for q, ckpt in modes:
                cell = dict(rank=r, fold=fold, dtype=dtype, quantization=q, batch=b, seq=seq, ckpt=ckpt)
                out.append(Plan(r, b, q, ckpt, predict(arch, cell, global_rank, device)))
    return out


def plan(arch: Arch, memory: int, **settings) -> tuple[Plan, list[Plan]]:
    """The first candidate (``candidates``' order) whose predicted peak fits ``memory``, and for each mode
    the best candidate that fits (the alternatives). The order is fixed and a candidate's peak does not
    depend on ``memory``, so less memory never gives a candidate earlier in the order, hence never a higher
    rank (what keeps a SuperNode's query and train consistent, ``round_plan``)."""
    cands = candidates(arch, **settings)
    fits = [p for p in cands if p.peak <= memory]
    if not fits:
        least = min(cands, key=lambda p: p.peak)
        raise ConfigError(f"memory: {format_bytes(memory)} is too little to train this model; the smallest "
                          f"configuration ({least.describe()}) needs more; give more memory or a smaller "
                          "--max-seq-len")
    alternatives = []
    for q, ckpt in MODES:
        first = next((p for p in fits if (p.quantization, p.ckpt) == (q, ckpt)), None)
        if first is not None:
            alternatives.append(first)
    return fits[0], alternatives


def device_kind(device: str) -> str:
    """Where the peak is counted: "cuda" (the device's memory; the merge copy lives on the CPU) or "cpu"."""
    return "cuda" if str(device).startswith("cuda") else "cpu"


def free_memory(device) -> int:
    """What the device has free now: psutil's available memory on the CPU, cudaMemGetInfo on CUDA."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def held_bytes(models, device) -> int:
    """What loaded models' tensors hold on ``device`` (given back when another configuration replaces them)."""
    import torch

    kind = torch.device(device).type
    sizes: dict[int, int] = {}  # per storage: tied and viewed tensors counted once
    for model in models:
        for t in list(model.parameters()) + list(model.buffers()):
            if t.device.type == kind:
                sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(sizes.values())


def run_plan(cfg, memory: int) -> Plan:
    """The plan for a run's settings (``RunConfig``: task, model, rank, batch, seq, dtype, fold, device)."""
    from .hardware import resolve_device
    from .tasks import make_task
    from .tasks.causal import CausalLMTask

    task = make_task(cfg)
    head = "causal" if isinstance(task, CausalLMTask) else "classification"
    arch = architecture(load_config(task.model_path, cfg.cache_dir), head, cfg.targets)
    chosen, _ = plan(arch, memory, global_rank=cfg.rank, batch=cfg.batch_size, seq=cfg.max_seq_len,
                     dtype=cfg.dtype, fold=cfg.fold, device=device_kind(resolve_device(cfg.device).type))
    return chosen


PLAN_KEY = "memory-plan"


def round_plan(cfg, declared: int, server_round: int | None, state, held: int) -> Plan:
    """A SuperNode's plan (node config ``max-memory``) for this round, the same for every message of it.

    The first message of a round (the query) plans for min(declared, free now + ``held``, what the loaded
    model holds and would give back) and keeps the plan in the node's state (``Context.state``, which Flower
    keeps between a run's messages); the round's later messages (the train) reuse it, so a train is never
    refused because free memory changed since the query. ``server_round`` None (a message's settings, read
    before its round is known) reuses the latest plan kept, or plans afresh without keeping it.
    """
    from flwr.app import ConfigRecord

    from .hardware import resolve_device

    kept = state.config_records.get(PLAN_KEY)
    if kept is not None and (server_round is None or int(kept["round"]) == server_round):
        return Plan(int(kept["rank"]), int(kept["batch"]), str(kept["quantization"]), bool(kept["ckpt"]),
                    int(kept["peak"]))
    chosen = run_plan(cfg, min(declared, free_memory(resolve_device(cfg.device)) + held))
    if server_round is not None:
        state[PLAN_KEY] = ConfigRecord({"round": server_round, **asdict(chosen)})
    return chosen


def apply_plan(cfg, chosen: Plan):
    """The run's settings as a plan changes them (quantization, checkpointing, batch; never rank here: the
    server assigns the pairs within the budget)."""
    return replace(cfg, quantization=chosen.quantization, gradient_checkpointing=chosen.ckpt,
                   batch_size=min(cfg.batch_size, chosen.batch))
