"""ClientTask / ClientUpdate <-> Flower Message content. The only place that knows the wire format.

Arrays travel in an ``ArrayRecord``; the (nested) task config as one JSON string
in a ``ConfigRecord``, so methods may put per-layer index lists in it.

Under secure aggregation (``secure_*`` below) a round is Flower's SecAgg+ workflow, which speaks the legacy
``FitIns``/``FitRes`` (``flwr.compat``): the task's arrays go as legacy ``Parameters`` in a fixed key order,
the keys, the upload's layout and the weight scale in the fit config; the reply's parameters are the
client's ``aggregation.secure_upload`` in layout order, which Flower's ``secaggplus_mod`` masks before it leaves.

Key names: the keys we define inside a message's records (``setup``, ``round``, ``attempt``, ``task``,
``update``, ``weight_scale``, the metrics ``train_loss``, ``trained_pairs``, ``client_s``, ...) are the Python
names of what they carry, with underscores, and are read under the same names; the keys of Flower's own
namespaces keep Flower's dashes (``num-examples``, the sample count Flower's strategies weight a reply by, ``partition-id`` and ``max-rank`` in a node
config, ``config-file`` in the run config).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from ..methods import ClientTask, ClientUpdate, UpdateRejected


def task_content(task: ClientTask, setup: str, server_round: int) -> RecordDict:
    """``setup``: the run's settings, already JSON-encoded (the same for every message of a run)."""
    return RecordDict({
        "arrays": ArrayRecord(torch_state_dict={k: v.detach().cpu().contiguous() for k, v in task.arrays.items()}),
        "config": ConfigRecord({"task": json.dumps(task.config), "setup": setup,
                                "round": server_round}),
    })


def read_task(content: RecordDict) -> tuple[ClientTask, dict[str, Any], int]:
    config = content["config"]
    arrays = dict(content["arrays"].to_torch_state_dict())
    return ClientTask(arrays=arrays, config=json.loads(config["task"])), json.loads(config["setup"]), int(config["round"])


def update_content(update: ClientUpdate, metrics: dict[str, float]) -> RecordDict:
    return RecordDict({
        "arrays": ArrayRecord(torch_state_dict={k: v.detach().cpu().contiguous() for k, v in update.arrays.items()}),
        "config": ConfigRecord({"update": json.dumps(update.config)}),
        "metrics": MetricRecord({"num-examples": int(update.num_samples), **metrics}),
    })


def read_update(content: RecordDict) -> tuple[ClientUpdate, dict[str, float]]:
    """Parse a reply; anything missing or malformed raises UpdateRejected (a ValueError) naming it.

    Only the wire format is checked here: an arrays record of tensors, a JSON mapping as the update's
    config, and a metrics record of finite numbers. What the values must be is the method's
    ``validate_update``, the same rules for every method.
    """
    try:
        arrays = dict(content["arrays"].to_torch_state_dict())
        config = json.loads(content["config"]["update"])
        metrics = dict(content["metrics"])
    except Exception as e:  # whatever a broken record makes parsing raise
        raise UpdateRejected(f"malformed reply ({type(e).__name__}: {e})") from None
    for key, value in arrays.items():
        if not isinstance(value, torch.Tensor):
            raise UpdateRejected(f"malformed reply: array {key!r} is a {type(value).__name__}, not a tensor")
    if not isinstance(config, dict):
        raise UpdateRejected(f"malformed reply: update config is a {type(config).__name__}, not a mapping")
    num = metrics.pop("num-examples", None)
    for key, value in metrics.items():
        if not all(_finite_number(v) for v in (value if isinstance(value, list) else [value])):
            raise UpdateRejected(f"malformed reply: metric {key!r} is not a finite number ({value!r:.60})")
    return ClientUpdate(arrays=arrays, config=config, num_samples=num), metrics


def _finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)  # a huge int has no float, and needs none


# ------------------------------------------------------------------ secure aggregation (SecAgg+, legacy FitIns/FitRes)
SECURE_FIT_CONFIG = "fitins.config"  # where compat puts a FitIns' config: its presence marks a secure task


def secure_fitins(task: ClientTask, setup: str, server_round: int, attempt: int,
                  layout: dict[str, tuple[int, ...]], weight_scale: float, cid: int | None = None) -> FitIns:
    """A task as legacy FitIns: arrays in the order of ``keys`` (listed in the config), the upload's
    ``layout`` (keys and shapes of the secure upload, ``aggregation.layout``, in order), the weight scale and
    ``cid``, the client the node serves (as in a plain task's config, ``strategy.configure_train``)."""
    keys = list(task.arrays)
    parameters = ndarrays_to_parameters([task.arrays[k].detach().cpu().contiguous().numpy() for k in keys])
    config = {"task": json.dumps(task.config), "setup": setup, "round": server_round, "attempt": attempt,
              "keys": json.dumps(keys), "layout": json.dumps([[k, list(s)] for k, s in layout.items()]),
              "weight_scale": float(weight_scale)}
    if cid is not None:
        config["cid"] = int(cid)
    return FitIns(parameters=parameters, config=config)


def is_secure_task(content: RecordDict) -> bool:
    return SECURE_FIT_CONFIG in content.config_records


def read_secure_task(content: RecordDict) -> tuple[ClientTask, dict[str, Any], int, int,
                                                    dict[str, tuple[int, ...]], float]:
    """The client's side of ``secure_fitins``: task, settings, round, attempt, upload layout, weight scale (the
    client id, where the server sent one, is ``secure_task_cid``)."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    config = fitins.config
    keys = json.loads(str(config["keys"]))
    values = parameters_to_ndarrays(fitins.parameters)
    if len(keys) != len(values):
        raise ValueError(f"secure task: {len(values)} arrays for {len(keys)} keys")
    arrays = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in zip(keys, values)}
    layout = {k: tuple(shape) for k, shape in json.loads(str(config["layout"]))}
    return (ClientTask(arrays=arrays, config=json.loads(str(config["task"]))), json.loads(str(config["setup"])),
            int(config["round"]), int(config["attempt"]), layout, float(config["weight_scale"]))


def secure_task_cid(content: RecordDict) -> int | None:
    """The client id a secure task names (``secure_fitins``'s ``cid``), or None."""
    value = content.config_records[SECURE_FIT_CONFIG].get("cid")
    return None if value is None else int(value)


def secure_reply_content(encoded: dict[str, torch.Tensor], layout: dict[str, tuple[int, ...]],
                         metrics: dict[str, Any]) -> RecordDict:
    """The client's legacy FitRes: ``encoded`` in ``layout`` order as float64, num_examples = 1 (SecAgg+'s
    weight: Flower then divides the sum by the number of clients, which the server multiplies back)."""
    if set(encoded) != set(layout):
        raise ValueError(f"the secure upload's keys differ from the layout: {sorted(set(encoded) ^ set(layout))[:3]}")
    for key, shape in layout.items():
        if tuple(encoded[key].shape) != tuple(shape):
            raise ValueError(f"secure upload: {key} has shape {tuple(encoded[key].shape)}, the layout {shape}")
    parameters = ndarrays_to_parameters([encoded[k].detach().cpu().double().contiguous().numpy() for k in layout])
    fitres = FitRes(status=Status(code=Code.OK, message="ok"), parameters=parameters, num_examples=1,
                    metrics=dict(metrics))
    return compat.fitres_to_recorddict(fitres, keep_input=False)
