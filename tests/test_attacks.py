"""Byzantine clients (fedplora/federation/attacks.py): who attacks, what each attack uploads, that validation
alone lets every attacked upload through, and the server's check of claimed sample counts."""

import pytest
import torch

from conftest import tiny_bert
from fedplora import ClientInfo, ClientUpdate, PLoRAConfig, get_plora_model, make_method
from fedplora import rng
from fedplora.config import ConfigError, RunConfig
from fedplora.federation.attacks import (
    DEFAULT_STRENGTH, attack_update, attackers, check_task, flip_labels, poisoned_data, strength,
)

CFG = PLoRAConfig(rank=4, alpha=8)


# ---------------------------------------------------------------- who attacks


def test_attackers_are_seeded_fixed_and_the_fraction_of_all_clients():
    cfg = RunConfig(num_clients=10, byzantine_fraction=0.3, seed=5)
    first = attackers(cfg)
    assert len(first) == 3 and first <= set(range(10))
    assert attackers(cfg) == first  # fixed: the set has no round, so every round (and process) sees it
    assert attackers(RunConfig(num_clients=10, byzantine_fraction=0.3, seed=5, rounds=40)) == first
    assert len({frozenset(attackers(RunConfig(num_clients=10, byzantine_fraction=0.3, seed=s)))
                for s in range(20)}) > 5  # the seed picks them
    assert attackers(RunConfig(num_clients=10)) == set()
    assert attackers(RunConfig(num_clients=10, byzantine_fraction=1.0)) == set(range(10))
    assert len(attackers(RunConfig(num_clients=7, byzantine_fraction=0.5))) == round(3.5)
    # its own stream: turning attacks on shifts no other draw (the failure injector's, say)
    assert "byzantine" in rng.STREAMS and "attack_noise" in rng.STREAMS


# ---------------------------------------------------------------- each attack on a hand-made upload


def _upload():
    start = {"L.plora_A": torch.tensor([[1.0, 2.0]]), "L.plora_B": torch.tensor([[0.0], [0.0]]),
             "head.w": torch.tensor([0.5])}
    honest = {"L.plora_A": torch.tensor([[1.5, 1.0]]), "L.plora_B": torch.tensor([[0.25], [-0.5]]),
              "head.w": torch.tensor([1.0])}
    return start, ClientUpdate(honest, {"rank": 1}, num_samples=7)


def _run(attack, s=None, rnd=2, cid=3):
    start, honest = _upload()
    cfg = RunConfig(byzantine_fraction=0.5, attack=attack, attack_strength=s, seed=9).validate()
    return start, honest, attack_update(cfg, rnd, cid, honest, start)


def test_sign_flip_reverses_the_honest_step_heads_included():
    _, honest, out = _run("sign_flip")  # start - 1 * (honest - start) = 2 start - honest
    assert torch.equal(out.arrays["L.plora_A"], torch.tensor([[0.5, 3.0]]))
    assert torch.equal(out.arrays["L.plora_B"], torch.tensor([[-0.25], [0.5]]))
    assert torch.equal(out.arrays["head.w"], torch.tensor([0.0]))
    assert out.num_samples == 7 and out.config == {"rank": 1} and list(out.arrays) == list(honest.arrays)
    _, _, twice = _run("sign_flip", 2.0)
    assert torch.equal(twice.arrays["L.plora_A"], torch.tensor([[0.0, 4.0]]))


def test_scale_boosts_the_honest_step_and_stays_finite():
    _, _, out = _run("scale")  # start + 100 (honest - start)
    assert torch.equal(out.arrays["L.plora_A"], torch.tensor([[51.0, -98.0]]))
    assert torch.equal(out.arrays["L.plora_B"], torch.tensor([[25.0], [-50.0]]))
    assert torch.equal(out.arrays["head.w"], torch.tensor([50.5]))
    _, _, huge = _run("scale", 1e300)  # float32 would overflow to Inf, which validation rejects: clamped
    top = torch.finfo(torch.float32).max
    assert all(bool(torch.isfinite(t).all()) and t.dtype == torch.float32 for t in huge.arrays.values())
    assert huge.arrays["L.plora_A"].tolist() == [[top, -top]]


def test_noise_adds_seeded_gaussian_noise_to_the_honest_upload():
    start, honest, out = _run("noise", 0.5, rnd=2, cid=3)
    g = rng.torch_generator("attack_noise", 9, 2, 3)
    for key in sorted(honest.arrays):  # drawn key by key in sorted order, in float64
        want = (honest.arrays[key].double() + 0.5 * torch.randn(honest.arrays[key].shape, generator=g,
                                                                 dtype=torch.float64)).float()
        assert torch.equal(out.arrays[key], want), key
    assert torch.equal(_run("noise", 0.5, 2, 3)[2].arrays["L.plora_A"], out.arrays["L.plora_A"])  # reproducible
    assert not torch.equal(_run("noise", 0.5, 2, 4)[2].arrays["L.plora_A"], out.arrays["L.plora_A"])  # per client
    assert not torch.equal(_run("noise", 0.5, 3, 3)[2].arrays["L.plora_A"], out.arrays["L.plora_A"])  # per round


def test_inflate_keeps_the_arrays_and_claims_more_samples():
    _, honest, out = _run("inflate")
    assert out.num_samples == 7_000_000 and isinstance(out.num_samples, int)
    assert all(torch.equal(out.arrays[k], honest.arrays[k]) for k in honest.arrays)
    assert _run("inflate", 3.0)[2].num_samples == 21
    assert _run("inflate", 1e300)[2].num_samples == 2 ** 53  # an exact integer, as the wire needs


def test_label_flip_leaves_the_upload_alone_and_strengths_default():
    _, honest, out = _run("label_flip")
    assert out is honest
    assert strength(RunConfig(attack="scale")) == DEFAULT_STRENGTH["scale"] == 100
    assert strength(RunConfig(attack="sign_flip")) == 1 and strength(RunConfig(attack="inflate")) == 1e6
    assert strength(RunConfig(attack="noise", attack_strength=0.1)) == 0.1


# ---------------------------------------------------------------- validation alone cannot stop them

FACTORIES = {
    "fedplora": lambda: make_method("fedplora", CFG, seed=1),
    "fedit": lambda: make_method("fedit", CFG),
    "hetlora": lambda: make_method("hetlora", CFG),
    "flexlora": lambda: make_method("flexlora", CFG),
    "flora": lambda: make_method("flora", CFG, seed=3),
}


@pytest.mark.parametrize("attack", ["sign_flip", "scale", "noise", "inflate"])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_attacked_uploads_pass_validation(name, attack):
    method = FACTORIES[name]()
    model = get_plora_model(tiny_bert(), CFG)  # float32: the uploads are float32
    state = method.init_state(model)
    task = method.configure_client(state, ClientInfo(cid=1, budget=2, num_samples=12), server_round=1)
    method.client_setup(model, task)
    start = method.client_update(model, task, num_samples=12)
    g = torch.Generator().manual_seed(0)
    honest = ClientUpdate({k: v + 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype)
                           for k, v in start.arrays.items()}, start.config, 12)  # a trained-looking upload
    method.validate_update(task, honest, state)
    cfg = RunConfig(byzantine_fraction=0.5, attack=attack).validate()
    attacked = attack_update(cfg, 1, 1, honest, start.arrays)
    assert attacked.arrays.keys() == honest.arrays.keys()
    assert all(attacked.arrays[k].dtype == honest.arrays[k].dtype == torch.float32 for k in honest.arrays)
    method.validate_update(task, attacked, state)  # passes: keys, shapes, dtypes, finite, positive count
    if attack != "inflate":
        assert any(not torch.equal(attacked.arrays[k], honest.arrays[k]) for k in honest.arrays)


# ---------------------------------------------------------------- label_flip: a data-poisoning client


def test_label_flip_flips_the_labels_of_an_encoded_partition(tiny_assets):
    from fedplora.tasks import make_task
    from fedplora.tasks.partition import partition_for

    cfg = RunConfig(model=tiny_assets["model"], data_dir=tiny_assets["data_dir"], num_clients=4, max_seq_len=16,
                    byzantine_fraction=0.25, attack="label_flip").validate()
    task = make_task(cfg)
    train, _ = task.load_splits()
    data = task.encode(partition_for(task, train, cfg)[0].select(range(12)))
    flipped = flip_labels(task, data)
    assert flipped["label"] == [2 - y for y in data["label"]]  # 3 labels: y -> 2 - y, neutral stays put
    assert flipped["input_ids"] == data["input_ids"] and len(flipped) == len(data)
    assert task.collate([flipped[i] for i in range(3)])["labels"].tolist() == [2 - y for y in data["label"][:3]]
    cache = {0: data}
    once = poisoned_data(task, data, cache, 0)
    assert poisoned_data(task, data, cache, 0) is once and cache[0] is data  # once per client, beside its data


def test_label_flip_refuses_a_task_without_class_labels():
    with pytest.raises(ConfigError, match="label_flip flips class labels, and task 'instruct' has none"):
        check_task(RunConfig(task="instruct", byzantine_fraction=0.2, attack="label_flip"))
    check_task(RunConfig(task="tweets", byzantine_fraction=0.2, attack="label_flip"))
    check_task(RunConfig(task="instruct", byzantine_fraction=0.2, attack="scale"))

    class Generation:  # what a causal-LM task looks like to flip_labels: no class labels
        name = "code"

    with pytest.raises(ConfigError) as e:
        flip_labels(Generation(), None)
    assert "\n" not in str(e.value) and "'code' has none" in str(e.value)


# ---------------------------------------------------------------- inflate: the server checks the claim


def test_the_server_rejects_a_claim_above_the_count_its_query_declared():
    from fedplora.federation.strategy import HeteroLoRAStrategy
    from fedplora.methods import UpdateRejected

    strategy = HeteroLoRAStrategy(FACTORIES["fedit"](), RunConfig())
    strategy._declared = {2: 30}  # what client 2's query said this round (configure_train fills it)
    _, honest = _upload()
    for n in (30, 29, 1):
        strategy.check_claim(2, ClientUpdate(honest.arrays, {}, n))
    with pytest.raises(UpdateRejected, match="claims 30000000 samples, more than the 30 its query declared"):
        strategy.check_claim(2, ClientUpdate(honest.arrays, {}, 30_000_000))


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("overrides,line", [
    ({"byzantine_fraction": 1.5}, "byzantine_fraction: must be a number in [0, 1], got 1.5 (--byzantine-fraction)"),
    ({"attack": "flip"}, "attack: must be 'sign_flip', 'scale', 'noise', 'inflate' or 'label_flip', got 'flip'"),
    ({"attack_strength": 0.0}, "attack_strength: must be a number > 0 when set, got 0.0 (--attack-strength)"),
    ({"attack_strength": -100.0}, "attack_strength: must be a number > 0 when set, got -100.0"),
    ({"attack_strength": float("inf")}, "attack_strength: must be finite, got inf (--attack-strength)"),
])
def test_bad_attack_settings_fail_with_one_line(overrides, line):
    with pytest.raises(ConfigError) as e:
        RunConfig(**overrides).validate()
    assert str(e.value).startswith(line) and "\n" not in str(e.value)


def test_attack_settings_round_trip_through_toml(tmp_path):
    cfg = RunConfig(byzantine_fraction=0.2, attack="noise", attack_strength=0.05)
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert RunConfig.from_toml(path) == cfg


# ---------------------------------------------------------------- in real rounds (in process, no simulation)

from test_fault_tolerance import InProcessGrid, _rounds, _small_cfg, in_process  # noqa: E402,F401


def _uploads(cfg):
    """One round in process: its history entry, and each client's task and upload as the server got them."""
    from fedplora.federation.messages import read_task, read_update

    seen = {}

    def capture(cid, msg, reply):
        if not reply.has_error():
            seen[cid] = (read_task(msg.content)[0], read_update(reply.content)[0])
        return [reply]

    _, history = _rounds(cfg, InProcessGrid(cfg.num_clients, tamper=capture))
    return history[0], seen


def test_byzantine_clients_attack_in_real_rounds_and_the_history_names_them(tiny_assets, in_process):
    base = dict(method="fedit", rounds=1, num_clients=4, clients_per_round=4, local_steps=1)
    honest_entry, honest = _uploads(_small_cfg(tiny_assets, **base))
    cfg = _small_cfg(tiny_assets, byzantine_fraction=0.5, attack="scale", attack_strength=10.0, **base)
    entry, attacked = _uploads(cfg)
    bad = attackers(cfg)
    assert entry["attackers"] == sorted(bad) and len(bad) == 2
    assert sorted(c["cid"] for c in entry["clients"]) == [0, 1, 2, 3]  # validation let every one through
    for cid, (task, update) in attacked.items():
        h = honest[cid][1].arrays
        for key, t in update.arrays.items():  # FedIT ideal uploads what it received, trained
            want = task.arrays[key] + 10 * (h[key] - task.arrays[key]) if cid in bad else h[key]
            assert torch.allclose(t, want, atol=1e-5, rtol=1e-5), (cid, key)
    # the history's delta_norm (what training changed, for choosing dp_clip) shows the scaled deltas
    norm = {c["cid"]: c["delta_norm"] for c in honest_entry["clients"]}
    assert all(n > 0 for n in norm.values())
    for c in entry["clients"]:
        assert c["delta_norm"] == pytest.approx(norm[c["cid"]] * (10 if c["cid"] in bad else 1), rel=1e-4)
    # inflate: the server catches the claim, the honest clients are aggregated
    cfg = _small_cfg(tiny_assets, byzantine_fraction=0.5, attack="inflate", **base)
    entry, _ = _uploads(cfg)
    assert sorted(c["cid"] for c in entry["clients"]) == sorted(set(range(4)) - bad) and entry["aggregated"]
    assert [(f["cid"], f["stage"]) for f in entry["failures"]] == [(c, "validate") for c in sorted(bad)]
    assert all("its query declared" in f["reason"] for f in entry["failures"])


def test_label_flip_clients_train_on_flipped_labels_in_real_rounds(tiny_assets, in_process):
    from fedplora.federation import client_app

    cfg = _small_cfg(tiny_assets, rounds=1, num_clients=4, clients_per_round=4, local_steps=1,
                     byzantine_fraction=0.25, attack="label_flip")
    entry, _ = _uploads(cfg)
    (bad,) = attackers(cfg)
    assert entry["attackers"] == [bad] and len(entry["clients"]) == 4
    (rt,) = client_app._runtimes.values()
    assert rt.encoded[("label_flip", bad)]["label"] == [2 - y for y in rt.encoded[bad]["label"]]
    assert not any(("label_flip", c) in rt.encoded for c in range(4) if c != bad)


@pytest.mark.parametrize("method", ["fedplora", "fedit", "hetlora"])
@pytest.mark.parametrize("attack", ["scale", "sign_flip"])
def test_attackers_pass_validation_and_robust_aggregation_contains_them_in_real_rounds(tiny_assets, in_process,
                                                                                      method, attack):
    """One of 6 clients attacks in every round (real ClientApp code, real validation): the plain mean follows
    it far from the clean run, the coordinate-wise median stays near the clean median run."""

    def distance(a, b):
        return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5

    base = dict(method=method, rounds=2, num_clients=6, clients_per_round=6, local_steps=2, ranks=[4],
                rank_shares=[1.0])  # every client trains every pair: median has 6 values per coordinate
    attack_settings = dict(byzantine_fraction=1 / 6, attack=attack, attack_strength=100.0 if attack == "scale" else 30.0)
    clean_mean, _ = _rounds(_small_cfg(tiny_assets, **base), InProcessGrid(6))
    clean_median, _ = _rounds(_small_cfg(tiny_assets, aggregator="median", **base), InProcessGrid(6))
    attacked_mean, history = _rounds(_small_cfg(tiny_assets, **base, **attack_settings), InProcessGrid(6))
    attacked_median, _ = _rounds(_small_cfg(tiny_assets, aggregator="median", **base, **attack_settings),
                                 InProcessGrid(6))
    assert all(len(h["clients"]) == 6 and not h["failures"] and len(h["attackers"]) == 1 for h in history)
    drift_mean, drift_median = distance(attacked_mean, clean_mean), distance(attacked_median, clean_median)
    assert drift_median < 0.2 * drift_mean, (drift_median, drift_mean)
