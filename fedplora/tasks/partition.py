"""Splitting the training data over clients with flwr-datasets partitioners.

* ``iid``: a seeded shuffle cut into equal parts (IidPartitioner);
* ``dirichlet``: label skew, each label's share per client drawn from Dir(``dirichlet_alpha``)
  (DirichletPartitioner); small alpha = strong skew;
* ``pathological``: every client holds exactly ``pathological_classes`` labels
  (PathologicalPartitioner, classes assigned "first-deterministic" as in Li et al. 2021);
* ``natural``: by the values of a column (``partition_column``, e.g. an instruction set's
  ``category``): one value per client when there are as many values as clients, otherwise value
  number i (in sorted order) goes to client i mod ``num_clients`` (NaturalIdPartitioner).

The label-skew partitioners split by ``partition_column`` when it is set, else by the task's
label column. Every partitioner is deterministic for a seed, so the server and every client
compute the same partitions independently.
"""

from __future__ import annotations

from typing import Any

from datasets import ClassLabel, Dataset
from flwr_datasets.partitioner import (DirichletPartitioner, IidPartitioner, NaturalIdPartitioner,
                                       PathologicalPartitioner, Partitioner)

from .. import rng
from ..config import PARTITIONERS  # the names the partitioner setting accepts
from .base import DataError

GROUP = "__fedplora_group"


def _need_column(kind: str, dataset: Dataset | None, column: str | None) -> str:
    if column is None:
        raise DataError(f"partitioner: {kind} needs a column to split by; this task has no labels: "
                        "use --partitioner iid or name one with --partition-column")
    if dataset is not None and column not in dataset.column_names:
        raise DataError(f"partition_column: the training data has no column {column!r}; "
                        f"it has {dataset.column_names}")
    return column


def make_partitioner(kind: str, num_partitions: int, seed: int, alpha: float = 0.5,
                     label_column: str | None = "label", *, classes_per_partition: int = 2) -> Partitioner:
    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        return DirichletPartitioner(num_partitions=num_partitions, partition_by=_need_column(kind, None, label_column),
                                    alpha=alpha, seed=seed, min_partition_size=1, self_balancing=False)
    if kind == "pathological":
        return PathologicalPartitioner(num_partitions=num_partitions,
                                       partition_by=_need_column(kind, None, label_column),
                                       num_classes_per_partition=classes_per_partition,
                                       class_assignment_mode="first-deterministic", shuffle=True, seed=seed)
    raise DataError(f"partitioner: unknown partitioner {kind!r}; choose one of {list(PARTITIONERS)}")


def partition(dataset: Dataset, kind: str, num_partitions: int, seed: int, alpha: float = 0.5,
              label_column: str | None = "label", *, classes_per_partition: int = 2,
              partition_column: str | None = None) -> list[Dataset]:
    """All partitions (deterministic for a seed). ``partition_column`` overrides ``label_column``."""
    column = partition_column or label_column
    if kind == "natural":
        return natural_partitions(dataset, _need_column(kind, dataset, column), num_partitions)
    if kind in ("dirichlet", "pathological"):
        _need_column(kind, dataset, column)
        labels = set(dataset[column])
        if kind == "pathological" and not 1 <= classes_per_partition <= len(labels):
            raise DataError(f"pathological_classes: {classes_per_partition} is not in [1, {len(labels)}] "
                            f"(the number of distinct {column!r} values)")
    if kind == "iid":
        dataset = dataset.shuffle(seed=seed)
    p = make_partitioner(kind, num_partitions, seed, alpha, column, classes_per_partition=classes_per_partition)
    p.dataset = dataset
    parts = [p.load_partition(i) for i in range(num_partitions)]
    empty = [i for i, part in enumerate(parts) if len(part) == 0]
    if empty:
        raise DataError(f"partitioner: {kind} left clients {empty} without data ({len(dataset)} examples "
                        f"over {num_partitions} clients); use fewer clients or another partitioner")
    return parts


def natural_partitions(dataset: Dataset, column: str, num_partitions: int) -> list[Dataset]:
    values = sorted({str(v) for v in dataset[column]})
    if len(values) < num_partitions:
        raise DataError(f"partitioner: natural split by {column!r} has {len(values)} values ({values[:10]}) "
                        f"for num_clients={num_partitions}; use at most {len(values)} clients")
    group = {v: i % num_partitions for i, v in enumerate(values)}
    tagged = dataset.map(lambda row: {GROUP: group[str(row[column])]})
    p = NaturalIdPartitioner(partition_by=GROUP)
    p.dataset = tagged
    assert p.num_partitions == num_partitions  # its partition ids are the sorted group ids 0..n-1
    return [p.load_partition(g).remove_columns(GROUP) for g in range(num_partitions)]


def partition_for(task, train: Dataset, cfg) -> list[Dataset]:
    """The client's partitions for a run: every partitioner setting read from ``cfg``."""
    return partition(train, cfg.partitioner, cfg.num_clients, rng.small_seed("partition", cfg.seed), cfg.dirichlet_alpha, task.label_column,
                     classes_per_partition=cfg.pathological_classes, partition_column=cfg.partition_column)


def label_histogram(ds: Dataset, label_column: str | None = "label") -> dict[str, int]:
    """Count of each label (by name for a ClassLabel column); {} without a label column."""
    if label_column is None or label_column not in ds.column_names:
        return {}
    feature = ds.features[label_column]
    name = feature.int2str if isinstance(feature, ClassLabel) else str
    out: dict[str, int] = {}
    for y in ds[label_column]:
        key = name(y)
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def partition_report(parts: list[Dataset], label_column: str | None = "label") -> dict[str, Any]:
    """Sizes and label histograms of the partitions, for the run's output (JSON-ready)."""
    hists = [label_histogram(p, label_column) for p in parts]
    total: dict[str, int] = {}
    for h in hists:
        for k, v in h.items():
            total[k] = total.get(k, 0) + v
    return {"label_column": label_column if any(hists) else None, "sizes": [len(p) for p in parts],
            "label_histograms": hists, "labels_total": dict(sorted(total.items()))}
