"""Sequence classification: text -> one of k labels, with a trained classifier head.

A classification task is a ``load_corpus`` (one labelled corpus, split by ``test_fraction``)
or a ``load_splits`` (a corpus that comes with its own train/test files, e.g. GLUE's tasks).
Rows hold ``text`` (and ``text_pair`` for a sentence-pair task) and ``label``.
Metrics: accuracy, macro-F1, MCC (``score``, which a task may extend) and the held-out loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Value

from .. import rng
from .base import DataError, Task
from .metrics import accuracy_f1_mcc
from .models import load_sequence_classifier


def make_dataset(texts: list[str], labels: list[int], label_names: list[str]) -> Dataset:
    features = Features({"text": Value("string"), "label": ClassLabel(names=label_names)})
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)


class ClassificationTask(Task):
    metric = "accuracy"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.label_names: list[str] = []

    # subclasses: return (texts, labels, label_names) for the whole corpus, or override load_splits
    def load_corpus(self) -> tuple[list[str], list[int], list[str]]:
        raise NotImplementedError

    def load_splits(self) -> tuple[Dataset, Dataset]:
        texts, labels, names = self.load_corpus()
        if not texts:
            raise DataError(f"task {self.name}: the corpus is empty")
        self.label_names = names
        data = make_dataset(texts, labels, names)
        split = data.train_test_split(test_size=self.config.test_fraction, seed=rng.small_seed("split", self.config.seed),
                                      stratify_by_column="label")
        return split["train"], split["test"]

    def default_model_path(self) -> str:
        from .models import minilm_path

        return minilm_path()

    def build_model(self):
        if not self.label_names:
            self.load_splits()
        model = load_sequence_classifier(self.model_path, len(self.label_names), seed=self.config.seed,
                                         **self.base_options())
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def encode(self, dataset: Dataset) -> Dataset:
        tok = self.tokenizer

        pair = "text_pair" in dataset.column_names  # a sentence-pair task (GLUE's MRPC, RTE, ...)

        def fn(batch):
            if pair:  # the tokenizer's pair input; the longer sentence loses tokens first
                return tok(batch["text"], batch["text_pair"], truncation="longest_first",
                           max_length=self.config.max_seq_len)
            return tok(batch["text"], truncation=True, max_length=self.config.max_seq_len)

        return dataset.map(fn, batched=True, remove_columns=["text", "text_pair"] if pair else ["text"])

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        feats = [{k: r[k] for k in r if k != "label"} for r in rows]
        batch = self.tokenizer.pad(feats, return_tensors="pt")
        batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.long)
        return dict(batch)

    def score(self, preds: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
        """The metrics of predictions against labels (a task adds its own, e.g. GLUE MRPC's F1)."""
        return accuracy_f1_mcc(preds, labels, num_labels)

    @torch.no_grad()
    def evaluate(self, model, dataset: Dataset, batch_size: int = 64) -> dict[str, float]:
        """Batches of examples of similar length (sorted once, stably): a batch pads to its longest
        example, so mixing a 5-token and a 64-token sentence would cost 64 tokens for both. The
        metrics do not depend on the order; the order is the same every round."""
        model.eval()
        preds, labels, losses = [], [], []
        order = np.argsort([len(ids) for ids in dataset["input_ids"]], kind="stable")
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[int(i)] for i in order[start:start + batch_size]]
            batch = self.collate(rows)
            out = model(**self.on_model(batch, model))
            losses.append(float(out.loss) * len(rows))
            preds.append(out.logits.argmax(-1).cpu().numpy())
            labels.append(batch["labels"].numpy())
        p, y = np.concatenate(preds), np.concatenate(labels)
        metrics = self.score(p, y, int(model.config.num_labels))
        metrics["loss"] = sum(losses) / len(dataset)
        return metrics
