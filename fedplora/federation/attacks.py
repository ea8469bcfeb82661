"""Byzantine clients: a seeded attack injector, next to the failure injector (docs/fault-tolerance.md).

Why: the failure injector tests clients that stop; an aggregator must also be measured against clients
that keep answering with harmful updates. Every attack here produces an upload that is well formed (the
task's keys, shapes and declared dtypes, finite values, a positive integer sample count), so the
server's validation alone cannot tell it from an honest one; only robust aggregation, bounds on the
update norm or a check of the claims can (docs/robustness.md).

* ``attackers(cfg)``: which clients are Byzantine. Drawn once per run from the seed, the same set
  every round, as real malicious participants are; the server computes it too, for the history only.
* ``attack_update``: an update attack, applied to the client's honest upload relative to the upload it
  would send without training (``start``: what it received, in the upload's keys and shapes).
* ``flip_labels``: the data-poisoning attack; the client trains honestly on its partition with every
  class label y replaced by num_labels - 1 - y.

Everything here is a pure function of the run's settings, the round and the client id, so a run with
attacks stays reproducible and resumable. A client applies them in the client mod
``client_app.injection_mod`` (``injection.InjectionMod``), around the train handler, which never reads the
attack settings.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import rng
from ..config import RunConfig
from ..errors import ConfigError
from ..methods import ClientUpdate
from ..methods.base import State

UPDATE_ATTACKS = ("sign_flip", "scale", "noise", "inflate")  # the attacks that transform the upload
DATA_ATTACKS = ("label_flip",)  # the attacks that poison the training data instead
# the strength an attack uses when ``attack_strength`` is not set (label_flip has none)
DEFAULT_STRENGTH = {"sign_flip": 1.0, "scale": 100.0, "noise": 1.0, "inflate": 1e6}
# inflate claims at most this many samples: an exact integer in float64 and in Flower's int64 metrics
MAX_CLAIM = 2 ** 53


def attackers(cfg: RunConfig) -> set[int]:
    """The Byzantine client ids: ``round(byzantine_fraction * num_clients)`` of them.

    Drawn once from (seed) alone, never from the round: a malicious participant stays malicious, and
    the server, every client process and a resumed run all compute the same set.
    """
    k = int(round(cfg.byzantine_fraction * cfg.num_clients))
    return {int(c) for c in rng.generator("byzantine", cfg.seed).permutation(cfg.num_clients)[:k]}


def strength(cfg: RunConfig) -> float:
    """``attack_strength``, or the attack's default (``DEFAULT_STRENGTH``)."""
    return cfg.attack_strength if cfg.attack_strength is not None else DEFAULT_STRENGTH.get(cfg.attack, 1.0)


def _finite_as(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` (float64) in ``like``'s dtype, clamped to that dtype's finite range.

    A huge scale would otherwise overflow float32 to Inf, which validation rejects; the attacker wants
    the largest value that still passes.
    """
    top = torch.finfo(like.dtype).max
    return values.clamp(-top, top).to(like.dtype)


def attack_update(cfg: RunConfig, server_round: int, cid: int, update: ClientUpdate, start: State) -> ClientUpdate:
    """The Byzantine version of ``update`` under ``cfg.attack`` (unchanged for a data attack).

    ``start`` holds, for every uploaded key, what the client would upload without training (what it
    received, sliced like the upload: a Fed-PLoRA client's selected pairs, FLoRA's fresh A and zero B),
    so ``delta = uploaded - start`` is the client's honest update of that tensor, heads included.

    * ``sign_flip``: start - s * delta (s = 1: the honest step, reversed);
    * ``scale``: start + s * delta (s = 100: the honest direction, boosted);
    * ``noise``: start + delta + N(0, s^2) per coordinate, from stream ``attack_noise`` at (seed, round,
      cid), drawn key by key in sorted order;
    * ``inflate``: the honest arrays, claiming ``num_samples * s`` samples (at most ``MAX_CLAIM``) so that a
      sample-weighted average follows this client alone.

    The keys, shapes, dtypes and declared config stay the upload's, and every value stays finite.
    """
    if cfg.attack in DATA_ATTACKS:
        return update
    s = strength(cfg)
    if cfg.attack == "inflate":
        claim = min(MAX_CLAIM, max(1, int(round(update.num_samples * s))))
        return ClientUpdate(dict(update.arrays), dict(update.config), claim)
    noise = rng.torch_generator("attack_noise", cfg.seed, server_round, cid) if cfg.attack == "noise" else None
    arrays: State = {}
    for key in sorted(update.arrays):
        honest = update.arrays[key]
        base = start[key].to(honest.device, torch.float64)
        delta = honest.double() - base
        if cfg.attack == "sign_flip":
            out = base - s * delta
        elif cfg.attack == "scale":
            out = base + s * delta
        elif cfg.attack == "noise":
            out = base + delta + s * torch.randn(honest.shape, generator=noise, dtype=torch.float64).to(honest.device)
        else:
            raise ValueError(f"unknown attack {cfg.attack!r}")
        arrays[key] = _finite_as(out, honest)
    return ClientUpdate({k: arrays[k] for k in update.arrays}, dict(update.config), update.num_samples)


def check_task(cfg: RunConfig) -> None:
    """Refuse, with one line, an attack the run's task cannot carry (``label_flip`` needs class labels).

    Checked from the task's class, without loading it, so the server refuses before the first round.
    """
    if cfg.attack != "label_flip" or cfg.byzantine_fraction == 0:
        return
    from ..tasks import TASKS
    from ..tasks.classification import ClassificationTask

    if not issubclass(TASKS[cfg.task], ClassificationTask):
        raise _no_labels(cfg.task)


def _no_labels(task_name: str) -> ConfigError:
    return ConfigError(f"attack: label_flip flips class labels, and task {task_name!r} has none; "
                       "choose another --attack or a classification task")


def flip_labels(task: Any, data: Any) -> Any:
    """An encoded partition with every class label y replaced by ``num_labels - 1 - y``.

    Why this flip: it moves every example to another class when there are two labels (the classic
    label-flipping attack) and is a fixed permutation, with no randomness, for any number of labels (the
    middle class stays put when the count is odd). A task without class labels is refused with one line.
    """
    from ..tasks.classification import ClassificationTask

    names = getattr(task, "label_names", None)
    if not isinstance(task, ClassificationTask) or not names or "label" not in getattr(data, "column_names", ()):
        raise _no_labels(getattr(task, "name", type(task).__name__))
    k = len(names)
    return data.map(lambda batch: {"label": [k - 1 - int(y) for y in batch["label"]]}, batched=True)


def poisoned_data(task: Any, data: Any, cache: dict, cid: int) -> Any:
    """``flip_labels(task, data)``, computed once per client in ``cache`` (the client runtime's own)."""
    key = ("label_flip", cid)
    if key not in cache:
        cache[key] = flip_labels(task, data)
    return cache[key]


__all__ = ["DEFAULT_STRENGTH", "attack_update", "attackers", "check_task", "flip_labels", "poisoned_data",
           "strength"]
