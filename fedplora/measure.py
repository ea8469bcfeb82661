"""Measurements every method reports the same way: noise and bytes.

Noise is a Frobenius distance between low-rank updates, computed from their
factors: ``|| sum_k c_k B_k A_k ||_F``. Small layers are materialised in float64;
large ones use the Gram identity ``||X Y||_F^2 = <X^T X, Y Y^T>`` so a
d_out x d_in matrix is never formed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

Factors = tuple[torch.Tensor, torch.Tensor]  # (B', A) with dW = B' @ A, scale folded into B'
LayerFactors = Mapping[str, Factors]

DENSE_LIMIT = 1 << 24  # entries of d_out x d_in we are happy to materialise


def norm_of_sum(terms: Iterable[tuple[float, torch.Tensor, torch.Tensor]]) -> float:
    """|| sum_k c_k B_k @ A_k ||_F in float64."""
    terms = [(c, B, A) for c, B, A in terms if B.shape[1] > 0]
    if not terms:
        return 0.0
    d_out, d_in = terms[0][1].shape[0], terms[0][2].shape[1]
    if d_out * d_in <= DENSE_LIMIT:
        total = torch.zeros(d_out, d_in, dtype=torch.float64)
        for c, B, A in terms:
            total += c * (B.double() @ A.double())
        return float(torch.linalg.matrix_norm(total))
    X = torch.cat([c * B.double() for c, B, _ in terms], dim=1)
    Y = torch.cat([A.double() for _, _, A in terms], dim=0)
    sq = float(((X.T @ X) * (Y @ Y.T)).sum())
    return max(sq, 0.0) ** 0.5


def init_noise(global_factors: LayerFactors, start_factors: LayerFactors) -> float:
    """sum over layers of ||dW_global - dW_client_start||_F."""
    total = 0.0
    for layer, (Bg, Ag) in global_factors.items():
        Bs, As = start_factors[layer]
        total += norm_of_sum([(1.0, Bg, Ag), (-1.0, Bs, As)])
    return total


def aggregation_noise(weights: list[float], client_factors: list[LayerFactors], formed: LayerFactors) -> float:
    """sum over layers of ||sum_i w_i B_i A_i - B_new A_new||_F (ideal product-space mean vs formed)."""
    total = 0.0
    for layer, (Bn, An) in formed.items():
        terms = [(w, *cf[layer]) for w, cf in zip(weights, client_factors)]
        total += norm_of_sum(terms + [(-1.0, Bn, An)])
    return total


def nbytes(arrays: Mapping[str, torch.Tensor]) -> int:
    """Exact payload bytes of a set of arrays (what goes on the wire, before framing)."""
    return int(sum(t.numel() * t.element_size() for t in arrays.values()))
