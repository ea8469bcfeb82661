"""The training controls an LLM run needs (issue 26, item 2): the learning-rate schedule over rounds, gradient
accumulation, local epochs and the communication budget."""

import math

import pytest
import torch

from conftest import tiny_bert
from fedplora import PLoRAConfig, get_plora_model, trainable_parameters
from fedplora.config import ConfigError, RunConfig
from fedplora.training import round_lr, train_local
from test_fault_tolerance import InProcessGrid, _small_cfg, in_process  # noqa: F401 (a fixture)


def test_the_schedules_give_the_formulas_rates():
    for t in range(1, 11):  # FlowerTune's cosine_annealing(t, T, lr_max, lr_min)
        assert round_lr(5e-5, 1e-6, "cosine", t, 10) == pytest.approx(
            1e-6 + 0.5 * (5e-5 - 1e-6) * (1 + math.cos(math.pi * t / 10)), rel=1e-15)
        assert round_lr(5e-5, 1e-6, "linear", t, 10) == pytest.approx(1e-6 + (5e-5 - 1e-6) * (1 - t / 10), rel=1e-15)
        assert round_lr(5e-5, 1e-6, "constant", t, 10) == 5e-5
    assert round_lr(5e-5, 1e-6, "cosine", 10, 10) == pytest.approx(1e-6)  # the last round trains at lr_min
    with pytest.raises(ConfigError, match="lr_min: 0.01 is above lr=0.004"):
        RunConfig(lr_schedule="cosine", lr_min=0.01).validate()


class Rows:
    """A classification task over a fixed table of token rows: what train_local needs of a task."""

    def __init__(self, n=12, length=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 101, (n, length), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.seen = []

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return i

    def collate(self, rows):
        self.seen.extend(rows)
        return {"input_ids": self.ids[rows], "labels": self.labels[rows]}

    def on_model(self, batch, model):
        return batch

    def loss(self, model, batch):
        return model(**batch).loss


def _no_dropout_bert():
    """conftest's tiny BERT without dropout: accumulation reproduces a larger batch only for the same forward
    (dropout draws one mask for a batch of 6, three for three of 2)."""
    model = tiny_bert(dtype=torch.float64)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _trained(batch_size, accum, steps=1, epochs=None, data=None):
    model = get_plora_model(_no_dropout_bert(), PLoRAConfig(rank=4, alpha=8))
    data = data or Rows()
    metrics = train_local(model, data, data, steps=steps, batch_size=batch_size, lr=1e-2, weight_decay=0.0, seed=3,
                          grad_accum_steps=accum, epochs=epochs)
    return model, metrics


def test_accumulating_k_micro_batches_is_one_batch_k_times_larger():
    big, big_metrics = _trained(6, 1)
    small, small_metrics = _trained(2, 3)
    assert small_metrics["train_loss"] == pytest.approx(big_metrics["train_loss"], rel=1e-12)
    for a, b in zip(trainable_parameters(small), trainable_parameters(big)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)  # one AdamW step from the same gradient
    # and one batch of 2 is a different step
    other, _ = _trained(2, 1)
    assert not all(torch.allclose(a, b) for a, b in zip(trainable_parameters(other), trainable_parameters(big)))


def test_local_epochs_pass_over_every_example_once_an_epoch():
    data = Rows(n=10)
    _trained(4, 1, steps=99, epochs=2, data=data)  # epochs replace steps: 2 x ceil(10 / 4) = 6 steps
    assert len(data.seen) == 20 and sorted(data.seen[:10]) == list(range(10)) == sorted(data.seen[10:])


def test_the_communication_budget_warns_or_stops_the_run(tiny_assets, in_process, tmp_path):
    from fedplora.federation.server_app import run_federation

    cfg = _small_cfg(tiny_assets, rounds=3, comm_budget_mb=0.01)
    warned = run_federation(InProcessGrid(cfg.num_clients), cfg, tmp_path / "warn")
    flags = [h.get("comm_budget_exceeded") for h in warned["history"][1:]]
    assert len(flags) == 3 and all(flags) and "0.01" in flags[0]
    stopped = run_federation(InProcessGrid(cfg.num_clients), cfg.with_overrides(comm_budget_action="stop"),
                             tmp_path / "stop")
    assert [h["round"] for h in stopped["history"]] == [0, 1] and "run stopped" in stopped["history"][1][
        "comm_budget_exceeded"]


def test_a_chat_template_prompt_is_the_tokenizers_own_rendering(tmp_path):
    """prompt_template = "chat": the instruct task renders each record with the model's chat template (SmolLM2's
    tokenizer, the real one), the response closed by its end-of-turn token; "alpaca" stays the Alpaca prompt."""
    import json

    from assets import make_tiny_causal_lm
    from fedplora.tasks import make_task
    from fedplora.tasks.instruct import chat_messages, format_prompt

    model = str(make_tiny_causal_lm(tmp_path / "tiny-llama"))
    records = [{"instruction": "Give a headline.", "input": "Rain all week in the north.", "output": "Wet week"},
               {"instruction": "Say hello.", "input": "", "output": "Hello"}]
    (tmp_path / "d.json").write_text(json.dumps(records * 4))
    base = dict(task="instruct", model=model, dataset=str(tmp_path / "d.json"), max_seq_len=128)
    chat = make_task(RunConfig(**base, prompt_template="chat").validate())
    train, _ = chat.load_splits()
    rows = chat.encode(train)
    tok = chat.tokenizer
    for row in rows:
        rec = next(r for r in records if r["output"] == row["response"])
        own = tok.apply_chat_template(chat_messages(rec["instruction"], rec["input"]), tokenize=False,
                                      add_generation_prompt=True)
        assert row["prompt"] == own and own.startswith("<|im_start|>") and own.endswith("<|im_start|>assistant\n")
        assert row["input_ids"][:row["prompt_len"]] == tok(own, add_special_tokens=False)["input_ids"]
        assert tok.decode(row["input_ids"][row["prompt_len"]:]) == rec["output"] + tok.eos_token
    alpaca = make_task(RunConfig(**base).validate())
    first = alpaca.encode(alpaca.load_splits()[0])[0]
    rec = next(r for r in records if r["output"] == first["response"])
    assert first["prompt"] == format_prompt(rec["instruction"], rec["input"])
