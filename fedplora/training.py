"""Local training: a fixed number of AdamW steps on the client's partition.

Batches are drawn with a generator seeded by (seed, round, client), and torch's
RNG (dropout) is seeded the same way, so a client's round is reproducible.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from . import rng
from .adapters import trainable_parameters


def local_seed(seed: int, server_round: int, cid: int) -> int:
    return rng.seed_int("batches", seed, server_round, cid)


def train_local(model, task, dataset, *, steps: int, batch_size: int, lr: float, weight_decay: float,
                seed: int) -> dict[str, float]:
    """Train ``trainable_parameters(model)`` for ``steps`` steps; returns mean loss and time."""
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
    for _ in range(steps):
        idx = draw.choice(len(dataset), size=min(batch_size, len(dataset)), replace=False)
        batch = task.on_model(task.collate([dataset[int(i)] for i in idx]), model)
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return {"train_loss": float(np.mean(losses)), "train_s": time.perf_counter() - t0}
