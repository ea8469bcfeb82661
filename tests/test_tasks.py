"""Tasks on tiny slices of their real data: loading, errors, encoding, metrics, partitions, the code sandbox."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from fedplora.config import ConfigError, RunConfig
from fedplora.tasks import TASKS, DataError, make_task
from fedplora.tasks.metrics import lcs_length, mcc, rouge_l
from fedplora.tasks.partition import partition, partition_for, partition_report


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory):
    from assets import make_tiny_causal_lm

    return str(make_tiny_causal_lm(tmp_path_factory.mktemp("assets") / "tiny-llama"))


@pytest.fixture(scope="session")
def sst2_slice(tmp_path_factory):
    from assets import SST2, make_sst2_slice

    if not (SST2 / "train.tsv").is_file():
        pytest.skip(f"no SST-2 data at {SST2}")
    return str(make_sst2_slice(tmp_path_factory.mktemp("sst2")))


def cfg(**kw) -> RunConfig:
    return RunConfig(**kw).validate()


def plora(model, rank=4):
    from fedplora.adapters import PLoRAConfig, get_plora_model

    return get_plora_model(model, PLoRAConfig(rank=rank))


def train_steps(task, model, data, steps=3, lr=1e-2):
    from fedplora.training import train_local

    return train_local(model, task, data, steps=steps, batch_size=4, lr=lr, weight_decay=0.0, seed=0)


# ------------------------------------------------------------------ metrics
def test_mcc_against_hand_examples():
    assert mcc([1, 1, 0, 0], [1, 1, 0, 0], 2) == pytest.approx(1.0)
    assert mcc([0, 0, 1, 1], [1, 1, 0, 0], 2) == pytest.approx(-1.0)
    assert mcc([1, 1, 1, 1], [1, 0, 1, 0], 2) == 0.0  # one class predicted: undefined -> 0
    # TP=2 FN=1 FP=1 TN=2: (2*2-1*1)/sqrt(3*3*3*3) = 3/9
    assert mcc([1, 1, 0, 1, 0, 0], [1, 1, 1, 0, 0, 0], 2) == pytest.approx(1 / 3)
    # 3 classes, confusion [[2,0,0],[1,1,0],[0,0,1]]: c=4, s=5, t=(2,2,1), p=(3,1,1)
    # (4*5 - (6+2+1)) / sqrt(25-11) / sqrt(25-9) = 11 / (sqrt(14)*4)
    assert mcc([0, 0, 0, 1, 2], [0, 0, 1, 1, 2], 3) == pytest.approx(11 / (math.sqrt(14) * 4))


def test_rouge_l_against_hand_examples():
    assert lcs_length("a b c d".split(), "a c d e".split()) == 3
    # LCS("the cat sat on the mat", "the cat on the mat") = 5: P = 5/6, R = 1 -> F = 10/11
    assert rouge_l("The cat sat on the mat.", "the cat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("Police arrest man", "Man arrested by police") == pytest.approx(2 * (1 / 3) * (1 / 4) / (1 / 3 + 1 / 4))
    assert rouge_l("", "anything") == 0.0
    assert rouge_l("Same words", "same, words!") == 1.0


def test_classification_metrics_include_mcc(tiny_assets):
    from fedplora.tasks.metrics import accuracy_f1_mcc

    m = accuracy_f1_mcc(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]), 2)
    assert m["accuracy"] == 0.75 and set(m) == {"accuracy", "macro_f1", "mcc"}


# ------------------------------------------------------------------ classification tasks
def test_registry_has_every_task():
    assert {"tweets", "bbc", "sst2", "instruct", "code"} <= set(TASKS)


def test_sst2_from_local_tsv_trains_and_reports_accuracy_and_mcc(sst2_slice, tiny_assets):
    task = make_task(cfg(task="sst2", data_dir=sst2_slice, model=tiny_assets["model"]))
    train, test = task.load_splits()
    assert len(train) == 40 and len(test) == 40 and task.label_names == ["negative", "positive"]
    model = plora(task.build_model())
    assert model.config.num_labels == 2  # the 3-label tiny model gets a fresh 2-label head
    before = task.evaluate(model, task.encode(test))
    train_steps(task, model, task.encode(train))
    after = task.evaluate(model, task.encode(test))
    assert {"accuracy", "macro_f1", "mcc", "loss"} <= set(after) and after != before


def test_sst2_errors_name_the_file_and_the_fix(tmp_path, sst2_slice):
    with pytest.raises(DataError, match="--data-dir FOLDER .* or --dataset glue/sst2"):
        make_task(cfg(task="sst2")).load_splits()
    with pytest.raises(DataError, match="no file .*train.tsv"):
        make_task(cfg(task="sst2", data_dir=str(tmp_path))).load_splits()
    (tmp_path / "train.tsv").write_text("text,label\nfine,1\n")
    with pytest.raises(DataError, match="no file .*validation.tsv"):  # both files are looked for before reading
        make_task(cfg(task="sst2", data_dir=str(tmp_path))).load_splits()
    (tmp_path / "validation.tsv").write_text("sentence\tlabel\nfine\t1\n")
    with pytest.raises(DataError, match="must be tab-separated with the header 'sentence<TAB>label'"):
        make_task(cfg(task="sst2", data_dir=str(tmp_path))).load_splits()
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\tnegative\n")
    with pytest.raises(DataError, match="line 3"):
        make_task(cfg(task="sst2", data_dir=str(tmp_path))).load_splits()
    with pytest.raises(DataError, match="neither a local folder nor the hub name"):
        make_task(cfg(task="sst2", dataset="someone/else")).load_splits()
    with pytest.raises(ConfigError, match="data_dir: no such folder"):
        cfg(task="sst2", data_dir=str(tmp_path / "missing"))


def test_bbc_loads_five_topics_without_duplicates(tiny_assets):
    task = make_task(cfg(task="bbc", model=tiny_assets["model"], test_fraction=0.2))
    train, test = task.load_splits()
    assert task.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    texts = list(train["text"]) + list(test["text"])
    assert len(texts) == len(set(texts)) > 2000
    small = task.encode(test.select(range(24)))
    metrics = task.evaluate(plora(task.build_model()), small)
    assert {"accuracy", "macro_f1", "mcc"} <= set(metrics)


def test_bbc_bad_folder(tmp_path):
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "1.txt").write_text("Headline\n\nBody.")
    with pytest.raises(DataError, match="at least 2 topic"):
        make_task(cfg(task="bbc", data_dir=str(tmp_path))).load_splits()
    (tmp_path / "only" / "1.txt").unlink()
    with pytest.raises(DataError, match="no articles"):
        make_task(cfg(task="bbc", data_dir=str(tmp_path))).load_splits()


# ------------------------------------------------------------------ models
def test_missing_or_wrong_model_paths_are_clear(tmp_path, tiny_assets):
    with pytest.raises(ConfigError, match="model: .* neither an existing local path nor a hub name"):
        cfg(model="no-such-model")
    for ref, msg in [(str(tmp_path / "missing" / "model"), "does not exist"), (str(tmp_path), "no config.json")]:
        task = make_task(RunConfig(task="bbc", model=ref))
        with pytest.raises(DataError, match=msg):
            task.build_model()
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(DataError, match="is a file"):
        make_task(RunConfig(task="instruct", model=str(tmp_path / "weights.bin"))).build_model()


def test_gguf_tokenizer_is_smollm2s(tiny_llm):
    from fedplora.tasks.models import load_tokenizer

    tok = load_tokenizer(tiny_llm)
    assert (tok.bos_token, tok.eos_token, tok.eos_token_id, len(tok)) == ("<|im_start|>", "<|im_end|>", 2, 49152)
    ids = tok("def f(x):\n    return x + 12", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "def f(x):\n    return x + 12"
    assert ids[-2:] == tok("12", add_special_tokens=False)["input_ids"] and len(ids[-2:]) == 2  # digits one by one
    assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]  # no BOS added


def test_smollm2_cache_is_built_once(tmp_path, monkeypatch):
    from fedplora.tasks import models

    calls = []

    def fake_dequantise(gguf, out):
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "dequantise_gguf", fake_dequantise)
    first = models.smollm2_path(str(tmp_path))
    assert models.smollm2_path(str(tmp_path)) == first and len(calls) == 1
    assert Path(first) == tmp_path / models.SMOLLM2_CACHE_NAME and (Path(first) / "config.json").is_file()
    monkeypatch.setenv("FEDPLORA_CACHE", str(tmp_path / "env"))
    assert models.cache_root(None) == tmp_path / "env"


# ------------------------------------------------------------------ instruct
ALPACA = [{"instruction": "Give the capital.", "input": "France", "output": "Paris"},
          {"instruction": "Say hello.", "input": "", "output": "Hello!"},
          {"instruction": "Add.", "input": "2 and 3", "output": "5"}]
DOLLY = [{"instruction": "Name a colour.", "context": "", "response": "Blue", "category": "open_qa"},
         {"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "summarization"}]


def test_instruct_default_is_the_bbc_headline_set():
    task = make_task(cfg(task="instruct"))
    train, test = task.load_splits()
    assert len(train) + len(test) > 2000 and set(train["category"]) == {"business", "entertainment", "politics",
                                                                          "sports", "tech"}
    row = train[0]
    assert row["prompt"].startswith("### Instruction:\nWrite a headline for this news article.\n\n### Input:\n")
    assert row["prompt"].endswith("### Response:\n") and "\n" not in row["response"]


@pytest.mark.parametrize("fmt", ["alpaca-json", "dolly-jsonl", "folder", "mixed"])
def test_instruct_reads_alpaca_and_dolly_files(tmp_path, fmt):
    if fmt == "alpaca-json":
        (tmp_path / "d.json").write_text(json.dumps(ALPACA * 4))
        c = cfg(task="instruct", dataset=str(tmp_path / "d.json"))
    elif fmt == "dolly-jsonl":
        (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in DOLLY * 4))
        c = cfg(task="instruct", dataset=str(tmp_path / "d.jsonl"))
    elif fmt == "mixed":
        (tmp_path / "d.json").write_text(json.dumps(DOLLY * 3 + ALPACA * 3))
        c = cfg(task="instruct", dataset=str(tmp_path / "d.json"))
    else:
        (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ALPACA))
        (tmp_path / "test.json").write_text(json.dumps(DOLLY))
        c = cfg(task="instruct", data_dir=str(tmp_path))
    train, test = make_task(c).load_splits()
    rows = list(train) + list(test)
    assert all(r["prompt"].endswith("### Response:\n") for r in rows)
    if fmt == "mixed":
        assert sorted(set(train["category"]) | set(test["category"])) == ["none", "open_qa", "summarization"]
    if fmt == "folder":
        assert len(train) == 3 and len(test) == 2 and test["category"] == ["open_qa", "summarization"]
        assert train[0]["prompt"] == "### Instruction:\nGive the capital.\n\n### Input:\nFrance\n\n### Response:\n"
        assert train[1]["prompt"] == "### Instruction:\nSay hello.\n\n### Response:\n"


def test_instruct_wrong_files_are_clear(tmp_path):
    def load(name, text):
        (tmp_path / name).write_text(text)
        return make_task(cfg(task="instruct", dataset=str(tmp_path / name))).load_splits()

    with pytest.raises(DataError, match="expected Alpaca .* or Dolly"):
        load("a.json", json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(DataError, match="line 2 is not JSON"):
        load("b.jsonl", json.dumps(ALPACA[0]) + "\n{oops\n")
    with pytest.raises(DataError, match="must hold a JSON list"):
        load("c.json", json.dumps({"data": ALPACA}))
    with pytest.raises(DataError, match="must be a .json .* or .jsonl"):
        load("d.csv", "instruction,output\n")
    with pytest.raises(DataError, match="record 2 has \\['instruction'\\]"):
        load("e.json", json.dumps([ALPACA[0], {"instruction": "x"}]))
    with pytest.raises(DataError, match="no train.jsonl or train.json"):
        make_task(cfg(task="instruct", data_dir=str(tmp_path))).load_splits()
    with pytest.raises(ConfigError, match="dataset: .* neither an existing file"):
        cfg(task="instruct", dataset=str(tmp_path / "missing.jsonl"))


def test_instruct_loss_is_masked_to_the_response_and_truncation_keeps_it(tiny_llm):
    task = make_task(cfg(task="instruct", model=tiny_llm, max_seq_len=48))
    tok = task.tokenizer
    long_input = " ".join(["word"] * 200)
    ids, n = task.tokenize_pair(f"### Instruction:\nHeadline?\n\n### Input:\n{long_input}\n\n### Response:\n",
                                "Short headline here")
    assert len(ids) <= 48 and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n:-1]) == "Short headline here"
    assert tok.decode(ids[:n]).startswith("### Instruction:\nHeadline?") and tok.decode(ids[:n]).endswith(
        "### Response:\n")
    batch = task.collate([{"input_ids": ids, "prompt_len": n}, {"input_ids": ids[:n + 2], "prompt_len": n}])
    labels = batch["labels"]
    assert (labels[0, :n] == -100).all() and (labels[0, n:len(ids)] == torch.tensor(ids[n:])).all()
    assert (labels[1, n + 2:] == -100).all() and batch["attention_mask"][1].sum() == n + 2


def test_instruct_trains_and_evaluates_loss_perplexity_rouge(tiny_llm, tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(ALPACA * 8))
    task = make_task(cfg(task="instruct", model=tiny_llm, dataset=str(tmp_path / "d.json"), max_seq_len=64,
                         gen_max_examples=3, gen_max_new_tokens=8))
    train, test = task.load_splits()
    model = plora(task.build_model(), rank=8)
    data = task.encode(train)
    before = task.evaluate(model, task.encode(test))
    assert set(before) == {"loss", "perplexity", "rougeL", "gen_examples"} and before["gen_examples"] == 3
    assert before["perplexity"] == pytest.approx(math.exp(before["loss"]), rel=1e-6)
    train_steps(task, model, data, steps=10, lr=3e-2)
    after = task.evaluate(model, task.encode(test))
    assert after["loss"] < before["loss"] - 0.3  # the answers are being learnt (a tiny random model: slowly)
    assert len(task.last_generations) == 3 and {"prompt", "response", "generation"} <= set(task.last_generations[0])


# ------------------------------------------------------------------ code
def test_code_splits_problems_and_canonical_solutions_pass():
    from fedplora.tasks.code import program

    task = make_task(cfg(task="code", test_fraction=0.2, code_timeout=20))
    train, test = task.load_splits()
    assert len(train) + len(test) == 164 and len(test) == 33
    assert not set(train["task_id"]) & set(test["task_id"])
    rows = [test[i] for i in range(3)]
    assert task.score(rows, [r["response"] for r in rows])["pass@1"] == 1.0
    assert task.score(rows, ["    return None\n"] * 3)["pass@1"] == 0.0
    assert "check(" + rows[0]["entry_point"] + ")" in program(rows[0]["prompt"], "", rows[0]["test"],
                                                                rows[0]["entry_point"])


def test_code_evaluates_pass_at_1_with_a_tiny_model(tiny_llm):
    task = make_task(cfg(task="code", model=tiny_llm, max_seq_len=128, gen_max_examples=2, gen_max_new_tokens=8))
    train, test = task.load_splits()
    model = plora(task.build_model())
    metrics = task.evaluate(model, task.encode(test.select(range(4))))
    assert metrics["pass@1"] == 0.0 and metrics["gen_examples"] == 2 and metrics["loss"] > 0
    assert [r["status"] for r in task.last_results] == ["failed", "failed"]
    assert task.cut("    return 1\ndef other():\n    pass") == "    return 1"


def test_code_wrong_file(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"task_id": "x", "prompt": "def f():\n"}) + "\n")
    with pytest.raises(DataError, match="problem 1 lacks"):
        make_task(cfg(task="code", dataset=str(tmp_path / "p.jsonl"))).load_splits()
    (tmp_path / "p.txt").write_text("")
    with pytest.raises(DataError, match="HumanEval-format .jsonl"):
        make_task(cfg(task="code", dataset=str(tmp_path / "p.txt"))).load_splits()


# ------------------------------------------------------------------ the sandbox
def test_sandbox_runs_good_code_and_reports_its_isolation():
    from fedplora.tasks.sandbox import run_python

    r = run_python("import math, os\nprint(math.factorial(5), os.getcwd() == os.environ['HOME'])")
    assert r.passed and r.stdout.split() == ["120", "True"]
    assert r.isolation["python_guard"] is True and "network" in r.isolation and "filesystem" in r.isolation
    assert r.isolation["reads"] in ("landlock + python_guard", "python_guard") and r.isolation["readable"]


def test_sandbox_stops_an_endless_loop():
    from fedplora.tasks.sandbox import run_python

    r = run_python("while True:\n    pass\n", timeout=1.5)
    assert r.status == "timeout" and not r.passed and r.duration_s < 10


@pytest.mark.parametrize("guard", [True, False], ids=["all-layers", "kernel-layers-only"])
def test_sandbox_blocks_writes_outside_its_directory(tmp_path, guard):
    from fedplora.tasks.sandbox import run_python

    target = tmp_path / "outside.txt"
    tmp_path.chmod(0o777)  # even a folder anyone may write to stays out of reach
    r = run_python(f"open({str(target)!r}, 'w').write('escaped')\n", python_guard=guard)
    assert not r.passed and not target.exists()
    assert "PermissionError" in r.stderr or "Permission denied" in r.stderr
    assert run_python("open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())").stdout == "ok\n"


@pytest.mark.parametrize("layers", [{}, {"python_guard": False}, {"python_guard": False, "landlock": False}],
                         ids=["all-layers", "kernel-layers", "network-namespace-only"])
def test_sandbox_blocks_sockets(layers):
    from fedplora.tasks.sandbox import run_python

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        r = run_python(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                       "s.sendall(b'leak')\n", **layers)
        assert not r.passed
        if layers.get("landlock") is False and not r.isolation["network"].endswith("namespace"):
            pytest.skip(f"no network namespace on this machine ({r.isolation['network']})")
        with pytest.raises(socket.timeout):
            server.accept()  # nothing reached the listener
    finally:
        server.close()


def test_sandbox_blocks_signals_and_processes():
    from fedplora.tasks.sandbox import run_python

    for src in ("import os\nos.kill(os.getppid(), 9)\n", "import os\nos.fork()\n",
                "import subprocess\nsubprocess.run(['true'])\n"):
        assert not run_python(src, python_guard=False).passed
    assert not run_python("x = bytearray(4 * 1024 ** 3)\n", memory_mb=512).passed


# ------------------------------------------------------------------ partitions
def _labelled(n=120, k=4):
    from fedplora.tasks.classification import make_dataset

    return make_dataset([f"t{i}" for i in range(n)], [i % k for i in range(n)], [f"c{j}" for j in range(k)])


def test_iid_and_dirichlet_partitions_are_seeded():
    ds = _labelled()
    a = partition(ds, "iid", 4, seed=0)
    assert [len(p) for p in a] == [30] * 4 and a[0]["text"] == partition(ds, "iid", 4, seed=0)[0]["text"]
    d = partition(ds, "dirichlet", 4, seed=1, alpha=0.3)
    assert sum(len(p) for p in d) == 120 and d[0]["text"] == partition(ds, "dirichlet", 4, seed=1, alpha=0.3)[0]["text"]


def test_pathological_gives_each_client_exactly_k_labels():
    parts = partition(_labelled(), "pathological", 6, seed=0, classes_per_partition=2)
    assert all(len(set(p["label"])) == 2 for p in parts)
    with pytest.raises(DataError, match="pathological_classes: 9"):
        partition(_labelled(), "pathological", 6, seed=0, classes_per_partition=9)


def test_natural_partitions_by_a_column():
    from datasets import Dataset

    cats = ["qa", "summary", "brainstorm", "qa", "qa", "summary", "class", "brainstorm"]
    ds = Dataset.from_dict({"prompt": [str(i) for i in range(8)], "category": cats})
    parts = partition(ds, "natural", 4, seed=0, label_column=None, partition_column="category")
    assert [sorted(set(p["category"])) for p in parts] == [["brainstorm"], ["class"], ["qa"], ["summary"]]
    two = partition(ds, "natural", 2, seed=0, label_column="category")
    assert [sorted(set(p["category"])) for p in two] == [["brainstorm", "qa"], ["class", "summary"]]
    with pytest.raises(DataError, match="has 4 values .* use at most 4 clients"):
        partition(ds, "natural", 5, seed=0, label_column="category")
    with pytest.raises(DataError, match="no column 'topic'"):
        partition(ds, "natural", 2, seed=0, label_column=None, partition_column="topic")
    with pytest.raises(DataError, match="this task has no labels"):
        partition(ds, "dirichlet", 2, seed=0, label_column=None)


def test_partition_for_reads_the_run_settings_and_report_is_json(tiny_assets):
    c = cfg(task="tweets", data_dir=tiny_assets["data_dir"], num_clients=3, clients_per_round=2,
            partitioner="pathological", pathological_classes=1)
    task = make_task(c)
    train, _ = task.load_splits()
    parts = partition_for(task, train, c)
    report = partition_report(parts, task.label_column)
    assert report["sizes"] == [len(p) for p in parts] and sum(report["sizes"]) == len(train)
    assert all(len(h) == 1 for h in report["label_histograms"])
    assert set(report["labels_total"]) == {"negative", "neutral", "positive"}
    json.dumps(report)
    assert partition_report(parts, None)["label_column"] is None


def test_new_settings_are_validated():
    for kw, msg in [({"partitioner": "shards"}, "partitioner: must be"), ({"pathological_classes": 0}, "pathological_classes"),
                    ({"gen_max_examples": 0}, "gen_max_examples"), ({"gen_max_new_tokens": -1}, "gen_max_new_tokens"),
                    ({"code_timeout": 0}, "code_timeout"), ({"partition_column": ""}, "partition_column")]:
        with pytest.raises(ConfigError, match=msg):
            cfg(**kw)


# ------------------------------------------------------------------ slow: the real SmolLM2
@pytest.mark.slow
def test_real_smollm2_instruct_evaluates(tmp_path):
    """Dequantise SmolLM2 (first time ~45 s, cached after) and evaluate it on two real BBC headlines."""
    task = make_task(cfg(task="instruct", max_seq_len=96, gen_max_examples=2, gen_max_new_tokens=8))
    _, test = task.load_splits()
    model = plora(task.build_model())
    metrics = task.evaluate(model, task.encode(test.select(range(2))))
    assert 0 < metrics["loss"] < 8 and 0 <= metrics["rougeL"] <= 1
    assert all(g["generation"].strip() for g in task.last_generations)  # a real model writes something


@pytest.mark.slow
def test_instruct_runs_end_to_end_on_flower(tiny_llm, tmp_path):
    """A causal-LM task through the real Simulation Engine: train, evaluate, export the adapter."""
    from fedplora.federation.simulation import run_simulation

    (tmp_path / "d.json").write_text(json.dumps(DOLLY * 10))  # natural split by category
    c = cfg(task="instruct", model=tiny_llm, dataset=str(tmp_path / "d.json"), num_clients=2, clients_per_round=2,
            rounds=1, local_steps=2, batch_size=2, rank=4, ranks=[2, 4], rank_shares=[1, 1], max_seq_len=48,
            eval_max_examples=4, gen_max_examples=2, gen_max_new_tokens=4, partitioner="natural",
            partition_column="category", out=str(tmp_path / "run"))
    summary = run_simulation(c, tmp_path / "run")
    assert summary["metric"] == "rougeL" and {"loss", "perplexity", "rougeL"} <= set(summary["final"])
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_cli_missing_data_is_one_clear_line(capsys):
    from fedplora.cli import main

    assert main(["run", "--task", "sst2", "--clients", "2", "--clients-per-round", "1", "--rounds", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedplora: error: sst2 needs its data: --data-dir FOLDER")


def test_a_missing_data_folder_or_file_fails_before_flower_starts(tmp_path, monkeypatch):
    """run_simulation checks where the data comes from first: no SuperLink is started for a run that
    cannot read its data."""
    from fedplora.federation import simulation

    def no_flower(*a, **k):
        raise AssertionError("Flower was started")

    monkeypatch.setattr(simulation.subprocess, "Popen", no_flower)
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nok .\t1\n")
    for kw, message in [({}, "sst2 needs its data: --data-dir FOLDER"),
                        ({"data_dir": str(tmp_path)}, f"sst2: no file {tmp_path / 'validation.tsv'}"),
                        ({"task": "stsb", "data_dir": str(tmp_path)}, "stsb is GLUE's regression task")]:
        cfg = RunConfig(**{"task": "sst2", **kw}).validate()
        with pytest.raises(ConfigError if kw.get("task") else DataError, match=message):
            simulation.run_simulation(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
