"""Supervised fine-tuning of a causal LM on (prompt, response) rows; the loss covers the response only.

Shared by ``instruct`` and ``code``. A subclass gives ``load_splits`` (rows with ``prompt`` and
``response`` text, plus any columns it needs at evaluation) and ``score`` (the headline metric of
greedy generations). Evaluation on the held-out rows:

* ``loss``: mean cross-entropy per response token (token-weighted over all evaluated rows);
* ``perplexity``: ``exp(loss)``;
* the task's generation metric on a seeded sample of at most ``gen_max_examples`` rows, greedy
  decoding of at most ``gen_max_new_tokens`` tokens, cut at the task's stop strings.

Tokenisation: prompt with the tokenizer's own special tokens (a BOS where the model uses one),
then the response and the EOS token. A row longer than ``max_seq_len`` keeps at least half of the
budget for the response; the prompt is shortened on the side the task names (``truncate_prompt``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from datasets import Dataset

from .. import rng
from .base import Task
from ..hardware import model_device
from .models import load_causal_lm, smollm2_path

IGNORE = -100


class CausalLMTask(Task):
    label_column = None
    truncate_prompt = "middle"  # "middle": keep its start and its last KEEP_TAIL tokens; "left": keep its end
    keep_tail = 16
    stop_strings: tuple[str, ...] = ()

    def default_model_path(self) -> str:
        return smollm2_path(self.config.cache_dir)

    def build_model(self):
        model = load_causal_lm(self.model_path, **self.base_options())
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    # ------------------------------------------------------------ tokenisation
    def tokenize_pair(self, prompt: str, response: str, special: bool = True) -> tuple[list[int], int]:
        """(input ids, prompt length) within ``max_seq_len``. ``special``: the tokenizer adds its own special tokens
        to the prompt (False for a prompt rendered by its chat template, which already holds them)."""
        tok, budget = self.tokenizer, self.config.max_seq_len
        p = tok(prompt, add_special_tokens=special)["input_ids"]
        if tok.eos_token_id is not None and p and p[-1] == tok.eos_token_id:
            p = p[:-1]  # a tokenizer that closes every text with EOS: the prompt must stay open
        r = tok(response, add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            r = r + [tok.eos_token_id]
        if len(p) + len(r) > budget:
            r = r[:max(budget // 2, budget - len(p))]
            room = budget - len(r)
            if len(p) > room:
                if self.truncate_prompt == "left":
                    p = p[len(p) - room:]
                else:
                    tail = min(self.keep_tail, room)
                    p = p[:room - tail] + p[len(p) - tail:]
        return p + r, len(p)

    def encode(self, dataset: Dataset) -> Dataset:
        def fn(row):
            ids, n = self.tokenize_pair(row["prompt"], row["response"])
            return {"input_ids": ids, "prompt_len": n}

        return dataset.map(fn)

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            x = torch.tensor(r["input_ids"], dtype=torch.long)
            ids[i, :len(x)] = x
            mask[i, :len(x)] = 1
            labels[i, r["prompt_len"]:len(x)] = x[r["prompt_len"]:]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def heldout_loss(self, model, dataset: Dataset, batch_size: int = 8) -> float:
        total, count = 0.0, 0
        for start in range(0, len(dataset), batch_size):
            batch = self.on_model(self.collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]),
                                  model)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            target = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                    target.reshape(-1), ignore_index=IGNORE, reduction="sum")
            total += float(nll)
            count += int((target != IGNORE).sum())
        return total / max(count, 1)

    def generation_sample(self, dataset: Dataset) -> list[int]:
        n = min(self.config.gen_max_examples, len(dataset))
        idx = rng.generator("generation_subset", self.config.seed).choice(len(dataset), size=n, replace=False)
        return sorted(int(i) for i in idx)

    def generate(self, model, prompts_ids: list[list[int]], batch_size: int = 8) -> list[str]:
        """Greedy continuations (text), left-padded batches, cut at EOS and the stop strings."""
        return [self.cut(text) for text in greedy_continuations(
            model, self.tokenizer, prompts_ids, self.config.gen_max_new_tokens, batch_size, tuple(self.stop_strings))]

    def cut(self, text: str) -> str:
        """The generation up to the first stop string."""
        for s in self.stop_strings:
            i = text.find(s)
            if i >= 0:
                text = text[:i]
        return text

    def score(self, rows: list[dict[str, Any]], generations: list[str]) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, model, dataset: Dataset) -> dict[str, float]:
        model.eval()
        loss = self.heldout_loss(model, dataset)
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        idx = self.generation_sample(dataset)
        rows = [dataset[i] for i in idx]
        generations = self.generate(model, [r["input_ids"][:r["prompt_len"]] for r in rows])
        self.last_generations = [{**{k: r[k] for k in ("prompt", "response") if k in r}, "generation": g}
                                 for r, g in zip(rows, generations)]
        metrics.update(self.score(rows, generations))
        metrics["gen_examples"] = float(len(rows))
        return metrics


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts_ids: list[list[int]], max_new_tokens: int, batch_size: int = 8,
                         stops: tuple[str, ...] = ()) -> list[str]:
    """The greedy continuation of each prompt (token ids), as text with special tokens dropped: left-padded batches,
    generation ends at EOS or at one of ``stops`` (the caller cuts the text there). Shared by the LLM tasks'
    evaluation and ``fedplora evaluate``, so both decode the same way."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model_device(model)
    kwargs: dict[str, Any] = {"stop_strings": list(stops), "tokenizer": tokenizer} if stops else {}
    out: list[str] = []
    for start in range(0, len(prompts_ids), batch_size):
        chunk = prompts_ids[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **kwargs)
        out.extend(tokenizer.decode(row, skip_special_tokens=True) for row in gen[:, width:].cpu())
    return out
