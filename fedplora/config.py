"""Every setting of a run, each declared once: TOML file < CLI flags, validated up front.

Why it is built this way: a setting used to be written down in up to four places (the dataclass
field, a CLI flag with its help, a check in ``validate``, and again in the method or task that
reads it), and the copies drifted: settings without flags, a "local path or hub name" rule in
four versions, a TOML writer that forgot escaping. Now each field of ``RunConfig`` is one
``setting(default, help, choices=..., ge=..., ...)`` declaration, and everything else is derived
from it:

* the CLI flags of ``fedplora run`` / ``compare`` / ``deploy-local`` (``cli.add_setting_flags``):
  ``--<name-with-dashes>`` unless the declaration names other ``flags``;
* the TOML file (``to_toml`` / ``from_toml``), which reads back exactly what it writes;
* the generic checks of ``validate``: type, allowed values, bounds, and a per-setting ``check``.

Only the checks that relate several settings are written by hand (``_cross_checks``). Adding a
setting (say ``device``) is one declaration below; ``tests/test_config_cli.py`` fails if a setting
has no flag or does not survive the TOML round trip. Methods and tasks trust a validated
``RunConfig`` and do not check its settings again.

A bad setting fails fast with one line (``ConfigError``) that names it and says how to fix it.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config_schema import Rule, Setting, settings_of, setting, toml_value  # noqa: F401 (Rule: importable here)
from .errors import ConfigError  # importable from here, as before errors.py
from .partitioners import PARTITIONERS  # the partitioner setting's choices, importable from here as before
from .paths import missing_reason, ref_kind


# ------------------------------------------------------------------ declarations
def _methods() -> list[str]:
    from .methods import METHODS

    return sorted(METHODS)


def _aggregators() -> tuple[str, ...]:
    from .robust import AGGREGATORS

    return AGGREGATORS


def method_class(method: str):
    """The registered class of ``method`` (what it declares it supports), or None for an unknown name."""
    from .methods import METHODS

    return METHODS.get(method)


def _defining(capability: str) -> str:
    """The methods with no ``<capability>_refusal``, for a message's "use ..." clause."""
    from .methods import METHODS

    names = [n for n, cls in METHODS.items() if getattr(cls, capability + "_refusal") is None]
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]


def secure_quantization_range(cfg: "RunConfig") -> int:
    """SecAgg+'s quantization levels: ``secure_quantization``, else the largest power of two q with
    (clients_per_round + 1) * q <= 2**32, so a sum of clients_per_round values in [0, q] never wraps."""
    if cfg.secure_quantization is not None:
        return cfg.secure_quantization
    return 1 << ((2**32 // (cfg.clients_per_round + 1)).bit_length() - 1)


def _tasks() -> list[str]:
    from .tasks import TASKS

    return sorted(TASKS)


def _model_ref(ref: str) -> str | None:
    return missing_reason(ref, "local path") if ref_kind(ref) == "missing" else None


def _dataset_ref(ref: str) -> str | None:
    return missing_reason(ref, "file or folder") if ref_kind(ref) == "missing" else None


def _folder(path: str) -> str | None:
    return None if Path(path).is_dir() else f"no such folder {path}"


def _device(name: str) -> str | None:
    import re

    if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        return None
    return f"must be auto, cpu, cuda, cuda:N or mps, got {name!r} (--device)"


def _finite(value: float) -> str | None:
    return None if math.isfinite(value) else f"must be finite, got {value!r}"


def _column(name: str) -> str | None:
    return None if name.strip() else f"must be a column name, got {name!r}"


def _modules(names: list[str]) -> str | None:
    return None if all(n.strip() for n in names) else f"module names must not be empty, got {names!r}"


@dataclass
class RunConfig:
    """The defaults are the demo: MiniLM on 3-class tweets, 10 clients with budgets {2,4,8} of R=8,
    2 per round, 8 rounds; about 2.5 minutes on 2 CPU cores."""

    # what to run
    method: str = setting("fedplora", "federated method", choices=_methods)
    task: str = setting("tweets", "task (docs/tasks.md)", choices=_tasks)
    model: str | None = setting(None, "model: local path or hub name (default: the task's embedded model)",
                                check=_model_ref)
    data_dir: str | None = setting(None, "folder with the task's data files", check=_folder)
    dataset: str | None = setting(None, "data file/folder or hub name (sst2: glue/sst2; instruct: JSON/JSONL "
                                        "or org/name)", check=_dataset_ref)
    cache_dir: str | None = setting(None, "cache for dequantised embedded models "
                                          "(default $FEDPLORA_CACHE or ~/.cache/fedplora)")
    # federation
    rounds: int = setting(8, "number of rounds", ge=1)
    num_clients: int = setting(10, "number of clients", ge=1, flags=("--clients", "--num-clients"))
    clients_per_round: int = setting(2, "clients sampled per round", ge=1)
    seed: int = setting(0, "seed for sampling, selection, partitions and init")
    # adapter: global rank R, alpha, targets. Defaults follow the paper (docs/method.md, "Defaults"):
    # scale alpha/R = 1, the query and value projections
    rank: int = setting(8, "global rank R (number of one-rank pairs)", ge=1)
    alpha: float | None = setting(None, "LoRA alpha (scale = alpha / R; default R, a scale of 1 as in the paper)",
                                  gt=0)
    targets: list[str] | None = setting(None, "target module names (default: the query and value projections; "
                                              "attention: every attention projection)",
                                        nonempty=True, check=_modules, metavar="query,value")
    lora_dropout: float = setting(0.0, "dropout on the adapter's input", ge=0, lt=1)
    # heterogeneity: rank groups and their shares of the clients, e.g. ranks [2,4,8] at 1:1:1
    ranks: list[int] = setting([2, 4, 8], "rank budgets of the client groups, each in [1, rank]",
                               ge=1, nonempty=True, metavar="2,4,8")
    rank_shares: list[float] = setting([1.0, 1.0, 1.0], "share of clients per rank group "
                                                        "(--ranks alone: equal shares)",
                                       ge=0, nonempty=True, metavar="1:1:1")
    budget_fluctuation: float = setting(0.0, "chance per round that a client's budget drops one group",
                                        ge=0, le=1)
    # method options
    weighting: str = setting("uniform", "aggregation weights: every client alike (uniform, the paper's) or by "
                                        "sample count (samples)", choices=("uniform", "samples"))
    selection: str = setting("per_layer", "Fed-PLoRA: which pairs a client trains: one random draw per layer "
                                          "(per_layer, the paper's), one draw for all layers (shared), or always "
                                          "the first r_i (fixed)",
                             choices=("per_layer", "shared", "fixed"))
    aggregate_over: str = setting("participants", "Fed-PLoRA: average pair j over the clients that trained it "
                                                  "(participants) or over every sampled client (all; one that did "
                                                  "not train j adds a zero update)",
                                  choices=("participants", "all"))
    unselected: str = setting("fold", "Fed-PLoRA: the pairs a client does not train are folded into its model "
                                      "(fold) or left out of it (drop: the Select-N-Drop ablation)",
                              choices=("fold", "drop"))
    fedit_variant: str = setting("ideal", "FedIT: every client at R, ignoring budgets (ideal), or every client "
                                          "at the smallest budget (feasible)", choices=("ideal", "feasible"))
    # robust aggregation (docs/robustness.md)
    aggregator: str = setting("mean", "how the server combines client updates: the method's own mean, or a "
                                      "Byzantine-robust rule applied per pair index over the clients that trained "
                                      "it (coordinate-wise median or trimmed mean, norm clipping, (multi-)Krum)",
                              choices=_aggregators)
    trim_fraction: float = setting(0.2, "trimmed_mean: share of the largest and of the smallest values dropped per "
                                        "coordinate, floor(trim_fraction * clients) at each end", ge=0, lt=0.5)
    clip_multiplier: float = setting(2.0, "norm_clip: each client's whole update is clipped to this many times the "
                                          "round's median update norm", gt=0)
    krum_f: int = setting(1, "krum: assumed number of Byzantine clients per round (a round needs more than "
                             "2*krum_f+2 replies)", ge=0)
    krum_m: int = setting(1, "krum: clients selected and averaged (1 = Krum, more = multi-Krum)", ge=1)
    # server optimizers on the pair space (fedplora/aggregation/server_opt.py): the round's aggregate minus the
    # global state is the pseudo-gradient; a pair nobody trained in a round is not stepped
    server_optimizer: str = setting("none", "what the server does with the round's aggregate: take it (none), or step "
                                            "towards it with momentum (avgm: FedAvgM), Adam (adam: FedAdam) or Yogi "
                                            "(yogi: FedYogi); pair-space methods only",
                                    choices=("none", "avgm", "adam", "yogi"))
    server_lr: float | None = setting(None, "the server optimizer's rate (default: avgm 1, adam 0.1, yogi 0.01, "
                                            "Flower's)", gt=0, check=_finite)
    server_momentum: float = setting(0.9, "avgm: server momentum (0 with server_lr 1 is the plain aggregate)",
                                     ge=0, lt=1)
    server_beta1: float = setting(0.9, "adam, yogi: first-moment decay", ge=0, lt=1)
    server_beta2: float = setting(0.99, "adam, yogi: second-moment decay", ge=0, lt=1)
    server_tau: float = setting(1e-3, "adam, yogi: the adaptivity floor added to sqrt(v)", gt=0, check=_finite)
    # differential privacy (docs/robustness.md, "Differential privacy"; fedplora/privacy.py)
    dp_mode: str = setting("off", "client-level differential privacy: none (off), the server clips each update and "
                                  "noises the sums (central, trusted server), or each client clips and noises its "
                                  "own update before upload (local)", choices=("off", "central", "local"))
    dp_clip: float | None = setting(None, "DP: L2 bound C on a client's whole update (all its pairs and heads)",
                                    gt=0, check=_finite)
    dp_noise_multiplier: float | None = setting(None, "DP: sigma, the noise std is sigma * dp_clip (0 = clipping "
                                                      "only, no privacy); or set target_epsilon", ge=0,
                                                check=_finite)
    dp_delta: float = setting(1e-5, "DP: the delta of the reported (epsilon, delta); keep it below 1/num_clients",
                              gt=0, lt=1)
    target_epsilon: float | None = setting(None, "DP: CHOOSES dp_noise_multiplier, once before the run, as the "
                                                 "smallest sigma that spends at most this epsilon over the planned "
                                                 "rounds (the run is never stopped early)", gt=0, check=_finite)
    # secure aggregation (docs/secure-aggregation.md; fedplora/federation/secure.py): Flower's SecAgg+
    secure_aggregation: bool = setting(False, "sum the clients' uploads with Flower's SecAgg+: the server learns "
                                              "only the per-pair sums of a round's surviving clients, never one "
                                              "client's pairs (the pair-space methods; aggregator mean)")
    secure_shares: float = setting(1.0, "SecAgg+: share of a round's clients each client's secrets are split "
                                        "among, its neighbours (1 = all: SecAgg)", gt=0, le=1)
    secure_threshold: float = setting(0.7, "SecAgg+: share of those shares needed to rebuild a dropped client's "
                                           "mask; a round survives dropouts down to this share of its clients",
                                      gt=0.5, le=1)
    secure_clip: float = setting(16.0, "SecAgg+: every uploaded coordinate is clipped to [-c, c] before "
                                       "quantization (LoRA pairs and heads stay far inside; the history counts "
                                       "clipped coordinates)", gt=0, check=_finite)
    secure_quantization: int | None = setting(None, "SecAgg+: quantization levels per coordinate (default: the "
                                                    "largest power of two q with (clients_per_round+1)*q <= 2**32, "
                                                    "so the masked sum cannot wrap around the 2**32 modulus)",
                                              ge=2)
    # data
    partitioner: str = setting("iid", "how the training data is split over clients (docs/tasks.md)",
                               choices=PARTITIONERS)
    dirichlet_alpha: float = setting(0.5, "Dirichlet label-skew concentration (small = strong skew): dirichlet "
                                          "splits each label across clients by Dir(alpha), dirichlet_per_client "
                                          "draws each equal-sized client's label mix from Dir(alpha)", gt=0)
    pathological_classes: int = setting(2, "labels per client with --partitioner pathological", ge=1)
    partition_column: str | None = setting(None, "column the dirichlet/pathological/natural partitioners split "
                                                 "by (default: the task's label column)", check=_column)
    test_fraction: float = setting(0.2, "share of the data held out when a task has no test split", gt=0, lt=1)
    max_seq_len: int = setting(64, "max tokens per example", ge=1)
    eval_split: str = setting("test", "what the server evaluates: the task's held-out split (test), or a "
                                      "seeded validation_fraction of the training data that no client trains on "
                                      "(validation: for choosing settings such as the learning rate)",
                              choices=("test", "validation"))
    validation_fraction: float = setting(0.1, "with eval_split=validation: the share of the training data held out",
                                         gt=0, lt=1)
    eval_max_examples: int = setting(300, "held-out examples evaluated per round (a seeded sample)", ge=1)
    eval_every: int = setting(1, "evaluate the global model every k rounds (and after the last)", ge=1)
    gen_max_examples: int = setting(20, "generation tasks: held-out examples generated per evaluation", ge=1)
    gen_max_new_tokens: int = setting(128, "generation tasks: greedy tokens per example", ge=1)
    code_timeout: float = setting(10.0, "code task: seconds of wall time per sandboxed program", gt=0)
    # local training
    local_steps: int = setting(15, "local AdamW steps per round", ge=1)
    batch_size: int = setting(16, "local batch size", ge=1)
    lr: float = setting(4e-3, "local learning rate", gt=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    # the controls an LLM run needs (FlowerTune's templates; fedplora/training.py)
    lr_schedule: str = setting("constant", "the client learning rate over rounds: constant, cosine (FlowerTune's "
                                           "cosine annealing from lr to lr_min) or linear", choices=("constant", "cosine",
                                                                                                    "linear"))
    lr_min: float = setting(0.0, "the rate lr_schedule ends at (FlowerTune: 1e-6)", ge=0, check=_finite)
    grad_accum_steps: int = setting(1, "micro-batches of batch_size per optimizer step (the gradient of one batch "
                                       "grad_accum_steps times larger, in the memory of one)", ge=1)
    local_epochs: int | None = setting(None, "passes over the client's partition per round, instead of local_steps",
                                       ge=1)
    prompt_template: str = setting("alpaca", "instruct task: the Alpaca prompt (### Instruction / ### Response), or "
                                             "chat: the model's own chat template, rendered by its tokenizer",
                                   choices=("alpaca", "chat"))
    comm_budget_mb: float | None = setting(None, "the run's traffic budget (uploads and downloads, MB): past it the "
                                                 "run warns, or stops (comm_budget_action); FlowerTune warns at "
                                                 "200,000", gt=0, check=_finite)
    comm_budget_action: str = setting("warn", "past comm_budget_mb: warn in the history and the console, or stop "
                                              "after that round", choices=("warn", "stop"))
    # runtime
    round_timeout: float = setting(900.0, "seconds a round waits for its clients' replies", gt=0)
    min_replies: int = setting(1, "valid replies a round needs to aggregate", ge=1)
    max_update_norm: float | None = setting(None, "reject a client update whose L2 norm exceeds this", gt=0)
    client_cpus: float = setting(1.0, "CPU cores per simulated client", gt=0)
    # hardware (docs/memory.md): where and in what precision the frozen base runs
    device: str = setting("auto", "where clients train and the server evaluates: auto (cuda, then mps, then cpu), "
                                  "cpu, cuda, cuda:N or mps", check=_device)
    client_gpus: float | None = setting(None, "simulation: share of a GPU per virtual client, 0.25 = four clients "
                                              "per GPU (default: 0 when the device is the CPU, else 1/clients_per_round)",
                                        ge=0, le=1)
    # a pool of interchangeable simulated nodes instead of one a client (docs/deployment.md, "Which node serves
    # which client"): Flower's per-node costs (a Context each, the Simulation Engine's message poll) then follow
    # the pool, not the federation; the rounds sample, train and aggregate exactly as with one node a client
    simulation_nodes: int = setting(0, "simulation: register only this many SuperNodes, each serving whichever "
                                       "sampled client the server assigns it (at least clients_per_round, at "
                                       "most num_clients; same numbers as one node a client)",
                                    ge=0, hint="0 = one node per client")
    dtype: str = setting("float32", "dtype of the frozen base (adapters keep float32 masters)",
                         choices=("float32", "bfloat16", "float16"))
    quantization: str = setting("none", "quantize the frozen base with bitsandbytes (QLoRA-style NF4 for 4bit)",
                                choices=("none", "8bit", "4bit"))
    fold: str = setting("branch", "how unselected pairs are folded: a frozen low-rank branch (no extra memory) "
                                  "or merged into the base weight", choices=("branch", "merge"))
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass (less memory, "
                                                  "about a third more compute)")
    out: str | None = setting(None, "output folder (default runs/<method>-<task>-<time>)")
    # fault tolerance (docs/fault-tolerance.md)
    connect_timeout: float = setting(900.0, "seconds for min_nodes nodes to connect, and for a node to answer its "
                                            "first query (cold start: it may load its model and data first)", gt=0)
    min_nodes: int | None = setting(None, "nodes connected before the first round (default num_clients; a "
                                          "deployment of many devices may start with fewer)", ge=1)
    checkpoint_every: int = setting(1, "write a resumable checkpoint every k rounds (and after the last)",
                                    ge=0, hint="0 = no checkpoints")
    on_too_few_replies: str = setting("skip", "fewer than min_replies valid replies: skip the round or retry it",
                                      choices=("skip", "retry"))
    max_round_retries: int = setting(2, "with retry: extra attempts (each with a fresh client sample) "
                                        "before skipping", ge=0)
    fail_fraction: float = setting(0.0, "failure injection for tests: this fraction of all clients fails "
                                        "each round", ge=0, le=1)
    fail_mode: str = setting("error", "injected failure: the client raises (error) or replies too late "
                                      "(straggle)", choices=("error", "straggle"))
    # Byzantine clients (fedplora/federation/attacks.py): a fixed, seeded set of clients attacks in every round
    byzantine_fraction: float = setting(0.0, "attack injection for tests: this fraction of all clients is "
                                             "Byzantine (the same clients all run)", ge=0, le=1)
    attack: str = setting("scale", "what a Byzantine client does: upload received - s*delta (sign_flip), "
                                   "received + s*delta (scale), received + delta + N(0, s^2) noise (noise), "
                                   "claim s times its sample count (inflate), or train on flipped labels "
                                   "(label_flip; classification tasks)",
                          choices=("sign_flip", "scale", "noise", "inflate", "label_flip"))
    attack_strength: float | None = setting(None, "the attack's s (default: sign_flip 1, scale 100, noise 1, "
                                                  "inflate 1e6; label_flip has none)", gt=0,
                                            check=lambda v: None if math.isfinite(v) else
                                            f"must be finite, got {v!r} (--attack-strength)")

    # ------------------------------------------------------------------ IO
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "RunConfig":
        norm = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(norm) - set(BY_NAME))
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {unknown}; known settings: {sorted(BY_NAME)}")
        return cls(**{k: BY_NAME[k].coerce(v) for k, v in norm.items()})

    @classmethod
    def from_toml(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: no such file {path}")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
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
        """Every set setting, one ``name = value`` line; ``from_toml`` reads it back equal.

        An unset (None) setting is left out: TOML has no null, and such a setting's default is None.
        """
        return "".join(f"{s.name} = {toml_value(v)}\n" for s in SETTINGS if (v := getattr(self, s.name)) is not None)

    # ------------------------------------------------------------ validation
    def validate(self) -> "RunConfig":
        for s in SETTINGS:
            problem = s.problem(getattr(self, s.name))
            if problem:
                raise ConfigError(f"{s.name}: {problem}")
        self._cross_checks()
        return self

    def _cross_checks(self) -> None:
        """The rules that relate several settings (each setting on its own is checked from its declaration)."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.clients_per_round <= self.num_clients,
             f"clients_per_round: {self.clients_per_round} is more than num_clients={self.num_clients}; "
             "lower --clients-per-round or raise --clients")
        need(self.min_nodes is None or self.min_nodes <= self.num_clients,
             f"min_nodes: {self.min_nodes} is more than num_clients={self.num_clients}; lower --min-nodes")
        need(self.simulation_nodes == 0 or self.clients_per_round <= self.simulation_nodes <= self.num_clients,
             f"simulation_nodes: {self.simulation_nodes} pool nodes for {self.clients_per_round} clients a round of "
             f"{self.num_clients}; use 0 (one node per client) or a pool between clients_per_round and num_clients "
             f"(--simulation-nodes {self.clients_per_round} to {self.num_clients})")
        need(self.simulation_nodes == 0 or self.min_nodes is None or self.min_nodes <= self.simulation_nodes,
             f"min_nodes: {self.min_nodes} is more than the simulation_nodes={self.simulation_nodes} the pool "
             "registers; lower --min-nodes or leave it unset")
        need(self.min_replies <= self.clients_per_round,
             f"min_replies: {self.min_replies} is more than clients_per_round={self.clients_per_round}; "
             "lower --min-replies or raise --clients-per-round")
        for r in self.ranks:
            need(r <= self.rank, f"ranks: budget {r} is outside [1, rank={self.rank}]; "
                                 "a client cannot train more pairs than the global rank R (raise --rank)")
        need(len(self.rank_shares) == len(self.ranks),
             f"rank_shares: needs one share per rank group ({len(self.ranks)}), got {self.rank_shares!r}")
        need(sum(self.rank_shares) > 0, f"rank_shares: must not be all 0, got {self.rank_shares!r}")
        from .aggregation import refusal

        problem = refusal(method_class(self.method), self.aggregator)
        need(problem is None, f"aggregator: {(problem or '').removeprefix('aggregator ')}")
        if self.aggregator == "krum":  # every aggregated round has >= min_replies updates: Krum must run on them
            least = 2 * self.krum_f + 3
            need(self.min_replies >= least,
                 f"min_replies: krum with krum_f={self.krum_f} needs more than 2*krum_f+2 = {least - 1} updates in "
                 f"every aggregated round, got min_replies={self.min_replies}; raise --min-replies (and "
                 f"--clients-per-round) to {least} or lower --krum-f")
            need(self.krum_m <= self.min_replies - self.krum_f,
                 f"krum_m: {self.krum_m} is more than min_replies - krum_f = {self.min_replies - self.krum_f}, the "
                 "clients Krum can select in the smallest aggregated round; lower --krum-m or raise --min-replies")
        if self.byzantine_fraction > 0 and self.aggregator != "mean":  # mean is the undefended baseline
            from .robust import tolerates

            attackers = int(round(self.byzantine_fraction * self.num_clients))
            expected = math.ceil(self.clients_per_round * attackers / self.num_clients - 1e-9)
            problem = tolerates(self.aggregator, self.clients_per_round, expected, trim_fraction=self.trim_fraction,
                                clip_multiplier=self.clip_multiplier, krum_f=self.krum_f, krum_m=self.krum_m)
            need(problem is None, f"byzantine_fraction: {self.byzantine_fraction:g} of {self.num_clients} clients "
                                  f"puts about {expected} Byzantine in a round of {self.clients_per_round}, and "
                                  f"{problem}; lower --byzantine-fraction, raise --clients-per-round or choose "
                                  "another --aggregator")
        self._dp_checks(need)
        self._secure_checks(need)
        need(self.lr_schedule == "constant" or self.lr_min <= self.lr,
             f"lr_min: {self.lr_min:g} is above lr={self.lr:g}; the {self.lr_schedule} schedule decays from lr to "
             "lr_min (lower --lr-min)")
        need(self.server_optimizer != "none" or self.server_lr is None,
             "server_lr: is set but server_optimizer is none; choose --server-optimizer avgm, adam or yogi, or unset it")
        refusal = method_class(self.method).server_opt_refusal
        need(self.server_optimizer == "none" or refusal is None,
             f"server_optimizer: {self.server_optimizer} is not defined for {self.method}: {refusal}; use "
             f"--server-optimizer none, or {_defining('server_opt')}")
        need(self.quantization == "none" or self.fold == "branch",
             f"fold: 'merge' adds pairs into the base weight, which a {self.quantization} base stores quantized; "
             "use --fold branch with --quantization")

    def _secure_checks(self, need: Callable[[bool, str], None]) -> None:
        """Secure aggregation (SecAgg+) with the rest: what it cannot compute is refused here, before any round."""
        if not self.secure_aggregation:
            need(self.secure_quantization is None, "secure_quantization: is set but secure_aggregation is off; "
                                                   "add --secure-aggregation, or unset it")
            return
        refusal = method_class(self.method).secure_refusal
        need(refusal is None, f"secure_aggregation: not defined for {self.method}: {refusal}; use "
                              f"{_defining('secure')}, or --no-secure-aggregation")
        need(self.aggregator == "mean",
             f"aggregator: {self.aggregator} needs every client's own update, which secure aggregation hides from "
             "the server (it sees only the sum); use --aggregator mean or --no-secure-aggregation")
        need(self.clients_per_round >= 3,
             f"clients_per_round: secure aggregation needs at least 3 clients a round (with 2, each learns the "
             f"other's update from the sum), got {self.clients_per_round}; raise --clients-per-round")
        need(self.max_update_norm is None,
             "max_update_norm: the server cannot measure one client's update under secure aggregation; unset "
             "--max-update-norm (secure_clip bounds every coordinate)")
        most = 2**32 // (self.clients_per_round + 1)
        need(self.secure_quantization is None or self.secure_quantization <= most,
             f"secure_quantization: {self.secure_quantization} levels for {self.clients_per_round} clients can "
             f"overflow the 2**32 modulus of the masked sum; use at most {most} (or leave it unset)")

    def _dp_checks(self, need: Callable[[bool, str], None]) -> None:
        """The DP settings together (ranges of each alone: their declarations; accounting: at the run's start)."""
        if self.dp_mode == "off":
            given = [n for n in ("dp_clip", "dp_noise_multiplier", "target_epsilon") if getattr(self, n) is not None]
            need(not given, f"{given[0] if given else ''}: is set but dp_mode is off, so no privacy would be applied; "
                            "set --dp-mode central or local, or unset it")
            return
        need(self.dp_clip is not None, f"dp_clip: dp_mode={self.dp_mode} needs the L2 clipping norm C; set --dp-clip")
        need(self.dp_noise_multiplier is not None or self.target_epsilon is not None,
             f"dp_noise_multiplier: dp_mode={self.dp_mode} needs --dp-noise-multiplier or --target-epsilon "
             "(which chooses it); set one of them")
        from .privacy import check_dp_settings

        check_dp_settings(self.dp_clip, self.dp_noise_multiplier, self.dp_delta, self.target_epsilon, self.dp_mode)
        if self.dp_mode == "central":
            refusal = method_class(self.method).dp_refusal
            need(refusal is None, f"dp_mode: central DP is not defined for {self.method}: {refusal}; use "
                                  f"--dp-mode local, or {_defining('dp')}")
            need(self.aggregator == "mean",
                 f"aggregator: central DP releases the noisy sum of clipped updates, which {self.aggregator} does not "
                 "compute (its sensitivity is not C); use --aggregator mean with --dp-mode central (local DP "
                 "allows any aggregator)")


# ------------------------------------------------------------------ derived from the declarations
SETTINGS: tuple[Setting, ...] = settings_of(RunConfig)
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
