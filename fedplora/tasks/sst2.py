"""GLUE SST-2: binary sentence sentiment (0 = negative, 1 = positive). Metric: accuracy (and MCC).

Data, one of:

* ``--data-dir FOLDER`` with GLUE's TSV files ``train.tsv`` and ``validation.tsv`` (header
  ``sentence<TAB>label``, no quoting), e.g. ``../shared/data/sst2``;
* ``--dataset glue/sst2``: the hub's GLUE SST-2 (needs the network).

Training uses ``train``; the held-out set is GLUE's ``validation`` split (872 sentences), the split
GLUE results are reported on, and the same whether the data comes from files or the hub (the hub's
test split has no labels). A labelled ``test.tsv`` beside them is not used, so it stays untouched for
a final check. ``eval_max_examples`` takes a seeded sample of the held-out set.
"""

from __future__ import annotations

import csv
from pathlib import Path

from datasets import Dataset

from ..paths import local_path, missing_message, ref_kind
from .base import DataError
from .classification import ClassificationTask, make_dataset

LABELS = ["negative", "positive"]
HUB_NAMES = ("glue/sst2", "nyu-mll/glue/sst2")
HELP = ("sst2 needs its data: --data-dir FOLDER with GLUE's train.tsv and validation.tsv "
        "(e.g. ../shared/data/sst2), or --dataset glue/sst2 when online")


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    if not path.is_file():
        raise DataError(f"sst2: no file {path}; {HELP}")
    texts, labels = [], []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or header[:2] != ["sentence", "label"]:
            raise DataError(f"sst2: {path} must be tab-separated with the header 'sentence<TAB>label' "
                            f"(GLUE's format), its first line is {header!r}")
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 2 or row[1] not in ("0", "1"):
                raise DataError(f"sst2: {path} line {lineno}: expected 'sentence<TAB>0|1', got {row!r}")
            texts.append(row[0])
            labels.append(int(row[1]))
    if not texts:
        raise DataError(f"sst2: {path} has no rows")
    return texts, labels


class SST2Task(ClassificationTask):
    name = "sst2"

    def load_splits(self) -> tuple[Dataset, Dataset]:
        self.label_names = list(LABELS)
        source = self.config.dataset
        if source:
            kind = ref_kind(source)
            if kind == "hub":
                return self._from_hub(source)
            if kind == "missing":
                raise DataError(missing_message("dataset", source, "folder"))
            if not local_path(source).is_dir():
                raise DataError(f"dataset: {source} is a file; sst2 reads a folder with GLUE's train.tsv and "
                                "validation.tsv")
        elif not self.config.data_dir:
            raise DataError(HELP)
        folder = local_path(source or self.config.data_dir)
        train = make_dataset(*read_tsv(folder / "train.tsv"), LABELS)
        test = make_dataset(*read_tsv(folder / "validation.tsv"), LABELS)
        return train, test

    def _from_hub(self, name: str) -> tuple[Dataset, Dataset]:
        if name not in HUB_NAMES:
            raise DataError(f"dataset: {name!r} is neither a local folder nor the hub name 'glue/sst2' "
                            "(sst2 reads only GLUE SST-2)")
        from datasets import load_dataset

        try:
            data = load_dataset("nyu-mll/glue", "sst2")
        except Exception as e:  # offline, hub down, ...: one clear line
            raise DataError(f"sst2: cannot load glue/sst2 from the hub ({type(e).__name__}: {e}); "
                            "offline, pass --data-dir with GLUE's TSV files instead") from None
        return (make_dataset(list(data["train"]["sentence"]), list(data["train"]["label"]), LABELS),
                make_dataset(list(data["validation"]["sentence"]), list(data["validation"]["label"]), LABELS))
