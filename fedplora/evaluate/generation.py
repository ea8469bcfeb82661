"""Greedy generation for the benchmarks that read what the model writes (finance sentiment, code).

FlowerTune's finance evaluation and the code harness both decode greedily or near it; greedy decoding makes the
figure a function of the adapter alone (no sampling seed), which is what a comparison of methods needs.
Prompts are tokenized with the tokenizer's own special tokens (as ``tokenizer(prompt)`` does in FlowerTune),
left-padded into batches, and each continuation is cut at the first of the benchmark's stop strings.
"""

from __future__ import annotations

import torch

from ..hardware import model_device


def cut(text: str, stops: tuple[str, ...]) -> str:
    """``text`` up to the earliest of ``stops`` (the code harness's ``_stop_at_stop_token``)."""
    end = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:end]


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
           stops: tuple[str, ...] = ()) -> list[str]:
    """The greedy continuation of each prompt (text, special tokens dropped), cut at ``stops``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model_device(model)
    kwargs = {"stop_strings": list(stops), "tokenizer": tokenizer} if stops else {}
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [tokenizer(p)["input_ids"] for p in prompts[start:start + batch_size]]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **kwargs)
        out.extend(cut(tokenizer.decode(row, skip_special_tokens=True), stops) for row in gen[:, width:].cpu())
    return out
