"""PLoRA <-> standard PEFT LoRA.

R one-rank pairs stacked are exactly a rank-R LoRA with scaling alpha/R, so the
export goes through PEFT's own machinery (a PeftModel on a clean copy of the
base, then ``save_pretrained``): what we write is what PEFT writes and reads.
PEFT's layer classes are touched only here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from .config import PLoRAConfig
from .layer import PLoRALayer
from .model import get_plora_model, get_plora_state_dict, plora_layers, set_plora_state_dict, A_SUFFIX, B_SUFFIX


def unwrap_base_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the model with every PLoRA layer replaced by its pristine base layer."""
    clean = copy.deepcopy(model)
    for name, layer in list(plora_layers(clean)):
        base = layer.base_layer
        with torch.no_grad():
            base.weight.copy_(layer.pristine_weight())
        parent_name, _, child = name.rpartition(".")
        parent = clean.get_submodule(parent_name) if parent_name else clean
        setattr(parent, child, base)
    for attr in ("plora_config", "plora_targets", "plora_heads"):
        if hasattr(clean, attr):
            delattr(clean, attr)
    for p in clean.parameters():
        p.requires_grad_(False)
    return clean


def export_peft_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write all R pairs (and trained heads) as a PEFT LoRA folder loadable by ``PeftModel.from_pretrained``."""
    from peft import LoraConfig, get_peft_model

    cfg: PLoRAConfig = model.plora_config
    state = get_plora_state_dict(model)
    layers = dict(plora_layers(model))
    transposed = {layer.transposed for layer in layers.values()}
    if len(transposed) > 1:
        raise ValueError("cannot export a mix of Linear and Conv1D targets as one PEFT adapter")
    base = unwrap_base_copy(model)
    name = base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None)
    lora_config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(layers),
        modules_to_save=list(model.plora_heads) or None,
        fan_in_fan_out=transposed.pop(),
        bias="none",
        base_model_name_or_path=name,
    )
    peft_model = get_peft_model(base, lora_config)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for lname in layers:
            target = inner.get_submodule(lname)
            target.lora_A["default"].weight.copy_(state[lname + A_SUFFIX])
            target.lora_B["default"].weight.copy_(state[lname + B_SUFFIX])
        for h in model.plora_heads:
            wrapper = inner.get_submodule(h)
            for pname, p in wrapper.modules_to_save["default"].named_parameters():
                p.copy_(state[f"{h}.{pname}"])
    out = Path(path)
    peft_model.save_pretrained(str(out))
    _sort_target_modules(out / "adapter_config.json")
    (out / "plora_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return out


def _sort_target_modules(config_file: Path) -> None:
    """PEFT keeps ``target_modules`` as a set and writes it in the set's order, which follows the process's
    string hashing: two runs with the same numbers wrote different adapter_config.json files. Sorted, and
    written as PEFT writes it (indent 2, sorted keys), so the same adapter is the same bytes."""
    config = json.loads(config_file.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


def load_peft_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Start PLoRA from an existing PEFT LoRA folder: R = the adapter's rank, same outputs."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path} is not a PEFT adapter folder (no adapter_config.json)")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(path))
    inner = peft_model.base_model.model
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ranks, scales = set(), set()
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            A = module.lora_A["default"].weight.detach()
            B = module.lora_B["default"].weight.detach()
            pairs[name] = (A, B)
            ranks.add(A.shape[0])
            scales.add(float(module.scaling["default"]))
    if not pairs:
        raise ValueError(f"{path} holds no LoRA layers PLoRA can read")
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError(f"{path}: PLoRA needs one rank and one scaling for every layer, got ranks "
                         f"{sorted(ranks)} and scalings {sorted(scales)}")
    rank, scale = ranks.pop(), scales.pop()
    heads = sorted(peft_model.peft_config["default"].modules_to_save or [])
    heads = [h for h in heads if h in dict(model.named_modules())]
    config = PLoRAConfig(rank=rank, alpha=scale * rank, target_modules=sorted(pairs), modules_to_save=heads)
    head_state = {}
    for h in heads:
        for pname, p in inner.get_submodule(h).modules_to_save["default"].named_parameters():
            head_state[f"{h}.{pname}"] = p.detach().clone()
    get_plora_model(model, config)
    state = {n + A_SUFFIX: A for n, (A, B) in pairs.items()} | {n + B_SUFFIX: B for n, (A, B) in pairs.items()}
    set_plora_state_dict(model, state | head_state)
    return model


__all__ = ["export_peft_adapter", "load_peft_adapter", "unwrap_base_copy", "PLoRALayer"]
