"""FlexLoRA (Bai et al., NeurIPS 2024): average in product space, hand out SVD truncations."""

from __future__ import annotations

import torch

from .. import rng
from ..robust import ProductDelta, client_coefficients
from ..state import A_SUFFIX, B_SUFFIX, State, head_keys, layer_names
from .base import DEFAULT_WEIGHTING, ClientTask, ClientUpdate
from .pairs import LeadingPairsMethod, average_heads, stack_pairs


def _to_rank(US: torch.Tensor, V: torch.Tensor, rank: int,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r S_r, V_r^T) with exactly ``rank`` pairs.

    When the product has fewer singular directions than ``rank``, the extra pairs
    get B = 0 and A = random unit rows orthogonal to the others: they add nothing,
    yet a later client can still train them (an all-zero pair never could).
    """
    US, V = US[:, :rank], V[:, :rank]
    missing = rank - V.shape[1]
    if missing > 0:
        G = torch.randn(V.shape[0], missing, generator=generator, dtype=V.dtype).to(V.device)
        Q, _ = torch.linalg.qr(G - V @ (V.T @ G))
        V = torch.cat([V, Q], dim=1)
        US = torch.cat([US, US.new_zeros(US.shape[0], missing)], dim=1)
    return US, V.T


def svd_truncation(X: torch.Tensor, Y: torch.Tensor, rank: int, generator: torch.Generator):
    """Rank-``rank`` truncated SVD of X @ Y (d_out x K times K x d_in) without forming it.

    X = Qx Rx and Y^T = Qy Ry (thin QRs), so X @ Y = Qx (Rx Ry^T) Qy^T with
    orthonormal Qx, Qy: the SVD of the K x K middle gives the SVD of the product.
    """
    Qx, Rx = torch.linalg.qr(X)
    Qy, Ry = torch.linalg.qr(Y.T)
    U, S, Vh = torch.linalg.svd(Rx @ Ry.T, full_matrices=False)
    return _to_rank((Qx @ U) * S, Qy @ Vh.T, rank, generator)


def dense_svd_truncation(X: torch.Tensor, Y: torch.Tensor, rank: int, generator: torch.Generator):
    """Reference path: the SVD of the materialised d_out x d_in product."""
    U, S, Vh = torch.linalg.svd(X @ Y, full_matrices=False)
    return _to_rank(U * S, Vh.T, rank, generator)


class FlexLoRA(LeadingPairsMethod):
    """The server forms dW = sum_i w_i s B_i A_i (``weighting``)
    and keeps its rank-R truncated SVD as the global state: B = U_R S_R / s and
    A = V_R^T, so that s B A is the truncation under the common scale s.

    The pairs are stored in descending singular-value order, so client i's rank-r_i
    truncation of dW is just the first r_i pairs, and truncating to R first loses
    nothing for any client (r_i <= R). What it does lose is in the global model that
    is evaluated and exported, and it is measured as aggregation noise. Round 0's
    state is LoRA's init (dW = 0), whose first r_i pairs are a rank-r_i LoRA init.

    ``svd="qr"`` (default) never forms d_out x d_in: thin QRs of the stacked factors
    and the SVD of a K x K matrix, K = sum_i r_i. ``svd="dense"`` is the reference.
    """

    name = "flexlora"
    server_opt_refusal = ("its pairs are the SVD of each round's aggregate, re-based every round, so a pair carries "
                          "no identity from one round to the next for momentum to follow")
    space = "products"
    aggregators = ("mean", "norm_clip", "krum")
    aggregator_refusal = ("FlexLoRA combines the clients' products B_i A_i, and a coordinate-wise statistic of them "
                          "needs a dense d_out x d_in matrix per client and layer (of the factors it would not be "
                          "FlexLoRA)")
    dp_refusal = ("it aggregates the clients' products B_i A_i, so the Gaussian noise would go on a dense "
                  "d_out x d_in sum per layer, not on pairs")
    secure_refusal = ("its server takes the SVD of the sum of the clients' products B_i A_i, which a sum of their "
                      "factors does not give")

    def __init__(self, plora, weighting: str = DEFAULT_WEIGHTING, seed: int = 0, svd: str = "qr") -> None:
        super().__init__(plora, weighting, seed)
        if svd not in ("qr", "dense"):
            raise ValueError(f"svd must be 'qr' (stacked factors) or 'dense' (reference), got {svd!r}")
        self.svd = svd

    def combine(self, state: State, tasks: list[ClientTask], updates: list[ClientUpdate], aggregator) -> State:
        """The weighted product-space mean, truncated to rank R; a whole-client rule (``robust_flexlora``) instead
        where ``aggregator`` is one."""
        if aggregator.name != "mean":
            return self.robust_flexlora(state, tasks, updates, aggregator)
        weights, s = self.client_weights(updates), self.plora.scale
        truncate = svd_truncation if self.svd == "qr" else dense_svd_truncation
        generator = rng.torch_generator("svd", self.seed)
        new: State = {}
        for layer in layer_names(state):
            B, A = stack_pairs(weights, updates, layer)
            US, Vt = truncate(s * B, A, self.rank, generator)
            new[layer + A_SUFFIX] = Vt.to(state[layer + A_SUFFIX].dtype)
            new[layer + B_SUFFIX] = (US / s).to(state[layer + B_SUFFIX].dtype)
        new.update(average_heads(state, updates, weights))
        return new

    def robust_flexlora(self, state: State, tasks: list[ClientTask], updates: list[ClientUpdate], aggregator) -> State:
        """norm_clip or krum in product space (median and trimmed_mean are refused: ``aggregators``).

        Client i's delta is s (B_i A_i - B0_i A0_i), B0_i A0_i the rank-r_i truncation it was sent (its task's
        pairs), plus its heads' deltas; norms and distances come from the factors, never a d_out x d_in product.
        With per-client weights u_i (uniform: 1/n, or 1/m over the Krum-selected) and clip scales c_i the
        product-space average is dW = sum_i u_i s (B0_i A0_i + c_i (B_i A_i - B0_i A0_i)), stacked and truncated
        as in ``aggregate``; the heads become global + sum_i u_i c_i (head_i - global).
        """
        s = self.plora.scale
        deltas = [ProductDelta({layer: [(s, u.arrays[layer + B_SUFFIX], u.arrays[layer + A_SUFFIX]),
                                        (-s, t.arrays[layer + B_SUFFIX], t.arrays[layer + A_SUFFIX])]
                                for layer in layer_names(state)},
                               {k: u.arrays[k].double() - state[k].double() for k in head_keys(state)})
                  for t, u in zip(tasks, updates)]
        weights, scales = client_coefficients(aggregator, deltas)
        truncate = svd_truncation if self.svd == "qr" else dense_svd_truncation
        generator = rng.torch_generator("svd", self.seed)
        new: State = {}
        for layer in layer_names(state):
            Bs, As = [], []
            for w, c, t, u in zip(weights, scales, tasks, updates):
                if w == 0:
                    continue
                Bs.append(w * c * u.arrays[layer + B_SUFFIX].double())
                As.append(u.arrays[layer + A_SUFFIX].double())
                if c != 1:  # the start's share that the clipped delta leaves
                    Bs.append(w * (1 - c) * t.arrays[layer + B_SUFFIX].double())
                    As.append(t.arrays[layer + A_SUFFIX].double())
            US, Vt = truncate(s * torch.cat(Bs, dim=1), torch.cat(As, dim=0), self.rank, generator)
            new[layer + A_SUFFIX] = Vt.to(state[layer + A_SUFFIX].dtype)
            new[layer + B_SUFFIX] = (US / s).to(state[layer + B_SUFFIX].dtype)
        for k in head_keys(state):
            step = sum(w * c * d.heads[k] for w, c, d in zip(weights, scales, deltas) if w)
            new[k] = (state[k].double() + step).to(state[k].dtype)
        return new
