"""What a task is: data, model, loss and metric. A new task is one small module.

The federation only calls these methods; it does not know whether a task is
classification or generation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from datasets import Dataset
from torch import nn

from .. import rng
from ..errors import DataError
from .models import load_tokenizer

__all__ = ["DataError", "Task"]  # DataError lives in fedplora.errors; importable from here as before



def json_lines(text: str, where: str, hint: str) -> list[Any]:
    """The records of a JSON lines text (blank lines skipped). Every reader of local data files (the instruct and
    FlowerTune tasks, ``fedplora evaluate``) refuses a bad line the same way: one line naming ``where`` and the line
    number, then ``hint``, what such a file should hold."""
    import json

    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{where} line {n} is not JSON ({e.msg}); {hint}") from None
    return records

class Task(ABC):
    name: ClassVar[str]
    metric: ClassVar[str]  # the headline metric (higher is better), e.g. "accuracy"
    label_column: ClassVar[str | None] = "label"  # what label-skew partitioners split by

    def __init__(self, config) -> None:
        self.config = config
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The model's tokenizer, loaded once (a decoder-only model's EOS doubles as padding)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_path)
        return self._tokenizer

    @classmethod
    def check_source(cls, config) -> None:
        """Where the data is to come from, checked without reading it (a DataError line): run before Flower
        starts, so a forgotten or misspelt data folder fails in a second, not after the federation's
        start-up. Loading checks the contents."""

    @abstractmethod
    def load_splits(self) -> tuple[Dataset, Dataset]:
        """(train, test), the same on every process for a given seed."""

    def splits(self) -> tuple[Dataset, Dataset]:
        """(what clients train on, what the server evaluates): ``load_splits`` with ``eval_split = "test"``;
        with ``"validation"`` a seeded ``validation_fraction`` of the training data, held out from every
        client and evaluated instead, so settings such as the learning rate are chosen without ever
        looking at the reported split (stratified by label where the task has one)."""
        train, test = self.load_splits()
        if self.config.eval_split != "validation":
            return train, test
        column = self.label_column if self.label_column in train.column_names else None
        if column is not None and not hasattr(train.features[column], "names"):
            train = train.class_encode_column(column)  # stratifying needs a ClassLabel column
        try:
            split = train.train_test_split(test_size=self.config.validation_fraction, stratify_by_column=column,
                                           seed=rng.small_seed("validation", self.config.seed))
        except ValueError as e:
            raise DataError(f"eval_split=validation: cannot hold out validation_fraction="
                            f"{self.config.validation_fraction:g} of {len(train)} training examples ({e}); "
                            "raise --validation-fraction") from None
        return split["train"], split["test"]

    @property
    def model_path(self) -> str:
        """The model this task fine-tunes: ``--model`` (local folder or hub name) or the task's default."""
        return self.config.model or self.default_model_path()

    def default_model_path(self) -> str:
        raise DataError(f"task {self.name}: no default model; pass --model PATH")

    @property
    def partition_column(self) -> str | None:
        """The column the label-skew and natural partitioners split by (``--partition-column`` overrides)."""
        return self.config.partition_column or self.label_column

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The plain transformers model (PLoRA is added by the caller); seeded head init; in the run's
        ``dtype`` / ``quantization`` on its ``device`` (``base_options``)."""

    def base_options(self) -> dict[str, Any]:
        """How the frozen base is loaded: dtype, quantization and the resolved device (fedplora.hardware)."""
        from ..hardware import resolve_device

        c = self.config
        return {"dtype": c.dtype, "quantization": c.quantization, "device": resolve_device(c.device)}

    @abstractmethod
    def encode(self, dataset: Dataset) -> Dataset:
        """Tokenise once; rows become model inputs."""

    @abstractmethod
    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]: ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    @staticmethod
    def on_model(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """The batch on the model's device (collate builds it on the CPU)."""
        from ..hardware import model_device, to_device

        return to_device(batch, model_device(model))

    @abstractmethod
    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        """Metrics of ``model`` on an encoded dataset; must include ``self.metric``."""

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "metric": self.metric, "model": self.model_path}
