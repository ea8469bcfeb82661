"""The small interface every federated LoRA method implements.

The server side (``configure_client``, ``aggregate``) and the client side
(``client_setup``, ``client_update``) are pure PyTorch: Flower only carries the
``ClientTask`` and ``ClientUpdate`` between them. Because Fed-PLoRA and every
baseline go through the same four calls, ``compare`` is fair by construction.

Global state is a flat ``dict[str, Tensor]``; aggregation returns a new dict
and never edits the old one, so a rejected update cannot half-update it.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import PLoRAConfig, get_plora_state_dict, select_and_fold, set_plora_state_dict
from ..adapters.layer import MASTER_DTYPE
from ..adapters.model import A_SUFFIX, B_SUFFIX, adapter_factors
from ..errors import UpdateRejected
from ..measure import LayerFactors, LayerPairs, mean_of_products
from ..privacy import CentralDP, clip_delta, noisy_pair_mean, pair_divisors
from ..robust import Aggregator, UnitDelta, combine, refusal

State = dict[str, torch.Tensor]


def upload_dtype(state: "State") -> torch.dtype:
    """The run's declared upload dtype, whatever a client's base dtype or quantization: the adapters' master
    dtype (``adapters.layer.MASTER_DTYPE``, float32), float64 where the global state is (exactness tests)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in state.values()) else MASTER_DTYPE


@dataclass(frozen=True)
class ClientInfo:
    cid: int  # stable client id (the data partition id), not Flower's random node id
    budget: int  # the largest rank the client can train this round
    num_samples: int = 1


@dataclass
class ClientTask:
    """What the server sends one client for one round."""

    arrays: State
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientUpdate:
    """What a client sends back."""

    arrays: State
    config: dict[str, Any]
    num_samples: int


class FederatedMethod(ABC):
    name: ClassVar[str]
    ignores_budgets: bool = False  # True only for a reference that trains rank R everywhere (FedIT ideal)
    # why central DP is not defined for the method (one line), or None (docs/robustness.md, "Differential privacy")
    dp_refusal: ClassVar[str | None] = None
    # why secure aggregation is not defined for the method (one line), or None (docs/secure-aggregation.md)
    secure_refusal: ClassVar[str | None] = None

    def __init__(self, plora: PLoRAConfig, weighting: str = "samples", seed: int = 0,
                 aggregator: Aggregator | str | None = None, dp: CentralDP | None = None) -> None:
        """``weighting``: "samples" or "uniform" (the run setting, checked by RunConfig).

        ``aggregator``: how ``aggregate`` combines the clients (``fedplora.robust``; a name or an ``Aggregator``
        with its parameters). The default, mean, is the method's own aggregation, untouched; a robust rule
        the method does not define raises one ValueError line here, before any round.

        ``dp``: central differential privacy (``fedplora.privacy.CentralDP``): the server releases
        ``private_aggregate`` instead of ``aggregate``. It needs the mean aggregator; a method that does not
        define it (``dp_refusal``) raises one ValueError line here.
        """
        self.plora = plora
        self.weighting = weighting
        self.seed = seed
        self.aggregator = Aggregator.of(aggregator)
        problem = refusal(self.aggregator.name, self.name)
        if problem:
            raise ValueError(problem)
        self.dp = dp
        if dp is not None:
            if self.dp_refusal:
                raise ValueError(f"central DP is not defined for {self.name}: {self.dp_refusal}")
            if self.robust:
                raise ValueError(f"central DP releases the noisy sum of clipped updates; aggregator "
                                 f"{self.aggregator.name} does not compute it: use the mean aggregator")

    @property
    def robust(self) -> bool:
        """True when ``aggregate`` uses a robust rule instead of the method's own mean."""
        return self.aggregator.name != "mean"

    @property
    def rank(self) -> int:
        return self.plora.rank

    def describe(self) -> str:
        """One line naming the method and the options that change what it is, for logs and tables."""
        return self.name + (f" (aggregator {self.aggregator.describe()})" if self.robust else "")

    def client_rank(self, client: ClientInfo) -> int:
        """The rank client i trains: its budget, capped at the global rank R."""
        if client.budget < 1:
            raise ValueError(f"client {client.cid}: a rank budget must be >= 1, got {client.budget}")
        return min(client.budget, self.rank)

    # ------------------------------------------------------------ server side
    def init_state(self, model: nn.Module) -> State:
        """The round-0 global state, from a freshly wrapped model."""
        return get_plora_state_dict(model)

    @abstractmethod
    def configure_client(self, state: State, client: ClientInfo, server_round: int) -> ClientTask: ...

    @abstractmethod
    def aggregate(self, state: State, tasks: list[ClientTask], updates: list[ClientUpdate]) -> State: ...

    # ------------------------------------------------------------ central differential privacy
    def trained_pairs(self, task: ClientTask, update: ClientUpdate) -> dict[str, list[int]]:
        """Per layer, the global pair indices the update's rows (A) and columns (B) hold, in order."""
        raise NotImplementedError(f"{self.name} does not define central DP")

    def dp_pair_counts(self) -> torch.Tensor:
        """The fixed expected number of a round's clients that train each pair index (``privacy.expected_pair_counts``
        under the method's selection rule and ``self.dp``'s budget profile)."""
        raise NotImplementedError(f"{self.name} does not define central DP")

    def private_aggregate(self, state: State, tasks: list[ClientTask], updates: list[ClientUpdate],
                          generator: torch.Generator | None) -> State:
        """Central DP's release (``self.dp``): global + (sum of clipped deltas per pair + noise) / fixed count.

        Unweighted whatever ``weighting``; ``dp_pair_aggregate`` says what is summed and divided. ``generator``
        draws the noise (a seeded stream per round: ``rng.torch_generator("dp_noise", seed, round)``).
        """
        if self.dp is None:
            raise ValueError(f"{self.name} was built without central DP (the dp option)")
        trained = [self.trained_pairs(t, u) for t, u in zip(tasks, updates)]
        deltas = [self.update_delta(t, u) for t, u in zip(tasks, updates)]
        return dp_pair_aggregate(self.dp, state, deltas, trained, self.dp_pair_counts(), generator)

    # ------------------------------------------------------------ secure aggregation (docs/secure-aggregation.md)
    # Under SecAgg+ the server learns only the element-wise sum of the clients' uploads, so every client sends the
    # same fixed shape: all R pairs of every layer (its trained pairs' weighted deltas, zeros elsewhere), each pair's
    # weight and trained-count indicator, and the heads. The sum gives, per pair, exactly the numerator and the
    # denominator of the rank-wise mean that ``aggregate`` computes from the individual updates.
    def secure_counts_everyone(self) -> bool:
        """True when every client counts for every pair (a client that did not train j adds a zero delta)."""
        return False

    def secure_layout(self, state: State) -> dict[str, tuple[int, ...]]:
        """Keys and shapes of the fixed-shape upload, sorted: the same on the server (global ``state``) and on every
        client (its task's arrays: fewer pairs, the same layer sizes). Per layer: A (R, d_in) and B (d_out, R)
        deltas, ``.w`` the per-pair weight and ``.count`` the per-pair indicator (R,); every head, and
        ``heads.w`` / ``heads.count`` (1,) when there are heads."""
        layout: dict[str, tuple[int, ...]] = {}
        for layer in layer_names(state):
            A, B = state[layer + A_SUFFIX], state[layer + B_SUFFIX]
            layout[layer + A_SUFFIX] = (self.rank, int(A.shape[1]))
            layout[layer + B_SUFFIX] = (int(B.shape[0]), self.rank)
            layout[layer + WEIGHT_SUFFIX] = (self.rank,)
            layout[layer + COUNT_SUFFIX] = (self.rank,)
        heads = head_keys(state)
        for key in heads:
            layout[key] = tuple(int(n) for n in state[key].shape)
        if heads:
            layout[HEADS_WEIGHT], layout[HEADS_COUNT] = (1,), (1,)
        return dict(sorted(layout.items()))

    def secure_weight(self, update: ClientUpdate, weight_scale: float) -> float:
        """The client's aggregation weight in (0, 1]: its sample count over the round's largest declared count, or 1."""
        if self.weighting != "samples":
            return 1.0
        if not (math.isfinite(weight_scale) and weight_scale >= 1):
            raise ValueError(f"secure weight scale must be a sample count >= 1, got {weight_scale!r}")
        return min(1.0, float(update.num_samples) / float(weight_scale))

    def secure_encode(self, task: ClientTask, update: ClientUpdate, weight_scale: float,
                      clip: float | None = None) -> State:
        """Client side, after training: the fixed-shape upload (float64, ``secure_layout(task.arrays)``).

        Pair j of a layer holds w * (trained value - global value) where the client trained j, zeros elsewhere;
        its ``.w`` entry w and its ``.count`` entry 1 (``secure_counts_everyone``: w and 0 on the pairs it did not
        train). ``clip`` (central DP under secure aggregation): the whole delta clipped to that L2 norm here, on
        the client, and no weights (a DP sum is unweighted)."""
        trained = self.trained_pairs(task, update)
        out = {k: torch.zeros(shape, dtype=torch.float64) for k, shape in self.secure_layout(task.arrays).items()}
        delta, heads = self.update_delta(task, update), head_keys(task.arrays)
        if clip is not None:
            delta, _, _ = clip_delta(delta, clip)
        w = 1.0 if clip is not None else self.secure_weight(update, weight_scale)
        everyone = clip is None and self.secure_counts_everyone()
        for layer, idx in trained.items():
            a, b, i = layer + A_SUFFIX, layer + B_SUFFIX, torch.tensor(idx, dtype=torch.long)
            out[a][i] = w * delta[a]
            out[b][:, i] = w * delta[b]
            out[layer + COUNT_SUFFIX][i] = 1.0
            if everyone:
                out[layer + WEIGHT_SUFFIX][:] = w
            else:
                out[layer + WEIGHT_SUFFIX][i] = w
        for key in heads:
            out[key] = w * delta[key]
        if heads:
            out[HEADS_WEIGHT][0], out[HEADS_COUNT][0] = w, 1.0
        return out

    def secure_aggregate(self, state: State, tasks: list[ClientTask], sums: State, clients: int,
                         generator: torch.Generator | None = None) -> State:
        """Server side: the new global state from the element-wise sum over the round's ``clients`` surviving clients
        of their ``secure_encode`` uploads (it never sees one of them). Pair j moves by sum_j / weight_j, the
        weighted mean of the deltas over the clients it averages over (``aggregate``'s rule); a pair nobody trained
        keeps its value. With central DP (``self.dp``), the sums of clipped deltas are released as in
        ``private_aggregate``: noise per coordinate, fixed divisors. Float64, cast back to the state's dtype."""
        self.check_secure_sums(state, sums, clients)
        if self.dp is not None:
            return self.secure_dp_release(state, sums, generator)
        new: State = {}
        for layer in layer_names(state):
            a, b = layer + A_SUFFIX, layer + B_SUFFIX
            A, B = self.secure_layer(state, layer, sums)
            new[a], new[b] = A.to(state[a].dtype), B.to(state[b].dtype)
        new.update(secure_heads(state, sums))
        return new

    def secure_layer(self, state: State, layer: str, sums: State) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's new (A, B) in float64 from the sums: each trained pair moves by its weighted delta sum over
        its weight sum; a pair whose trained count is 0 keeps its value."""
        a, b = layer + A_SUFFIX, layer + B_SUFFIX
        weight, trained = sums[layer + WEIGHT_SUFFIX], sums[layer + COUNT_SUFFIX].round() > 0
        step = torch.where(trained, weight, torch.ones_like(weight))
        A, B = state[a].double().clone(), state[b].double().clone()
        A[trained] += sums[a][trained] / step[trained, None]
        B[:, trained] += sums[b][:, trained] / step[None, trained]
        return A, B

    def secure_dp_release(self, state: State, sums: State, generator: torch.Generator | None) -> State:
        """Central DP's release from the sums of the clients' clipped deltas (``dp_release``). A coordinate no
        client can train (expected count 0) is zero in every upload: its quantization residue is dropped."""
        counts = self.dp_pair_counts()
        deltas = {k: sums[k].clone() for k in state}
        none = torch.as_tensor(counts, dtype=torch.float64) == 0
        for layer in layer_names(state):
            deltas[layer + A_SUFFIX][none] = 0
            deltas[layer + B_SUFFIX][:, none] = 0
        return dp_release(self.dp, state, deltas, counts, generator)

    def check_secure_sums(self, state: State, sums: State, clients: int | None = None) -> None:
        """The unmasked sums have the layout's keys and shapes and finite values, and (given the number of summed
        uploads) every trained count is a whole number of them: each upload holds 0 or 1 per pair and exactly 1
        for the heads, so a count off by more than rounding means an upload declared another SecAgg+ weight or
        was not an encoding. Raise ValueError naming the key."""
        layout = self.secure_layout(state)
        if set(sums) != set(layout):
            raise ValueError(f"secure sums: keys differ from the layout (missing {sorted(set(layout) - set(sums))[:3]}, "
                             f"unexpected {sorted(set(sums) - set(layout))[:3]})")
        for key, shape in layout.items():
            if tuple(sums[key].shape) != shape:
                raise ValueError(f"secure sums: {key} has shape {tuple(sums[key].shape)}, expected {shape}")
            if not bool(torch.isfinite(sums[key]).all()):
                raise ValueError(f"secure sums: {key} contains NaN or Inf")
        if clients is None:
            return
        for key in layout:
            if not key.endswith(COUNT_SUFFIX) and key != HEADS_COUNT:
                continue
            count = sums[key]
            off = float((count - count.round()).abs().max())
            if off > 0.01 or float(count.min()) < -0.01 or float(count.max()) > clients + 0.01:
                raise ValueError(f"secure sums: {key} is not a count of at most {clients} uploads "
                                 f"(range {float(count.min()):.4g}..{float(count.max()):.4g})")
            if key == HEADS_COUNT and round(float(count[0])) != clients:
                raise ValueError(f"secure sums: {clients} uploads were summed but {key} counts {float(count[0]):.4g}")

    def update_delta(self, task: ClientTask, update: ClientUpdate) -> State:
        """What training changed, float64, per uploaded key: each trained pair's rows (A) and columns (B) minus the
        global values they started from (``trained_pairs``), and each head minus its global value. Its norm is the
        client's ``delta_norm`` in the history (a guide for ``dp_clip`` and ``clip_multiplier``)."""
        delta: State = {}
        for layer, idx in self.trained_pairs(task, update).items():
            a, b, i = layer + A_SUFFIX, layer + B_SUFFIX, torch.tensor(idx, dtype=torch.long)
            delta[a] = update.arrays[a].double() - task.arrays[a].double()[i]
            delta[b] = update.arrays[b].double() - task.arrays[b].double()[:, i]
        for key in head_keys(task.arrays):
            delta[key] = update.arrays[key].double() - task.arrays[key].double()
        return delta

    def client_weights(self, updates: list[ClientUpdate]) -> list[float]:
        """Normalised aggregation weights (sample count by default, uniform as an option)."""
        raw = [float(u.num_samples) if self.weighting == "samples" else 1.0 for u in updates]
        total = sum(raw)
        return [w / total for w in raw]

    # ------------------------------------------------------------ client side
    @abstractmethod
    def client_setup(self, model: nn.Module, task: ClientTask) -> None:
        """Turn the received task into the local model to train (trainable = what is uploaded)."""

    @abstractmethod
    def client_update(self, model: nn.Module, task: ClientTask, num_samples: int) -> ClientUpdate: ...

    # ------------------------------------------------------------ global model
    def load_global(self, model: nn.Module, state: State) -> None:
        """Make ``model`` compute the global model (for evaluation and export)."""
        set_plora_state_dict(model, state)
        select_and_fold(model, range(self.rank))

    def export_adapter(self, model: nn.Module, state: State, path, base_model_name_or_path: str | None = None):
        """The global model as a standard PEFT LoRA folder (``PeftModel.from_pretrained(base, path)``)."""
        from ..adapters import export_peft_adapter

        self.load_global(model, state)
        return export_peft_adapter(model, path, base_model_name_or_path)

    # ------------------------------------------------------------ measurement
    def global_factors(self, state: State) -> LayerFactors:
        return adapter_factors(state, self.plora.scale)

    @abstractmethod
    def client_start_factors(self, task: ClientTask) -> LayerFactors:
        """The adapter the client starts training from, as it computes it."""

    @abstractmethod
    def client_end_factors(self, task: ClientTask, update: ClientUpdate) -> LayerFactors:
        """The client's whole local adapter after training."""

    # the paper's noise definitions (docs/method.md, "Measurements"): parameters, not functions
    def global_pairs(self, state: State) -> LayerPairs:
        """The paper's global "A, B": per layer the stored pairs (A, B), unscaled (R pairs a layer)."""
        return {layer: (state[layer + A_SUFFIX], state[layer + B_SUFFIX]) for layer in layer_names(state)}

    def client_start_pairs(self, task: ClientTask) -> LayerPairs:
        """The paper's "A_i, B_i": the pairs the client starts training from, unscaled; fewer than R pairs
        are compared rank-wise with the global ones (zero-padded, ``measure.padded_distance``)."""
        return self.global_pairs(task.arrays)

    def paper_ideal_factors(self, state: State, tasks: list[ClientTask], updates: list[ClientUpdate]) -> LayerFactors:
        """The paper's dW* = (1/v) sum_i B_i A_i (uniform over the v clients), from the clients' end adapters."""
        return mean_of_products([self.client_end_factors(t, u) for t, u in zip(tasks, updates)])

    # ------------------------------------------------------------ validation
    @abstractmethod
    def expected_update_shapes(self, task: ClientTask, state: State) -> dict[str, tuple[int, ...]]: ...

    def expected_update_config(self, task: ClientTask) -> dict[str, Any]:
        """What an honest reply declares in its config (``client_update``): the rank it was given."""
        return {"rank": task.config["rank"]}

    def validate_update(self, task: ClientTask, update: ClientUpdate, state: State,
                        max_norm: float | None = None) -> None:
        """Raise UpdateRejected naming what is wrong; aggregation only sees updates that pass.

        The same rules for every method (docs/fault-tolerance.md, "Broken updates"): the sample
        count, the declared config (exactly ``expected_update_config``), the keys and shapes
        (``expected_update_shapes``), dense tensors of the declared dtype, finite values, factors
        whose product cannot overflow that dtype, and the norm bound.
        """
        n = update.num_samples
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= MAX_NUM_SAMPLES:
            raise UpdateRejected(f"num_samples must be a positive integer of at most 2**53, got {_short(n)}")
        self.check_declared(task, update.config)
        expected = self.expected_update_shapes(task, state)
        if not isinstance(update.arrays, dict):
            raise UpdateRejected(f"update arrays must map key -> tensor, got {type(update.arrays).__name__}")
        missing = sorted(set(expected) - set(update.arrays), key=str)
        extra = sorted(set(update.arrays) - set(expected), key=str)
        if missing or extra:
            raise UpdateRejected(f"update keys differ from the task: missing {missing[:3]}, unexpected {extra[:3]}")
        for key, shape in expected.items():
            t = update.arrays[key]
            if not isinstance(t, torch.Tensor):
                raise UpdateRejected(f"{key}: expected a tensor, got {type(t).__name__}")
            if t.layout != torch.strided or t.is_meta:
                raise UpdateRejected(f"{key}: expected a dense tensor with values, got a {t.layout} tensor "
                                     f"on {t.device}")
            if tuple(t.shape) != tuple(shape):
                raise UpdateRejected(f"{key}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
            declared = state[key].dtype if key in state else upload_dtype(state)
            if t.dtype != declared:
                raise UpdateRejected(f"{key}: expected {str(declared).removeprefix('torch.')} values (the declared "
                                     f"upload dtype), got {str(t.dtype).removeprefix('torch.')}")
            if not bool(torch.isfinite(t).all()):
                raise UpdateRejected(f"{key}: contains NaN or Inf")
        self.check_products(update.arrays)
        if max_norm is not None:
            norm = math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in update.arrays.values()))
            if norm > max_norm:
                raise UpdateRejected(f"update norm {norm:.3g} exceeds the bound {max_norm:g}")

    def check_declared(self, task: ClientTask, config: Any) -> None:
        """The reply's config declares exactly the work it was given: ``expected_update_config(task)``, no
        key more or less, each value equal to the task's and of its type (2.0 or true is not the rank 2)."""
        if not isinstance(config, dict):
            raise UpdateRejected(f"update config must be a mapping, got {type(config).__name__}")
        expected = self.expected_update_config(task)
        extra = sorted(set(config) - set(expected), key=str)
        if extra:
            raise UpdateRejected(f"update config: unexpected keys {_short(extra)} (a {self.name} reply declares "
                                 f"only {sorted(expected)})")
        missing = sorted(set(expected) - set(config))
        if missing:
            raise UpdateRejected(f"update config: missing {missing} (a {self.name} reply declares {sorted(expected)})")
        R, rank = self.rank, task.config.get("rank", self.rank)
        if "rank" in config and (type(config["rank"]) is not int or not 1 <= config["rank"] <= R):
            raise UpdateRejected(f"declared rank {_short(config['rank'])} is not an integer in [1, {R}]")
        indices = config.get("indices")
        if "indices" in config:
            if not isinstance(indices, dict):
                raise UpdateRejected("declared indices must map layer -> list of pair indices")
            for layer, idx in indices.items():
                if not isinstance(idx, list) or not all(type(i) is int and 0 <= i < R for i in idx):
                    raise UpdateRejected(f"{layer}: declared indices {_short(idx)} are not pair indices in [0, {R})")
                if len(set(idx)) != len(idx):
                    raise UpdateRejected(f"{layer}: declared indices {_short(idx)} repeat a pair")
                if len(idx) > rank:
                    raise UpdateRejected(f"{layer}: declared {len(idx)} indices, more than the client's rank {rank}")
        for key, value in expected.items():
            if not _same_json(config[key], value):
                raise UpdateRejected(f"declared {key} differs from the task's "
                                     f"({_short(config[key])} != {_short(value)})")

    def check_products(self, arrays: State) -> None:
        """Finite factors can still overflow once multiplied (FlexLoRA and FLoRA aggregate B @ A): per layer,
        max(1, s)·||B||·||A|| must stay below the square root of the declared dtype's largest value."""
        s = max(1.0, abs(float(self.plora.scale)))
        for key in arrays:
            if not (isinstance(key, str) and key.endswith(A_SUFFIX)):
                continue
            layer = key[: -len(A_SUFFIX)]
            if layer + B_SUFFIX not in arrays:
                continue
            dtype = arrays[key].dtype
            limit = math.sqrt(torch.finfo(dtype).max)
            A, B = arrays[key].detach().double(), arrays[layer + B_SUFFIX].detach().double()
            bound = s * float(A.norm()) * float(B.norm())
            if not bound <= limit:
                raise UpdateRejected(f"{layer}: values too large, the product bound max(1, s)·||B||·||A|| = "
                                     f"{bound:.3g} exceeds {limit:.3g} (the square root of the largest "
                                     f"{str(dtype).removeprefix('torch.')}), so aggregating B @ A could overflow")


MAX_NUM_SAMPLES = 2**53  # the largest sample count a float64 aggregation weight holds exactly


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values, types included (2 vs 2.0 vs true differ; key order does not matter)."""
    try:
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    except (TypeError, ValueError):
        return False


def _short(value: Any, limit: int = 80) -> str:
    """repr for a rejection message, cut to one short line (a reply may send anything)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def head_keys(state: State) -> list[str]:
    return [k for k in state if not (k.endswith(A_SUFFIX) or k.endswith(B_SUFFIX))]


def layer_names(state: State) -> list[str]:
    return [k[: -len(A_SUFFIX)] for k in state if k.endswith(A_SUFFIX)]


def average_heads(state: State, updates: list[ClientUpdate], weights: list[float]) -> State:
    """FedAvg of the non-adapter trainables (e.g. a classifier head)."""
    out = {}
    for key in head_keys(state):
        acc = torch.zeros_like(state[key], dtype=torch.float64)
        for w, u in zip(weights, updates):
            acc += w * u.arrays[key].double()
        out[key] = acc.to(state[key].dtype)
    return out


def leading_pairs(state: State, rank: int) -> State:
    """The first ``rank`` pairs of every layer, plus the heads (copies, so only they go on the wire)."""
    out: State = {}
    for layer in layer_names(state):
        out[layer + A_SUFFIX] = state[layer + A_SUFFIX][:rank].clone()
        out[layer + B_SUFFIX] = state[layer + B_SUFFIX][:, :rank].clone()
    out.update({k: state[k] for k in head_keys(state)})
    return out


def pad_pairs(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad r pairs to ``rank`` pairs; a zero pair adds nothing to B @ A."""
    r = A.shape[0]
    return F.pad(A, (0, 0, 0, rank - r)), F.pad(B, (0, rank - r))


def padded_average(state: State, updates: list[ClientUpdate], weights: dict[str, list[float]],
                   keep_untrained: bool = True) -> State:
    """Per layer, sum_i w_i pad(A_i) and sum_i w_i pad(B_i) in float64 (clients hold leading pairs).

    Pairs beyond every client's rank keep their previous values, or become zero
    with ``keep_untrained=False``.
    """
    new: State = {}
    for layer in layer_names(state):
        old_A, old_B = state[layer + A_SUFFIX], state[layer + B_SUFFIX]
        A = torch.zeros_like(old_A, dtype=torch.float64)
        B = torch.zeros_like(old_B, dtype=torch.float64)
        for w, u in zip(weights[layer], updates):
            r = u.arrays[layer + A_SUFFIX].shape[0]
            A[:r] += w * u.arrays[layer + A_SUFFIX].double()
            B[:, :r] += w * u.arrays[layer + B_SUFFIX].double()
        if keep_untrained:
            top = max(u.arrays[layer + A_SUFFIX].shape[0] for u in updates)
            A[top:], B[:, top:] = old_A[top:].double(), old_B[:, top:].double()
        new[layer + A_SUFFIX], new[layer + B_SUFFIX] = A.to(old_A.dtype), B.to(old_B.dtype)
    return new


def stack_pairs(weights: list[float], updates: list[ClientUpdate], layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[w_1 B_1 | ... | w_n B_n] and [A_1; ...; A_n] in float64: their product is sum_i w_i B_i A_i."""
    B = torch.cat([w * u.arrays[layer + B_SUFFIX].double() for w, u in zip(weights, updates)], dim=1)
    A = torch.cat([u.arrays[layer + A_SUFFIX].double() for u in updates], dim=0)
    return B, A


def robust_pair_aggregate(aggregator: Aggregator, state: State, updates: list[ClientUpdate],
                          trained: list[dict[str, list[int]]], zero_for_untrained: bool = False) -> State:
    """The robust rule per pair index over the clients that trained it, and over all clients for the heads.

    ``trained[i][layer]``: the pair indices client i's rows (A) and columns (B) hold, in order. Each pair is one
    unit [a_j ; b_j] of deltas from the global value (``robust.UnitDelta``). ``zero_for_untrained``: a client also
    holds every pair it did not train, with a zero delta (Fed-PLoRA's aggregate_over="all"). A pair nobody holds
    keeps its global value. Float64 throughout, cast back to the state's dtype.
    """
    deltas = []
    for u, pairs in zip(updates, trained):
        units: dict = {}
        for layer in layer_names(state):
            A_old, B_old = state[layer + A_SUFFIX].double(), state[layer + B_SUFFIX].double()
            A, B = u.arrays[layer + A_SUFFIX].double(), u.arrays[layer + B_SUFFIX].double()
            for row, j in enumerate(pairs[layer]):
                units[(layer, j)] = torch.cat([A[row] - A_old[j], B[:, row] - B_old[:, j]])
            if zero_for_untrained:
                for j in range(A_old.shape[0]):
                    units.setdefault((layer, j), torch.zeros(A_old.shape[1] + B_old.shape[0], dtype=torch.float64))
        for key in head_keys(state):
            units[key] = u.arrays[key].double() - state[key].double()
        deltas.append(UnitDelta(units))
    step = combine(aggregator, deltas)
    new: State = {}
    for layer in layer_names(state):
        A_old, B_old = state[layer + A_SUFFIX], state[layer + B_SUFFIX]
        A, B, d_in = A_old.double().clone(), B_old.double().clone(), A_old.shape[1]
        for j in range(A.shape[0]):
            if (layer, j) in step:
                A[j] += step[(layer, j)][:d_in]
                B[:, j] += step[(layer, j)][d_in:]
        new[layer + A_SUFFIX], new[layer + B_SUFFIX] = A.to(A_old.dtype), B.to(B_old.dtype)
    for key in head_keys(state):
        new[key] = (state[key].double() + step[key]).to(state[key].dtype) if key in step else state[key].clone()
    return new


def dp_pair_aggregate(dp: CentralDP, state: State, deltas: list[State], trained: list[dict[str, list[int]]],
                      pair_counts: torch.Tensor, generator: torch.Generator | None) -> State:
    """Central DP per pair index (docs/robustness.md, "Differential privacy").

    Client i's delta is its uploaded pairs and heads minus their global values (``FederatedMethod.update_delta``;
    ``trained[i][layer]``: the pair index of each uploaded row of A and column of B). The whole delta, all its
    tensors together, is clipped to ``dp.clip`` (``privacy.clip_delta``); the clipped deltas are summed without weights per pair index (over the
    clients that trained it) and per head (over every client); ``privacy.noisy_pair_mean`` adds N(0, (sigma C)^2)
    to every coordinate of every sum, including pairs nobody trained this round, and divides pair j by
    ``pair_counts[j]`` and the heads by ``dp.clients_per_round``: fixed numbers, never the round's realised counts.
    A pair whose expected count is 0 (no client can train it) gets neither noise nor an update. The mean delta
    is added to the global state in float64, then cast back to the state's dtype.
    """
    sums = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in state.items()}
    layers, heads = layer_names(state), head_keys(state)
    for delta, pairs in zip(deltas, trained):
        clipped, _, _ = clip_delta(delta, dp.clip)
        for layer in layers:
            a, b, idx = layer + A_SUFFIX, layer + B_SUFFIX, torch.tensor(pairs[layer], dtype=torch.long)
            sums[a][idx] += clipped[a]
            sums[b][:, idx] += clipped[b]
        for key in heads:
            sums[key] += clipped[key]
    return dp_release(dp, state, sums, pair_counts, generator)


def dp_release(dp: CentralDP, state: State, sums: State, pair_counts: torch.Tensor,
               generator: torch.Generator | None) -> State:
    """global + (sums of clipped deltas + N(0, (sigma C)^2) per coordinate) / fixed counts: pair j divided by
    ``pair_counts[j]``, the heads by ``dp.clients_per_round`` (``privacy.noisy_pair_mean``); float64, cast back.
    The sums come from the server (``dp_pair_aggregate``) or from SecAgg+ (``secure_aggregate``)."""
    divisors = pair_divisors(list(sums), pair_counts, dp.clients_per_round)
    mean = noisy_pair_mean(sums, divisors, dp.noise_std, generator)
    return {k: (v.double() + mean[k]).to(v.dtype) for k, v in state.items()}


# the fixed-shape secure upload's extra keys (secure_layout)
WEIGHT_SUFFIX = ".w"
COUNT_SUFFIX = ".count"
HEADS_WEIGHT = "heads.w"
HEADS_COUNT = "heads.count"


def secure_heads(state: State, sums: State) -> State:
    """The heads from the secure sums: global + sum of weighted deltas / total weight (FedAvg with ``weighting``);
    unchanged when no client's upload arrived with them."""
    heads = head_keys(state)
    if not heads or round(float(sums[HEADS_COUNT][0])) <= 0:
        return {k: state[k].clone() for k in heads}
    total = float(sums[HEADS_WEIGHT][0])
    return {k: (state[k].double() + sums[k] / total).to(state[k].dtype) for k in heads}


class LeadingPairsMethod(FederatedMethod):
    """A client trains a plain rank-r_i LoRA: the first r_i pairs (FedIT, HetLoRA, FlexLoRA).

    The server sends exactly those r_i pairs (and the heads). The client's rank-R
    model holds them with zero pairs beyond, so it computes W0 + s B_r A_r, and it
    trains, keeps optimizer state for and uploads r_i pairs only. Subclasses pick
    the rank (``client_rank``), what the global pairs mean and how they are aggregated.
    """

    def configure_client(self, state: State, client: ClientInfo, server_round: int) -> ClientTask:
        rank = self.client_rank(client)
        return ClientTask(arrays=leading_pairs(state, rank), config={"rank": rank})

    def client_setup(self, model: nn.Module, task: ClientTask) -> None:
        full = dict(task.arrays)
        for layer in layer_names(task.arrays):
            full[layer + A_SUFFIX], full[layer + B_SUFFIX] = pad_pairs(
                task.arrays[layer + A_SUFFIX], task.arrays[layer + B_SUFFIX], self.rank)
        set_plora_state_dict(model, full)
        select_and_fold(model, range(task.config["rank"]))

    def client_update(self, model: nn.Module, task: ClientTask, num_samples: int) -> ClientUpdate:
        rank = task.config["rank"]
        return ClientUpdate(leading_pairs(get_plora_state_dict(model), rank), {"rank": rank}, num_samples)

    def expected_update_shapes(self, task: ClientTask, state: State) -> dict[str, tuple[int, ...]]:
        return {key: tuple(t.shape) for key, t in task.arrays.items()}

    def robust_aggregate(self, state: State, updates: list[ClientUpdate]) -> State:
        """The robust rule per pair index over the clients whose rank covers it (client i holds pairs 0..r_i-1).
        A zero-padded entry beyond r_i is not a trained value, so it is not counted (HetLoRA's padding is its mean's
        rule, not data)."""
        trained = [{layer: list(range(u.arrays[layer + A_SUFFIX].shape[0])) for layer in layer_names(state)}
                   for u in updates]
        return robust_pair_aggregate(self.aggregator, state, updates, trained)

    def trained_pairs(self, task: ClientTask, update: ClientUpdate) -> dict[str, list[int]]:
        """Client i holds the leading pairs 0..r_i-1 of every layer."""
        return {layer: list(range(update.arrays[layer + A_SUFFIX].shape[0]))
                for layer in layer_names(update.arrays)}

    def client_start_factors(self, task: ClientTask) -> LayerFactors:
        return self.global_factors(task.arrays)

    def client_end_factors(self, task: ClientTask, update: ClientUpdate) -> LayerFactors:
        return self.global_factors(update.arrays)
