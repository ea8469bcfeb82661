"""Configuration of a PLoRA adapter (kept apart from the layer math, like PEFT)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class PLoRAConfig:
    """R parallel one-rank adapters per targeted linear layer.

    ``scale = alpha / rank`` is one constant for every pair and every client:
    a client-specific ``alpha / r_i`` would make folding inexact (see docs/method.md).
    ``alpha=None`` means alpha = rank, a scale of 1: the paper's choice.

    ``target_modules``: a list of module-name suffixes (``"query"`` matches
    ``encoder.layer.0.attention.self.query``) or one regex that must match the
    full module name, as in PEFT. ``None`` picks the query and value projections of the
    model's architecture (the paper's targets); ``"attention"`` all its attention projections.

    ``modules_to_save``: other modules trained fully and averaged FedAvg-style
    (a classification head). ``None`` picks the head of a ``*ForSequenceClassification``.
    They are kept in float32 whatever the base's dtype.

    ``fold``: how the unselected pairs are folded (``layer.py``). ``"branch"`` (the default,
    chosen by the memory benchmark, docs/memory.md) keeps them a frozen low-rank branch: no
    extra memory, any base dtype, quantized bases included. ``"merge"`` adds them into the
    base weight, rebuilt from a pristine copy kept on the CPU: one extra d_out x d_in per
    adapted layer, float bases only. Both compute the same model to float tolerance.
    """

    rank: int = 8
    alpha: float | None = None
    target_modules: list[str] | str | None = None
    dropout: float = 0.0
    modules_to_save: list[str] | None = None
    init_a: str = "kaiming_uniform"  # round-0 init of a_j; b_j always starts at 0
    fold: str = "branch"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"PLoRAConfig.rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is None:
            self.alpha = float(self.rank)
        if not self.alpha > 0:
            raise ValueError(f"PLoRAConfig.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"PLoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init_a not in ("kaiming_uniform", "gaussian"):
            raise ValueError(
                f"PLoRAConfig.init_a must be 'kaiming_uniform' or 'gaussian', got {self.init_a!r}"
            )
        if self.fold not in ("branch", "merge"):
            raise ValueError(f"PLoRAConfig.fold must be 'branch' or 'merge', got {self.fold!r}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)


# The query and value projections per architecture: the paper's targets (BERT query/value, decoders
# q_proj/v_proj), and the default. Architectures not listed fall back on PEFT's own table, which holds
# the same choice for most of them.
QUERY_VALUE_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
}

# Every attention projection per architecture (``target_modules="attention"``, ``--targets attention``):
# fedplora's default before it followed the paper.
ATTENTION_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "key", "value"],
    "roberta": ["query", "key", "value"],
    "distilbert": ["q_lin", "k_lin", "v_lin"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
}

# Heads trained fully beside the adapters (names of the head modules).
SEQUENCE_CLASSIFICATION_HEADS = ["classifier", "score"]


def resolve_targets(target_modules: list[str] | str | None, model_type: str) -> list[str] | str:
    """The module names to adapt: ``None`` the query/value default, ``["attention"]`` (or "attention")
    every attention projection of the architecture, anything else as given."""
    if target_modules is None:
        return default_target_modules(model_type)
    if target_modules in ("attention", ["attention"]):
        return default_target_modules(model_type, "attention")
    return target_modules


def default_target_modules(model_type: str, which: str = "query_value") -> list[str]:
    """``which``: "query_value" (the default targets) or "attention" (every attention projection)."""
    own = ATTENTION_TARGETS if which == "attention" else QUERY_VALUE_TARGETS
    if model_type in own:
        return list(own[model_type])
    try:  # fall back on PEFT's own table (query/value for most architectures) for those we do not list
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table
    except ImportError:  # pragma: no cover - depends on PEFT internals
        table = {}
    if which != "attention" and model_type in table:
        return list(table[model_type])
    if which == "attention":
        raise ValueError(f"no list of attention projections for model type {model_type!r}: "
                         "name them with --targets (e.g. q_proj,k_proj,v_proj,o_proj)")
    raise ValueError(
        f"no default PLoRA targets for model type {model_type!r}: "
        "pass target_modules (e.g. ['q_proj', 'v_proj']) in PLoRAConfig or --targets"
    )


