"""GLUE tasks from TSV folders (tiny splits written here) and the two Dirichlet partitioners."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from fedplora import rng
from fedplora.config import ConfigError, RunConfig
from fedplora.errors import DataError
from fedplora.tasks import GLUE, TASKS, make_task
from fedplora.tasks.classification import make_dataset
from fedplora.tasks.partition import equal_sizes, partition, partition_for

ALL_GLUE = {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}

PAIRS = [("The cat sat on the mat .", "A cat was sitting on the mat ."),
         ("Stocks fell sharply on Monday .", "Shares dropped steeply on Monday ."),
         ("He plays the violin .", "The weather is cold today ."),
         ("She bought a new car .", "Yesterday it rained in Paris ."),
         ("The company reported a profit .", "The firm said it made money ."),
         ("I like green tea .", "Green tea is something I enjoy .")]


def cfg(**kw) -> RunConfig:
    return RunConfig(**kw).validate()


def write_tsv(path: Path, header: list[str], rows: list[tuple]) -> None:
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n", encoding="utf-8")


def glue_folder(folder: Path, header: list[str], rows: list[tuple], held_out: str = "validation") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    write_tsv(folder / "train.tsv", header, rows)
    write_tsv(folder / f"{held_out}.tsv", header, rows[: max(2, len(rows) // 2)])
    return str(folder)


def pair_rows(n: int = 12) -> list[tuple]:
    return [(*PAIRS[i % len(PAIRS)], 1 - (i % len(PAIRS)) // 2 % 2) for i in range(n)]


# ------------------------------------------------------------------ the table
def test_the_table_has_every_glue_task_each_a_task_name():
    assert set(GLUE) == ALL_GLUE and ALL_GLUE <= set(TASKS)
    for name, spec in GLUE.items():
        cls = TASKS[name]
        assert cls.name == name and cls.metric == spec.metric and cls.spec is spec
        assert len(spec.columns) in (1, 2) and spec.header[-1] == "label"
        assert spec.regression or (len(spec.labels) >= 2 and spec.metric in ("accuracy", "mcc"))
    assert TASKS["cola"].metric == "mcc" and TASKS["sst2"].metric == TASKS["rte"].metric == "accuracy"
    assert GLUE["mrpc"].extra == GLUE["qqp"].extra == ("f1",)
    assert [n for n, s in GLUE.items() if s.is_pair] == ["mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]
    assert GLUE["mnli"].held_out == "validation_matched" and GLUE["mnli"].labels == ("entailment", "neutral",
                                                                                       "contradiction")
    assert make_task(cfg(task="cola")).describe()["metric"] == "mcc"
    from fedplora.tasks.sst2 import SST2Task

    assert SST2Task is TASKS["sst2"]


# ------------------------------------------------------------------ reading and encoding
def test_single_sentence_task_reads_and_encodes(tmp_path):
    rows = [("Our friends won't buy this analysis .", 1), ("They drank the pub .", 0), ('He said " hi .', 1),
            ("The more we study verbs , the crazier they get .", 1)]
    task = make_task(cfg(task="cola", data_dir=glue_folder(tmp_path, ["sentence", "label"], rows)))
    train, test = task.load_splits()
    assert task.label_names == ["unacceptable", "acceptable"] and task.metric == "mcc"
    assert train["text"][2] == 'He said " hi .' and train["label"] == [1, 0, 1, 1] and len(test) == 2
    assert "text_pair" not in train.column_names
    enc = task.encode(train)
    assert "text" not in enc.column_names and set(enc[0]["token_type_ids"]) == {0}


def test_pair_task_reads_and_encodes_as_the_tokenizers_pair(tmp_path):
    """RTE is not in ../shared/data: its table row alone makes `--task rte --data-dir DIR` work."""
    task = make_task(cfg(task="rte", data_dir=glue_folder(tmp_path, ["sentence1", "sentence2", "label"],
                                                          pair_rows()), max_seq_len=12))
    train, _ = task.load_splits()
    assert train.column_names == ["text", "text_pair", "label"] and task.label_names == ["entailment", "not_entailment"]
    assert (train[0]["text"], train[0]["text_pair"]) == PAIRS[0]
    enc = task.encode(train)
    tok = task.tokenizer
    first = enc[0]["input_ids"]
    assert first == tok(PAIRS[0][0], PAIRS[0][1], truncation="longest_first", max_length=12)["input_ids"]
    assert len(first) == 12 and first.count(tok.sep_token_id) == 2  # both sentences kept, truncated to 12
    assert 1 in enc[0]["token_type_ids"]  # the second sentence is segment 1
    batch = task.collate([enc[i] for i in range(3)])
    assert batch["input_ids"].shape == batch["token_type_ids"].shape and batch["labels"].tolist() == [1, 1, 0]


def test_header_order_idx_column_and_mnli_split(tmp_path):
    header = ["idx", "hypothesis", "label", "premise"]
    rows = [(i, f"h{i}", i % 3, f"p{i}") for i in range(6)]
    folder = glue_folder(tmp_path, header, rows, held_out="validation_matched")
    task = make_task(cfg(task="mnli", data_dir=folder))
    train, test = task.load_splits()
    assert (train[4]["text"], train[4]["text_pair"], train[4]["label"]) == ("p4", "h4", 1) and len(test) == 3
    assert task.label_names == ["entailment", "neutral", "contradiction"]


# ------------------------------------------------------------------ metrics
def test_cola_mcc_and_mrpc_f1_against_hand_values():
    preds, labels = np.array([1, 1, 1, 0, 0, 1, 0, 1]), np.array([1, 1, 0, 0, 1, 1, 0, 1])
    # TP=4 (0,1,5,7) FP=1 (2) FN=1 (4) TN=2 (3,6)
    cola = make_task(cfg(task="cola")).score(preds, labels, 2)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (8 - 1) / sqrt(5*5*3*3) = 7/15
    assert cola["mcc"] == pytest.approx(7 / 15) and cola["accuracy"] == pytest.approx(6 / 8)
    assert "f1" not in cola
    mrpc = make_task(cfg(task="mrpc")).score(preds, labels, 2)
    # F1 of label 1 = 2TP / (2TP + FP + FN) = 8/10; of label 0: 2*2/(4+1+1) = 2/3
    assert mrpc["f1"] == pytest.approx(0.8) and mrpc["accuracy"] == pytest.approx(0.75)
    assert mrpc["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    # nothing predicted positive and no positive label: F1 0, not a division by zero
    assert make_task(cfg(task="qqp")).score(np.zeros(4, int), np.zeros(4, int), 2)["f1"] == 0.0


# ------------------------------------------------------------------ data errors: one line each
def test_each_data_error_is_one_clear_line(tmp_path):
    def load(**kw):
        return make_task(cfg(task="cola", **kw)).load_splits()

    cases = []
    with pytest.raises(DataError, match=r"cola needs its data: --data-dir FOLDER .* or --dataset glue/cola") as e:
        load()
    cases.append(e.value)
    with pytest.raises(DataError, match=r"no file .*train\.tsv") as e:
        load(data_dir=str(tmp_path))
    cases.append(e.value)
    bad = {"empty.tsv": ("", r"is empty"),
           "header.tsv": ("text\tlabel\nfine\t1\n", r"header 'sentence<TAB>label'.*first line is \['text', 'label'\]"),
           "pair.tsv": ("sentence1\tsentence2\tlabel\na\tb\t1\n", r"header 'sentence<TAB>label'"),
           "fields.tsv": ("sentence\tlabel\ngood\t1\nbad\t0\textra\n", r"line 3: expected 2 tab-separated fields"),
           "label.tsv": ("sentence\tlabel\ngood\t1\nbad\t2\n", r"line 3: label '2' is not one of 0 \(unacceptable\), "
                                                               r"1 \(acceptable\)"),
           "name.tsv": ("sentence\tlabel\ngood\tacceptable\n", r"line 2: label 'acceptable'"),
           "rows.tsv": ("sentence\tlabel\n\n", r"has a header but no rows")}
    for name, (text, msg) in bad.items():
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        (folder / "train.tsv").write_text(text, encoding="utf-8")
        (folder / "validation.tsv").write_text("sentence\tlabel\nok\t1\n", encoding="utf-8")
        with pytest.raises(DataError, match=msg) as e:
            load(data_dir=str(folder))
        cases.append(e.value)
    folder = tmp_path / "noval"
    folder.mkdir()
    write_tsv(folder / "train.tsv", ["sentence", "label"], [("ok", 1)])
    with pytest.raises(DataError, match=r"no file .*validation\.tsv"):
        load(data_dir=str(folder))
    with pytest.raises(DataError, match="dataset: .* is a file"):
        load(dataset=str(folder / "train.tsv"))
    with pytest.raises(ConfigError, match="task: stsb is GLUE's regression task"):
        make_task(cfg(task="stsb", data_dir=str(folder))).load_splits()
    assert all("\n" not in str(c) for c in cases)


# ------------------------------------------------------------------ hub names
def test_hub_is_tried_only_for_glue_names(tmp_path, monkeypatch):
    import datasets
    from datasets import Dataset

    calls = []

    def fake_load_dataset(path, name=None, **kw):
        calls.append((path, name))
        rows = {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [0, 1], "idx": [0, 1]}
        return {"train": Dataset.from_dict(rows), "validation": Dataset.from_dict(rows)}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    folder = glue_folder(tmp_path / "mrpc", ["sentence1", "sentence2", "label"], pair_rows(4))
    make_task(cfg(task="mrpc", data_dir=folder)).load_splits()
    make_task(cfg(task="mrpc", dataset=folder)).load_splits()  # a local folder wins
    for name in ("someone/else", "glue/cola", "glue/mrpc/extra"):
        with pytest.raises(DataError, match=r"neither a local folder nor the hub name 'glue/mrpc'"):
            make_task(cfg(task="mrpc", dataset=name)).load_splits()
    assert calls == []
    for name in ("glue/mrpc", "nyu-mll/glue/mrpc"):
        train, test = make_task(cfg(task="mrpc", dataset=name)).load_splits()
        assert train["text_pair"] == ["c", "d"] and test["label"] == [0, 1]
    assert calls == [("nyu-mll/glue", "mrpc")] * 2

    def offline(path, name=None, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"cola: cannot load glue/cola from the hub \(ConnectionError: no network\)"):
        make_task(cfg(task="cola", dataset="glue/cola")).load_splits()


# ------------------------------------------------------------------ end to end
def test_pair_task_end_to_end_with_minilm(tmp_path):
    """MRPC's format on a tiny split: MiniLM (the default model), PLoRA, two local steps, evaluation."""
    from fedplora.adapters import PLoRAConfig, get_plora_model
    from fedplora.training import train_local

    folder = glue_folder(tmp_path, ["sentence1", "sentence2", "label"], pair_rows(16))
    task = make_task(cfg(task="mrpc", data_dir=folder, max_seq_len=32))
    train, test = task.load_splits()
    model = get_plora_model(task.build_model(), PLoRAConfig(rank=4))
    assert model.config.num_labels == 2
    stats = train_local(model, task, task.encode(train), steps=2, batch_size=4, lr=1e-3, weight_decay=0.0, seed=0)
    assert math.isfinite(stats["train_loss"])
    metrics = task.evaluate(model, task.encode(test))
    assert {"accuracy", "f1", "macro_f1", "mcc", "loss"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values()) and 0 <= metrics["f1"] <= 1


# ------------------------------------------------------------------ the two Dirichlet formulations
def two_labels(n: int = 2000, negatives: int = 900):
    return make_dataset([f"t{i}" for i in range(n)], [0] * negatives + [1] * (n - negatives), ["neg", "pos"])


def test_per_client_dirichlet_gives_equal_sizes_and_no_empty_client():
    ds = two_labels()
    parts = partition(ds, "dirichlet_per_client", 100, seed=3, alpha=0.01)
    assert [len(p) for p in parts] == [20] * 100 and sum(len(p) for p in parts) == len(ds)
    ids = sorted(t for p in parts for t in p["text"])
    assert ids == sorted(ds["text"])  # every row once
    single = sum(len(set(p["label"])) == 1 for p in parts)
    assert single >= 80  # alpha = 0.01: nearly every client holds one label
    assert equal_sizes(2003, 100)[:4] == [21, 21, 21, 20] and sum(equal_sizes(2003, 100)) == 2003


def test_per_client_dirichlet_survives_exact_zero_shares():
    """numpy's Dir(0.01) draws exact zeros; flwr-datasets' InnerDirichletPartitioner alone dies on each of these
    seeds ("Probabilities contain NaN": a one-label client whose label ran out), as on 11 of seeds 0-11."""
    ds = two_labels()  # 45% / 55%, like SST-2's 44% / 56%
    for seed in range(4):
        parts = partition(ds, "dirichlet_per_client", 100, seed=seed, alpha=0.01)
        assert [len(p) for p in parts] == [20] * 100


def test_per_client_dirichlet_splits_any_column():
    from datasets import Dataset

    ds = Dataset.from_dict({"prompt": [str(i) for i in range(60)], "category": ["qa", "sum", "gen"] * 20})
    parts = partition(ds, "dirichlet_per_client", 6, seed=0, alpha=0.01, label_column=None, partition_column="category")
    assert [len(p) for p in parts] == [10] * 6 and parts[0].column_names == ["prompt", "category"]


def test_per_class_dirichlet_that_cannot_fill_every_client_is_one_line(capfd):
    ds = two_labels()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError) as e:
            partition(ds, "dirichlet", 100, seed=0, alpha=0.01)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("dirichlet_alpha: the dirichlet partitioner")
    assert "--partitioner dirichlet_per_client" in msg and "--dirichlet-alpha" in msg and "--clients" in msg
    assert caught == [] and capfd.readouterr().err == ""  # flwr-datasets' ten retry warnings are silenced
    with pytest.raises(DataError, match="num_clients: 100 clients for 50 training examples"):
        partition(two_labels(50, 20), "dirichlet_per_client", 100, seed=0, alpha=0.01)


def test_both_dirichlet_formulations_are_reproducible_from_the_seed(tiny_assets):
    ds = two_labels()
    for kind, alpha in (("dirichlet_per_client", 0.01), ("dirichlet", 0.5)):
        a, b = (partition(ds, kind, 10, seed=5, alpha=alpha) for _ in range(2))
        other = partition(ds, kind, 10, seed=6, alpha=alpha)
        assert [p["text"] for p in a] == [p["text"] for p in b] != [p["text"] for p in other]
    c = cfg(task="tweets", data_dir=tiny_assets["data_dir"], num_clients=4, clients_per_round=2,
            partitioner="dirichlet_per_client", dirichlet_alpha=0.01, seed=7)
    task = make_task(c)
    train, _ = task.load_splits()
    parts = partition_for(task, train, c)  # seeded through the "partition" stream
    direct = partition(train, "dirichlet_per_client", 4, rng.small_seed("partition", 7), 0.01)
    assert [p["text"] for p in parts] == [p["text"] for p in direct]
    assert [len(p) for p in parts] == equal_sizes(len(train), 4)


def test_partitioner_setting_accepts_per_client_dirichlet():
    assert cfg(partitioner="dirichlet_per_client", dirichlet_alpha=0.01).partitioner == "dirichlet_per_client"
    with pytest.raises(ConfigError, match="partitioner: must be"):
        cfg(partitioner="inner_dirichlet")


def test_cli_run_with_an_impossible_dirichlet_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    """`fedplora run` on 2 labels, 100 clients, per-class Dir(0.01): refused before Flower starts (the split is
    drawn first, tasks.check_partitions), in about a second instead of after the federation's start-up."""
    from fedplora.cli import main
    from fedplora.federation import simulation

    def no_flower():
        raise AssertionError("Flower was started: the split was not checked first")

    monkeypatch.setattr(simulation, "free_port", no_flower)

    rows = [(f"sentence number {i} .", int(i % 9 < 4)) for i in range(300)]
    folder = glue_folder(tmp_path / "data", ["sentence", "label"], rows)
    code = main(["run", "--task", "sst2", "--data-dir", folder, "--clients", "100", "--clients-per-round", "10",
                 "--rounds", "1", "--partitioner", "dirichlet", "--dirichlet-alpha", "0.01",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("fedplora: error: dirichlet_alpha: the dirichlet partitioner")
    assert "min_partition_size" not in err and "max number of attempts" not in err  # no flwr-datasets retry wall
    assert "Traceback" not in err


def test_validation_split_is_carved_from_train_stratified_seeded_and_never_the_test_split(tmp_path):
    rows = [(f"sentence number {i} .", i % 2) for i in range(40)]
    folder = glue_folder(tmp_path, ["sentence", "label"], rows)
    train, test = make_task(cfg(task="sst2", data_dir=folder)).splits()
    assert (len(train), len(test)) == (40, 20)  # eval_split=test: the task's own held-out split
    task = make_task(cfg(task="sst2", data_dir=folder, eval_split="validation", validation_fraction=0.2))
    rest, val = task.splits()
    assert (len(rest), len(val)) == (32, 8) and sorted(val["label"]) == [0] * 4 + [1] * 4  # stratified
    assert not set(rest["text"]) & set(val["text"]) and set(rest["text"]) | set(val["text"]) == {r[0] for r in rows}
    again, val2 = make_task(cfg(task="sst2", data_dir=folder, eval_split="validation",
                                validation_fraction=0.2)).splits()
    assert val2["text"] == val["text"] and again["text"] == rest["text"]  # seeded
    other = make_task(cfg(task="sst2", data_dir=folder, eval_split="validation", validation_fraction=0.2,
                          seed=1)).splits()[1]
    assert other["text"] != val["text"]
    with pytest.raises(DataError, match="validation_fraction"):
        make_task(cfg(task="sst2", data_dir=folder, eval_split="validation", validation_fraction=0.01)).splits()


def test_the_early_split_check_draws_local_data_only(tmp_path, monkeypatch):
    """A hub dataset is left to the federation (offline there); iid is never drawn early; local per-class
    Dirichlet is."""
    import fedplora.tasks as tasks

    drawn = []
    monkeypatch.setattr(tasks, "make_task", lambda c: drawn.append(c.dataset or c.data_dir) or 1 / 0)
    tasks.check_partitions(cfg(task="sst2", dataset="glue/sst2", partitioner="dirichlet", num_clients=4))
    tasks.check_partitions(cfg(task="sst2", data_dir=str(tmp_path), partitioner="iid", num_clients=4))
    assert drawn == []
    with pytest.raises(ZeroDivisionError):
        tasks.check_partitions(cfg(task="sst2", data_dir=str(tmp_path), partitioner="dirichlet", num_clients=4))
    assert drawn == [str(tmp_path)]
