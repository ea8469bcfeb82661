import pytest
import torch

from conftest import MODELS, logits, randomize_pairs, tiny_bert
from fedplora import (
    PLoRAConfig, get_plora_model, get_plora_state_dict, plora_layers, select_and_fold, set_plora_state_dict,
    trainable_parameters,
)


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_wrapping_keeps_outputs_and_freezes_base(arch, ids):
    model = MODELS[arch]()
    before = logits(model, ids)
    get_plora_model(model, PLoRAConfig(rank=4, alpha=8))
    assert torch.equal(logits(model, ids), before)  # b_j = 0 at init
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".active_A" in n or ".active_B" in n or n.startswith("classifier") for n in names)
    layers = dict(plora_layers(model))
    expected = {"bert": "query", "llama": "q_proj", "gpt2": "c_attn"}[arch]
    assert any(n.endswith(expected) for n in layers)


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_fold_preserves_outputs_over_many_rounds_and_restores_w0_bit_exactly(arch, ids):
    model = MODELS[arch](dtype=torch.float64)
    get_plora_model(model, PLoRAConfig(rank=6, alpha=12))
    w0 = {n: l.base_layer.weight.detach().clone() for n, l in plora_layers(model)}
    g = torch.Generator().manual_seed(3)
    for rnd in range(6):
        randomize_pairs(model, seed=rnd)
        select_and_fold(model, range(6))
        reference = logits(model, ids)
        r = int(torch.randint(0, 7, (1,), generator=g))
        subset = torch.randperm(6, generator=g)[:r].tolist()
        select_and_fold(model, subset)
        assert torch.allclose(logits(model, ids), reference, atol=1e-10, rtol=0)
        for n, layer in plora_layers(model):
            assert layer.folded_count == 6 - r
    select_and_fold(model, range(6))
    for n, layer in plora_layers(model):
        assert torch.equal(layer.base_layer.weight, w0[n])
        assert layer.base_weight0 is None


def test_fold_is_not_cumulative(ids):
    model = tiny_bert(dtype=torch.float64)
    get_plora_model(model, PLoRAConfig(rank=4, alpha=4))
    randomize_pairs(model)
    select_and_fold(model, [0])
    first = {n: l.base_layer.weight.clone() for n, l in plora_layers(model)}
    select_and_fold(model, [1])
    select_and_fold(model, [0])  # same selection again: same folded weight, bit for bit
    for n, l in plora_layers(model):
        assert torch.equal(l.base_layer.weight, first[n])


def test_gradients_reach_only_selected_pairs_and_optimizer_holds_r_pairs(ids):
    model = tiny_bert()
    get_plora_model(model, PLoRAConfig(rank=8, alpha=16))
    randomize_pairs(model)
    before = get_plora_state_dict(model)
    select_and_fold(model, [2, 5])
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    model.train()
    for _ in range(2):
        out = model(input_ids=ids, labels=torch.tensor([0, 1, 2]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    for _, layer in plora_layers(model):
        assert layer.active_A.shape[0] == 2 and layer.active_B.shape[1] == 2
        assert layer.base_layer.weight.grad is None
    adapter_state = [s for p, s in opt.state.items() if p.dim() == 2 and p.shape != model.classifier.weight.shape]
    assert adapter_state and all(2 in s["exp_avg"].shape for s in adapter_state)
    after = get_plora_state_dict(model)
    for k, v in before.items():
        if k.endswith("plora_A"):
            assert torch.equal(after[k][[0, 1, 3, 4, 6, 7]], v[[0, 1, 3, 4, 6, 7]])
            assert not torch.equal(after[k][[2, 5]], v[[2, 5]])
        elif k.endswith("plora_B"):
            assert torch.equal(after[k][:, [0, 1, 3, 4, 6, 7]], v[:, [0, 1, 3, 4, 6, 7]])


def test_state_dict_names_are_stable_and_roundtrip():
    a, b = tiny_bert(), tiny_bert()
    cfg = PLoRAConfig(rank=3, alpha=3)
    get_plora_model(a, cfg)
    get_plora_model(b, cfg)
    state = randomize_pairs(a)
    assert list(get_plora_state_dict(a)) == list(get_plora_state_dict(b))
    set_plora_state_dict(b, state)
    for k, v in get_plora_state_dict(b).items():
        assert torch.equal(v, state[k])
    assert "classifier.weight" in state


def test_regex_targets_and_explicit_heads():
    model = tiny_llama_model = MODELS["llama"]()
    get_plora_model(tiny_llama_model, PLoRAConfig(rank=2, target_modules=r".*\.(q|v)_proj", modules_to_save=[]))
    names = [n for n, _ in plora_layers(model)]
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)


def test_clear_errors_for_bad_config():
    with pytest.raises(ValueError, match="rank"):
        PLoRAConfig(rank=0)
    with pytest.raises(ValueError, match="matched no"):
        get_plora_model(tiny_bert(), PLoRAConfig(rank=2, target_modules=["nonexistent"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        get_plora_model(tiny_bert(), PLoRAConfig(rank=2, modules_to_save=["nohead"]))
    model = get_plora_model(tiny_bert(), PLoRAConfig(rank=2))
    with pytest.raises(ValueError, match="distinct"):
        select_and_fold(model, [0, 0])
    with pytest.raises(ValueError, match="distinct"):
        select_and_fold(model, [5])
    with pytest.raises(KeyError, match="missing"):
        set_plora_state_dict(model, {})


def test_per_layer_selection():
    model = tiny_bert(dtype=torch.float64)
    get_plora_model(model, PLoRAConfig(rank=4))
    randomize_pairs(model)
    names = [n for n, _ in plora_layers(model)]
    select_and_fold(model, {n: [k % 4] for k, n in enumerate(names)})
    for k, (n, layer) in enumerate(plora_layers(model)):
        assert layer.active_idx.tolist() == [k % 4]
