"""Failure and attack injection (tests, drills, robustness studies) as a Flower client mod: ``injection_mod``.

The production train handler (``client_app.handle_train``) trains and replies with the client's honest update;
it never reads ``fail_fraction``, ``fail_mode``, ``byzantine_fraction``, ``attack`` or ``attack_strength``. This
mod (an ``InjectionMod`` that ``client_app`` makes, ``client_app.injection_mod``, and installs around the handler
in ``client_app.TRAIN_MODS``, inside ``secure_mod``) does all of the injecting:

* failures (``injected_failure``, docs/fault-tolerance.md): before the handler runs, a failing client raises
  (``fail_mode = "error"``) or sleeps ``round_timeout`` seconds and then trains (``"straggle"``);
* ``label_flip`` (a data attack): the handler is served the client's flipped partition for this one call
  (``ClientRuntime.serving``, the runtime's data source overridden inside a ``with`` block) and trains on it
  without knowing; the flipped copy is kept beside the clean one (``attacks.poisoned_data``);
* the update attacks (``sign_flip``, ``scale``, ``noise``, ``inflate``): after the handler, the reply's update
  is replaced by ``attacks.attack_update`` of it, relative to the client's start upload (what it would upload
  without training). The mod computes that start before the handler runs, from the task in the message, with
  the method's own public client side (``client_setup`` then ``client_update`` on the cached runtime's model):
  exactly the tensors the handler computed for it before. ``client_setup`` rebuilds the model from the task
  (every fold from the pristine base weight), so the handler's own ``client_setup`` then starts training from
  the same state, and training is seeded by (seed, round, client): the numbers are bit-for-bit those of an
  attack inside the handler.

The order is the one the handler had: local DP (production, in the handler) first, then the attack, then, under
secure aggregation, the client's ``aggregation.secure_upload`` and SecAgg+'s masking (``secure_mod``, outside this mod: it
hands the handler, and so this mod, a plain task and encodes the plain reply). SecAgg+ calls the handler in its
masked-vector stage only, so that is where an injected failure raises, as before.

Honest clients (and every client of a run with neither ``fail_fraction`` nor ``byzantine_fraction``) pass straight
through. Who is Byzantine is ``attacks.attackers(cfg)``: the server computes the same set for its history.
"""

from __future__ import annotations

import json
import time

from flwr.app import Context, Message

from .. import rng
from ..config import RunConfig
from ..methods.base import State
from . import attacks
from .messages import read_task, update_content


def injected_failure(cfg: RunConfig, server_round: int, attempt: int, cid: int) -> bool:
    """Failure injection (tests, drills): ``fail_fraction`` of all clients are down in each round, seeded.

    The failing set is drawn from (seed, round, attempt), so a run is reproducible and a retried
    round meets other failures.
    """
    k = int(round(cfg.fail_fraction * cfg.num_clients))
    down = rng.generator("failures", cfg.seed, server_round, attempt).permutation(cfg.num_clients)[:k]
    return cid in down.tolist()


class InjectionMod:
    """A ClientApp's ``injection_mod`` (module docstring), given how that app reaches its client state, so that this
    module imports nothing of the app (``client_app`` installs the mod):

    * ``client_id(msg, context, cfg)``: the client this node serves for ``msg`` (``client_app.client_id``, checked);
    * ``runtime(cfg, context)``: the process's cached ``ClientRuntime`` of the run (its model, task, partitions,
      encoded data, ``serving``);
    * ``method(cfg)``: the run's method, as the handler makes it;
    * ``read_reply(content)``: the handler's reply read back as (``ClientUpdate``, metrics).
    """

    def __init__(self, *, client_id, runtime, method, read_reply) -> None:
        self.client_id, self.runtime, self.method, self.read_reply = client_id, runtime, method, read_reply

    def start_upload(self, cfg: RunConfig, context: Context, task, cid: int) -> State:
        """What this client would upload without training: the method's ``client_setup`` of ``task`` on the cached
        runtime's model, then its ``client_update``, in the upload's keys and shapes (what it received, sliced like
        the upload: a Fed-PLoRA client's selected pairs, FLoRA's fresh A and zero B)."""
        method = self.method(cfg)
        rt = self.runtime(cfg, context)
        method.client_setup(rt.model, task)
        return method.client_update(rt.model, task, num_samples=len(rt.parts[cid])).arrays

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        """The train mod that injects failures and attacks around the handler (module docstring)."""
        config = msg.content["config"]
        cfg = RunConfig.from_dict(json.loads(config["setup"]))
        if not cfg.fail_fraction and not cfg.byzantine_fraction:
            return call_next(msg, context)
        server_round, attempt = int(config["round"]), int(config.get("attempt", 0))
        cid = self.client_id(msg, context, cfg)
        if injected_failure(cfg, server_round, attempt, cid):
            if cfg.fail_mode == "error":
                raise RuntimeError(f"injected failure (fail_fraction={cfg.fail_fraction}): client {cid}, "
                                   f"round {server_round}")
            time.sleep(cfg.round_timeout)  # "straggle": the reply comes after the server stopped waiting
        if cid not in attacks.attackers(cfg):
            return call_next(msg, context)
        if cfg.attack in attacks.DATA_ATTACKS:  # label_flip: the handler trains on the flipped partition, unaware
            rt = self.runtime(cfg, context)
            with rt.serving(cid, attacks.poisoned_data(rt.task, rt.data(cid), rt.encoded, cid)):
                return call_next(msg, context)
        try:
            start = self.start_upload(cfg, context, read_task(msg.content)[0], cid)
        except Exception:
            # the handler refuses this task as well (a rank above the budget, a device that cannot load the run):
            # its own reason is the one the server records
            call_next(msg, context)
            raise
        reply = call_next(msg, context)
        update, metrics = self.read_reply(reply.content)
        reply.content = update_content(attacks.attack_update(cfg, server_round, cid, update, start), metrics)
        return reply


__all__ = ["InjectionMod", "injected_failure"]
