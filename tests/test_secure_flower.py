"""Secure aggregation through Flower's SecAgg+ (fedplora/federation/secure.py, docs/secure-aggregation.md).

In one process (the real ClientApp with its mods, Flower's real SecAggPlusWorkflow, messages copied as they would
be on the wire) and, marked slow, in the Simulation Engine.
"""

import copy

import numpy as np
import pytest
import torch
from flwr.app import Error, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedplora.config import ConfigError, RunConfig, secure_quantization_range
from fedplora.federation import client_app
from test_fault_tolerance import InProcessGrid, _rounds, _small_cfg, _strategy, in_process  # noqa: F401 (a fixture)


# ------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("settings, text", [
    (dict(method="flexlora"), "secure_aggregation: not defined for flexlora"),
    (dict(method="flora"), "secure_aggregation: not defined for flora"),
    (dict(aggregator="median"), "aggregator: median needs every client's own update"),
    (dict(aggregator="krum", min_replies=5, clients_per_round=5), "aggregator: krum needs every client's own update"),
    (dict(clients_per_round=2), "clients_per_round: secure aggregation needs at least 3 clients"),
    (dict(max_update_norm=10.0), "max_update_norm: the server cannot measure one client's update"),
    (dict(secure_quantization=2**31), "secure_quantization: 2147483648 levels for 4 clients can overflow"),
    (dict(secure_threshold=0.5), "secure_threshold: must be a number in (0.5, 1]"),
    (dict(secure_shares=0.0), "secure_shares: must be a number in (0, 1]"),
    (dict(secure_clip=float("inf")), "secure_clip: must be finite"),
])
def test_refusals_are_one_line_naming_the_setting(settings, text):
    base = dict(num_clients=10, clients_per_round=4, secure_aggregation=True)
    with pytest.raises(ConfigError) as e:
        RunConfig(**{**base, **settings}).validate()
    assert str(e.value).startswith(text) and "\n" not in str(e.value), str(e.value)


def test_settings_default_off_and_the_quantization_range_fits_the_modulus():
    assert RunConfig().validate().secure_aggregation is False
    with pytest.raises(ConfigError, match="secure_quantization: is set but secure_aggregation is off"):
        RunConfig(secure_quantization=1024).validate()
    for k in (3, 4, 7, 10, 100, 1000):
        q = secure_quantization_range(RunConfig(num_clients=1000, clients_per_round=k))
        assert q & (q - 1) == 0 and (k + 1) * q <= 2**32 < (k + 1) * 2 * q  # the largest such power of two
        assert q <= 2**30  # Flower's stochastic rounding casts to int32
    for method in ("fedplora", "fedit", "hetlora"):
        RunConfig(method=method, clients_per_round=3, secure_aggregation=True).validate()


# ------------------------------------------------------------------------------------ in one process
class SecureGrid(InProcessGrid):
    """The in-process grid through the real ClientApp (its mods, hence Flower's secaggplus_mod), each message a
    copy (as after the wire). Records every reply the server receives. ``leave(cid, stage, attempt)``: the client
    sends no reply from that SecAgg+ stage on (a dropout)."""

    def __init__(self, num_clients, leave=None):
        super().__init__(num_clients)
        self.leave = leave or (lambda cid, stage, attempt: False)
        self.received, self.gone = [], set()

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent += 1
            msg.metadata.__dict__["_message_id"] = f"m{self.sent}"
            wire = copy.deepcopy(msg)
            context = self.contexts[msg.metadata.dst_node_id]
            cid = int(context.node_config["partition-id"])
            configs = wire.content.config_records.get(RECORD_KEY_CONFIGS)
            if configs is not None:
                stage = configs["stage"]
                if stage == "setup":
                    self.gone.discard(cid)
                fit = wire.content.config_records.get("fitins.config")
                if cid in self.gone or self.leave(cid, stage, int(fit["attempt"]) if fit else None):
                    self.gone.add(cid)
                    continue
            try:
                reply = client_app.app(wire, context)
            except Exception as e:  # what Flower sends back when a ClientApp raises
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=wire)
            reply = copy.deepcopy(reply)
            self.received.append(reply)
            replies.append(reply)
        return replies


def _secure(cfg, **kw):
    return cfg.with_overrides(secure_aggregation=True, **kw).validate()


def _bound(cfg, clients, plain, min_weight):
    """The quantization bound on one coordinate of a per-pair mean: each of the K summed values is off by less
    than one level 2c/q (stochastic rounding), so the sum S and the weight W by at most K levels each, and
    |S'/W' - S/W| <= K * level * (1 + |S/W|) / W, to first order (doubled for the second order and float32)."""
    level = 2 * cfg.secure_clip / secure_quantization_range(cfg)
    return 2 * clients * level * (1 + plain.abs().max().item()) / min_weight


@pytest.mark.parametrize("options", [dict(), dict(aggregate_over="all", weighting="samples")])
def test_secure_round_equals_the_plain_aggregation_within_the_quantization_bound(tiny_assets, in_process, options):
    cfg = _small_cfg(tiny_assets, rounds=1, local_steps=1, **options)
    plain, _ = _rounds(cfg, InProcessGrid(cfg.num_clients))
    secure_cfg = _secure(cfg)
    state, (entry,) = _rounds(secure_cfg, SecureGrid(cfg.num_clients))
    again, _ = _rounds(secure_cfg, SecureGrid(cfg.num_clients))
    assert entry["aggregated"] and entry["secure"] and entry["survivors"] == 4 and entry["dropouts"] == []
    sizes = [c["num_samples"] for c in entry["clients"]]
    min_weight = min(sizes) / max(sizes) if cfg.weighting == "samples" else 1.0
    for key, value in plain.items():
        diff = (state[key].double() - value.double())
        assert diff.abs().max().item() <= _bound(secure_cfg, 4, value.double(), min_weight), key
        assert diff.norm().item() <= 1e-4 * max(value.double().norm().item(), 1e-12), key
        assert torch.equal(again[key], state[key]), key  # seeded stochastic rounding: reproducible bit for bit
    # the history: noise that needs each client's update is unavailable, never faked; traffic counted
    assert entry["fn_agg_noise"] is None and entry["paper_agg_noise"] is None and entry["agg_noise"] is None
    from fedplora.federation.progress import noise_line

    assert noise_line(entry).count("agg n/a") == 2  # the console says so, rather than nan
    assert "never holds" in entry["noise_unavailable"]["fn_agg_noise"]
    assert entry["fn_init_noise"] == 0.0 and entry["paper_init_noise"] == 0.0  # Select-N-Fold starts at the global
    assert all(c["secure_clipped"] == 0 and c["train_loss"] is not None for c in entry["clients"])
    assert entry["bytes_up"] == sum(c["bytes_up"] for c in entry["clients"]) > 0
    assert entry["bytes_down"] == sum(c["bytes_down"] for c in entry["clients"]) > 0


@pytest.mark.parametrize("options", [
    dict(method="fedit"), dict(method="hetlora", weighting="samples", secure_clip=1.0),
    dict(method="fedplora", dp_mode="central", dp_clip=0.05, dp_noise_multiplier=0.5),
    dict(method="hetlora", dp_mode="central", dp_clip=0.05, dp_noise_multiplier=0.5),
], ids=["fedit", "hetlora-samples", "fedplora-central-dp", "hetlora-central-dp"])
def test_fedit_hetlora_and_central_dp_under_secure_aggregation_match_their_plain_rounds(tiny_assets, in_process,
                                                                                        options):
    """Two rounds (round 2 starts from a trained B, so HetLoRA's norm weights differ from client to client).
    Central DP: the clients clip (the server has no update to clip), the server adds the same seeded noise to
    the unmasked sums: the release equals the plain run's, where the server clipped. HetLoRA's weights are the
    clients' ||B_i A_i||_F, small in this tiny model after one step: an absolute quantization error becomes a
    relative one of K * level / sum of weights, so it runs with a smaller clip range (docs/secure-aggregation.md)."""
    cfg = _small_cfg(tiny_assets, rounds=2, local_steps=1, **options)
    plain, plain_history = _rounds(cfg, InProcessGrid(cfg.num_clients))
    state, history = _rounds(_secure(cfg), SecureGrid(cfg.num_clients))
    assert all(h["aggregated"] and h["secure"] and h["survivors"] == 4 for h in history)
    if cfg.dp_mode == "central":
        assert [h["dp_epsilon"] for h in history] == [h["dp_epsilon"] for h in plain_history]
    for key, value in plain.items():
        diff = (state[key].double() - value.double()).norm().item()
        assert diff <= 1e-4 * max(value.double().norm().item(), 1e-12), (key, diff)


def test_the_server_never_holds_a_clients_pairs(tiny_assets, in_process, monkeypatch):
    from fedplora.aggregation import secure_upload
    from fedplora.federation import secure, strategy

    encoded = []  # what the clients encoded (client side, before masking): for checking the unmasked sum only
    real_encode = client_app.secure_reply

    def spy_reply(cfg, method, task, update, metrics, layout, weight_scale):
        encoded.append(secure_upload(method, task, update, weight_scale, None))
        return real_encode(cfg, method, task, update, metrics, layout, weight_scale)

    seen = []  # every (results) the legacy adapter's aggregate_fit is handed
    real_aggregate_fit = secure.SecureRoundStrategy.aggregate_fit

    def spy_aggregate_fit(self, server_round, results, failures):
        seen.append([(proxy.node_id, fitres) for proxy, fitres in results])
        return real_aggregate_fit(self, server_round, results, failures)

    def never(*args, **kwargs):
        raise AssertionError("the plain path ran under secure aggregation")

    monkeypatch.setattr(client_app, "secure_reply", spy_reply)
    monkeypatch.setattr(secure.SecureRoundStrategy, "aggregate_fit", spy_aggregate_fit)
    monkeypatch.setattr(strategy.HeteroLoRAStrategy, "collect", never)
    monkeypatch.setattr(strategy.HeteroLoRAStrategy, "aggregate_train", never)
    cfg = _secure(_small_cfg(tiny_assets, rounds=1, local_steps=1))
    grid = SecureGrid(cfg.num_clients)
    _, (entry,) = _rounds(cfg, grid)
    assert entry["aggregated"] and len(encoded) == 4

    # every reply that reached the server: no array carries a value (the FitRes arrays are emptied by
    # secaggplus_mod); the upload is a masked integer vector in the SecAgg+ config record
    train_replies = [r for r in grid.received if RECORD_KEY_CONFIGS in r.content.config_records]
    assert len(train_replies) == 4 * 4  # four stages, four clients
    for reply in grid.received:
        for record in reply.content.array_records.values():
            assert all(len(a.data) == 0 for a in record.values()) or len(record) == 0
    masked = [r for r in train_replies if Key.MASKED_PARAMETERS in r.content.config_records[RECORD_KEY_CONFIGS]]
    assert len(masked) == 4
    from flwr.common import bytes_to_ndarray

    for reply, enc in zip(masked, encoded):
        vec = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        assert all(np.issubdtype(v.dtype, np.integer) for v in vec)  # integers mod 2**32, not floats

    # aggregate_fit was called once, and every result carried one and the same array list: the unmasked mean
    (results,) = seen
    assert len(results) == 4 and len({id(f.parameters) for _, f in results}) == 1
    from flwr.common import parameters_to_ndarrays

    mean = parameters_to_ndarrays(results[0][1].parameters)
    total = {k: sum(e[k] for e in encoded) for k in encoded[0]}
    level = 2 * cfg.secure_clip / secure_quantization_range(cfg)
    for value, key in zip(mean, total):  # the layout order
        assert np.abs(value * 4 - total[key].numpy()).max() <= 4 * level, key
        # no client's own pairs are what the server got: it got the mean. (Where every client uploads the same
        # values the sum reveals them anyway: round 1's A deltas are all zero, B being zero at the start.)
        if key.endswith((".plora_A", ".plora_B")) and len({e[key].numpy().tobytes() for e in encoded}) > 1:
            assert not any(np.allclose(value, enc[key].numpy(), atol=level) for enc in encoded), key


def _leave_in(stage, cids):
    return lambda cid, s, attempt: s == stage and cid in cids


def test_dropouts_within_the_threshold_still_aggregate_the_survivors(tiny_assets, in_process):
    # one client leaves after sending its masked vector (unmask stage): its vector is in the sum, its masks
    # are rebuilt from the others' shares
    cfg = _secure(_small_cfg(tiny_assets, rounds=1, local_steps=1))
    plain, _ = _rounds(cfg.with_overrides(secure_aggregation=False), InProcessGrid(4))
    state, (entry,) = _rounds(cfg, SecureGrid(4, _leave_in("unmask", {2})))
    assert entry["aggregated"] and entry["survivors"] == 4 and entry["dropouts"] == [2]
    assert [(f["cid"], f["stage"]) for f in entry["failures"]] == [(2, "secure:unmask")]
    for key, value in plain.items():
        assert (state[key].double() - value.double()).norm() <= 1e-4 * max(value.double().norm(), 1e-12)

    # 30% of a round's clients fail mid-protocol (injected failures raise while training, in SecAgg+'s stage 2):
    # the 7 survivors are aggregated, exactly as a plain round aggregates them
    cfg = _secure(_small_cfg(tiny_assets, rounds=1, local_steps=1, num_clients=10, clients_per_round=10,
                             fail_fraction=0.3))
    plain, (plain_entry,) = _rounds(cfg.with_overrides(secure_aggregation=False), InProcessGrid(10))
    state, (entry,) = _rounds(cfg, SecureGrid(10))
    down = [c for c in range(10) if client_app.injected_failure(cfg, 1, 0, c)]
    assert len(down) == 3 and entry["aggregated"] and entry["dropouts"] == down
    assert [c["cid"] for c in entry["clients"]] == [c["cid"] for c in plain_entry["clients"]]
    assert [(f["cid"], f["stage"]) for f in entry["failures"]] == [(c, "secure:collect_masked_vectors") for c in down]
    assert all("injected failure" in f["reason"] for f in entry["failures"])
    for key, value in plain.items():
        assert (state[key].double() - value.double()).norm() <= 1e-4 * max(value.double().norm(), 1e-12)


def test_too_many_dropouts_skip_or_retry_the_round_and_never_touch_the_state(tiny_assets, in_process):
    from fedplora.federation.strategy import arrays_to_state

    cfg = _secure(_small_cfg(tiny_assets, rounds=1, local_steps=1, num_clients=10, clients_per_round=10,
                             fail_fraction=0.4))  # 6 of 10 left, the threshold is 7
    grid = SecureGrid(10)
    before = arrays_to_state(_strategy(cfg, grid)[1])
    state, (entry,) = _rounds(cfg, grid)
    assert not entry["aggregated"] and entry["attempts"] == 1
    assert "halted at stage collect_masked_vectors: 6 of the round's 10 clients left, SecAgg+ needs 7" in \
        entry["failures"][-1]["reason"]
    assert all(torch.equal(state[k], before[k]) for k in before)

    retry = cfg.with_overrides(on_too_few_replies="retry", max_round_retries=1)
    state, (entry,) = _rounds(retry, SecureGrid(10))
    assert not entry["aggregated"] and entry["attempts"] == 2
    assert sum(f["cid"] is None for f in entry["failures"]) == 2  # each attempt halted, recorded
    assert all(torch.equal(state[k], before[k]) for k in before)

    # a malformed masked vector makes Flower raise: recorded, the round skipped, the server goes on
    cfg = _secure(_small_cfg(tiny_assets, rounds=1, local_steps=1))
    grid = SecureGrid(4)
    real = grid.send_and_receive

    def broken(messages, *, timeout=None):
        replies = real(messages, timeout=timeout)
        for r in replies:
            configs = r.content.config_records.get(RECORD_KEY_CONFIGS)
            if configs is not None and Key.MASKED_PARAMETERS in configs and r.metadata.src_node_id == 101:
                configs[Key.MASKED_PARAMETERS] = [b"not an array"]
        return replies

    grid.send_and_receive = broken
    state, (entry,) = _rounds(cfg, grid)
    assert not entry["aggregated"] and "secure aggregation failed" in entry["failures"][-1]["reason"]
    assert all(torch.equal(state[k], before[k]) for k in before if k in state)


def test_local_dp_under_secure_aggregation(tiny_assets, in_process):
    cfg = _secure(_small_cfg(tiny_assets, rounds=1, local_steps=1, dp_mode="local", dp_clip=1.0,
                             dp_noise_multiplier=0.5))
    plain, (plain_entry,) = _rounds(cfg.with_overrides(secure_aggregation=False), InProcessGrid(4))
    state, (entry,) = _rounds(cfg, SecureGrid(4))
    assert entry["aggregated"] and entry["dp_epsilon"] == plain_entry["dp_epsilon"] > 0
    for key, value in plain.items():
        assert (state[key].double() - value.double()).norm() <= 1e-4 * max(value.double().norm(), 1e-12)


def test_resume_from_a_checkpoint_with_secure_aggregation(tiny_assets, in_process, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from fedplora.federation import server_app

    cfg = _secure(_small_cfg(tiny_assets, rounds=2, local_steps=1, eval_max_examples=8, checkpoint_every=1))
    ref = server_app.run_federation(SecureGrid(4), cfg.with_overrides(out=str(tmp_path / "ref")), tmp_path / "ref")

    class Stop(Exception):
        pass

    real_save = server_app.save_checkpoint

    def save_then_stop(out, rnd, *args, **kwargs):
        real_save(out, rnd, *args, **kwargs)
        if rnd == 1:
            raise Stop

    run = cfg.with_overrides(out=str(tmp_path / "run"))
    monkeypatch.setattr(server_app, "save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        server_app.run_federation(SecureGrid(4), run, tmp_path / "run")
    monkeypatch.setattr(server_app, "save_checkpoint", real_save)
    resumed = server_app.run_federation(SecureGrid(4), run, tmp_path / "run", resume=True)
    from fedplora.federation.strategy import untimed

    assert [untimed(h) for h in resumed["history"]] == [untimed(h) for h in ref["history"]]
    assert all(h.get("secure") for h in resumed["history"][1:])
    a, b = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (tmp_path / "ref", tmp_path / "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -------------------------------------------------------------------------------- the Simulation Engine
@pytest.mark.slow
def test_simulation_engine_secure_round_equals_the_plain_one(tiny_assets, tmp_path, in_process):
    """The secure round in Flower's Simulation Engine (its own processes: SuperLink, Ray actors) against the plain
    round computed by the same strategy and ClientApp code in this process (one Simulation Engine run, not two,
    to keep CI short): the global states agree within 1e-4."""
    from safetensors.torch import load_file

    from fedplora.federation.simulation import run_simulation

    cfg = _small_cfg(tiny_assets, rounds=1, local_steps=1, eval_max_examples=8, clients_per_round=3)
    plain, (plain_entry,) = _rounds(cfg, InProcessGrid(cfg.num_clients))
    secure = run_simulation(_secure(cfg, out=str(tmp_path / "secure")), tmp_path / "secure")
    (entry,) = secure["history"][1:]
    assert entry["secure"] and entry["aggregated"] and entry["survivors"] == 3 and entry["fn_agg_noise"] is None
    assert [c["cid"] for c in entry["clients"]] == [c["cid"] for c in plain_entry["clients"]]
    assert entry["bytes_up"] > 0 and entry["bytes_down"] > 0
    state = load_file(str(tmp_path / "secure" / "checkpoint" / "state-r00001.safetensors"))
    assert state.keys() == plain.keys()
    for key, value in plain.items():
        diff = (state[key].double() - value.double()).norm()
        assert diff <= 1e-4 * max(value.double().norm(), 1e-12), key
