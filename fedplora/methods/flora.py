"""FLoRA (Wang et al., NeurIPS 2024): stack the clients' LoRAs, merge them into the base, restart.

Stacking [w_1 B_1 | ... | w_n B_n] [A_1; ...; A_n] = sum_i w_i B_i A_i is the exact
product-space average, so FLoRA has neither initialization nor aggregation
noise; it pays with a fresh adapter every round and a dense downlink.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import rng
from ..adapters import get_plora_state_dict, plora_layers, select_and_fold, set_plora_state_dict
from ..adapters.layer import init_pairs_A_
from ..measure import LayerFactors, LayerPairs
from ..robust import ProductDelta, client_coefficients
from ..state import A_SUFFIX, B_SUFFIX, State, head_keys
from .base import ClientInfo, ClientTask, ClientUpdate, FederatedMethod
from .pairs import average_heads, leading_pairs, stack_pairs

DELTA_SUFFIX = ".flora_delta"


def _deltas(state: State) -> dict[str, torch.Tensor]:
    return {k[: -len(DELTA_SUFFIX)]: v for k, v in state.items() if k.endswith(DELTA_SUFFIX)}


def _heads(state: State) -> State:
    return {k: v for k, v in state.items() if not k.endswith(DELTA_SUFFIX)}


def fresh_generator(init_seed: list[int], layer_index: int) -> torch.Generator:
    """The generator of one layer's fresh A: one seed, the round and the client fix every draw."""
    seed, server_round, cid = init_seed
    return rng.torch_generator("flora_init", seed, server_round, cid, layer_index)


def export_dense(model: nn.Module, dense: dict[str, torch.Tensor], heads: State, path,
                 base_model_name_or_path: str | None = None):
    """A global model W0 + D_layer (+ heads) as a standard PEFT LoRA: each dense D exactly, by its SVD truncated to
    its numerical rank K (the largest K over layers, scale 1). For methods whose global model is not a rank-R
    LoRA (FLoRA's merged stack, FedEx-LoRA's residual)."""
    from ..adapters import PLoRAConfig, export_peft_adapter, get_plora_model, unwrap_base_copy

    factors = {}
    for layer, D in dense.items():
        U, S, Vh = torch.linalg.svd(D.double(), full_matrices=False)
        keep = int((S > S.max().clamp_min(1e-30) * 1e-7).sum()) if S.numel() else 0
        factors[layer] = (U[:, :keep] * S[:keep], Vh[:keep])
    k = max(1, max(B.shape[1] for B, _ in factors.values()))
    base = unwrap_base_copy(model)
    cfg = PLoRAConfig(rank=k, alpha=float(k), target_modules=sorted(factors), modules_to_save=list(model.plora_heads))
    export_model = get_plora_model(base, cfg)
    pairs = {}
    for layer, (B, A) in factors.items():
        Bk = torch.zeros(B.shape[0], k, dtype=torch.float64)
        Ak = torch.zeros(k, A.shape[1], dtype=torch.float64)
        Bk[:, : B.shape[1]], Ak[: A.shape[0]] = B, A
        dtype = dense[layer].dtype
        pairs[layer + A_SUFFIX], pairs[layer + B_SUFFIX] = Ak.to(dtype), Bk.to(dtype)
    set_plora_state_dict(export_model, pairs | heads)
    return export_peft_adapter(export_model, path, base_model_name_or_path)


class FLoRA(FederatedMethod):
    """FLoRA with a dense merged delta as the global state.

    State: per adapted layer D = s * (sum of every earlier round's stack), a
    d_out x d_in tensor in float32 or wider, plus the heads. This costs one extra
    copy of the adapted weights, but stays that size: stacked factors would grow
    by sum_i r_i pairs every round and outgrow it after d_in d_out / (d_in + d_out)
    pairs. Client i computes W0 + D (a base offset under the pairs, W0 kept
    pristine) and trains a fresh rank-r_i LoRA: A drawn with a generator seeded by
    (seed, round, cid, layer), B = 0, so it starts exactly at the global model.

    Downlink: D and the heads. Clients here keep nothing between rounds, so the
    server must send the merged weights; a client that kept its merged model would
    only need the previous round's stack, sum_i r_i (d_in + d_out) numbers a layer.
    The global model is not a rank-R LoRA, so it cannot be exported as one.
    Measuring its noise (always 0) forms D @ I: O(d_out d_in^2) a layer.
    """

    name = "flora"
    server_opt_refusal = "its clients train fresh adapters every round: no pairs carry over a round to step"
    space = "products"
    aggregators = ("mean", "norm_clip", "krum")
    aggregator_refusal = ("FLoRA's clients train fresh adapters with their own random A, so their factors share no "
                          "coordinates, and a coordinate-wise statistic of the products needs a dense d_out x d_in "
                          "matrix per client and layer")
    dp_refusal = ("it stacks the clients' fresh adapters into a dense d_out x d_in sum per layer, so there are no "
                  "shared pairs to sum and noise")
    secure_refusal = ("its server stacks every client's own fresh adapter, so it needs each client's pairs, "
                      "not their sum")

    # ------------------------------------------------------------ server side
    def init_state(self, model: nn.Module) -> State:
        state: State = {}
        for name, layer in plora_layers(model):
            dtype = torch.promote_types(layer.plora_A.dtype, torch.float32)
            state[name + DELTA_SUFFIX] = torch.zeros(layer.d_out, layer.d_in, dtype=dtype)  # global state: CPU
        full = get_plora_state_dict(model)
        state.update({k: full[k] for k in head_keys(full)})
        return state

    def configure_client(self, state: State, client: ClientInfo, server_round: int) -> ClientTask:
        config = {"rank": self.client_rank(client), "init_seed": [self.seed, server_round, client.cid]}
        return ClientTask(arrays=dict(state), config=config)

    def combine(self, state: State, tasks: list[ClientTask], updates: list[ClientUpdate], aggregator) -> State:
        """D gains the stacked weighted mean of the clients' products; a whole-client rule (``robust_flora``)
        instead where ``aggregator`` is one."""
        if aggregator.name != "mean":
            return self.robust_flora(state, updates, aggregator)
        weights = self.client_weights(updates)
        new: State = {}
        for layer, D in _deltas(state).items():
            B, A = stack_pairs(weights, updates, layer)  # the stacked global update of this round
            new[layer + DELTA_SUFFIX] = (D.double() + self.plora.scale * (B @ A)).to(D.dtype)
        new.update(average_heads(_heads(state), updates, weights))
        return new

    def robust_flora(self, state: State, updates: list[ClientUpdate], aggregator) -> State:
        """norm_clip or krum in product space (median and trimmed_mean are refused: ``aggregators``).

        Client i starts from B = 0, so its delta is s B_i A_i (plus its heads' deltas); norms and distances come
        from the factors. D gains s sum_i u_i c_i B_i A_i, stacked exactly as in ``aggregate``, with weights u_i
        (1/n, or 1/m over the Krum-selected) and clip scales c_i; the heads become global + sum_i u_i c_i delta_i.
        """
        s, heads = self.plora.scale, _heads(state)
        deltas = [ProductDelta({layer: [(s, u.arrays[layer + B_SUFFIX], u.arrays[layer + A_SUFFIX])]
                                for layer in _deltas(state)},
                               {k: u.arrays[k].double() - heads[k].double() for k in heads}) for u in updates]
        weights, scales = client_coefficients(aggregator, deltas)
        kept = [(w * c, u) for w, c, u in zip(weights, scales, updates) if w]
        new: State = {}
        for layer, D in _deltas(state).items():
            B, A = stack_pairs([wc for wc, _ in kept], [u for _, u in kept], layer)
            new[layer + DELTA_SUFFIX] = (D.double() + s * (B @ A)).to(D.dtype)
        for k, h in heads.items():
            step = sum(w * c * d.heads[k] for w, c, d in zip(weights, scales, deltas) if w)
            new[k] = (h.double() + step).to(h.dtype)
        return new

    # ------------------------------------------------------------ client side
    def fresh_A(self, task: ClientTask, layer_index: int, d_in: int, dtype: torch.dtype) -> torch.Tensor:
        """A client's fresh A of this round for one layer (R x d_in, rows beyond its rank zero): the seeded draw
        ``client_setup`` trains from and ``client_start_pairs`` measures."""
        A = torch.empty(self.rank, d_in, dtype=dtype)
        init_pairs_A_(A, self.plora.init_a, fresh_generator(task.config["init_seed"], layer_index))
        A[task.config["rank"]:] = 0
        return A

    def client_setup(self, model: nn.Module, task: ClientTask) -> None:
        rank = task.config["rank"]
        fresh = dict(_heads(task.arrays))
        for k, (name, layer) in enumerate(plora_layers(model)):
            A = self.fresh_A(task, k, layer.d_in, layer.plora_A.dtype)
            fresh[name + A_SUFFIX], fresh[name + B_SUFFIX] = A, torch.zeros(layer.d_out, self.rank, dtype=A.dtype)
            layer.set_base_offset(task.arrays[name + DELTA_SUFFIX])
        set_plora_state_dict(model, fresh)
        select_and_fold(model, range(rank))

    def client_update(self, model: nn.Module, task: ClientTask, num_samples: int) -> ClientUpdate:
        rank = task.config["rank"]
        return ClientUpdate(leading_pairs(get_plora_state_dict(model), rank), {"rank": rank}, num_samples)

    def expected_update_shapes(self, task: ClientTask, state: State) -> dict[str, tuple[int, ...]]:
        rank = task.config["rank"]
        shapes = {key: tuple(t.shape) for key, t in _heads(state).items()}
        for layer, D in _deltas(state).items():
            d_out, d_in = D.shape
            shapes[layer + A_SUFFIX], shapes[layer + B_SUFFIX] = (rank, d_in), (d_out, rank)
        return shapes

    # ------------------------------------------------------------ global model
    def load_global(self, model: nn.Module, state: State) -> None:
        """W0 + D with zero pairs: the merged model (the heads from the state)."""
        full = get_plora_state_dict(model)
        set_plora_state_dict(model, {k: torch.zeros_like(v) for k, v in full.items()} | _heads(state))
        for name, layer in plora_layers(model):
            layer.set_base_offset(state[name + DELTA_SUFFIX])
        select_and_fold(model, range(self.rank))

    def export_adapter(self, model: nn.Module, state: State, path, base_model_name_or_path: str | None = None):
        """D is not rank R: export it exactly as a PEFT LoRA of its numerical rank K (``export_dense``)."""
        return export_dense(model, _deltas(state), _heads(state), path, base_model_name_or_path)

    # ------------------------------------------------------------ measurement
    def global_factors(self, state: State) -> LayerFactors:
        return {layer: (D, torch.eye(D.shape[1], dtype=D.dtype, device=D.device))
                for layer, D in _deltas(state).items()}

    def client_start_factors(self, task: ClientTask) -> LayerFactors:
        return self.global_factors(task.arrays)  # fresh B = 0: the client starts at W0 + D

    def client_end_factors(self, task: ClientTask, update: ClientUpdate) -> LayerFactors:
        out = {}
        for layer, (D, eye) in self.global_factors(task.arrays).items():
            B, A = update.arrays[layer + B_SUFFIX], update.arrays[layer + A_SUFFIX]
            out[layer] = (torch.cat([D, self.plora.scale * B.to(D.dtype)], dim=1),
                          torch.cat([eye, A.to(D.dtype)], dim=0))
        return out

    # the paper's noise definitions (docs/method.md, "Measurements")
    def global_pairs(self, state: State) -> LayerPairs:
        """No global pairs: every earlier round is merged into D (which the client holds exactly), so the
        global adapter a client could continue from is empty (rank 0, zero-padded by the measure)."""
        return {layer: (D.new_zeros(0, D.shape[1]), D.new_zeros(D.shape[0], 0)) for layer, D in _deltas(state).items()}

    def client_start_pairs(self, task: ClientTask) -> LayerPairs:
        """The fresh rank-r_i adapter of ``client_setup`` (the same seeded A, B = 0), redrawn here."""
        rank, out = task.config["rank"], {}
        for k, (layer, D) in enumerate(_deltas(task.arrays).items()):
            A = self.fresh_A(task, k, D.shape[1], D.dtype)  # D's dtype is the pairs' master dtype
            out[layer] = (A[:rank], torch.zeros(D.shape[0], rank, dtype=D.dtype))
        return out

    def paper_ideal_factors(self, state: State, tasks: list[ClientTask], updates: list[ClientUpdate]) -> LayerFactors:
        """D + (1/v) sum_i s B_i A_i: the default's mean of the clients' end adapters, D stacked once not v times."""
        v, s, out = len(updates), self.plora.scale, {}
        for layer, (D, eye) in self.global_factors(state).items():
            Bs = [s / v * u.arrays[layer + B_SUFFIX].double() for u in updates]
            out[layer] = (torch.cat([D.double(), *Bs], dim=1),
                          torch.cat([eye.double(), *(u.arrays[layer + A_SUFFIX].double() for u in updates)], dim=0))
        return out
