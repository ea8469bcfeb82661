"""Where the frozen base runs and in what form: device, dtype, bitsandbytes quantization, checkpointing.

Why one module: the same four settings decide how every process (a simulated client, a SuperNode,
the server's evaluator, the memory benchmark) loads its base model, and a mismatch between two of
them would be a silent difference in what is trained. The adapters never follow these settings:
their masters are float32 on the model's device, and what goes on the wire is float32 on the CPU
(``fedplora.adapters``).
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto``: cuda, then mps, then cpu; an explicit device that this machine lacks is a ConfigError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {name} asked for, but this machine has no CUDA device torch can use; "
                              "use --device auto or --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {name} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                              "device(s); use --device cuda")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device: mps asked for, but this machine has no Apple GPU torch can use; use --device auto")
    return device


def quantization_config(quantization: str, dtype: str, skip_modules: list[str] | None = None):
    """transformers' BitsAndBytesConfig for ``8bit`` (LLM.int8) or ``4bit`` (NF4 with double quantization and
    the base dtype as compute dtype, as QLoRA and FlowerTune); None for ``none``."""
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"quantization: {quantization} needs bitsandbytes; run `make setup` (or pip install "
                          "bitsandbytes), or use --quantization none") from None
    from transformers import BitsAndBytesConfig

    skip = list(skip_modules or []) + ["lm_head"]
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=DTYPES[dtype], llm_int8_skip_modules=skip)


def load_kwargs(dtype: str, quantization: str, device: torch.device,
                skip_modules: list[str] | None = None) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for the base in ``dtype`` / ``quantization`` on ``device``."""
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    q = quantization_config(quantization, dtype, skip_modules)
    if q is not None:
        kwargs["quantization_config"] = q
        kwargs["device_map"] = {"": str(device)}  # bitsandbytes quantizes as it places the weights
    return kwargs


def place(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move a model loaded without a device map (a quantized one is already in place)."""
    if getattr(model, "hf_device_map", None) is None and getattr(model, "is_quantized", False) is False:
        model.to(device)
    keep_4bit_trainable(model)
    return model


def keep_4bit_trainable(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On a CPU with AVX512-BF16, bitsandbytes 0.50.2 repacks a Linear4bit's weight in place, at its first
    no-grad forward, for an inference kernel that has no autograd: from then on no gradient flows through the
    layer, so an adapter evaluated once (a SuperNode, a library user's eval-then-train loop) would silently
    train nothing. tests/test_hardware.py holds the reproduction.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing: the frozen base needs no input gradients for the adapters' to flow."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"gradient_checkpointing: {type(model).__name__} does not support it; "
                          "use --no-gradient-checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


MMAP_THRESHOLD = 131072  # bytes; what benchmarks/bench_memory.py measured under (MALLOC_MMAP_THRESHOLD_)


def steady_allocator() -> None:
    """Fix glibc's mmap threshold as the memory benchmark does, so a CPU client peaks where the planner says.

    By default glibc raises the threshold as large blocks are freed, after which activations stay in the heap
    and a training step peaked up to 40% higher at large batches (docs/memory.md). A process started with
    ``MALLOC_MMAP_THRESHOLD_`` set keeps it; elsewhere (not glibc) this does nothing.
    """
    import ctypes
    import os

    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
