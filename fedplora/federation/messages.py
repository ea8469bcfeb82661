"""ClientTask / ClientUpdate <-> Flower Message content. The only place that knows the wire format.

Arrays travel in an ``ArrayRecord``; the (nested) task config as one JSON string
in a ``ConfigRecord``, so methods may put per-layer index lists in it.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ..methods import ClientTask, ClientUpdate


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
    """Parse a reply; anything missing or malformed raises ValueError (the reply is then rejected)."""
    try:
        arrays = {k: torch.as_tensor(v) for k, v in content["arrays"].to_torch_state_dict().items()}
        config = json.loads(content["config"]["update"])
        metrics = dict(content["metrics"])
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"malformed reply ({type(e).__name__}: {e})") from None
    num = metrics.pop("num-examples", None)
    if not isinstance(config, dict):
        raise ValueError("malformed reply: update config is not a mapping")
    return ClientUpdate(arrays=arrays, config=config, num_samples=num), metrics
