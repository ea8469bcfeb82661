import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


def tiny_bert(num_labels=3, dtype=torch.float32):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=101, num_labels=num_labels, max_position_embeddings=64)
    return BertForSequenceClassification(cfg).to(dtype).eval()


def tiny_llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=101, n_positions=64)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


MODELS = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize_pairs(model, seed=1, scale=0.5):
    """Give every pair (and head) non-zero values so folding actually changes weights."""
    from fedplora import get_plora_state_dict, set_plora_state_dict

    g = torch.Generator().manual_seed(seed)
    state = get_plora_state_dict(model)
    state = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) * scale for k, v in state.items()}
    set_plora_state_dict(model, state)
    return state


@pytest.fixture
def ids():
    return torch.randint(0, 101, (3, 9), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    from assets import make_tiny_model, make_tweets_slice

    root = tmp_path_factory.mktemp("assets")
    return {"model": str(make_tiny_model(root / "tiny-bert")), "data_dir": str(make_tweets_slice(root / "tweets"))}
