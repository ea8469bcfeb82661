"""One round's aggregation as one path: encode each reply, reduce them, decode the result.

    update_i --method.encode--> contribution_i --reducer.reduce--> reduced --method.decode--> new state

The method holds its maths (what a reply contributes, what the reduced sums mean); the reducer (``reducers.py``)
is how clients are combined, chosen once per run (``reducer_for``). Plain, robust and private rounds go through
``aggregate``; a secure round is the same sum computed by SecAgg+ in Flower, so its server side is
``secure_decode`` of the unmasked sums and its client side ``secure_upload``. Product-space methods (FlexLoRA,
FLoRA) have no pair sums: ``aggregate`` hands them the reducer's rule for their own ``combine``.
"""

from __future__ import annotations

import torch

from ..privacy import CentralDP
from ..robust import AGGREGATORS, Aggregator
from ..state import A_SUFFIX, State
from .contributions import HEADS_COUNT, Reduced, layout, layout_keys
from .reducers import Mean, Private, Reducer, Robust, dp_upload
from .server_opt import ServerOptimizer, moved_pairs


def refusal(method, aggregator: str) -> str | None:
    """Why the rule ``aggregator`` is not defined for ``method`` (a class or instance; one line ending in what to
    use), or None. A method declares the rules it accepts (``aggregators``) and why not the others."""
    allowed = method.aggregators
    if aggregator in allowed:
        return None
    use = f"{', '.join(allowed[:-1])} or {allowed[-1]}" if len(allowed) > 1 else allowed[0]
    return f"aggregator {aggregator} is not defined for {method.name}: {method.aggregator_refusal}; use {use}"


def reducer_for(method, how: "Reducer | CentralDP | Aggregator | str | None" = None) -> Reducer:
    """The reducer for ``how`` (a reducer, central DP settings, a robust rule or its name; None: the mean), after
    checking that ``method`` defines it: what it does not raises one ValueError line, before any round."""
    if isinstance(how, (Private, CentralDP)):
        if method.dp_refusal:
            raise ValueError(f"central DP is not defined for {method.name}: {method.dp_refusal}")
        return how if isinstance(how, Private) else Private(how, method.dp_pair_counts(how))
    rule = how.aggregator if isinstance(how, Reducer) else Aggregator.of(how)
    if rule.name not in AGGREGATORS:
        raise ValueError(f"aggregator: must be one of {', '.join(AGGREGATORS)}, got {rule.name!r}")
    problem = refusal(method, rule.name)
    if problem:
        raise ValueError(problem)
    if isinstance(how, Reducer):
        return how
    return Mean() if rule.name == "mean" else Robust(rule)


def aggregate(method, state: State, tasks: list, updates: list, how=None,
              generator: torch.Generator | None = None, server_opt: ServerOptimizer | None = None) -> State:
    """The new global state from a round's valid replies (client-id order); a new dict, the old one untouched.

    ``how``: see ``reducer_for``. ``generator``: central DP's noise (a seeded stream per round,
    ``rng.torch_generator("dp_noise", seed, round)``). ``server_opt``: a server optimizer that steps towards the
    decoded aggregate (pair space only; ``server_opt.py``). No replies: the state unchanged.
    """
    reducer = reducer_for(method, how)
    if not updates:
        return dict(state)
    if server_opt is not None and not server_opt.identity and method.server_opt_refusal:
        raise ValueError(f"server optimizer {server_opt.name} is not defined for {method.name}: "
                         f"{method.server_opt_refusal}")
    if method.space == "products":
        return method.combine(state, tasks, updates, reducer.aggregator)
    if len(tasks) != len(updates):
        raise ValueError(f"aggregate: {len(updates)} updates but {len(tasks)} tasks; pass the task each update answers")
    wrong = next((k for k, v in state.items() if k.endswith(A_SUFFIX) and v.shape[0] != method.rank), None)
    if wrong is not None:
        raise ValueError(f"aggregate: the state holds {state[wrong].shape[0]} pairs in {wrong[: -len(A_SUFFIX)]}, "
                         f"the method's rank is {method.rank}")
    reduced = reducer.reduce(method.contributions(state, tasks, updates), generator)
    return optimize(state, method.decode(state, reduced), reduced, server_opt)


def optimize(state: State, new: State, reduced: Reduced, server_opt: ServerOptimizer | None) -> State:
    """The server optimizer's step towards the decoded aggregate, over the pairs someone contributed to."""
    if server_opt is None or server_opt.identity:
        return new
    return server_opt.step(state, new, moved_pairs(reduced.sums, state))


# ------------------------------------------------------------------ secure aggregation (docs/secure-aggregation.md)
def secure_upload(method, task, update, weight_scale: float, clip: float | None = None) -> State:
    """A client's fixed-shape SecAgg+ upload (float64, ``layout(task.arrays, R)``): its contribution's sums, with
    its sample weight as a share of the round's largest declared count (``weight_scale``), so every value stays
    inside SecAgg+'s clipping range. ``clip`` (central DP): its whole delta clipped here, on the client, and
    unweighted (``reducers.dp_upload``)."""
    contribution = method.encode(task, update, weight_scale)
    if clip is None:
        return contribution.sums
    return dp_upload(contribution, clip)


def secure_decode(method, state: State, sums: State, clients: int, reducer: Reducer,
                  generator: torch.Generator | None = None, server_opt: ServerOptimizer | None = None) -> State:
    """The new global state from the element-wise sum of ``clients`` secure uploads (the server never sees one):
    the method's decode of the sums, or with central DP the noisy release of the summed clipped deltas."""
    check_secure_sums(method, state, sums, clients)
    if isinstance(reducer, Private):
        reduced = reducer.release(layout(state, method.rank), sums, generator, residue=True)
    else:
        reduced = Reduced(sums)
    return optimize(state, method.decode(state, reduced), reduced, server_opt)


def check_secure_sums(method, state: State, sums: State, clients: int | None = None) -> None:
    """The unmasked sums have the layout's keys and shapes and finite values, and (given the number of summed
    uploads) every trained count is a whole number of them: each upload holds 0 or 1 per pair and exactly 1
    for the heads, so a count off by more than rounding means an upload declared another SecAgg+ weight or
    was not an encoding. Raise ValueError naming the key."""
    shapes = layout(state, method.rank)
    if set(sums) != set(shapes):
        raise ValueError(f"secure sums: keys differ from the layout (missing {sorted(set(shapes) - set(sums))[:3]}, "
                         f"unexpected {sorted(set(sums) - set(shapes))[:3]})")
    for key, shape in shapes.items():
        if tuple(sums[key].shape) != shape:
            raise ValueError(f"secure sums: {key} has shape {tuple(sums[key].shape)}, expected {shape}")
        if not bool(torch.isfinite(sums[key]).all()):
            raise ValueError(f"secure sums: {key} contains NaN or Inf")
    if clients is None:
        return
    _, _, weights, counts = layout_keys(shapes)
    for key in counts:
        count = sums[key]
        off = float((count - count.round()).abs().max())
        if off > 0.01 or float(count.min()) < -0.01 or float(count.max()) > clients + 0.01:
            raise ValueError(f"secure sums: {key} is not a count of at most {clients} uploads "
                             f"(range {float(count.min()):.4g}..{float(count.max()):.4g})")
        if key == HEADS_COUNT and round(float(count[0])) != clients:
            raise ValueError(f"secure sums: {clients} uploads were summed but {key} counts {float(count[0]):.4g}")
    bound = method.secure_weight_bound
    for w_key, c_key in zip(weights, counts):  # a weight steers the division: no negative, none 0 under a count
        w, trained = sums[w_key], sums[c_key].round() > 0
        if float(w.min()) < -0.01 or bool((w[trained] <= 0).any()) or (
                bound is not None and float(w.max()) > clients * bound + 0.01):
            raise ValueError(f"secure sums: {w_key} is not a sum of {clients} clients' weights (range "
                             f"{float(w.min()):.4g}..{float(w.max()):.4g}, positive where a pair was trained"
                             + (f", at most {bound:g} a client" if bound is not None else "") + ")")
