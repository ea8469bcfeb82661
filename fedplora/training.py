"""Local training: AdamW steps on the client's partition, a fixed number of them or whole epochs.

Batches are drawn with a generator seeded by (seed, round, client), and torch's RNG (dropout) is seeded the
same way, so a client's round is reproducible. The controls an LLM run needs (FlowerTune's templates) are
here too: a learning rate scheduled over rounds (``round_lr``), gradient accumulation (an optimizer step over
k micro-batches, the same gradient as one batch k times larger) and local epochs instead of steps.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from . import rng
from .adapters import trainable_parameters


def local_seed(seed: int, server_round: int, cid: int) -> int:
    return rng.seed_int("batches", seed, server_round, cid)


def round_lr(lr: float, lr_min: float, schedule: str, server_round: int, rounds: int) -> float:
    """The client learning rate of a round: ``constant``; ``cosine`` from lr towards lr_min, FlowerTune's
    ``cosine_annealing`` (lr_min + (lr - lr_min)(1 + cos(pi t / T)) / 2 at round t of T, so the last round trains
    at lr_min); ``linear`` over the same position t / T."""
    if schedule == "constant":
        return lr
    position = server_round / rounds
    if schedule == "cosine":
        return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * position))
    return lr_min + (lr - lr_min) * (1 - position)


def batches(n: int, batch: int, draw: np.random.Generator, steps: int | None, epochs: int | None):
    """Index batches of the partition: ``steps`` random batches (each without repeats), or ``epochs`` passes
    over a fresh permutation each (every example once a pass; the last batch of a pass may be smaller)."""
    if epochs is None:
        for _ in range(steps):
            yield draw.choice(n, size=min(batch, n), replace=False)
        return
    for _ in range(epochs):
        order = draw.permutation(n)
        for start in range(0, n, batch):
            yield order[start:start + batch]


def train_local(model, task, dataset, *, steps: int, batch_size: int, lr: float, weight_decay: float,
                seed: int, grad_accum_steps: int = 1, epochs: int | None = None) -> dict[str, float]:
    """Train ``trainable_parameters(model)`` for ``steps`` optimizer steps (or ``epochs`` passes); returns the mean
    loss and the time. Each step takes ``grad_accum_steps`` micro-batches of ``batch_size``, drawn together as one
    batch of their total and weighted by their share of it, so the step's gradient is that larger batch's."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError("nothing to train: the model has no trainable parameters")
    if len(dataset) == 0:
        raise ValueError("this client's partition is empty")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    draw = np.random.default_rng(seed)  # ``seed`` is already this client's and round's batches stream
    torch.manual_seed(seed)
    model.train()
    losses, t0 = [], time.perf_counter()
    for idx in batches(len(dataset), batch_size * grad_accum_steps, draw, steps, epochs):
        total = 0.0
        for part in np.array_split(idx, min(grad_accum_steps, len(idx))):
            batch = task.on_model(task.collate([dataset[int(i)] for i in part]), model)
            loss = task.loss(model, batch) * (len(part) / len(idx))
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    model.eval()
    return {"train_loss": float(np.mean(losses)), "train_s": time.perf_counter() - t0}
