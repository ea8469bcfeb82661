"""Splitting the training data over clients with flwr-datasets partitioners."""

from __future__ import annotations

from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner


def make_partitioner(kind: str, num_partitions: int, seed: int, alpha: float = 0.5,
                     label_column: str | None = "label") -> Partitioner:
    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        if label_column is None:
            raise ValueError("the dirichlet partitioner needs a task with labels")
        return DirichletPartitioner(num_partitions=num_partitions, partition_by=label_column, alpha=alpha,
                                    seed=seed, min_partition_size=1, self_balancing=False)
    raise ValueError(f"unknown partitioner {kind!r}; choose 'iid' or 'dirichlet'")


def partition(dataset: Dataset, kind: str, num_partitions: int, seed: int, alpha: float = 0.5,
              label_column: str | None = "label") -> list[Dataset]:
    """All partitions (deterministic for a seed); IID shuffles with the seed first."""
    if kind == "iid":
        dataset = dataset.shuffle(seed=seed)
    p = make_partitioner(kind, num_partitions, seed, alpha, label_column)
    p.dataset = dataset
    return [p.load_partition(i) for i in range(num_partitions)]


def label_histogram(ds: Dataset, label_column: str | None = "label") -> dict[str, int]:
    if label_column is None or label_column not in ds.column_names:
        return {}
    out: dict[str, int] = {}
    for y in ds[label_column]:
        out[str(y)] = out.get(str(y), 0) + 1
    return dict(sorted(out.items()))
