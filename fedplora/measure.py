"""Measurements every method reports the same way: noise and bytes.

Two noise families, named apart everywhere (history keys, tables, plots; docs/method.md):

* function level (``init_noise``, ``aggregation_noise``; history ``fn_init_noise``,
  ``fn_agg_noise``): distances between the functions the adapters compute, B A;
* the paper's (functions ``paper_init_noise``, ``paper_aggregation_noise``; history
  ``paper_init_noise``, ``paper_agg_noise``): initialization at the parameter level,
  sum_i (||A - A_i||_F + ||B - B_i||_F) with a rank-wise (zero-padded) subtraction,
  and aggregation ||dW* - dW||_F with the paper's uniform dW* (per pair over its
  trainers Q_j for Fed-PLoRA, ``per_pair_mean_of_products``).

Product noise is a Frobenius norm computed from factors: ``|| sum_k c_k B_k A_k ||_F``.
Small layers are materialised in float64; large ones use the Gram identity
``||X Y||_F^2 = <X^T X, Y Y^T>`` so a d_out x d_in matrix is never formed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

Factors = tuple[torch.Tensor, torch.Tensor]  # (B', A) with dW = B' @ A, scale folded into B'
LayerFactors = Mapping[str, Factors]
Pairs = tuple[torch.Tensor, torch.Tensor]  # (A, B) as stored and trained: r x d_in and d_out x r, no scale
LayerPairs = Mapping[str, Pairs]

# history keys of a round's entry; a history also keeps ``init_noise``/``agg_noise``: the function-level
# figures under the names used before the paper's were added (``LEGACY_NOISE_KEYS``, ``noise_of``)
# (every name ends in "noise", which is how ``fedplora study`` finds them)
NOISE_KEYS = {"fn_init_noise": "function-level initialization noise",
              "fn_agg_noise": "function-level aggregation noise",
              "paper_init_noise": "paper (parameter-level) initialization noise",
              "paper_agg_noise": "paper aggregation noise"}
LEGACY_NOISE_KEYS = {"fn_init_noise": "init_noise", "fn_agg_noise": "agg_noise"}

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


def noise_of(entry: Mapping, key: str) -> float:
    """A round's noise figure by its current name (``NOISE_KEYS``), also from histories written before the
    names split: their ``init_noise``/``agg_noise`` are the function-level figures; the paper's figures were
    not measured then (NaN)."""
    if key in entry:  # None: not measurable in that round (secure aggregation: ``noise_unavailable`` says why)
        return float("nan") if entry[key] is None else float(entry[key])
    if key in LEGACY_NOISE_KEYS and LEGACY_NOISE_KEYS[key] in entry:
        return float(entry[LEGACY_NOISE_KEYS[key]])
    return float("nan")


# ------------------------------------------------------------------ the paper's definitions
def padded_distance(global_pair: Pairs, start_pair: Pairs) -> float:
    """||A - A_i||_F + ||B - B_i||_F, the lower-rank side zero-padded to the other's rank (rank-wise subtraction)."""
    (A, B), (Ai, Bi) = global_pair, start_pair
    r = max(A.shape[0], Ai.shape[0])
    dA = _pad_rows(A.double(), r) - _pad_rows(Ai.double(), r)
    dB = _pad_rows(B.double().T, r) - _pad_rows(Bi.double().T, r)
    return float(torch.linalg.vector_norm(dA)) + float(torch.linalg.vector_norm(dB))


def _pad_rows(X: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([X, X.new_zeros(rows - X.shape[0], X.shape[1])]) if X.shape[0] < rows else X


def paper_init_noise(global_pairs: LayerPairs, client_starts: Iterable[LayerPairs]) -> float:
    """The paper's N_Init: sum over the round's clients i (a sum, not a mean) and over adapted layers of
    ||A - A_i||_F + ||B - B_i||_F, the parameters the client starts training from against the global ones."""
    return sum(padded_distance(global_pairs[layer], start[layer]) for start in client_starts for layer in start)


def paper_aggregation_noise(ideal: LayerFactors, formed: LayerFactors) -> float:
    """The paper's N_Agg = sum over layers of ||dW* - dW||_F, dW* given as factors (``mean_of_products`` or
    ``per_pair_mean_of_products``), dW = the global adapter the server formed."""
    total = 0.0
    for layer, (Bn, An) in formed.items():
        Bi, Ai = ideal[layer]
        total += norm_of_sum([(1.0, Bi, Ai), (-1.0, Bn, An)])
    return total


def mean_of_products(client_factors: list[LayerFactors]) -> dict[str, Factors]:
    """The paper's dW* = (1/v) sum_i B_i A_i as stacked factors [B_1/v | ... | B_v/v] [A_1; ...; A_v]."""
    v = len(client_factors)
    return {layer: (torch.cat([cf[layer][0].double() / v for cf in client_factors], dim=1),
                    torch.cat([cf[layer][1].double() for cf in client_factors], dim=0))
            for layer in client_factors[0]}


def per_pair_mean_of_products(old: Factors, trained: list[tuple[list[int], torch.Tensor, torch.Tensor]]) -> Factors:
    """Fed-PLoRA's dW* for one layer: sum_j (1/|Q_j|) sum_{i in Q_j} b_ij a_ij^T, as stacked factors.

    ``trained``: per client, (its pair indices, B_i' with those columns, A_i with those rows); ``old``:
    the layer's global (B', A) before the round, whose pairs no client trained stay in dW* as they were.
    Against the formed per-pair means b_j a_j^T (uniform weights) this leaves the per-pair covariance
    sum_j (1/|Q_j|) sum_{i in Q_j} (b_ij - b_j)(a_ij - a_j)^T.
    """
    B_old, A_old = old
    count = torch.zeros(A_old.shape[0], dtype=torch.float64)
    for idx, _, _ in trained:
        count[torch.as_tensor(idx, dtype=torch.long)] += 1
    Bs, As = [], []
    for idx, Bi, Ai in trained:
        Bs.append(Bi.double() / count[torch.as_tensor(idx, dtype=torch.long)][None, :])
        As.append(Ai.double())
    untouched = count == 0
    Bs.append(B_old.double()[:, untouched])
    As.append(A_old.double()[untouched])
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def nbytes(arrays: Mapping[str, torch.Tensor]) -> int:
    """Exact payload bytes of a set of arrays (what goes on the wire, before framing)."""
    return int(sum(t.numel() * t.element_size() for t in arrays.values()))
