"""Every check a reply passes before a reducer sees it: the same rules for every method.

Why here and not on the method: a method declares only what an honest reply holds (``expected_update_shapes``,
``expected_update_config``); what makes a reply acceptable (a sample count, dense finite tensors of the declared
dtype, factors whose product cannot overflow, a norm bound) is one rule for all of them
(docs/fault-tolerance.md, "Broken updates"). A rejection raises ``UpdateRejected`` naming what is wrong; the
strategy records it and the round goes on without that reply.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from ..errors import UpdateRejected
from ..state import A_SUFFIX, B_SUFFIX, State, upload_dtype

MAX_NUM_SAMPLES = 2**53  # the largest sample count a float64 aggregation weight holds exactly


def validate_update(method, task, update, state: State, max_norm: float | None = None) -> None:
    """Raise UpdateRejected naming what is wrong: the sample count, the declared config (exactly the method's
    ``expected_update_config``), the keys and shapes (``expected_update_shapes``), dense tensors of the declared
    dtype, finite values, factors whose product cannot overflow that dtype, and the norm bound."""
    n = update.num_samples
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= MAX_NUM_SAMPLES:
        raise UpdateRejected(f"num_samples must be a positive integer of at most 2**53, got {short(n)}")
    check_declared(method, task, update.config)
    expected = method.expected_update_shapes(task, state)
    if not isinstance(update.arrays, dict):
        raise UpdateRejected(f"update arrays must map key -> tensor, got {type(update.arrays).__name__}")
    missing = sorted(set(expected) - set(update.arrays), key=str)
    extra = sorted(set(update.arrays) - set(expected), key=str)
    if missing or extra:
        raise UpdateRejected(f"update keys differ from the task: missing {missing[:3]}, unexpected {extra[:3]}")
    for key, shape in expected.items():
        t = update.arrays[key]
        if not isinstance(t, torch.Tensor):
            raise UpdateRejected(f"{key}: expected a tensor, got {type(t).__name__}")
        if t.layout != torch.strided or t.is_meta:
            raise UpdateRejected(f"{key}: expected a dense tensor with values, got a {t.layout} tensor on {t.device}")
        if tuple(t.shape) != tuple(shape):
            raise UpdateRejected(f"{key}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
        declared = state[key].dtype if key in state else upload_dtype(state)
        if t.dtype != declared:
            raise UpdateRejected(f"{key}: expected {str(declared).removeprefix('torch.')} values (the declared "
                                 f"upload dtype), got {str(t.dtype).removeprefix('torch.')}")
        if not bool(torch.isfinite(t).all()):
            raise UpdateRejected(f"{key}: contains NaN or Inf")
    check_products(update.arrays, method.plora.scale)
    if max_norm is not None:
        norm = math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in update.arrays.values()))
        if norm > max_norm:
            raise UpdateRejected(f"update norm {norm:.3g} exceeds the bound {max_norm:g}")


def check_declared(method, task, config: Any) -> None:
    """The reply's config declares exactly the work it was given: ``method.expected_update_config(task)``, no
    key more or less, each value equal to the task's and of its type (2.0 or true is not the rank 2)."""
    if not isinstance(config, dict):
        raise UpdateRejected(f"update config must be a mapping, got {type(config).__name__}")
    expected = method.expected_update_config(task)
    extra = sorted(set(config) - set(expected), key=str)
    if extra:
        raise UpdateRejected(f"update config: unexpected keys {short(extra)} (a {method.name} reply declares "
                             f"only {sorted(expected)})")
    missing = sorted(set(expected) - set(config))
    if missing:
        raise UpdateRejected(f"update config: missing {missing} (a {method.name} reply declares {sorted(expected)})")
    R, rank = method.rank, task.config.get("rank", method.rank)
    if "rank" in config and (type(config["rank"]) is not int or not 1 <= config["rank"] <= R):
        raise UpdateRejected(f"declared rank {short(config['rank'])} is not an integer in [1, {R}]")
    indices = config.get("indices")
    if "indices" in config:
        if not isinstance(indices, dict):
            raise UpdateRejected("declared indices must map layer -> list of pair indices")
        for layer, idx in indices.items():
            if not isinstance(idx, list) or not all(type(i) is int and 0 <= i < R for i in idx):
                raise UpdateRejected(f"{layer}: declared indices {short(idx)} are not pair indices in [0, {R})")
            if len(set(idx)) != len(idx):
                raise UpdateRejected(f"{layer}: declared indices {short(idx)} repeat a pair")
            if len(idx) > rank:
                raise UpdateRejected(f"{layer}: declared {len(idx)} indices, more than the client's rank {rank}")
    for key, value in expected.items():
        if not same_json(config[key], value):
            raise UpdateRejected(f"declared {key} differs from the task's ({short(config[key])} != {short(value)})")


def check_products(arrays: State, scale: float) -> None:
    """Finite factors can still overflow once multiplied (FlexLoRA and FLoRA aggregate B @ A): per layer,
    max(1, s)·||B||·||A|| must stay below the square root of the declared dtype's largest value."""
    s = max(1.0, abs(float(scale)))
    for key in arrays:
        if not (isinstance(key, str) and key.endswith(A_SUFFIX)):
            continue
        layer = key[: -len(A_SUFFIX)]
        if layer + B_SUFFIX not in arrays:
            continue
        dtype = arrays[key].dtype
        limit = math.sqrt(torch.finfo(dtype).max)
        A, B = arrays[key].detach().double(), arrays[layer + B_SUFFIX].detach().double()
        bound = s * float(A.norm()) * float(B.norm())
        if not bound <= limit:
            raise UpdateRejected(f"{layer}: values too large, the product bound max(1, s)·||B||·||A|| = "
                                 f"{bound:.3g} exceeds {limit:.3g} (the square root of the largest "
                                 f"{str(dtype).removeprefix('torch.')}), so aggregating B @ A could overflow")


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values, types included (2 vs 2.0 vs true differ; key order does not matter)."""
    try:
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    except (TypeError, ValueError):
        return False


def short(value: Any, limit: int = 80) -> str:
    """repr for a rejection message, cut to one short line (a reply may send anything)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
