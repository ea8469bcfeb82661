"""ClientTask / ClientUpdate <-> Flower Message content. The only place that knows the wire format.

Arrays travel in an ``ArrayRecord``; the (nested) task config as one JSON string
in a ``ConfigRecord``, so methods may put per-layer index lists in it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

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
