"""Server checkpoints: everything needed to continue a run after its last complete round.

Layout in the run folder::

    checkpoint/state-r00003.safetensors   the global state (every method keeps all of it in tensors), and the
                                          server optimizer's moments under ``server_opt::`` keys
    checkpoint/checkpoint.json            the commit record: round, history, config, RNG states, the
                                          manifest (model identity, state keys/shapes/dtypes), the
                                          state file's size and SHA-256, and (with dp_mode on) the
                                          privacy accountant's state

Both are written to a temp name, flushed and renamed; checkpoint.json is renamed last, so
it always names a complete state file (a crash in between leaves the previous checkpoint
in force). Loading checks everything before anything is written, and every problem is a
``CheckpointError`` naming the file and the mismatch. Everything random in a run is
derived from (seed, round, client), so state + history + round is all a resume needs;
the global RNG states are saved too, for anything that draws from them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..config import RunConfig
from ..errors import CheckpointError  # importable from here as before
from ..methods.base import State

FORMAT = 1
FOLDER = "checkpoint"
OPT_PREFIX = "server_opt::"  # the server optimizer's tensors, stored in the state file beside the state
RECORD = "checkpoint.json"
# settings that may differ between the stopped run and its resumption (where the folder now lies)
MAY_DIFFER = ("out",)


@dataclass
class Checkpoint:
    round: int
    state: State
    history: list[dict[str, Any]]
    elapsed_s: float
    rng: dict[str, Any]
    privacy: dict[str, Any] | None = None  # the privacy accounting (HeteroLoRAStrategy.privacy_state)
    server_opt: State | None = None  # the server optimizer's moments and step counts


def record_path(out: Path) -> Path:
    return out / FOLDER / RECORD


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def manifest(cfg: RunConfig, model_id: str | None, state: State) -> dict[str, Any]:
    """What makes a checkpoint belong to a run: model, task, method, rank R and the state's layout."""
    return {"model": model_id, "task": cfg.task, "method": cfg.method, "rank": cfg.rank,
            "state": {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in sorted(state.items())}}


def rng_states() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, *rest = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(), "python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), *rest]}


def restore_rng(states: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def save_checkpoint(out: Path, rnd: int, state: State, history: list[dict[str, Any]], cfg: RunConfig,
                    model_id: str | None, elapsed_s: float, privacy: dict[str, Any] | None = None,
                    server_opt: State | None = None) -> Path:
    """Write the checkpoint of round ``rnd``; the previous one stays valid until this one is complete.

    ``privacy``: the run's privacy accounting (JSON), kept so that a resumed run continues the count exactly;
    ``server_opt``: the server optimizer's moments and step counts, stored beside the state (``OPT_PREFIX``)."""
    folder = out / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    # contiguous: SVD-based states (FlexLoRA) hold transposed views; clone: no shared storage
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    tensors.update({OPT_PREFIX + k: v.detach().cpu().contiguous().clone() for k, v in (server_opt or {}).items()})
    data = save_tensors(tensors)
    state_file = folder / f"state-r{rnd:05d}.safetensors"
    _write_atomic(state_file, data)
    record = {"format": FORMAT, "round": rnd, "manifest": manifest(cfg, model_id, state),
              "state_file": state_file.name, "state_bytes": len(data), "state_sha256": hashlib.sha256(data).hexdigest(),
              "config": cfg.to_dict(), "elapsed_s": elapsed_s, "rng": rng_states(), "history": history}
    if privacy is not None:
        record["privacy"] = privacy
    _write_atomic(folder / RECORD, json.dumps(record, default=float).encode())
    for old in folder.glob("state-r*.safetensors"):  # only now is the previous state no longer needed
        if old.name != state_file.name:
            old.unlink()
    return folder / RECORD


def _read_record(out: Path) -> dict[str, Any]:
    path = record_path(out)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint (the run stopped before its first one, or checkpoint_every "
                              "was 0); start the run again without --resume")
    try:
        record = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint record (truncated or not JSON: {e})") from None
    keys = ("format", "round", "manifest", "state_file", "state_bytes", "state_sha256", "config", "elapsed_s", "rng",
            "history")
    if not isinstance(record, dict) or any(k not in record for k in keys):
        raise CheckpointError(f"{path}: corrupt checkpoint record (missing fields)")
    if record["format"] != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {record['format']!r}, this version reads {FORMAT}")
    return record


def check_config(out: Path, record: dict[str, Any], cfg: RunConfig) -> None:
    # a setting added after the checkpoint was written is absent from it: the stopped run ran with its default
    saved = {**RunConfig().to_dict(), **record["config"]}
    current = cfg.to_dict()
    differ = [k for k in sorted(set(saved) | set(current)) if k not in MAY_DIFFER and saved.get(k) != current.get(k)]
    if differ:
        k = differ[0]
        raise CheckpointError(f"{record_path(out)}: made by a run with {k}={saved.get(k)!r}, this run has "
                              f"{k}={current.get(k)!r}" + (f" (and {len(differ) - 1} more settings differ)"
                                                           if len(differ) > 1 else ""))
    if not 0 <= record["round"] <= cfg.rounds:
        raise CheckpointError(f"{record_path(out)}: round {record['round']} is outside [0, rounds={cfg.rounds}]")


def read_checkpoint(out: Path, cfg: RunConfig) -> tuple[dict[str, Any], bytes]:
    """The commit record and the state file's bytes, checked for integrity and against ``cfg``.

    Needs no model, so ``--resume`` runs it before starting anything.
    """
    record = _read_record(out)
    check_config(out, record, cfg)
    state_file = out / FOLDER / record["state_file"]
    if not state_file.is_file():
        raise CheckpointError(f"{state_file}: missing (named by {record_path(out)})")
    data = state_file.read_bytes()
    if len(data) != record["state_bytes"] or hashlib.sha256(data).hexdigest() != record["state_sha256"]:
        raise CheckpointError(f"{state_file}: corrupt ({len(data)} bytes, SHA-256 differs from the record's; "
                              f"expected {record['state_bytes']} bytes)")
    return record, data


def load_checkpoint(out: Path, cfg: RunConfig, model_id: str | None, reference: State) -> Checkpoint:
    """Read and check the checkpoint against this run: its config, model identity and state layout.

    ``reference`` is the freshly initialised global state: the checkpoint's state must have its
    keys, shapes and dtypes. Nothing is written, so a failed load leaves the folder as it was.
    """
    record, data = read_checkpoint(out, cfg)
    path = record_path(out)
    expected = manifest(cfg, model_id, reference)
    for key in ("model", "task", "method", "rank"):
        if record["manifest"].get(key) != expected[key]:
            raise CheckpointError(f"{path}: made for {key} {record['manifest'].get(key)!r}, this run has {expected[key]!r}")
    try:
        state = load_tensors(data)
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"{out / FOLDER / record['state_file']}: unreadable ({e})") from None
    server_opt = {k[len(OPT_PREFIX):]: v for k, v in state.items() if k.startswith(OPT_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(OPT_PREFIX)}
    for name, layout in (("record", record["manifest"]["state"]), ("state file", manifest(cfg, model_id, state)["state"])):
        if layout != expected["state"]:
            k = next(k for k in sorted(set(layout) | set(expected["state"])) if layout.get(k) != expected["state"].get(k))
            raise CheckpointError(f"{path}: the {name}'s state {k!r} is {layout.get(k)} (shape, dtype), this model "
                                  f"needs {expected['state'].get(k)}; was the model changed?")
    state = {k: state[k] for k in reference}  # the run's key order (a safetensors file does not keep it), which
    # a method may read: Fed-PLoRA's per_layer selection numbers the layers in the state's order
    return Checkpoint(round=int(record["round"]), state=state, history=record["history"],
                      elapsed_s=float(record["elapsed_s"]), rng=record["rng"], privacy=record.get("privacy"),
                      server_opt=server_opt)


def start_fresh(out: Path) -> None:
    """Before a new run writes into ``out``: refuse to overwrite an unfinished run's checkpoint, drop a finished one's."""
    path = record_path(out)
    if path.exists():
        try:
            record = json.loads(path.read_bytes())
            done = record["round"] >= record["config"]["rounds"]
        except (ValueError, KeyError, TypeError):
            done = False
        if not done:
            raise CheckpointError(f"{out} holds the checkpoint of an unfinished run: continue it with "
                                  f"`fedplora run --resume {out}`, or choose another --out")
    shutil.rmtree(out / FOLDER, ignore_errors=True)


def resume_config(out: Path) -> RunConfig:
    """The settings of the run in ``out`` (its config.toml), checked against its checkpoint."""
    toml = out / "config.toml"
    if not toml.is_file():
        raise CheckpointError(f"{toml}: missing; --resume needs the folder of a run started by `fedplora run`")
    cfg = RunConfig.from_toml(toml).with_overrides(out=str(out)).validate()
    read_checkpoint(out, cfg)
    return cfg
