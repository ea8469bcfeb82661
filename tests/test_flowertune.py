"""FlowerTune's four LLM challenges (issue 26, item 1): their readers on each dataset's own format, the one-line
refusal of a file with other columns, the TOMLs against the template's values, every method of the bench on the
challenges' heterogeneous budgets, and each challenge end to end through ``fedplora run --config``'s settings.

The data are small samples in each dataset's columns that ``flowertune_samples.py`` writes (nothing is downloaded).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from flowertune_samples import records, write, write_sample
from fedplora.config import RunConfig
from fedplora.errors import DataError
from fedplora.methods import METHODS
from fedplora.tasks import TASKS, check_source, make_task
from fedplora.tasks.flowertune import CHALLENGES, PREAMBLE, flowertune_prompt
from test_fault_tolerance import InProcessGrid, in_process  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "flowertune"
NAMES = list(CHALLENGES)


def toml(name: str) -> Path:
    return CONFIGS / f"{name}.toml"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from assets import make_tiny_causal_lm

    return str(make_tiny_causal_lm(tmp_path_factory.mktemp("ft") / "tiny-llama"))


# ------------------------------------------------------------------ readers
@pytest.mark.parametrize("name", NAMES)
def test_each_challenge_reads_its_datasets_columns_from_json_jsonl_and_parquet(name, tmp_path, tiny_lm):
    """The same rows from the three formats, each prompt the template's (its instruction folded its way), the loss on
    " {output}" and the end-of-sequence token."""
    rows = records(name)
    splits = {}
    for fmt in ("json", "jsonl", "parquet"):
        cfg = RunConfig(task=f"flowertune-{name}", dataset=str(write_sample(name, tmp_path, fmt)), model=tiny_lm,
                        max_seq_len=256).validate()
        check_source(cfg)
        splits[fmt] = make_task(cfg).load_splits()
    for fmt in ("jsonl", "parquet"):
        for a, b in zip(splits["json"], splits[fmt]):
            assert a.to_dict() == b.to_dict()
    train, test = splits["json"]
    assert len(train) + len(test) == len(rows) and len(test) == round(0.2 * len(rows))
    def instruction(rec):
        return {"general-nlp": rec["instruction"],  # the template never reads alpaca-gpt4's input
                "finance": f"{rec['instruction']} {rec['input']}".strip(),
                "code": f"{rec['instruction']} {rec['input']}".strip(),
                "medical": rec["input"]}[name]  # its instruction is one sentence on every row

    expected = {(f"{PREAMBLE}\n### Instruction:\n{instruction(r)}\n### Response:", r["output"]) for r in rows}
    assert set(zip(train["prompt"], train["response"])) | set(zip(test["prompt"], test["response"])) == expected
    if name == "general-nlp":
        assert any(r["input"] for r in rows)  # the sample has inputs, and no prompt shows them
        assert not any(r["input"] and r["input"] in p for r in rows for p in train["prompt"])
    task = make_task(RunConfig(task=f"flowertune-{name}", dataset=str(tmp_path / f"{name}.json"), model=tiny_lm,
                               max_seq_len=512).validate())
    enc = task.encode(train.select(range(3)))
    tok = task.tokenizer
    for row in enc:
        assert tok.decode(row["input_ids"][:row["prompt_len"]]).endswith("\n### Response:")
        assert tok.decode(row["input_ids"][row["prompt_len"]:]) == " " + row["response"] + tok.eos_token
    # prompt_template = "chat": the same instruction as a user turn of the model's own chat template
    chat = make_task(RunConfig(task=f"flowertune-{name}", dataset=str(tmp_path / f"{name}.json"), model=tiny_lm,
                               max_seq_len=512, prompt_template="chat").validate())
    for row in chat.encode(train.select(range(3))):
        own = tok.apply_chat_template([{"role": "user", "content": row["instruction"]}], tokenize=False,
                                      add_generation_prompt=True)
        assert row["prompt"] == own and row["input_ids"][:row["prompt_len"]] == tok(own, add_special_tokens=False)[
            "input_ids"]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet"])
def test_a_file_with_other_columns_is_refused_in_one_line(fmt, tmp_path):
    """Before Flower starts (check_source) and when loading: the file, the columns it has, the ones expected."""
    alpaca_like = [{"instruction": "Say hi.", "response": "Hi", "context": ""}] * 6  # Dolly's names, not the dataset's
    path = write(alpaca_like, tmp_path / f"dolly.{fmt}")
    cfg = RunConfig(task="flowertune-finance", dataset=str(path)).validate()
    expected = (f"flowertune-finance: {path} has the columns ['context', 'instruction', 'response']; expected "
                "['instruction', 'input', 'output'], those of flwrlabs/fingpt-sentiment-train (missing: input, output; "
                "other columns are ignored)")
    for step in (lambda: check_source(cfg), lambda: make_task(cfg).load_splits()):
        with pytest.raises(DataError) as err:
            step()
        assert str(err.value) == expected and "\n" not in str(err.value)


def test_the_cli_refuses_bad_data_with_one_line_before_flower_starts(tmp_path, capsys, monkeypatch):
    from fedplora.cli import main
    from fedplora.federation import simulation

    def no_flower(*a, **k):
        raise AssertionError("Flower was started")

    monkeypatch.setattr(simulation.subprocess, "Popen", no_flower)
    bad = write([{"question": "q", "answer": "a"}] * 4, tmp_path / "qa.parquet")
    assert main(["run", "--config", str(toml("medical")), "--dataset", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fedplora: error: flowertune-medical: {bad} has the columns ['answer', 'question']; expected "
                   "['instruction', 'input', 'output'], those of flwrlabs/medical-meadow-medical-flashcards (missing: "
                   "instruction, input, output; other columns are ignored)"]
    # the challenge's own hub dataset with the hub switched off: one line saying to pass a local copy
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert main(["run", "--config", str(toml("code")), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedplora: error: flowertune-code: the data is the hub dataset "
                                               "flwrlabs/code-alpaca-20k, but the hub is off")


def test_bad_records_are_one_line_too(tmp_path):
    def load(dataset):
        return make_task(RunConfig(task="flowertune-code", dataset=str(dataset)).validate()).load_splits()

    for rows, message in [([], "has no records"),
                          ([{"instruction": "a", "input": "", "output": 3}] * 3, r"record 1: \['output'\] must be"),
                          ([{"instruction": "a", "input": "b", "output": " "}] * 3, "every record has an empty")]:
        with pytest.raises(DataError, match=message):
            load(write(rows, tmp_path / "x.jsonl"))
    (tmp_path / "x.csv").write_text("instruction,input,output\n")
    with pytest.raises(DataError, match=r"x.csv must be a .json, .jsonl or .parquet file"):
        check_source(RunConfig(task="flowertune-code", dataset=str(tmp_path / "x.csv")).validate())
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="is not a readable Parquet file"):
        check_source(RunConfig(task="flowertune-code", dataset=str(tmp_path / "x.parquet")).validate())
    # a folder: train.<ext> and test.<ext> are the splits
    write(records("code")[:20], tmp_path / "folder" / "train.parquet")
    write(records("code")[20:], tmp_path / "folder" / "test.jsonl")
    train, test = load(tmp_path / "folder")
    assert (len(train), len(test)) == (20, len(records("code")) - 20)
    # null inputs (Parquet) are empty inputs
    train, _ = load(write([{"instruction": "Say hi.", "input": None, "output": "Hi"}] * 4, tmp_path / "nulls.parquet"))
    assert train[0]["prompt"] == flowertune_prompt("Say hi.")


# ------------------------------------------------------------------ the TOMLs
@pytest.mark.parametrize("name", NAMES)
def test_each_toml_carries_the_templates_settings(name):
    c = CHALLENGES[name]
    cfg = RunConfig.from_toml(toml(name)).validate()
    assert cfg.task == f"flowertune-{name}" and cfg.task in TASKS and cfg.dataset == c.hub
    assert (cfg.num_clients, cfg.clients_per_round) == (c.num_clients, round(c.num_clients * c.fraction))
    template = {"model": "mistralai/Mistral-7B-v0.3", "quantization": "4bit", "dtype": "bfloat16",
                "gradient_checkpointing": True, "rank": 32, "alpha": 64.0, "lora_dropout": 0.075,
                "targets": ["q_proj", "v_proj"], "rounds": 200, "partitioner": "iid", "weighting": "samples",
                "lr": 5e-5, "lr_min": 1e-6, "lr_schedule": "cosine", "max_seq_len": 512, "batch_size": 16,
                "grad_accum_steps": 1, "local_steps": 10, "local_epochs": None, "weight_decay": 0.0,
                "prompt_template": "alpaca", "checkpoint_every": 5, "comm_budget_action": "warn"}
    assert {k: getattr(cfg, k) for k in template} == template
    assert cfg.comm_budget_mb == pytest.approx(200_000 * 1024**2 / 1e6)  # the tracker's MiB, in our MB
    assert cfg.ranks == [8, 16, 32] and cfg.rank_shares == [1.0, 1.0, 1.0]  # heterogeneous budgets of R = 32


def test_the_cosine_rates_of_a_challenge_run_are_the_templates():
    from fedplora.training import round_lr

    cfg = RunConfig.from_toml(toml("finance")).validate()
    rates = [round_lr(cfg.lr, cfg.lr_min, cfg.lr_schedule, t, cfg.rounds) for t in (1, 100, 200)]
    first = 1e-6 + (5e-5 - 1e-6) * (1 + math.cos(math.pi / 200)) / 2  # FlowerTune's cosine_annealing(1, 200, ...)
    assert rates == pytest.approx([first, (5e-5 + 1e-6) / 2, 1e-6], rel=1e-12)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_the_challenges_budgets(method):
    """One round of each method with the TOMLs' adapter (R = 32, alpha 64, q/v) and budgets 8, 16, 32, on a tiny
    Llama: every client trains its budget (FedIT's ideal: R), and the aggregate keeps the global state's shapes."""
    from fedplora import get_plora_model, trainable_parameters
    from fedplora.methods import ClientInfo, build_method, plora_config

    cfg = RunConfig.from_toml(toml("general-nlp")).with_overrides(method=method).validate()
    method_ = build_method(cfg)
    state = method_.init_state(get_plora_model(tiny_llama(), plora_config(cfg)))
    ids = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(0))
    tasks, updates = [], []
    for cid, budget in enumerate(cfg.ranks):
        task = method_.configure_client(state, ClientInfo(cid, budget, 10), 1)
        model = get_plora_model(tiny_llama(), plora_config(cfg))
        method_.client_setup(model, task)
        assert task.config["rank"] == (cfg.rank if method_.ignores_budgets else budget)
        opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        update = method_.client_update(model, task, 10)
        method_.validate_update(task, update, state)
        tasks.append(task)
        updates.append(update)
    new = method_.aggregate(state, tasks, updates)
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in state.items()}
    assert any(not torch.equal(new[k], state[k]) for k in state)


# ------------------------------------------------------------------ end to end
FP32 = ["--quantization", "none", "--dtype", "float32", "--no-gradient-checkpointing"]
SMOKE = ["--clients", "3", "--clients-per-round", "2", "--rounds", "2", "--local-steps", "1", "--batch-size", "2",
         "--max-seq-len", "48", "--test-fraction", "0.2", "--eval-every", "2", "--eval-max-examples", "4",
         "--gen-max-examples", "1", "--gen-max-new-tokens", "4"]
METHOD_OF = {"general-nlp": "fedplora", "finance": "hetlora", "medical": "flexlora", "code": "fslora"}
# the benchmark each challenge is evaluated on (FlowerTune's), read from a sample evaluate_samples.py writes
BENCHMARK_OF = {"general-nlp": "mmlu", "finance": "fpb", "medical": "pubmedqa", "code": "mbpp"}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_each_challenge_runs_end_to_end_from_its_toml(name, tmp_path, in_process):
    """``fedplora run --config configs/flowertune/<c>.toml`` with smoke overrides (SmolLM2-135M, the local sample,
    2 rounds of 3 clients with budgets 8, 16 and 32, each challenge with another method), parsed by ``run``'s own
    parser; the federation runs in this process (the real strategy and ClientApp functions; Flower's transport is what
    the other slow tests run). Code keeps the TOML's base as it is, bfloat16 in 4 bits with checkpointing (bitsandbytes'
    CPU kernels); the others run a float32 base, as the README's smoke runs."""
    from fedplora.cli import build_parser, config_from_args
    from fedplora.federation.server_app import run_federation
    from fedplora.tasks.models import smollm2_path

    sample = write_sample(name, tmp_path, "parquet" if name == "code" else "jsonl")
    base = [] if name == "code" else FP32
    args = build_parser().parse_args(["run", "--config", str(toml(name)), "--model", smollm2_path(), "--dataset",
                                      str(sample), "--method", METHOD_OF[name], *SMOKE, *base])
    cfg = config_from_args(args)
    assert (cfg.rank, cfg.ranks, cfg.lr_schedule, cfg.task) == (32, [8, 16, 32], "cosine", f"flowertune-{name}")
    if name == "code":
        assert (cfg.quantization, cfg.dtype, cfg.gradient_checkpointing) == ("4bit", "bfloat16", True)
    summary = run_federation(InProcessGrid(cfg.num_clients), cfg, tmp_path / "run")
    history = summary["history"]
    assert [h["round"] for h in history] == [0, 1, 2] and summary["method"] == METHOD_OF[name]
    trained = [c for h in history[1:] for c in h["clients"]]
    assert len(trained) == 4 and {c["rank"] for c in trained} <= {8, 16, 32}
    assert all(not h.get("failures") for h in history[1:])
    final = summary["final"]
    assert {"loss", "perplexity", "rougeL"} <= set(final) and 0 < final["loss"] < 20
    saved = RunConfig.from_toml(tmp_path / "run" / "config.toml")
    assert saved.task == cfg.task and saved.comm_budget_mb == cfg.comm_budget_mb
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["r"] == 32
    # then the challenge's benchmark on the run folder, as a practitioner would quote it
    from evaluate_samples import write_sample as write_benchmark
    from fedplora.cli import main

    bench = BENCHMARK_OF[name]
    data = write_benchmark(bench, tmp_path / "bench")
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(tmp_path / "run"), "--benchmark", bench, "--data", str(data), "--max-examples", "2",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    figure = report["results"][bench]
    assert report["run"] == str(tmp_path / "run") and report["settings"]["max_examples"] == 2
    assert figure["metric"] and figure["value"] is not None and 0.0 <= figure["value"] <= 1.0, figure
