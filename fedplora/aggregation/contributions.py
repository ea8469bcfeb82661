"""What one client adds to a round, in the one fixed layout that every reducer and SecAgg+ share.

Why one layout: under secure aggregation the server sees only the element-wise sum of the clients' uploads, so
every client sends the same shape: per adapted layer all R pairs (its own weighted values where it has them,
zeros elsewhere), each pair's weight and trained-count indicator, and the heads. From the sums of these a pair
method recomputes exactly what its own mean is (``FederatedMethod.decode``). Once that is the secure path, it
may as well be the plain one too: the mean is the sum reducer, and only the reduction differs between plain,
robust, private and secure rounds (``reducers.py``).

A ``Contribution`` carries three views of one client's reply, each for the reducers that need it:

* ``values`` (the mean): in the layout, the client's value of every pair it counts for (its trained value, or
  for a client that counts with a zero change, the global value), zeros elsewhere; its per-pair weight
  (``.w``: 0 where it does not count) and trained indicator (``.count``); the heads likewise. The mean
  reducer computes sum_i (w_ij / W_j) value_ij, FedAvg's arithmetic exactly.
* ``sums`` (SecAgg+): what a client uploads under secure aggregation, the same layout with weighted changes
  from the global value instead of values (a method may upload something else, which its ``decode`` knows:
  HetLoRA uploads its norm-weighted zero-padded values). Their sum is what the server unmasks.
* ``deltas`` (robust rules, central DP): what the client changed, per unit it holds, unweighted: a pair as
  ``(layer, j) -> [a_j ; b_j]`` (A's row and B's column), a head as ``key -> tensor``. A method whose clients
  count with a zero change for pairs they did not train (Fed-PLoRA's ``aggregate_over = "all"``) holds those
  pairs too.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

from ..state import A_SUFFIX, B_SUFFIX, State, head_keys, layer_names

# the layout's extra keys, beside each layer's A and B and the heads
WEIGHT_SUFFIX = ".w"
COUNT_SUFFIX = ".count"
HEADS_WEIGHT = "heads.w"
HEADS_COUNT = "heads.count"


def layout(state: State, rank: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of a contribution, sorted: the same from the global state (server) and from a task's
    arrays (a client: fewer pairs, the same layer sizes). Per layer: A (R, d_in), B (d_out, R), ``.w`` and
    ``.count`` (R,); every head, and ``heads.w`` / ``heads.count`` (1,) when there are heads."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in layer_names(state):
        A, B = state[layer + A_SUFFIX], state[layer + B_SUFFIX]
        shapes[layer + A_SUFFIX] = (rank, int(A.shape[1]))
        shapes[layer + B_SUFFIX] = (int(B.shape[0]), rank)
        shapes[layer + WEIGHT_SUFFIX] = (rank,)
        shapes[layer + COUNT_SUFFIX] = (rank,)
    heads = head_keys(state)
    for key in heads:
        if key in shapes or key in (HEADS_WEIGHT, HEADS_COUNT):
            raise ValueError(f"the trainable {key!r} has the name of a weight or count key of the aggregation layout; "
                             "rename the module (or leave it out of modules_to_save)")
        shapes[key] = tuple(int(n) for n in state[key].shape)
    if heads:
        shapes[HEADS_WEIGHT], shapes[HEADS_COUNT] = (1,), (1,)
    return dict(sorted(shapes.items()))


def layout_keys(shapes: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str], list[str], list[str]]:
    """A layout's (layers, heads, weight keys, count keys): a head is whatever is neither a layer's pair nor a
    weight or count key, whatever its name ends with."""
    layers = [k[: -len(A_SUFFIX)] for k in shapes if k.endswith(A_SUFFIX)]
    weights = [layer + WEIGHT_SUFFIX for layer in layers] + ([HEADS_WEIGHT] if HEADS_WEIGHT in shapes else [])
    counts = [layer + COUNT_SUFFIX for layer in layers] + ([HEADS_COUNT] if HEADS_COUNT in shapes else [])
    extra = set(weights) | set(counts)
    heads = [k for k in shapes if not k.endswith((A_SUFFIX, B_SUFFIX)) and k not in extra]
    return layers, heads, weights, counts


def zeros(shapes: dict[str, tuple[int, ...]]) -> State:
    return {k: torch.zeros(shape, dtype=torch.float64) for k, shape in shapes.items()}


@dataclass
class Contribution:
    """One client's reply as the reducers see it (module docstring)."""

    values: State
    sums: State
    deltas: dict[Hashable, torch.Tensor]


MEAN, SUMS, STEPS = "mean", "sums", "steps"


@dataclass
class Reduced:
    """What a reducer returns, in the contribution layout, and which form it is in (the method decodes it).

    ``mean``: per pair the weighted mean of the clients' values, with the summed weights (``.w``) and trained
    counts (``.count``). ``sums``: the element-wise sum of the clients' ``Contribution.sums`` (SecAgg+).
    ``steps``: per pair (and head) the aggregate change itself, with weight 1 and count 1 where there is one
    (robust rules, central DP): the new value is the old one plus it.
    """

    sums: State
    form: str = SUMS


def pair_contribution(shapes: dict[str, tuple[int, ...]], starts: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      task_arrays: State, update_arrays: State, held: dict[str, list[int]], weight: float,
                      head_weight: float, everyone: bool = False, global_arrays: State | None = None) -> Contribution:
    """The contribution of a client that trained pairs ``held[layer]`` (the global index of each uploaded row of A
    and column of B, in order), starting from ``starts[layer]`` (those rows and columns as it was sent them); its
    heads started from ``task_arrays``.

    Its values and weight on those pairs, count 1 there, and their weighted changes; the heads likewise.
    ``everyone``: the client also counts, with its weight, for every pair it did not train, with a zero change
    (a zero delta unit too, so robust rules see it; its count stays 0) and, in the values, the global value
    (``global_arrays``: the server's state; on a client, which needs only ``sums``, None)."""
    values, sums, deltas = zeros(shapes), zeros(shapes), {}
    for layer, idx in held.items():
        a, b, i = layer + A_SUFFIX, layer + B_SUFFIX, torch.tensor(idx, dtype=torch.long)
        A, B = update_arrays[a].double(), update_arrays[b].double()
        dA, dB = A - starts[layer][0].double(), B - starts[layer][1].double()
        w, count = values[layer + WEIGHT_SUFFIX], values[layer + COUNT_SUFFIX]
        if everyone:
            if global_arrays is not None:
                values[a], values[b] = global_arrays[a].double().clone(), global_arrays[b].double().clone()
            w[:] = weight
        values[a][i], values[b][:, i] = A, B
        w[i], count[i] = weight, 1.0
        sums[a][i], sums[b][:, i] = weight * dA, weight * dB
        sums[layer + WEIGHT_SUFFIX], sums[layer + COUNT_SUFFIX] = w.clone(), count.clone()
        for row, j in enumerate(idx):
            deltas[(layer, j)] = torch.cat([dA[row], dB[:, row]])
        if everyone:
            width = dA.shape[1] + dB.shape[0]
            for j in range(shapes[a][0]):
                deltas.setdefault((layer, j), torch.zeros(width, dtype=torch.float64))
    heads = [k for k in layout_keys(shapes)[1] if k in update_arrays]
    for key in heads:
        h = update_arrays[key].double()
        d = h - task_arrays[key].double()
        values[key], sums[key], deltas[key] = h, head_weight * d, d
    if heads:
        for view in (values, sums):
            view[HEADS_WEIGHT][0], view[HEADS_COUNT][0] = head_weight, 1.0
    return Contribution(values, sums, deltas)


def apply_mean(state: State, means: State, defined_by: str = WEIGHT_SUFFIX) -> State:
    """The mean decode: pair j takes its mean value where it is defined (its summed weight above 0, or with
    ``defined_by=COUNT_SUFFIX`` its trained count), else keeps its value; the heads likewise. Cast back."""
    new: State = {}
    for layer in layer_names(state):
        a, b = layer + A_SUFFIX, layer + B_SUFFIX
        defined = (means[layer + defined_by] > 0) if defined_by == WEIGHT_SUFFIX else \
            (means[layer + COUNT_SUFFIX].round() > 0)
        A, B = means[a].clone(), means[b].clone()
        A[~defined], B[:, ~defined] = state[a][~defined].double(), state[b][:, ~defined].double()
        new[a], new[b] = A.to(state[a].dtype), B.to(state[b].dtype)
    heads = head_keys(state)
    defined = bool(heads) and round(float(means[HEADS_COUNT][0])) > 0
    new.update({k: means[k].to(state[k].dtype) if defined else state[k].clone() for k in heads})
    return {k: new[k] for k in state}


def deltas_in_layout(shapes: dict[str, tuple[int, ...]], deltas: dict[Hashable, torch.Tensor],
                     weight_on_held: float = 1.0) -> State:
    """Unit deltas scattered back into the layout (unweighted), ``.w`` = ``weight_on_held`` and ``.count`` = 1
    where a unit is present: a reducer's steps, or a central-DP upload under secure aggregation."""
    out = zeros(shapes)
    has_heads = False
    for key, d in deltas.items():
        if isinstance(key, tuple):
            layer, j = key
            d_in = shapes[layer + A_SUFFIX][1]
            out[layer + A_SUFFIX][j] = d[:d_in]
            out[layer + B_SUFFIX][:, j] = d[d_in:]
            out[layer + WEIGHT_SUFFIX][j] = weight_on_held
            out[layer + COUNT_SUFFIX][j] = 1.0
        else:
            out[key] = d
            has_heads = True
    if has_heads:
        out[HEADS_WEIGHT][0], out[HEADS_COUNT][0] = weight_on_held, 1.0
    return out


def apply_sums(state: State, sums: State) -> State:
    """The step decode: pair j moves by its summed weighted change over its summed weight where its count is
    above 0 (someone contributed), else keeps its value; the heads likewise. Float64, cast back."""
    new: State = {}
    for layer in layer_names(state):
        a, b = layer + A_SUFFIX, layer + B_SUFFIX
        weight, trained = sums[layer + WEIGHT_SUFFIX], sums[layer + COUNT_SUFFIX].round() > 0
        step = torch.where(trained, weight, torch.ones_like(weight))
        A, B = state[a].double().clone(), state[b].double().clone()
        A[trained] += sums[a][trained] / step[trained, None]
        B[:, trained] += sums[b][:, trained] / step[None, trained]
        new[a], new[b] = A.to(state[a].dtype), B.to(state[b].dtype)
    new.update(apply_heads(state, sums))
    return {k: new[k] for k in state}


def apply_heads(state: State, sums: State) -> State:
    """The heads from the sums: global + summed weighted change / summed weight (FedAvg with the clients' weights);
    unchanged when no contribution carried them."""
    heads = head_keys(state)
    if not heads or round(float(sums[HEADS_COUNT][0])) <= 0:
        return {k: state[k].clone() for k in heads}
    total = float(sums[HEADS_WEIGHT][0])
    return {k: (state[k].double() + sums[k] / total).to(state[k].dtype) for k in heads}
