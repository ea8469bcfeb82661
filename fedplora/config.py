"""Every setting of a run in one dataclass: TOML file < CLI flags, validated up front.

A bad setting fails fast with one line that names it and says how to fix it.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A setting is wrong; the message names it."""


@dataclass
class RunConfig:
    """The defaults are the demo: MiniLM on 3-class tweets, 10 clients with budgets {2,4,8} of R=8,
    2 per round, 8 rounds; about 2.5 minutes on 2 CPU cores."""

    # what to run
    method: str = "fedplora"
    task: str = "tweets"
    model: str | None = None  # local path or hub name; None = the task's embedded default
    data_dir: str | None = None  # for tasks that read local files (e.g. sst2)
    dataset: str | None = None  # a data file/folder or hub name (sst2: glue/sst2; instruct: JSON/JSONL or org/name)
    cache_dir: str | None = None  # dequantised embedded models (default $FEDPLORA_CACHE or ~/.cache/fedplora)
    # federation
    rounds: int = 8
    num_clients: int = 10
    clients_per_round: int = 2
    seed: int = 0
    # adapter: global rank R, alpha, targets (None = attention projections)
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] | None = None
    lora_dropout: float = 0.0
    # heterogeneity: rank groups and their shares of the clients, e.g. ranks [2,4,8] at 1:1:1
    ranks: list[int] = field(default_factory=lambda: [2, 4, 8])
    rank_shares: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    budget_fluctuation: float = 0.0  # chance per round that a client's budget drops one group
    # method options
    weighting: str = "samples"  # or "uniform"
    selection: str = "shared"  # Fed-PLoRA: one index draw for all layers, or "per_layer"
    fedit_variant: str = "ideal"  # FedIT: "ideal" (every client at R, ignores budgets) or "feasible" (smallest budget)
    # data
    partitioner: str = "iid"  # "iid", "dirichlet", "pathological" or "natural" (docs/tasks.md)
    dirichlet_alpha: float = 0.5
    pathological_classes: int = 2  # "pathological": labels per client
    partition_column: str | None = None  # column the label-skew/natural partitioners split by (None = the task's)
    test_fraction: float = 0.2
    max_seq_len: int = 64
    eval_max_examples: int = 300
    eval_every: int = 1
    gen_max_examples: int = 20  # generation tasks: held-out examples generated per evaluation (a seeded sample)
    gen_max_new_tokens: int = 128  # generation tasks: greedy tokens per example
    code_timeout: float = 10.0  # code task: seconds of wall time per sandboxed program
    # local training
    local_steps: int = 15
    batch_size: int = 16
    lr: float = 4e-3
    weight_decay: float = 0.0
    # runtime
    round_timeout: float = 900.0
    min_replies: int = 1
    max_update_norm: float | None = None
    client_cpus: float = 1.0
    out: str | None = None
    # fault tolerance (docs/fault-tolerance.md)
    connect_timeout: float = 900.0  # seconds for all clients to connect and answer the first query (cold start)
    checkpoint_every: int = 1  # write a resumable checkpoint every k rounds (and after the last); 0 = never
    on_too_few_replies: str = "skip"  # fewer than min_replies valid replies: "skip" the round or "retry" it
    max_round_retries: int = 2  # with "retry": extra attempts (each with a fresh client sample) before skipping
    fail_fraction: float = 0.0  # failure injection for tests: this fraction of all clients fails each round
    fail_mode: str = "error"  # injected failure: "error" (the client raises) or "straggle" (replies too late)

    # ------------------------------------------------------------------ IO
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "RunConfig":
        known = {f.name for f in fields(cls)}
        norm = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(norm) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {unknown}; known settings: {sorted(known)}")
        return cls(**norm)

    @classmethod
    def from_toml(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: no such file {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config: {path} is not valid TOML ({e})") from None
        return cls.from_dict(data.get("fedplora", data), source=str(path))

    def with_overrides(self, **overrides: Any) -> "RunConfig":
        data = asdict(self)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return RunConfig.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_toml(self) -> str:
        lines = []
        for k, v in asdict(self).items():
            if v is None:
                continue
            if isinstance(v, str):
                lines.append(f'{k} = "{v}"')
            elif isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, list):
                lines.append(f"{k} = [{', '.join(repr(x) if not isinstance(x, str) else chr(34) + x + chr(34) for x in v)}]")
            else:
                lines.append(f"{k} = {v}")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------ validation
    def validate(self) -> "RunConfig":
        from .methods import METHODS
        from .tasks import TASKS

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        need(self.method in METHODS, f"method: unknown method {self.method!r}; choose one of {sorted(METHODS)}")
        need(self.task in TASKS, f"task: unknown task {self.task!r}; choose one of {sorted(TASKS)}")
        for name in ("rounds", "num_clients", "clients_per_round", "rank", "local_steps", "batch_size",
                     "max_seq_len", "eval_max_examples", "eval_every", "min_replies", "pathological_classes",
                     "gen_max_examples", "gen_max_new_tokens"):
            v = getattr(self, name)
            need(is_int(v) and v >= 1, f"{name}: must be an integer >= 1, got {v!r}")
        need(is_int(self.seed), f"seed: must be an integer, got {self.seed!r}")
        need(self.clients_per_round <= self.num_clients,
             f"clients_per_round: {self.clients_per_round} is more than num_clients={self.num_clients}; "
             "lower --clients-per-round or raise --clients")
        need(self.min_replies <= self.clients_per_round,
             f"min_replies: {self.min_replies} is more than clients_per_round={self.clients_per_round}")
        need(self.alpha > 0, f"alpha: must be > 0, got {self.alpha!r}")
        need(0 <= self.lora_dropout < 1, f"lora_dropout: must be in [0, 1), got {self.lora_dropout!r}")
        need(isinstance(self.ranks, list) and len(self.ranks) >= 1 and all(is_int(r) for r in self.ranks),
             f"ranks: must be a list of integers, got {self.ranks!r}")
        for r in self.ranks:
            need(1 <= r <= self.rank, f"ranks: budget {r} is outside [1, rank={self.rank}]; "
                                      "a client cannot train more pairs than the global rank R")
        need(isinstance(self.rank_shares, list) and len(self.rank_shares) == len(self.ranks),
             f"rank_shares: needs one share per rank group ({len(self.ranks)}), got {self.rank_shares!r}")
        need(all(s >= 0 for s in self.rank_shares) and sum(self.rank_shares) > 0,
             f"rank_shares: must be >= 0 and not all 0, got {self.rank_shares!r}")
        need(0 <= self.budget_fluctuation <= 1, f"budget_fluctuation: must be in [0, 1], got {self.budget_fluctuation!r}")
        need(self.weighting in ("samples", "uniform"), f"weighting: must be 'samples' or 'uniform', got {self.weighting!r}")
        need(self.selection in ("shared", "per_layer"), f"selection: must be 'shared' or 'per_layer', got {self.selection!r}")
        need(self.fedit_variant in ("ideal", "feasible"),
             f"fedit_variant: must be 'ideal' or 'feasible', got {self.fedit_variant!r}")
        need(self.partitioner in ("iid", "dirichlet", "pathological", "natural"),
             f"partitioner: must be 'iid', 'dirichlet', 'pathological' or 'natural', got {self.partitioner!r}")
        need(self.partition_column is None or (isinstance(self.partition_column, str) and self.partition_column != ""),
             f"partition_column: must be a column name, got {self.partition_column!r}")
        need(self.code_timeout > 0, f"code_timeout: must be > 0 seconds, got {self.code_timeout!r}")
        need(self.dirichlet_alpha > 0, f"dirichlet_alpha: must be > 0, got {self.dirichlet_alpha!r}")
        need(0 < self.test_fraction < 1, f"test_fraction: must be in (0, 1), got {self.test_fraction!r}")
        need(self.lr > 0, f"lr: must be > 0, got {self.lr!r}")
        need(self.weight_decay >= 0, f"weight_decay: must be >= 0, got {self.weight_decay!r}")
        need(self.round_timeout > 0, f"round_timeout: must be > 0 seconds, got {self.round_timeout!r}")
        need(self.max_update_norm is None or self.max_update_norm > 0,
             f"max_update_norm: must be > 0 when set, got {self.max_update_norm!r}")
        need(self.client_cpus > 0, f"client_cpus: must be > 0, got {self.client_cpus!r}")
        need(self.connect_timeout > 0, f"connect_timeout: must be > 0 seconds, got {self.connect_timeout!r}")
        need(is_int(self.checkpoint_every) and self.checkpoint_every >= 0,
             f"checkpoint_every: must be an integer >= 0 (0 = no checkpoints), got {self.checkpoint_every!r}")
        need(self.on_too_few_replies in ("skip", "retry"),
             f"on_too_few_replies: must be 'skip' or 'retry', got {self.on_too_few_replies!r}")
        need(is_int(self.max_round_retries) and self.max_round_retries >= 0,
             f"max_round_retries: must be an integer >= 0, got {self.max_round_retries!r}")
        need(0 <= self.fail_fraction <= 1, f"fail_fraction: must be in [0, 1], got {self.fail_fraction!r}")
        need(self.fail_mode in ("error", "straggle"), f"fail_mode: must be 'error' or 'straggle', got {self.fail_mode!r}")
        if self.model is not None and not Path(self.model).exists() and "/" not in self.model:
            raise ConfigError(f"model: {self.model!r} is neither an existing local path nor a hub name (org/name)")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ConfigError(f"data_dir: no such folder {self.data_dir}")
        if self.dataset is not None and not Path(self.dataset).expanduser().exists() and (
                self.dataset.startswith((".", "/", "~")) or self.dataset.count("/") not in (1, 2)):
            raise ConfigError(f"dataset: {self.dataset!r} is neither an existing file or folder nor a hub name (org/name)")
        return self
