"""Injecting PLoRA layers into any transformers model, and the model-level API.

State-dict names are stable across clients and runs:
``<module>.plora_A`` (R x d_in), ``<module>.plora_B`` (d_out x R) for every
adapted layer, and ``<param name>`` for each parameter of ``modules_to_save``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from .config import SEQUENCE_CLASSIFICATION_HEADS, PLoRAConfig, resolve_targets
from .layer import PLoRALayer, _dims, master_dtype

A_SUFFIX = ".plora_A"
B_SUFFIX = ".plora_B"


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _resolve_heads(model: nn.Module, config: PLoRAConfig) -> list[str]:
    if config.modules_to_save is not None:
        heads = list(config.modules_to_save)
    else:
        arch = " ".join(getattr(getattr(model, "config", None), "architectures", None) or [])
        is_cls = "SequenceClassification" in (arch + type(model).__name__)
        heads = [h for h in SEQUENCE_CLASSIFICATION_HEADS if is_cls and hasattr(model, h)]
    names = dict(model.named_modules())
    missing = [h for h in heads if h not in names]
    if missing:
        raise ValueError(f"modules_to_save {missing} not found in the model (top-level names: "
                         f"{[n for n, _ in model.named_children()]})")
    return heads


def get_plora_model(model: nn.Module, config: PLoRAConfig) -> nn.Module:
    """Wrap the targeted layers of ``model`` in place, freeze the rest, return the model.

    The wrapped model computes exactly what it did before (b_j = 0 at init).
    """
    if any(isinstance(m, PLoRALayer) for m in model.modules()):
        raise ValueError("this model already carries PLoRA layers")
    targets = resolve_targets(config.target_modules, getattr(getattr(model, "config", None), "model_type", ""))
    heads = _resolve_heads(model, config)
    for p in model.parameters():
        p.requires_grad_(False)

    wrapped = []
    for name, module in list(model.named_modules()):
        if not name or not _matches(name, targets) or any(name == h or name.startswith(h + ".") for h in heads):
            continue
        try:
            _dims(module)
        except TypeError:
            continue  # a container whose name matches (e.g. "attention"), not a linear layer
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PLoRALayer(module, config.rank, config.alpha, config.dropout, config.init_a,
                                          config.fold))
        wrapped.append(name)
    if not wrapped:
        raise ValueError(
            f"target_modules {targets!r} matched no Linear/Conv1D layer; linear layers in this "
            f"model include {sorted({n.rsplit('.', 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})}"
        )
    for h in heads:
        _float32_head(model.get_submodule(h))
    model.plora_config = config
    model.plora_targets = wrapped
    model.plora_heads = heads
    return model


def _float32_head(head: nn.Module) -> None:
    """Train a head as float32 masters on a half-precision base: inputs are cast up, its output back to the
    base's dtype (so a trained module inside the network feeds the next half-precision layer what it expects)."""
    for p in head.parameters():
        p.requires_grad_(True)
    base_dtype = next((p.dtype for p in head.parameters() if p.dtype in (torch.float16, torch.bfloat16)), None)
    if base_dtype is None:
        return
    head.float()

    def cast_in(module, args):
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def cast_out(module, args, out):
        return out.to(base_dtype) if torch.is_tensor(out) and out.is_floating_point() else out

    head.register_forward_pre_hook(cast_in)
    head.register_forward_hook(cast_out)


def plora_layers(model: nn.Module) -> Iterator[tuple[str, PLoRALayer]]:
    for name, module in model.named_modules():
        if isinstance(module, PLoRALayer):
            yield name, module


def _require_plora(model: nn.Module) -> None:
    if not hasattr(model, "plora_config"):
        raise ValueError("this model has no PLoRA adapters: call get_plora_model(model, config) first")


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    _require_plora(model)
    out = {}
    for h in model.plora_heads:
        for pname, p in model.get_submodule(h).named_parameters():
            out[f"{h}.{pname}"] = p
    return out


def get_plora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """All R pairs of every adapted layer plus the head parameters: copies of the float32 masters (float64 on a
    float64 base) on the CPU, wherever the model lives: the server's global state and every upload."""
    _require_plora(model)
    state: dict[str, torch.Tensor] = {}

    def copy(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", master_dtype(t), copy=True)

    for name, layer in plora_layers(model):
        A, B = layer.pairs()
        state[name + A_SUFFIX], state[name + B_SUFFIX] = copy(A), copy(B)
    for name, p in head_parameters(model).items():
        state[name] = copy(p)
    return state


def set_plora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load pairs and heads; the current selection is re-applied with the new values."""
    _require_plora(model)
    expected = set(plora_state_shapes(model))
    if strict:
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise KeyError(f"PLoRA state mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    for name, layer in plora_layers(model):
        if name + A_SUFFIX in state:
            layer.set_pairs(state[name + A_SUFFIX], state[name + B_SUFFIX])
    with torch.no_grad():
        for name, p in head_parameters(model).items():
            if name in state:
                if state[name].shape != p.shape:
                    raise ValueError(f"{name}: expected shape {tuple(p.shape)}, got {tuple(state[name].shape)}")
                p.copy_(state[name])


def plora_state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    _require_plora(model)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, layer in plora_layers(model):
        shapes[name + A_SUFFIX] = (layer.rank, layer.d_in)
        shapes[name + B_SUFFIX] = (layer.d_out, layer.rank)
    for name, p in head_parameters(model).items():
        shapes[name] = tuple(p.shape)
    return shapes


def select_and_fold(model: nn.Module, indices: Iterable[int] | Mapping[str, Iterable[int]]) -> None:
    """Select-N-Fold on every adapted layer.

    ``indices``: one index set shared by all layers, or a mapping layer name ->
    indices. Unselected pairs are folded (current values) into weights rebuilt
    from the pristine base; the selected pairs, initialised to their current
    values, are the only trainable adapter tensors. All indices = nothing folded.
    """
    _require_plora(model)
    per_layer = isinstance(indices, Mapping)
    shared = None if per_layer else sorted(int(i) for i in indices)
    for name, layer in plora_layers(model):
        if per_layer and name not in indices:
            raise KeyError(f"no indices given for PLoRA layer {name}")
        layer.select(sorted(int(i) for i in indices[name]) if per_layer else shared)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adapter_factors(state: dict[str, torch.Tensor], scale: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (s*B, A) from a PLoRA state dict: dW = (s*B) @ A."""
    out = {}
    for key, A in state.items():
        if key.endswith(A_SUFFIX):
            layer = key[: -len(A_SUFFIX)]
            out[layer] = (scale * state[layer + B_SUFFIX], A)
    return out
