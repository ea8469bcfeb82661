import pytest
import torch

from conftest import MODELS, logits, randomize_pairs, tiny_bert, tiny_llama
from fedplora import (
    PLoRAConfig, get_plora_model, get_plora_state_dict, plora_layers, select_and_fold, set_plora_state_dict,
    trainable_parameters,
)


FOLDS = ["branch", "merge"]


@pytest.mark.parametrize("fold", FOLDS)
@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_wrapping_keeps_outputs_and_freezes_base(arch, fold, ids):
    model = MODELS[arch]()
    before = logits(model, ids)
    get_plora_model(model, PLoRAConfig(rank=4, alpha=8, fold=fold))
    assert torch.equal(logits(model, ids), before)  # b_j = 0 at init
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".active_A" in n or ".active_B" in n or n.startswith("classifier") for n in names)
    layers = dict(plora_layers(model))
    expected = {"bert": "query", "llama": "q_proj", "gpt2": "c_attn"}[arch]
    assert any(n.endswith(expected) for n in layers)


@pytest.mark.parametrize("fold", FOLDS)
@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_fold_preserves_outputs_over_many_rounds_and_restores_w0_bit_exactly(arch, fold, ids):
    model = MODELS[arch](dtype=torch.float64)
    get_plora_model(model, PLoRAConfig(rank=6, alpha=12, fold=fold))
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
            if fold == "branch":  # the base weight is never touched
                assert torch.equal(layer.base_layer.weight, w0[n]) and layer.base_weight0 is None
            else:  # merged from the pristine copy, which lives on the CPU while something is folded
                assert torch.equal(layer.pristine_weight(), w0[n])
                assert (layer.base_weight0 is not None) == (r < 6)
    select_and_fold(model, range(6))
    for n, layer in plora_layers(model):
        assert torch.equal(layer.base_layer.weight, w0[n])
        assert layer.base_weight0 is None


@pytest.mark.parametrize("fold", FOLDS)
def test_fold_is_not_cumulative(fold, ids):
    model = tiny_bert(dtype=torch.float64)
    get_plora_model(model, PLoRAConfig(rank=4, alpha=4, fold=fold))
    randomize_pairs(model)
    select_and_fold(model, [0])
    first = {n: (l.base_layer.weight.clone(), l.folded_A, l.folded_B) for n, l in plora_layers(model)}
    out = logits(model, ids)
    select_and_fold(model, [1])
    select_and_fold(model, [0])  # same selection again: same folded weight / branch, bit for bit
    for n, l in plora_layers(model):
        weight, A, B = first[n]
        assert torch.equal(l.base_layer.weight, weight)
        if fold == "branch":
            assert torch.equal(l.folded_A, A) and torch.equal(l.folded_B, B)
        else:
            assert l.folded_A is None and l.folded_B is None
    assert torch.equal(logits(model, ids), out)


@pytest.mark.parametrize("fold", FOLDS)
def test_gradients_reach_only_selected_pairs_and_optimizer_holds_r_pairs(fold, ids):
    model = tiny_bert()
    get_plora_model(model, PLoRAConfig(rank=8, alpha=16, fold=fold))
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
    with pytest.raises(ValueError, match="fold must be 'branch' or 'merge', got 'fused'"):
        PLoRAConfig(fold="fused")
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


@pytest.mark.parametrize("fold", FOLDS)
def test_per_layer_selection(fold):
    model = tiny_bert(dtype=torch.float64)
    get_plora_model(model, PLoRAConfig(rank=4, fold=fold))
    randomize_pairs(model)
    names = [n for n, _ in plora_layers(model)]
    select_and_fold(model, {n: [k % 4] for k, n in enumerate(names)})
    for k, (n, layer) in enumerate(plora_layers(model)):
        assert layer.active_idx.tolist() == [k % 4]


# ---------------------------------------------------------------- fold modes: branch vs merge


def _pair_of_models(arch, dtype, rank=6, **kw):
    """The same wrapped model twice, fold="branch" and fold="merge", with the same random pairs and heads."""
    models = {}
    for fold in FOLDS:
        model = get_plora_model(MODELS[arch](dtype=dtype), PLoRAConfig(rank=rank, alpha=2 * rank, fold=fold, **kw))
        randomize_pairs(model, seed=11, scale=0.3)
        models[fold] = model
    return models["branch"], models["merge"]


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_branch_and_merge_compute_the_all_active_model_over_random_selections(arch, dtype, atol, ids):
    branch, merge = _pair_of_models(arch, dtype)
    g = torch.Generator().manual_seed(4)
    for rnd in range(4):
        state = randomize_pairs(branch, seed=20 + rnd, scale=0.3)
        set_plora_state_dict(merge, state)
        select_and_fold(branch, range(6))
        select_and_fold(merge, range(6))
        full = logits(branch, ids)
        assert torch.equal(logits(merge, ids), full)  # nothing folded: both are the same layer math
        per_layer = {n: torch.randperm(6, generator=g)[: int(torch.randint(0, 7, (1,), generator=g))].tolist()
                     for n, _ in plora_layers(branch)}
        select_and_fold(branch, per_layer)
        select_and_fold(merge, per_layer)
        b, m = logits(branch, ids), logits(merge, ids)
        assert torch.equal(b, full)  # branch: bit-identical to the all-active model, in eval mode
        assert torch.allclose(m, full, atol=atol, rtol=0)
        assert torch.allclose(b, m, atol=atol, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_merge_keeps_the_pristine_w0_on_the_cpu_only_while_something_is_folded(arch):
    model = get_plora_model(MODELS[arch](dtype=torch.float64), PLoRAConfig(rank=4, alpha=8, fold="merge"))
    w0 = {n: l.base_layer.weight.detach().clone() for n, l in plora_layers(model)}
    randomize_pairs(model)
    assert all(l.base_weight0 is None for _, l in plora_layers(model))  # nothing folded yet: no copy
    for subset in ([0], [1, 2], [], [3]):
        select_and_fold(model, subset)
        for n, l in plora_layers(model):
            assert l.base_weight0.device.type == "cpu" and torch.equal(l.base_weight0, w0[n])
            assert not torch.equal(l.base_layer.weight, w0[n])  # the folded pairs are in the weight
    select_and_fold(model, range(4))
    for n, l in plora_layers(model):
        assert l.base_weight0 is None and torch.equal(l.base_layer.weight, w0[n])  # restored bit for bit


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_branch_never_touches_the_base_weight_and_holds_no_dense_tensor(arch, ids):
    model = get_plora_model(MODELS[arch](), PLoRAConfig(rank=6, alpha=12))
    assert model.plora_config.fold == "branch"  # the default
    w0 = {n: l.base_layer.weight.detach().clone() for n, l in plora_layers(model)}
    g = torch.Generator().manual_seed(0)
    for rnd in range(3):
        randomize_pairs(model, seed=rnd)
        subset = torch.randperm(6, generator=g)[: rnd + 1].tolist()
        select_and_fold(model, subset)
        model.train()
        model(input_ids=ids, labels=torch.tensor([0, 1, 2]) if arch == "bert" else ids).loss.backward()
        torch.optim.SGD(trainable_parameters(model), lr=0.1).step()
        model.eval()
        for n, l in plora_layers(model):
            assert torch.equal(l.base_layer.weight, w0[n]) and l.base_weight0 is None
            own = dict(l.named_buffers(recurse=False)) | dict(l.named_parameters(recurse=False))
            assert l.folded_A.shape == (6 - len(subset), l.d_in) and l.folded_B.shape == (l.d_out, 6 - len(subset))
            for name, t in own.items():  # R x d_in, d_out x R, r x ..., indices: nothing d_out x d_in
                assert t.numel() <= 6 * max(l.d_in, l.d_out), (name, tuple(t.shape))


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_base_offset_restores_w0_bit_exactly_in_merge_mode_and_agrees_with_branch(arch, ids):
    branch, merge = _pair_of_models(arch, torch.float64, rank=4)
    w0 = {n: l.base_layer.weight.detach().clone() for n, l in plora_layers(merge)}
    g = torch.Generator().manual_seed(2)
    for (_, b), (_, m) in zip(plora_layers(branch), plora_layers(merge)):
        D = torch.randn(m.d_out, m.d_in, generator=g, dtype=torch.float64) * 0.1
        b.set_base_offset(D)
        m.set_base_offset(D)
    for subset in (range(4), [1, 3], []):
        select_and_fold(branch, subset)
        select_and_fold(merge, subset)
        assert torch.allclose(logits(branch, ids), logits(merge, ids), atol=1e-10, rtol=0)
    for (n, b), (_, m) in zip(plora_layers(branch), plora_layers(merge)):
        assert torch.equal(b.base_layer.weight, w0[n])  # branch: the offset is a term of the forward pass
        assert m.base_weight0.device.type == "cpu"
        b.set_base_offset(None)
        m.set_base_offset(None)
    select_and_fold(merge, range(4))
    for n, m in plora_layers(merge):
        assert torch.equal(m.base_layer.weight, w0[n]) and m.base_weight0 is None


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_dropout_in_training_folded_branch_pairs_see_x_without_dropout_as_merged_ones_do(arch, ids):
    branch, merge = _pair_of_models(arch, torch.float64, dropout=0.3)
    every = get_plora_model(MODELS[arch](dtype=torch.float64), PLoRAConfig(rank=6, alpha=12, dropout=0.3))
    set_plora_state_dict(every, get_plora_state_dict(branch))  # same pairs, nothing folded: all see dropout
    labels = torch.tensor([0, 1, 2]) if arch == "bert" else ids
    losses, grads = {}, {}
    for key, model, subset in (("branch", branch, [1, 4]), ("merge", merge, [1, 4]), ("every", every, range(6))):
        select_and_fold(model, subset)
        model.train()
        torch.manual_seed(123)  # the same dropout masks everywhere
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        losses[key] = float(loss)
        grads[key] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert losses["branch"] == pytest.approx(losses["merge"], abs=1e-10)
    assert grads["branch"].keys() == grads["merge"].keys()
    for n, g in grads["branch"].items():
        assert torch.allclose(g, grads["merge"][n], atol=1e-10, rtol=0), n
    assert abs(losses["branch"] - losses["every"]) > 1e-6  # dropout on the folded pairs would change the loss
    branch.eval()
    merge.eval()  # eval mode: dropout off, branch back to the exact all-active product
    select_and_fold(every, range(6))
    assert torch.equal(logits(branch, ids), logits(every.eval(), ids))
