"""Greedy generation for the benchmarks that read what the model writes (finance sentiment, code).

FlowerTune's finance evaluation and the code harness both decode greedily or near it; greedy decoding makes the
figure a function of the adapter alone (no sampling seed), which is what a comparison of methods needs.
Prompts are tokenized with the tokenizer's own special tokens (as ``tokenizer(prompt)`` does in FlowerTune),
left-padded into batches, and each continuation is cut at the first of the benchmark's stop strings.
"""

from __future__ import annotations

from ..tasks.causal import greedy_continuations


def cut(text: str, stops: tuple[str, ...]) -> str:
    """``text`` up to the earliest of ``stops`` (the code harness's ``_stop_at_stop_token``)."""
    end = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:end]


def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
           stops: tuple[str, ...] = ()) -> list[str]:
    """The greedy continuation of each prompt (text, special tokens dropped), cut at ``stops``."""
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    return [cut(text, stops) for text in greedy_continuations(model, tokenizer, ids, max_new_tokens, batch_size, stops)]
