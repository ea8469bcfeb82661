"""The Flower ClientApp: thin wiring around the method core.

``query``: tell the server which client this node serves (``client_id``), how many
examples it holds and its rank budget this round. ``train``: load the task the
server sent, run the method's client side, train locally, reply with the update.
The run's settings arrive in the message (``setup``), so the same app serves the
Simulation Engine and real SuperNodes; on a SuperNode the settings that name its
own files (``DEVICE_LOCAL_SETTINGS``) come from its node config instead
(``device_settings``, docs/deployment.md).

The train handler (``handle_train``) is plain and honest: it knows neither secure aggregation nor the injected
failures and attacks. Its mods (``TRAIN_MODS``) add them: ``secure_mod`` (SecAgg+: hands the handler a plain
task, encodes and masks its reply) and, inside it, ``injection_mod`` (failure and attack injection for
tests and drills, given this app's client state). ``train`` is the handler wrapped in them, as the ClientApp runs
it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.client.mod import make_ffn
from flwr.clientapp import ClientApp

from .. import rng
from ..adapters import get_plora_model, plora_layers
from ..config import RunConfig
from ..hardware import enable_gradient_checkpointing, resolve_device, steady_allocator
from ..aggregation import secure_upload
from ..methods import METHODS, ClientUpdate, make_method, plora_config
from ..planner import apply_plan, held_bytes, parse_memory, round_plan
from ..tasks import make_task
from ..tasks.partition import partition_for
from ..training import local_seed, round_lr, train_local
from .accounting import central_dp, dp_noise_multiplier  # noqa: F401 (central_dp: the run's DP settings)
from .heterogeneity import base_budget, round_budget
from .injection import InjectionMod, injected_failure  # noqa: F401 (injected_failure: read here by tests)
from .messages import (read_secure_task, read_task, secure_reply_content, secure_task_cid, task_content,
                       update_content)

app = ClientApp()


def method_options(cfg: RunConfig) -> dict[str, Any]:
    """The method's constructor options from the run's settings (``FederatedMethod.config_options``)."""
    return {"weighting": cfg.weighting, "seed": cfg.seed, **METHODS[cfg.method].config_options(cfg)}


# The settings that name files on the device. On a SuperNode they come from its own node config (keys with
# dashes: data-dir, dataset, cache-dir, model), never from the server; where the node config has none, the
# task's embedded default. In simulation the run's values are used. docs/deployment.md.
DEVICE_LOCAL_SETTINGS = ("data_dir", "dataset", "cache_dir", "model")
# what the Simulation Engine puts in node_config, plus "cpus" (threads per client, which a simulated client
# may be given too); anything else is a device's own declaration
SIMULATION_NODE_KEYS = frozenset({"partition-id", "num-partitions", "cpus"})


def on_device(context: Context) -> bool:
    """True under the Deployment Engine: this is a SuperNode's ``flwr-clientapp`` process, or its node config
    declares more than the Simulation Engine's partition-id/num-partitions."""
    return Path(sys.argv[0]).name == "flwr-clientapp" or bool(set(context.node_config) - SIMULATION_NODE_KEYS)


def device_settings(cfg: RunConfig, context: Context, planned: bool = True) -> RunConfig:
    """The run's settings as this client applies them.

    In simulation, ``cfg`` unchanged, except that a client given no GPU share (``client_gpus`` 0) trains on the
    CPU rather than on a CUDA device Ray did not give it. On a SuperNode, every ``DEVICE_LOCAL_SETTINGS`` entry
    is replaced by its node config value (``None`` where it declares none: the task's embedded default),
    whatever the server sent; ``device``, ``dtype``, ``quantization`` and ``gradient-checkpointing`` in its
    node config override the run's (the adapters it uploads are float32 whatever its base is). A node
    config ``max-memory`` (e.g. ``max-memory=2GB``) hands ``quantization``, ``gradient-checkpointing`` and a lower ``batch_size`` to the memory plan
    (``fedplora.planner.round_plan``, docs/memory.md) unless ``planned`` is False (the plan's own input).
    The device refuses (``ValueError``; Flower returns it to the server as the reply's error reason) a run
    whose task its node config ``tasks`` (e.g. ``tasks='sst2,tweets'``) does not list, or when its declared
    model or data folder does not exist here.
    """
    if not on_device(context):
        if not cfg.client_gpus and cfg.device != "cpu" and resolve_device(cfg.device).type == "cuda":
            return dataclasses.replace(cfg, device="cpu")  # Ray gave this client no GPU share: it trains on the CPU
        return cfg
    node = context.node_config
    local: dict[str, str | None] = {}
    for name in DEVICE_LOCAL_SETTINGS:
        value = node.get(name.replace("_", "-"))
        local[name] = None if value is None or str(value) == "" else os.path.expanduser(str(value))
    if "tasks" in node:
        held = node["tasks"] if isinstance(node["tasks"], list) else str(node["tasks"]).split(",")
        held = [str(t).strip() for t in held if str(t).strip()]
        if cfg.task not in held:
            raise ValueError(f"this device does not hold task {cfg.task!r} (node config tasks={','.join(held)!r}); "
                             "it refuses the run")
    if local["model"] is not None and not Path(local["model"]).exists():
        raise ValueError(f"this device does not hold the model: node config model={local['model']!r} does not "
                         "exist here; it refuses the run")
    if local["data_dir"] is not None and not Path(local["data_dir"]).is_dir():
        raise ValueError(f"this device does not hold the data: node config data-dir={local['data_dir']!r} is not "
                         "a folder here; it refuses the run")
    # the device's own accelerator and base precision, where its node config declares them
    for name in ("device", "dtype", "quantization"):
        if node.get(name) not in (None, ""):
            local[name] = str(node[name])
    ckpt = node.get("gradient-checkpointing", cfg.gradient_checkpointing)
    local["gradient_checkpointing"] = ckpt if isinstance(ckpt, bool) else str(ckpt).lower() in ("1", "true", "yes")
    cfg = RunConfig.from_dict({**cfg.to_dict(), **local}).validate()
    if planned and "max-memory" in node:
        held = held_bytes([rt.model for rt in _runtimes.values()], resolve_device(cfg.device))
        chosen = round_plan(cfg, parse_memory(node["max-memory"]), None, context.state, held)
        cfg = apply_plan(cfg, chosen).validate()
    return cfg


class ClientRuntime:
    """The model and data partitions a client process keeps between messages."""

    def __init__(self, cfg: RunConfig, cpus: float, plans_memory: bool = False) -> None:
        """``plans_memory``: the device sizes its training by the planner (node config ``max-memory``), so it
        trains under the allocator the planner's figures were measured with (``steady_allocator``). Only
        then: that fixed mmap threshold maps and unmaps every large activation, which made a MiniLM step
        1.6x slower (benchmarks/bench_round.py, docs/speed.md)."""
        torch.set_num_threads(max(1, int(cpus)))
        if plans_memory:
            steady_allocator()
        self.cfg = cfg
        self.task = make_task(cfg)
        train, _ = self.task.splits()
        self.parts = partition_for(self.task, train, cfg)
        self.encoded: dict[Any, Any] = {}
        self.served: dict[int, Any] = {}
        self.model = get_plora_model(self.task.build_model(), plora_config(cfg))
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)

    def data(self, cid: int):
        """Client ``cid``'s encoded partition (encoded once), or what ``serving`` serves in its place."""
        if cid in self.served:
            return self.served[cid]
        if cid not in self.encoded:
            self.encoded[cid] = self.task.encode(self.parts[cid])
        return self.encoded[cid]

    @contextlib.contextmanager
    def serving(self, cid: int, data):
        """Inside the block, ``data(cid)`` is ``data``: how a mod changes what the handler trains on without the
        handler knowing (``injection_mod``'s label_flip). Restored on leaving, whatever happened."""
        self.served[cid] = data
        try:
            yield
        finally:
            del self.served[cid]


_runtimes: dict[str, ClientRuntime] = {}


def runtime(cfg: RunConfig, context: Context) -> ClientRuntime:
    """This client's model and data for the run ``cfg``, loaded once (from the device's own files on a SuperNode)."""
    cfg = device_settings(cfg, context)
    key = json.dumps(cfg.to_dict(), sort_keys=True)  # a run's settings never change mid-run
    if key not in _runtimes:
        _runtimes.clear()  # one run at a time per process: free the previous model
        try:
            _runtimes[key] = ClientRuntime(cfg, float(context.node_config.get("cpus", cfg.client_cpus)),
                                           plans_memory="max-memory" in context.node_config)
        except Exception as e:
            if not on_device(context):
                raise
            own = ", ".join(f"{k.replace('_', '-')}={getattr(cfg, k)!r}" for k in DEVICE_LOCAL_SETTINGS)
            raise RuntimeError(f"this device cannot load task {cfg.task!r} from its own files ({own}; None = the "
                               f"task's embedded default): {type(e).__name__}: {e}") from e
    return _runtimes[key]


def client_id(context: Context, cfg: RunConfig, asked: int | None = None) -> int:
    """The client this node serves for a message that asks for client ``asked`` (``asked_client``).

    In simulation, ``asked``: every simulated node can serve any client (they share one dataset and this app), and
    the server addresses each sampled client to a node of its choosing (``roster.py``); the node config's
    ``partition-id`` is only Flower's numbering of its nodes, which the server cannot know (node ids are random),
    and is used only by a message that names no client. On a device, its own node config ``partition-id``,
    whatever was asked: its data is its own, and its answer tells the server which client it is.
    """
    if asked is not None and not on_device(context):
        cid = int(asked)
        if not 0 <= cid < cfg.num_clients:
            raise ValueError(f"asked to serve client {cid}, outside [0, num_clients={cfg.num_clients})")
        return cid
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no 'partition-id' in its node config; start it with "
                         "--node-config \"partition-id=0 num-partitions=N\"")
    cid = int(context.node_config["partition-id"])
    if not 0 <= cid < cfg.num_clients:
        raise ValueError(f"partition-id {cid} is outside [0, num_clients={cfg.num_clients})")
    return cid


def asked_client(msg: Message) -> int | None:
    """The client id a query or plain train message asks this node to serve (its config's ``cid``), or None."""
    config = msg.content.config_records.get("config")
    value = None if config is None else config.get("cid")
    return None if value is None else int(value)


def message_client_id(msg: Message, context: Context, cfg: RunConfig) -> int:
    """``client_id`` for ``msg``: the client this node serves when answering it."""
    return client_id(context, cfg, asked_client(msg))


def client_budget(context: Context, cfg: RunConfig, cid: int, server_round: int) -> int:
    """This round's rank budget: the node config's ``max-memory`` plan (docs/memory.md) or ``max-rank`` on a
    real device, else the simulated profile's; either may drop a group (``budget_fluctuation``)."""
    if "max-memory" in context.node_config:  # a real device declares its memory: the plan gives the rank
        local = device_settings(cfg, context, planned=False)
        held = held_bytes([rt.model for rt in _runtimes.values()], resolve_device(local.device))
        base = round_plan(local, parse_memory(context.node_config["max-memory"]), server_round, context.state,
                          held).rank
    elif "max-rank" in context.node_config:  # a real device declares its own budget
        base = int(context.node_config["max-rank"])
    else:
        base = base_budget(cfg.num_clients, cfg.ranks, cfg.rank_shares, cfg.seed, cid)
    return min(cfg.rank, round_budget(base, cfg.ranks, cfg.budget_fluctuation, cfg.seed, server_round, cid))


def _setup(msg: Message) -> tuple[RunConfig, int]:
    config = msg.content["config"]
    return RunConfig.from_dict(json.loads(config["setup"])), int(config["round"])


@app.query()
def query(msg: Message, context: Context) -> Message:
    cfg, server_round = _setup(msg)
    cid = message_client_id(msg, context, cfg)
    rt = runtime(cfg, context)
    info = {"cid": cid, "budget": client_budget(context, cfg, cid, server_round), "num_examples": len(rt.parts[cid])}
    return Message(RecordDict({"info": MetricRecord(info)}), reply_to=msg)


def local_private_update(cfg: RunConfig, server_round: int, cid: int, update, start):
    """Local DP (``dp_mode = "local"``): the upload becomes start + privatize_local(upload - start).

    ``start`` is what the client would upload without training (the pairs and heads it received, FLoRA's fresh
    adapter), so the delta is exactly what training changed; its clipped, noised version is added back in float64
    and cast to the upload dtype. The noise comes from the stream ``dp_local_noise`` (seed, round, client).
    """
    from ..privacy import privatize_local

    delta = {k: t.detach().double() - start[k].detach().double() for k, t in update.arrays.items()}
    noisy = privatize_local(delta, cfg.dp_clip, dp_noise_multiplier(cfg),
                            rng.torch_generator("dp_local_noise", cfg.seed, server_round, cid))
    arrays = {k: (start[k].detach().double() + noisy[k]).to(t.dtype) for k, t in update.arrays.items()}
    return dataclasses.replace(update, arrays=arrays)


def read_own_reply(content: RecordDict) -> tuple[ClientUpdate, dict[str, Any]]:
    """The handler's reply (``update_content``) read back by a mod of this client: its update and its metrics
    (less ``num-examples``, the update's sample count). Nothing is checked, unlike the server's ``read_update``:
    it is this process's own reply, passed on as the handler made it."""
    metrics = dict(content["metrics"])
    num_samples = int(metrics.pop("num-examples"))
    update = ClientUpdate(dict(content["arrays"].to_torch_state_dict()), json.loads(str(content["config"]["update"])),
                          num_samples)
    return update, metrics


def secure_mod(msg: Message, context: Context, call_next) -> Message:
    """Secure aggregation's client side: a train message that carries SecAgg+'s config record goes through
    Flower's own ``secaggplus_mod`` (which runs the protocol's stages and masks the reply's parameters); every
    other message (query, plain train) passes as before.

    In SecAgg+'s masked-vector stage the rest of the chain (the inner mods, then the handler) is handed the
    task as a plain train message (``task_content``, as a plain round sends it) and replies with the plain
    update; that reply becomes the fixed-shape ``aggregation.secure_upload`` of the update (``secure_reply``), as
    legacy FitRes parameters, which ``secaggplus_mod`` quantizes and masks. Whatever the inner mods do to the
    update (local DP is the handler's; an injected attack, ``injection_mod``) is thus done before it is
    encoded.

    Flower quantizes with numpy's global RNG (stochastic rounding); it is seeded here from (run seed, round,
    attempt, client), right after training and encoding and before ``secaggplus_mod`` quantizes, so a secure run
    is reproducible. The global RNG's state is restored afterwards.
    """
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.metadata.message_type != "train" or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)

    def train_then_seed(message: Message, ctx: Context) -> Message:
        task, setup, server_round, attempt, layout, weight_scale = read_secure_task(message.content)
        asked = secure_task_cid(message.content)
        plain = task_content(task, json.dumps(setup), server_round)
        plain["config"]["attempt"] = attempt
        if asked is not None:
            plain["config"]["cid"] = asked
        # the same message (its metadata copied) with the plain task as its content
        update, metrics = read_own_reply(call_next(Message(content=plain, metadata=copy.copy(message.metadata)),
                                                   ctx).content)
        cfg = RunConfig.from_dict(setup)
        method = make_method(cfg.method, plora_config(cfg), **method_options(cfg))
        reply = Message(secure_reply(cfg, method, task, update, metrics, layout, weight_scale), reply_to=message)
        cid = client_id(ctx, cfg, asked)
        np.random.seed(rng.small_seed("secure_quantization", int(setup["seed"]), server_round, attempt, cid))
        return reply

    saved = np.random.get_state()
    try:
        return secaggplus_mod(msg, context, train_then_seed)
    finally:
        np.random.set_state(saved)


def handle_train(msg: Message, context: Context) -> Message:
    """A round's training: the method's client side on the task, local training, the honest update as the reply
    (clipped and noised here under local DP, before anything leaves the client). Secure aggregation and the
    injected failures and attacks are its mods' (``TRAIN_MODS``)."""
    t0 = time.perf_counter()
    task, setup, server_round = read_task(msg.content)
    cfg = RunConfig.from_dict(setup)
    cid = message_client_id(msg, context, cfg)
    budget = client_budget(context, cfg, cid, server_round)
    method = make_method(cfg.method, plora_config(cfg), **method_options(cfg))
    if int(task.config.get("rank", 0)) > budget and not method.ignores_budgets:
        raise ValueError(f"asked to train {task.config['rank']} pairs but this client's budget is {budget}")
    rt = runtime(cfg, context)
    method.client_setup(rt.model, task)
    trained_pairs = max(int(layer.active_idx.numel()) for _, layer in plora_layers(rt.model))
    data = rt.data(cid)
    private = cfg.dp_mode == "local"
    start = method.client_update(rt.model, task, num_samples=len(data)).arrays if private else None
    lr = round_lr(cfg.lr, cfg.lr_min, cfg.lr_schedule, server_round, cfg.rounds)
    metrics = train_local(rt.model, rt.task, data, steps=cfg.local_steps, batch_size=cfg.batch_size, lr=lr,
                          grad_accum_steps=cfg.grad_accum_steps, epochs=cfg.local_epochs,
                          weight_decay=cfg.weight_decay, seed=local_seed(cfg.seed, server_round, cid))
    update = method.client_update(rt.model, task, num_samples=len(data))
    if private:  # local DP: clipped and noised here, before anything leaves the client
        update = local_private_update(cfg, server_round, cid, update, start)
    metrics.update({"cid": cid, "budget": budget, "trained_pairs": trained_pairs,
                    "client_s": time.perf_counter() - t0})  # the whole handler: setup, training, upload
    return Message(update_content(update, metrics), reply_to=msg)


# failure and attack injection (tests, drills): a mod given this app's client state (injection.py)
injection_mod = InjectionMod(client_id=message_client_id, runtime=runtime, read_reply=read_own_reply,
                             method=lambda cfg: make_method(cfg.method, plora_config(cfg), **method_options(cfg)))
# the train handler's mods, outermost first: SecAgg+ (plain messages pass), then failure and attack injection
# (runs with neither pass), so an attack changes the update before secure aggregation encodes it
TRAIN_MODS = [secure_mod, injection_mod]
# the train function as the ClientApp runs it (the handler inside its mods); in-process callers use it too
train = app.train()(make_ffn(handle_train, TRAIN_MODS))


def secure_reply(cfg: RunConfig, method, task, update, metrics: dict[str, Any], layout, weight_scale: float):
    """The fixed-shape upload (``aggregation.secure_upload``; central DP clips the delta here, on the client) and the
    metrics, which report how many coordinates fall outside SecAgg+'s clipping range [-secure_clip, secure_clip]
    (Flower clips them silently; the server's history shows the count)."""
    clip = cfg.dp_clip if cfg.dp_mode == "central" else None
    encoded = secure_upload(method, task, update, weight_scale, clip)
    clipped = sum(int((t.detach().double().abs() > cfg.secure_clip).sum()) for t in encoded.values())
    return secure_reply_content(encoded, layout, {**metrics, "secure_clipped": clipped})
