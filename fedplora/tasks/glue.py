"""GLUE: one table row per task (columns, labels, metric); every row is a task name of its own.

Data, one of:

* ``--data-dir FOLDER`` (or ``--dataset FOLDER``) with the task's TSV files ``train.tsv`` and
  ``<held-out split>.tsv`` (``validation.tsv``; MNLI: ``validation_matched.tsv``), in the format of
  ``../shared/data``: UTF-8, tab-separated, no quoting, a header naming the task's text columns and
  ``label`` (any order; an ``idx`` column is ignored), the label as its id (``0``, ``1``, ...);
* ``--dataset glue/<name>`` (or ``nyu-mll/glue/<name>``): the hub's GLUE split (needs the network).
  No other hub name is ever tried.

Training uses ``train``; the held-out set is GLUE's validation split, the split GLUE results are
reported on (GLUE's test labels are not public; a ``test.tsv`` beside them is never read).
Sentence pairs are the tokenizer's pair input, truncated ``longest_first`` to ``max_seq_len``.

A new GLUE-format task is one ``GlueSpec`` row in ``GLUE``; ``GLUE_TASKS`` makes its task class.
STS-B is in the table but refused with one line: it is a regression task (a 0-5 similarity score
scored by Pearson/Spearman correlation) and this family trains classifiers.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, Features, Value

from ..errors import ConfigError
from ..paths import local_path, missing_message, ref_kind
from .base import DataError
from .classification import ClassificationTask
from .metrics import accuracy_f1_mcc, binary_f1


@dataclass(frozen=True)
class GlueSpec:
    """One GLUE task: its TSV/hub columns, label names (label id = index), headline metric."""

    name: str
    columns: tuple[str, ...]  # the text columns: one (a sentence) or two (a pair), as the hub names them
    labels: tuple[str, ...]  # the label names; the files hold the ids 0..k-1
    metric: str  # the headline metric: "accuracy" or "mcc"
    extra: tuple[str, ...] = ()  # metrics GLUE reports beside the headline: "f1" = F1 of label 1
    held_out: str = "validation"  # the hub split (and file stem) results are reported on
    regression: bool = False  # STS-B: refused (see the module docstring)

    @property
    def is_pair(self) -> bool:
        return len(self.columns) == 2

    @property
    def header(self) -> tuple[str, ...]:
        return (*self.columns, "label")


# The labels are the hub's (datasets.load_dataset("nyu-mll/glue", name).features["label"].names).
GLUE: dict[str, GlueSpec] = {s.name: s for s in [
    GlueSpec("cola", ("sentence",), ("unacceptable", "acceptable"), "mcc"),
    GlueSpec("sst2", ("sentence",), ("negative", "positive"), "accuracy"),
    GlueSpec("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "accuracy", extra=("f1",)),
    GlueSpec("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), "accuracy", extra=("f1",)),
    GlueSpec("stsb", ("sentence1", "sentence2"), (), "pearson", regression=True),
    GlueSpec("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), "accuracy",
             held_out="validation_matched"),
    GlueSpec("qnli", ("question", "sentence"), ("entailment", "not_entailment"), "accuracy"),
    GlueSpec("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), "accuracy"),
    GlueSpec("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), "accuracy"),
]}

IGNORED_COLUMNS = ("idx",)  # the hub's row id, present when a split is exported with to_csv


def hub_names(spec: GlueSpec) -> tuple[str, ...]:
    return f"glue/{spec.name}", f"nyu-mll/glue/{spec.name}"


def data_help(spec: GlueSpec) -> str:
    return (f"{spec.name} needs its data: --data-dir FOLDER with GLUE's train.tsv and {spec.held_out}.tsv "
            f"(header '{'<TAB>'.join(spec.header)}', the format of ../shared/data), "
            f"or --dataset glue/{spec.name} when online")


def refuse_regression(spec: GlueSpec) -> None:
    if spec.regression:
        raise ConfigError(f"task: {spec.name} is GLUE's regression task (a 0-5 similarity score, scored by "
                          "Pearson/Spearman correlation) and fedplora's GLUE tasks are classifiers; "
                          "choose another task")


def read_tsv(path: Path, spec: GlueSpec) -> tuple[list[tuple[str, ...]], list[int]]:
    """The rows' text columns (in ``spec.columns`` order) and label ids of one GLUE TSV file."""
    name, want = spec.name, "<TAB>".join(spec.header)
    if not path.is_file():
        raise DataError(f"{name}: no file {path}; {data_help(spec)}")
    ids = {str(i): i for i in range(len(spec.labels))}
    texts, labels = [], []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{name}: {path} is empty; it needs the header '{want}' and one row per example")
        kept = [c for c in header if c not in IGNORED_COLUMNS]
        if sorted(kept) != sorted(spec.header) or len(set(header)) != len(header):
            raise DataError(f"{name}: {path} must be tab-separated with the header '{want}' "
                            f"(GLUE's format), its first line is {header!r}")
        where = [header.index(c) for c in spec.columns]
        at_label = header.index("label")
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{name}: {path} line {lineno}: expected {len(header)} tab-separated fields "
                                f"('{'<TAB>'.join(header)}'), got {len(row)}: {row!r}")
            y = ids.get(row[at_label].strip())
            if y is None:
                raise DataError(f"{name}: {path} line {lineno}: label {row[at_label]!r} is not one of "
                                f"{label_set(spec)}")
            texts.append(tuple(row[i] for i in where))
            labels.append(y)
    if not texts:
        raise DataError(f"{name}: {path} has a header but no rows")
    return texts, labels


def label_set(spec: GlueSpec) -> str:
    return ", ".join(f"{i} ({n})" for i, n in enumerate(spec.labels))


def make_glue_dataset(texts: list[tuple[str, ...]], labels: list[int], spec: GlueSpec) -> Dataset:
    """``text`` (and ``text_pair`` for a pair task) and a ClassLabel ``label``."""
    cols: dict[str, Any] = {"text": [t[0] for t in texts]}
    feats: dict[str, Any] = {"text": Value("string")}
    if spec.is_pair:
        cols["text_pair"], feats["text_pair"] = [t[1] for t in texts], Value("string")
    cols["label"], feats["label"] = labels, ClassLabel(names=list(spec.labels))
    return Dataset.from_dict(cols, features=Features(feats))


class GlueTask(ClassificationTask):
    """A GLUE task from its table row (``spec``); ``GLUE_TASKS`` holds one subclass per row."""

    spec: GlueSpec

    @classmethod
    def check_source(cls, config) -> None:
        spec, source = cls.spec, config.dataset
        refuse_regression(spec)
        if source:
            kind = ref_kind(source)
            if kind == "hub":
                return
            if kind == "missing":
                raise DataError(missing_message("dataset", source, "folder"))
            if not local_path(source).is_dir():
                raise DataError(f"dataset: {source} is a file; {spec.name} reads a folder with GLUE's train.tsv "
                                f"and {spec.held_out}.tsv")
        elif not config.data_dir:
            raise DataError(data_help(spec))
        folder = local_path(source or config.data_dir)
        for file in ("train.tsv", f"{spec.held_out}.tsv"):
            if not (folder / file).is_file():
                raise DataError(f"{spec.name}: no file {folder / file}; {data_help(spec)}")

    def load_splits(self) -> tuple[Dataset, Dataset]:
        spec = self.spec
        self.check_source(self.config)
        self.label_names = list(spec.labels)
        source = self.config.dataset
        if source and ref_kind(source) == "hub":
            return self._from_hub(source)
        folder = local_path(source or self.config.data_dir)
        train = make_glue_dataset(*read_tsv(folder / "train.tsv", spec), spec)
        test = make_glue_dataset(*read_tsv(folder / f"{spec.held_out}.tsv", spec), spec)
        return train, test

    def _from_hub(self, name: str) -> tuple[Dataset, Dataset]:
        spec = self.spec
        if name not in hub_names(spec):
            raise DataError(f"dataset: {name!r} is neither a local folder nor the hub name 'glue/{spec.name}' "
                            f"({spec.name} reads only GLUE {spec.name.upper()})")
        from datasets import load_dataset

        try:
            data = load_dataset("nyu-mll/glue", spec.name)
        except Exception as e:  # offline, hub down, ...: one clear line
            raise DataError(f"{spec.name}: cannot load glue/{spec.name} from the hub ({type(e).__name__}: {e}); "
                            "offline, pass --data-dir with GLUE's TSV files instead") from None

        def split(key: str) -> Dataset:
            part = data[key]
            texts = list(zip(*(part[c] for c in spec.columns)))
            labels = [int(y) for y in part["label"]]
            bad = sorted({y for y in labels if not 0 <= y < len(spec.labels)})
            if bad:
                raise DataError(f"{spec.name}: the hub's {key} split has labels {bad} outside {label_set(spec)}")
            return make_glue_dataset(texts, labels, spec)

        return split("train"), split(spec.held_out)

    def build_model(self):
        refuse_regression(self.spec)
        return super().build_model()

    def score(self, preds: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
        metrics = accuracy_f1_mcc(preds, labels, num_labels)
        if "f1" in self.spec.extra:
            metrics["f1"] = binary_f1(preds, labels, positive=1)
        return metrics

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "glue": {"columns": list(self.spec.columns), "labels": list(self.spec.labels),
                                               "held_out": self.spec.held_out}}


def _task_class(spec: GlueSpec) -> type[GlueTask]:
    cls_name = "GLUE" + spec.name.upper() + "Task"
    doc = f"GLUE {spec.name}: {' + '.join(spec.columns)} -> {', '.join(spec.labels) or 'a score'}; {spec.metric}."
    return type(cls_name, (GlueTask,), {"name": spec.name, "metric": spec.metric, "spec": spec, "__doc__": doc,
                                        "__module__": __name__})


GLUE_TASKS: dict[str, type[GlueTask]] = {name: _task_class(spec) for name, spec in GLUE.items()}

__all__ = ["GLUE", "GLUE_TASKS", "GlueSpec", "GlueTask", "read_tsv"]
