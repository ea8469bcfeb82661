"""A seeded fuzz of malformed client replies, as an attacker would send them, against every method.

The server's path is the real one: ``HeteroLoRAStrategy.collect`` (``read_update``, then the method's
``validate_update``) and ``aggregate_train``. Replies are made from small hand-built states and honest
updates written here from each method's conventions (not from ``expected_update_shapes``, which is
under test). A reply's content is either a real Flower ``RecordDict`` (what travels) or a duck-typed
stand-in that lets any Python object reach the parser (what a buggy or hostile client library could
hand over). Every malformed reply, alone or with other faults, must be rejected with a one-line
reason naming the broken rule, the same rule for all five methods; honest replies, also in harmless
variants (strided tensors, extra finite metrics), must be accepted; and the global state must stay
bit-identical to a round without the malformed replies.
"""

from __future__ import annotations

import json
import math
import re
import types

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedplora import PLoRAConfig
from fedplora.config import RunConfig
from fedplora.federation.messages import update_content
from fedplora.federation.strategy import HeteroLoRAStrategy, RoundRecord, arrays_to_state
from fedplora.methods import ClientInfo, ClientUpdate, FedIT, FedPLoRA, FlexLoRA, FLoRA, HetLoRA, UpdateRejected

R = 4
CFG = PLoRAConfig(rank=R, alpha=8)
LAYERS = {"enc.0.query": (5, 6), "enc.1.value": (7, 5)}  # layer -> (d_out, d_in)
HEADS = {"cls.weight": (3, 5), "cls.bias": (3,)}
BUDGETS = [1, 2, 4, 3, 2, 1]  # the clients' budgets, by client id

VARIANTS = {
    **{f"fedplora-{sel}-{over}": (lambda sel=sel, over=over: FedPLoRA(CFG, seed=1, selection=sel, aggregate_over=over))
       for sel in ("shared", "per_layer", "fixed") for over in ("participants", "all")},
    "fedplora-drop": lambda: FedPLoRA(CFG, seed=1, unselected="drop"),
    "fedit-ideal": lambda: FedIT(CFG),
    "fedit-feasible": lambda: FedIT(CFG, variant="feasible", min_rank=1),
    "hetlora": lambda: HetLoRA(CFG),
    "flexlora": lambda: FlexLoRA(CFG),
    "flora": lambda: FLoRA(CFG, seed=3),
}


def _state(name: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    if name == "flora":
        state = {layer + ".flora_delta": torch.randn(o, i, generator=g) for layer, (o, i) in LAYERS.items()}
    else:
        state = {}
        for layer, (o, i) in LAYERS.items():
            state[layer + ".plora_A"] = torch.randn(R, i, generator=g)
            state[layer + ".plora_B"] = torch.randn(o, R, generator=g)
    return state | {k: torch.randn(shape, generator=g) for k, shape in HEADS.items()}


def _honest(name: str, task, state, g: torch.Generator) -> ClientUpdate:
    """What each method's ``client_update`` sends, by its conventions: Fed-PLoRA its assigned pairs and their
    indices; FedIT, HetLoRA and FlexLoRA the leading pairs and the rank; FLoRA a fresh rank-r adapter."""
    def noise(*shape):
        return 0.01 * torch.randn(shape, generator=g)

    arrays = {}
    if name.startswith("fedplora"):
        for layer, idx in task.config["indices"].items():
            A, B = state[layer + ".plora_A"], state[layer + ".plora_B"]
            arrays[layer + ".plora_A"] = A[idx] + noise(len(idx), A.shape[1])
            arrays[layer + ".plora_B"] = B[:, idx] + noise(B.shape[0], len(idx))
        config = {"indices": task.config["indices"]}
    else:
        r = task.config["rank"]
        for layer, (o, i) in LAYERS.items():
            if name == "flora":
                arrays[layer + ".plora_A"], arrays[layer + ".plora_B"] = torch.randn(r, i, generator=g), noise(o, r)
            else:
                arrays[layer + ".plora_A"] = state[layer + ".plora_A"][:r] + noise(r, i)
                arrays[layer + ".plora_B"] = state[layer + ".plora_B"][:, :r] + noise(o, r)
        config = {"rank": r}
    arrays |= {k: state[k] + noise(*shape) for k, shape in HEADS.items()}
    return ClientUpdate(arrays=arrays, config=json.loads(json.dumps(config)), num_samples=10 + 7 * task.config["rank"])


# ------------------------------------------------------------------------------------ replies and the server

class _Arrays:
    """An arrays record that hands over whatever it holds (a real ArrayRecord only carries numpy arrays)."""

    def __init__(self, arrays, fail=False):
        self.arrays, self.fail = arrays, fail

    def to_torch_state_dict(self):
        if self.fail:
            raise EOFError("truncated array bytes")
        return dict(self.arrays)


class _Reply:
    def __init__(self, node: int, content):
        self.metadata = types.SimpleNamespace(src_node_id=node)
        self.content = content

    def has_error(self):
        return False


def _raw(update: ClientUpdate, metrics: dict) -> dict:
    """A duck-typed reply content: arrays, config and count reach ``read_update`` as they are."""
    metrics = dict(metrics)
    if update.num_samples is not _MISSING:
        metrics["num-examples"] = update.num_samples
    config = update.config if isinstance(update.config, str) else json.dumps(update.config)
    return {"arrays": _Arrays(update.arrays), "config": {"update": config}, "metrics": metrics}


def _wire(update: ClientUpdate, metrics: dict) -> RecordDict | None:
    """The same reply as real Flower records, when they can carry it (else None)."""
    try:
        metrics = dict(metrics)
        if update.num_samples is not _MISSING:
            metrics["num-examples"] = update.num_samples
        arrays = ArrayRecord(torch_state_dict={k: v.detach().contiguous() for k, v in update.arrays.items()})
        config = update.config if isinstance(update.config, str) else json.dumps(update.config)
        return RecordDict({"arrays": arrays, "config": ConfigRecord({"update": config}),
                           "metrics": MetricRecord(metrics)})
    except Exception:
        return None


_MISSING = object()  # a count left out of the metrics record


class Round:
    """One method's server on a hand-made state, with a task for every client."""

    def __init__(self, name: str, seed: int = 0):
        self.name = name
        self.method = VARIANTS[name]()
        g = torch.Generator().manual_seed(seed)
        self.state = _state(name, g)
        self.snapshot = {k: v.clone() for k, v in self.state.items()}
        self.strategy = HeteroLoRAStrategy(self.method, RunConfig(rank=R, ranks=[1, 2, 4]))
        self.strategy.state = self.state
        self.tasks = {cid: self.method.configure_client(self.state, ClientInfo(cid, b, 10), 1)
                      for cid, b in enumerate(BUDGETS)}

    def honest(self, cid: int, seed: int) -> ClientUpdate:
        return _honest(self.name, self.tasks[cid], self.state, torch.Generator().manual_seed(seed))

    def collect(self, contents: dict[int, object]):
        """``contents``: cid -> reply content; the strategy's accepted replies and recorded failures."""
        self.strategy.record = RoundRecord(round=1)
        self.strategy._pending = {100 + cid: (cid, self.tasks[cid]) for cid in contents}
        accepted = self.strategy.collect([_Reply(100 + cid, c) for cid, c in contents.items()])
        return accepted, self.strategy.record.failures

    def aggregate(self, contents: dict[int, object]):
        """``aggregate_train`` on these replies: the new global arrays, or None when nothing was aggregated."""
        self.strategy.record = RoundRecord(round=1)
        self.strategy._pending = {100 + cid: (cid, self.tasks[cid]) for cid in contents}
        arrays, _ = self.strategy.aggregate_train(1, [_Reply(100 + cid, c) for cid, c in contents.items()])
        return arrays

    def unchanged(self) -> bool:
        return all(torch.equal(self.state[k], v) and self.state[k].dtype == v.dtype for k, v in self.snapshot.items())


# ------------------------------------------------------------------------------------ the faults

def _factor_keys(arrays):
    return sorted(k for k in arrays if k.endswith((".plora_A", ".plora_B")))


def _with(update: ClientUpdate, **changes) -> ClientUpdate:
    fields = {"arrays": update.arrays, "config": update.config, "num_samples": update.num_samples} | changes
    return ClientUpdate(**fields)


def _set_key(key_fn, value_fn):
    def fault(update, ctx):
        key = key_fn(update.arrays, ctx)
        return _with(update, arrays={**update.arrays, key: value_fn(update.arrays[key], ctx)}), key
    return fault


def _any_key(arrays, ctx):
    free = [k for k in sorted(arrays) if k not in ctx["used"]]
    return free[ctx["g"].integers(len(free))]


def _factor_key(arrays, ctx):
    free = [k for k in _factor_keys(arrays) if k not in ctx["used"]]
    return free[ctx["g"].integers(len(free))]


def _poke(value):
    def change(t, ctx):
        t = t.clone()
        t.reshape(-1)[ctx["g"].integers(t.numel())] = value  # a fresh tensor is contiguous: reshape is a view
        return t
    return change


def _drop(update, ctx):
    key = _any_key(update.arrays, ctx)
    return _with(update, arrays={k: v for k, v in update.arrays.items() if k != key}), key


def _rename(update, ctx):
    key = _any_key(update.arrays, ctx)
    new = ctx["g"].choice([key + "_", key.upper(), key.replace(".plora_", ".lora_"), " " + key])
    return _with(update, arrays={(new if k == key else k): v for k, v in update.arrays.items()}), key


def _extra(update, ctx):
    extra = ctx["g"].choice(["bert.pooler.dense.weight", "enc.0.query.flora_delta", "enc.2.query.plora_A", ""])
    return _with(update, arrays={**update.arrays, str(extra): torch.zeros(3, 3)}), None


def _cfg(fn):
    def fault(update, ctx):
        return _with(update, config=fn(dict(update.config), ctx["task"], ctx)), "config"
    return fault


def _count(value):
    return lambda update, ctx: (_with(update, num_samples=value), "count")


def _differing_indices(c, task, ctx):
    """Indices that are well formed (distinct, in range, at most the rank) yet not the task's."""
    r, own = task.config["rank"], task.config.get("indices")
    for _ in range(20):
        idx = {layer: sorted(ctx["g"].choice(R, size=r, replace=False).tolist()) for layer in LAYERS}
        if idx != own:
            return {**c, "indices": idx}
    return {**c, "indices": {layer: idx[:-1] for layer, idx in own.items()}}  # rank R: every pair is its own


SHAPE = r"expected shape"
DTYPE = r"expected float32 values \(the declared upload dtype\), got "
KEYS = r"update keys differ from the task"
CONFIG = r"declared|update config"
COUNT = r"num_samples must be a positive integer"
PARSE = r"malformed reply"

# name -> (rule the rejection must name, fault(update, ctx) -> (update, the key it used or None))
ARRAY_FAULTS = {
    "missing key": (KEYS, _drop),
    "extra key": (KEYS, _extra),
    "renamed key": (KEYS, _rename),
    "transposed": (SHAPE, _set_key(_factor_key, lambda t, c: t.T)),
    "one row more": (SHAPE, _set_key(_any_key, lambda t, c: torch.cat([t, t[:1]]))),
    "one row less": (SHAPE, _set_key(_any_key, lambda t, c: t[:-1])),
    "one column more": (SHAPE, _set_key(_factor_key, lambda t, c: torch.cat([t, t[:, :1]], 1))),
    "0-d": (SHAPE, _set_key(_any_key, lambda t, c: t.reshape(-1)[0].clone())),
    "empty": (SHAPE, _set_key(_any_key, lambda t, c: t[:0])),
    "flattened": (SHAPE, _set_key(_factor_key, lambda t, c: t.reshape(-1))),
    "extra dim": (SHAPE, _set_key(_any_key, lambda t, c: t.unsqueeze(0))),
    **{f"dtype {d}": (DTYPE + d.removeprefix("torch."), _set_key(_any_key, lambda t, c, d=d: t.to(getattr(torch, d))))
       for d in ("float16", "bfloat16", "float64", "int32", "int64", "uint8", "bool", "complex64")},
    "NaN": (r"contains NaN or Inf", _set_key(_any_key, _poke(math.nan))),
    "+Inf": (r"contains NaN or Inf", _set_key(_any_key, _poke(math.inf))),
    "-Inf": (r"contains NaN or Inf", _set_key(_any_key, _poke(-math.inf))),
    "one huge factor value": (r"values too large", _set_key(_factor_key, _poke(3.0e38))),
    "huge factors": (r"values too large", lambda u, c: (_with(u, arrays={  # finite, but B @ A overflows
        k: (v * 1e20 if k.endswith((".plora_A", ".plora_B")) and k not in c["used"] else v)
        for k, v in u.arrays.items()}), None)),
    "list": (PARSE + r": array .* is a list, not a tensor", _set_key(_any_key, lambda t, c: t.tolist())),
    "numpy array": (PARSE + r": array .* is a ndarray, not a tensor", _set_key(_any_key, lambda t, c: t.numpy())),
    "string": (PARSE + r": array .* is a str, not a tensor", _set_key(_any_key, lambda t, c: "0.1")),
    "None": (PARSE + r": array .* is a NoneType, not a tensor", _set_key(_any_key, lambda t, c: None)),
    "float": (PARSE + r": array .* is a float, not a tensor", _set_key(_any_key, lambda t, c: 0.5)),
    "meta tensor": (r"expected a dense tensor", _set_key(_any_key, lambda t, c: t.to("meta"))),
    "sparse tensor": (r"expected a dense tensor", _set_key(_any_key, lambda t, c: t.to_sparse())),
}
COUNT_FAULTS = {f"count {v!r}": (COUNT, _count(v)) for v in [
    0, -1, -(10**6), 2.5, 5.0, True, False, 10**30, 2**64 - 1, 2**63, 2**53 + 1, "5", "", None, [5], {"n": 5},
    np.int64(5), np.float64(5.0), math.nan, math.inf, -math.inf, _MISSING]}
CONFIG_FAULTS = {
    "config empty": (CONFIG, _cfg(lambda c, t, x: {})),
    "config extra key": (CONFIG, _cfg(lambda c, t, x: {**c, "junk": 1})),
    "config nested junk": (CONFIG, _cfg(lambda c, t, x: {**c, "x": [{"y": [None, {"z": 1.5}]}]})),
    "config init_seed": (CONFIG, _cfg(lambda c, t, x: {**c, "init_seed": [9, 1, 2]})),
    "rank one more": (CONFIG, _cfg(lambda c, t, x: {**c, "rank": t.config["rank"] + 1})),
    "rank one less": (CONFIG, _cfg(lambda c, t, x: {**c, "rank": t.config["rank"] - 1})),
    "rank beyond R": (CONFIG, _cfg(lambda c, t, x: {**c, "rank": R + 3})),
    "rank as float": (CONFIG, _cfg(lambda c, t, x: {**c, "rank": float(t.config["rank"])})),
    "rank as bool": (CONFIG, _cfg(lambda c, t, x: {**c, "rank": True})),
    "rank as string": (CONFIG, _cfg(lambda c, t, x: {**c, "rank": str(t.config["rank"])})),
    "rank null": (CONFIG, _cfg(lambda c, t, x: {**c, "rank": None})),
    "rank as list": (CONFIG, _cfg(lambda c, t, x: {**c, "rank": [t.config["rank"]]})),
    "indices differ": (CONFIG, _cfg(_differing_indices)),
    "indices repeated": (CONFIG, _cfg(lambda c, t, x: {**c, "indices": {la: [0] * (t.config["rank"] + 1) for la in LAYERS}})),
    "indices out of range": (CONFIG, _cfg(lambda c, t, x: {**c, "indices": {la: [R + i for i in range(t.config["rank"])] for la in LAYERS}})),
    "indices negative": (CONFIG, _cfg(lambda c, t, x: {**c, "indices": {la: [-1] for la in LAYERS}})),
    "indices as floats": (CONFIG, _cfg(lambda c, t, x: {**c, "indices": {la: [float(i) for i in range(t.config["rank"])] for la in LAYERS}})),
    "indices as bools": (CONFIG, _cfg(lambda c, t, x: {**c, "indices": {la: [True] for la in LAYERS}})),
    "indices too many": (CONFIG, _cfg(lambda c, t, x: {**c, "indices": {la: list(range(R)) for la in LAYERS}}
                                      if t.config["rank"] < R else {**c, "indices": {la: list(range(R)) + [R] for la in LAYERS}})),
    "indices layer missing": (CONFIG, _cfg(lambda c, t, x: {**c, "indices": {la: list(range(t.config["rank"])) for la in list(LAYERS)[:1]}})),
    "indices layer extra": (CONFIG, _cfg(lambda c, t, x: {**c, "indices": {**(c.get("indices") or {}), "enc.9.key": [0]}})),
    "indices a list": (CONFIG, _cfg(lambda c, t, x: {**c, "indices": [[0]]})),
    "indices null": (CONFIG, _cfg(lambda c, t, x: {**c, "indices": None})),
    "indices nested": (CONFIG, _cfg(lambda c, t, x: {**c, "indices": {la: [[0]] for la in LAYERS}})),
    "declaration swapped": (CONFIG, _cfg(lambda c, t, x: {"rank": t.config["rank"]} if "indices" in c else
                                         {"indices": {la: list(range(t.config["rank"])) for la in LAYERS}})),
    "config a list": (PARSE + r": update config is a list", _cfg(lambda c, t, x: [c])),
    "config a number": (PARSE + r": update config is a int", _cfg(lambda c, t, x: 3)),
    "config null": (PARSE + r": update config is a NoneType", _cfg(lambda c, t, x: None)),
    "config not JSON": (PARSE + r" \(JSONDecodeError", _cfg(lambda c, t, x: "{'rank': ")),
}
METRIC_FAULTS = {f"metric {k}={v!r}": (PARSE + r": metric .* is not a finite number",
                                       lambda u, c, k=k, v=v: (u, ("metric", k, v)))
                 for k, v in [("train_loss", math.nan), ("train_loss", math.inf), ("budget", -math.inf),
                              ("train_loss", "low"), ("budget", None), ("trained_pairs", True),
                              ("train_loss", [0.5, math.nan]), ("train_loss", {"a": 1})]}
# whole-content faults: (rule, content maker(honest update, honest metrics)); always alone
CONTENT_FAULTS = {
    "empty content": (PARSE, lambda u, m: {}),
    "content None": (PARSE, lambda u, m: None),
    "content a string": (PARSE, lambda u, m: "arrays"),
    "no arrays record": (PARSE, lambda u, m: {k: v for k, v in _raw(u, m).items() if k != "arrays"}),
    "no config record": (PARSE, lambda u, m: {k: v for k, v in _raw(u, m).items() if k != "config"}),
    "no metrics record": (PARSE, lambda u, m: {k: v for k, v in _raw(u, m).items() if k != "metrics"}),
    "config record without update": (PARSE, lambda u, m: {**_raw(u, m), "config": {"other": "{}"}}),
    "update not a string": (PARSE, lambda u, m: {**_raw(u, m), "config": {"update": 7}}),
    "arrays record raises": (PARSE, lambda u, m: {**_raw(u, m), "arrays": _Arrays({}, fail=True)}),
    "arrays record not a record": (PARSE, lambda u, m: {**_raw(u, m), "arrays": [1, 2]}),
    "metrics not a mapping": (PARSE, lambda u, m: {**_raw(u, m), "metrics": 5}),
    "wire: empty RecordDict": (PARSE, lambda u, m: RecordDict()),
    "wire: arrays only": (PARSE, lambda u, m: RecordDict({"arrays": ArrayRecord(torch_state_dict=u.arrays)})),
}
FAULTS = {**ARRAY_FAULTS, **COUNT_FAULTS, **CONFIG_FAULTS, **METRIC_FAULTS}
HONEST_METRICS = {"train_loss": 0.7, "train_s": 0.01, "cid": 0, "budget": 2, "trained_pairs": 2}

# harmless variants of an honest reply: all must be accepted
HARMLESS = {
    "as sent": lambda u: u,
    "non-contiguous": lambda u: _with(u, arrays={k: (v.T.contiguous().T if v.dim() == 2 else v) for k, v in u.arrays.items()}),
    "strided": lambda u: _with(u, arrays={k: torch.stack([v, v], -1)[..., 0] for k, v in u.arrays.items()}),
    "requires grad": lambda u: _with(u, arrays={k: v.clone().requires_grad_() for k, v in u.arrays.items()}),
    "negative zeros": lambda u: _with(u, arrays={k: torch.full_like(v, -0.0) for k, v in u.arrays.items()}),
    "keys reordered": lambda u: _with(u, arrays=dict(reversed(list(u.arrays.items())))),
    "config reordered": lambda u: _with(u, config=dict(reversed(list(u.config.items()))) | {
        k: dict(reversed(list(v.items()))) for k, v in u.config.items() if isinstance(v, dict)}),
    "one sample": lambda u: _with(u, num_samples=1),
    "2**53 samples": lambda u: _with(u, num_samples=2**53),
}


def _apply(names, update, task, g):
    """Apply faults in turn, each to a key no earlier one touched; returns the reply content and the metrics."""
    ctx = {"g": g, "task": task, "used": set()}
    metrics = dict(HONEST_METRICS)
    for name in names:
        update, used = FAULTS[name][1](update, ctx)
        if isinstance(used, tuple):  # a metric fault
            metrics[used[1]] = used[2]
        elif used is not None:
            ctx["used"].add(used)
    return update, metrics


def _one_line(reason):
    return isinstance(reason, str) and reason and "\n" not in reason and len(reason) < 400


# ------------------------------------------------------------------------------------ the tests

@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_honest_replies_and_harmless_variants_are_accepted(name):
    rnd = Round(name)
    for cid in rnd.tasks:
        for variant, change in HARMLESS.items():
            update = change(rnd.honest(cid, seed=cid))
            for content in (_raw(update, HONEST_METRICS), _wire(update, HONEST_METRICS)):
                if content is None:
                    continue
                accepted, failures = rnd.collect({cid: content})
                assert [a.cid for a in accepted] == [cid] and not failures, (variant, failures)
            rnd.method.validate_update(rnd.tasks[cid], update, rnd.state)
    assert rnd.unchanged()


def _check_rejected(rnd, cid, content, rules, label):
    accepted, failures = rnd.collect({cid: content})
    assert not accepted, f"{rnd.name}: {label} was accepted"
    (failure,) = failures
    assert failure["stage"] == "validate" and failure["cid"] == cid
    assert _one_line(failure["reason"]), failure
    assert any(re.search(rule, failure["reason"]) for rule in rules), f"{rnd.name}: {label}: {failure['reason']}"
    return failure["reason"]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_single_fault_is_rejected_naming_its_rule(name):
    rnd = Round(name)
    for k, (fault, (rule, _)) in enumerate(FAULTS.items()):
        cid = k % len(BUDGETS)
        update, metrics = _apply([fault], rnd.honest(cid, seed=k), rnd.tasks[cid], np.random.default_rng(k))
        for content in (_raw(update, metrics), _wire(update, metrics)):
            if content is not None:
                _check_rejected(rnd, cid, content, [rule], fault)
        if fault in ARRAY_FAULTS and isinstance(update.arrays, dict) and all(
                isinstance(v, torch.Tensor) for v in update.arrays.values()) or fault in COUNT_FAULTS:
            with pytest.raises(UpdateRejected, match=rule):  # the method's own check, without the strategy
                rnd.method.validate_update(rnd.tasks[cid], update, rnd.state)
        if fault in CONFIG_FAULTS and isinstance(update.config, dict):
            with pytest.raises(UpdateRejected, match=rule):
                rnd.method.validate_update(rnd.tasks[cid], update, rnd.state)
    for k, (fault, (rule, make)) in enumerate(CONTENT_FAULTS.items()):
        cid = k % len(BUDGETS)
        _check_rejected(rnd, cid, make(rnd.honest(cid, seed=k), HONEST_METRICS), [rule], fault)
    assert rnd.unchanged()


def test_the_same_fault_is_rejected_by_the_same_rule_in_every_method():
    """One fault, one rule: the rejection reasons of all variants name the same check, with the key, dtype or
    value that broke it, and read the same once the names of keys and numbers are set aside."""
    rounds = {name: Round(name) for name in VARIANTS}
    for k, fault in enumerate(FAULTS):
        reasons = {}
        for name, rnd in rounds.items():
            cid = 2  # budget 4 = R: every method's task has rank R and several pairs
            update, metrics = _apply([fault], rnd.honest(cid, seed=k), rnd.tasks[cid], np.random.default_rng(k))
            reasons[name] = _check_rejected(rnd, cid, _raw(update, metrics), [FAULTS[fault][0]], fault)
        shapes = {re.sub(r"'[^']*'|\[[^\]]*\]|\([^)]*\)|\{[^}]*\}|-?\d[\d.e+-]*|\b(fedplora|fedit|hetlora|flexlora|flora)\b|"
                         r"[\w.]+\.(plora_[AB]|weight|bias)", "_", r) for r in reasons.values()}
        if fault not in CONFIG_FAULTS:  # a config names what the method's replies declare (rank or indices)
            assert len(shapes) == 1, (fault, reasons)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_combined_faults_are_rejected_and_the_state_is_that_of_the_honest_replies(name):
    """Three honest clients and many broken ones in one round: random combinations of 2 or 3 faults (each on
    its own key), plus whole-content faults. Only the honest replies are accepted, every other one is
    recorded with a reason naming one of its faults, and the new state is bit-identical to the round
    without the broken replies."""
    rnd, g = Round(name, seed=5), np.random.default_rng(sum(map(ord, name)))
    names = sorted(FAULTS)
    honest_cids = [0, 2, 3]
    contents, rules = {}, {}
    cid = len(BUDGETS)
    for k in range(60):
        faults = list(g.choice(names, size=int(g.integers(2, 4)), replace=False))
        budget = int(g.choice(BUDGETS))
        rnd.tasks[cid] = rnd.method.configure_client(rnd.state, ClientInfo(cid, budget, 10), 1)
        try:
            update, metrics = _apply(faults, rnd.honest(cid, seed=1000 + k), rnd.tasks[cid], g)
        except (ValueError, IndexError, TypeError):  # a combination with nothing left to break (every key used)
            continue
        wire = _wire(update, metrics) if g.random() < 0.5 else None
        contents[cid], rules[cid] = wire or _raw(update, metrics), [FAULTS[f][0] for f in faults]
        cid += 1
    for k, (fault, (rule, make)) in enumerate(CONTENT_FAULTS.items()):
        rnd.tasks[cid] = rnd.method.configure_client(rnd.state, ClientInfo(cid, 2, 10), 1)
        contents[cid], rules[cid] = make(rnd.honest(cid, seed=2000 + k), HONEST_METRICS), [rule]
        cid += 1
    honest = {c: _wire(rnd.honest(c, seed=c), HONEST_METRICS) for c in honest_cids}

    accepted, failures = rnd.collect(honest | contents)
    assert [a.cid for a in accepted] == honest_cids
    assert sorted(f["cid"] for f in failures) == sorted(contents)
    for f in failures:
        assert f["stage"] == "validate" and _one_line(f["reason"])
        assert any(re.search(rule, f["reason"]) for rule in rules[f["cid"]]), (f["cid"], rules[f["cid"]], f["reason"])
    fuzzed = rnd.aggregate(honest | contents)
    assert rnd.unchanged()  # aggregation never edits the state it is given
    reference = rnd.aggregate(honest)
    assert fuzzed is not None and reference is not None
    fuzzed, reference = arrays_to_state(fuzzed), arrays_to_state(reference)
    assert fuzzed.keys() == reference.keys() == rnd.state.keys()
    for key in reference:
        assert fuzzed[key].dtype == reference[key].dtype and torch.equal(fuzzed[key], reference[key]), key
        assert torch.isfinite(fuzzed[key]).all(), key


def test_a_round_whose_aggregate_is_not_finite_leaves_the_state_unchanged(monkeypatch):
    """A last guard behind validation: a new state with NaN or Inf never replaces the global one."""
    rnd = Round("flora")
    honest = {0: _wire(rnd.honest(0, seed=0), HONEST_METRICS)}
    real = rnd.method.combine  # what the aggregation pipeline calls for a product-space method (FLoRA)

    def overflowing(state, tasks, updates, aggregator):
        new = real(state, tasks, updates, aggregator)
        return {**new, "cls.bias": torch.full_like(new["cls.bias"], math.inf)}

    monkeypatch.setattr(rnd.method, "combine", overflowing)
    assert rnd.aggregate(honest) is None and rnd.unchanged()
    assert rnd.strategy.record.failures[-1]["stage"] == "round"
    assert "cls.bias NaN or Inf" in rnd.strategy.record.failures[-1]["reason"]


def test_a_round_whose_aggregation_raises_fails_and_the_server_goes_on(monkeypatch):
    """Whatever aggregation raises (an SVD that does not converge, a method's bug) fails that round, with its reason;
    the global state stays and the server can run the next round."""
    rnd = Round("flexlora")
    honest = {0: _wire(rnd.honest(0, seed=0), HONEST_METRICS)}

    def broken(state, tasks, updates, aggregator):
        raise RuntimeError("linalg.svd: the algorithm failed to converge")

    monkeypatch.setattr(rnd.method, "combine", broken)
    assert rnd.aggregate(honest) is None and rnd.unchanged()
    failure = rnd.strategy.record.failures[-1]
    assert failure["stage"] == "round" and "aggregation failed (RuntimeError: linalg.svd" in failure["reason"]
    monkeypatch.undo()
    assert rnd.aggregate(honest) is not None  # the next round aggregates


def test_update_content_of_an_honest_reply_round_trips():
    """The client's own encoder (``update_content``) makes replies the server accepts, for every method."""
    for name in VARIANTS:
        rnd = Round(name)
        update = rnd.honest(1, seed=1)
        accepted, failures = rnd.collect({1: update_content(update, {"train_loss": 0.5})})
        assert [a.cid for a in accepted] == [1] and not failures, (name, failures)
