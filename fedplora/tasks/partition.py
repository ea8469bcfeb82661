"""Splitting the training data over clients with flwr-datasets partitioners.

* ``iid``: a seeded shuffle cut into equal parts (IidPartitioner);
* ``dirichlet``: label skew per class: each label's rows are split across the clients in shares
  drawn from Dir(``dirichlet_alpha``) over the clients (DirichletPartitioner); client sizes vary,
  and at a small alpha with few labels most clients get nothing: the partitioner redraws up to
  10 times, then the run stops with one line naming the settings to change;
* ``dirichlet_per_client``: label skew per client: every client gets the same number of rows
  (len // n, the first len % n clients one more), its label mix drawn from Dir(``dirichlet_alpha``)
  over the labels (InnerDirichletPartitioner; a label that runs out is replaced by the others),
  so no client is ever empty;
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

import warnings
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset
from flwr_datasets.partitioner import (DirichletPartitioner, IidPartitioner, InnerDirichletPartitioner,
                                       NaturalIdPartitioner, PathologicalPartitioner, Partitioner)

from .. import rng
from ..partitioners import PARTITIONERS  # the names the partitioner setting accepts
from .base import DataError

GROUP = "__fedplora_group"
LABEL_SKEW = ("dirichlet", "dirichlet_per_client", "pathological")
_TINY = 1e-300  # the least share a Dirichlet draw gives a label (see _FlooredDirichlet)


class _FlooredDirichlet:
    """The partitioner's numpy Generator, but a Dirichlet share is never exactly 0.

    numpy draws exact zeros from Dir(alpha) at a small alpha (at 0.01 most draws of 100 clients have
    one); InnerDirichletPartitioner renormalises a client's label shares when a label runs out, and a
    client whose only non-zero share ran out gets 0/0 = NaN and the run dies ("Probabilities contain
    NaN", half the seeds at alpha 0.01, 2 labels, 100 clients). Flooring at 1e-300 changes no draw
    by more than that and lets such a client take the labels that are left. Every other draw is the
    Generator's own, so partitions stay those of the seed.
    """

    def __init__(self, gen: np.random.Generator) -> None:
        self._gen = gen

    def dirichlet(self, alpha, size=None):
        p = np.maximum(self._gen.dirichlet(alpha, size), _TINY)
        return p / p.sum(axis=-1, keepdims=True)

    def __getattr__(self, name: str):
        return getattr(self._gen, name)


class _InnerDirichlet(InnerDirichletPartitioner):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._rng = _FlooredDirichlet(self._rng)


def equal_sizes(total: int, num_partitions: int) -> list[int]:
    """``total`` rows over ``num_partitions`` clients: total // n each, the first total % n one more."""
    base, extra = divmod(total, num_partitions)
    return [base + (i < extra) for i in range(num_partitions)]


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
    if kind == "dirichlet_per_client":
        raise DataError("partitioner: dirichlet_per_client needs the data's size; call partition()")
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
    if kind in LABEL_SKEW:
        _need_column(kind, dataset, column)
        labels = set(dataset[column])
        if kind == "pathological" and not 1 <= classes_per_partition <= len(labels):
            raise DataError(f"pathological_classes: {classes_per_partition} is not in [1, {len(labels)}] "
                            f"(the number of distinct {column!r} values)")
    if len(dataset) < num_partitions:
        raise DataError(f"num_clients: {num_partitions} clients for {len(dataset)} training examples; "
                        f"use at most {len(dataset)} clients")
    if kind == "dirichlet_per_client":
        return per_client_dirichlet(dataset, column, num_partitions, seed, alpha)
    if kind == "iid":
        dataset = dataset.shuffle(seed=seed)
    p = make_partitioner(kind, num_partitions, seed, alpha, column, classes_per_partition=classes_per_partition)
    p.dataset = dataset
    with warnings.catch_warnings():  # flwr-datasets warns at length on every redraw; the error below says it once
        warnings.simplefilter("ignore")
        try:
            parts = [p.load_partition(i) for i in range(num_partitions)]
        except ValueError as e:
            if kind == "dirichlet" and "max number of attempts" in str(e):
                raise DataError(
                    f"dirichlet_alpha: the dirichlet partitioner (each label split across clients by "
                    f"Dir({alpha:g})) left a client without data in 11 draws ({len(dataset)} examples, "
                    f"{len(labels)} labels, {num_partitions} clients); use --partitioner dirichlet_per_client "
                    "(equal sizes, each client's label mix from Dir(alpha)), a larger --dirichlet-alpha or fewer "
                    "--clients") from None
            raise DataError(f"partitioner: {kind} cannot split {len(dataset)} examples over {num_partitions} "
                            f"clients: {e}") from None
    empty = [i for i, part in enumerate(parts) if len(part) == 0]
    if empty:
        raise DataError(f"partitioner: {kind} left clients {empty} without data ({len(dataset)} examples "
                        f"over {num_partitions} clients); use fewer clients or another partitioner")
    return parts


def per_client_dirichlet(dataset: Dataset, column: str, num_partitions: int, seed: int,
                         alpha: float) -> list[Dataset]:
    """``dirichlet_per_client``: equal sizes, each client's label mix drawn from Dir(alpha) over the labels.

    InnerDirichletPartitioner indexes labels 0..k-1, so any column (strings, ids with gaps) is split
    by the rank of its value among the sorted distinct values.
    """
    column_values = dataset[column]
    try:
        values = sorted(set(column_values))
    except TypeError:  # mixed types
        values = sorted(set(column_values), key=str)
    code = {v: i for i, v in enumerate(values)}
    tagged = dataset.add_column(GROUP, [code[v] for v in column_values])
    p = _InnerDirichlet(partition_sizes=equal_sizes(len(dataset), num_partitions), partition_by=GROUP,
                        alpha=float(alpha), shuffle=True, seed=seed)
    p.dataset = tagged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [p.load_partition(i).remove_columns(GROUP) for i in range(num_partitions)]


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
