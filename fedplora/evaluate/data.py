"""A benchmark's rows: from the hub by FlowerTune's dataset id, or from a local file in that dataset's own format.

Why both: FlowerTune's evaluation reads each benchmark from the Hugging Face hub by name, which a practitioner
online wants to repeat exactly; an offline machine (this project's CI, a cluster without a proxy) needs the same
rows from a file it was given. A local file is read as it ships or as ``datasets`` exports it: ``.json`` (a list
of records, or one record a line, as ``Dataset.to_json`` writes), ``.jsonl``, either gzipped, ``.parquet`` or
``.csv``. Every row is a plain dict, so the benchmarks never see where it came from.

``check_columns`` is the one place a file's columns are compared with what a benchmark accepts, so a wrong file
is one line naming the file, the columns found and the column sets expected.
"""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..tasks.base import json_lines

SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet", ".csv")
Row = dict[str, Any]


@dataclass(frozen=True)
class HubSource:
    """Where FlowerTune's evaluation reads a benchmark: dataset id, configuration, split(s) joined with ``+``."""
    path: str
    config: str | None
    split: str

    def describe(self) -> str:
        return f"{self.path}" + (f" ({self.config})" if self.config else "") + f", split {self.split}"


SCRIPT_REFUSED = "Dataset scripts are no longer supported"
# The hub's own Parquet export of every dataset it could convert, scripts included, one folder per
# configuration and split: what the dataset viewer serves (https://huggingface.co/docs/dataset-viewer/parquet).
PARQUET_EXPORT = "hf://datasets/{path}@refs%2Fconvert%2Fparquet"


def load_hub(source: HubSource, what: str) -> list[Row]:
    """The split(s) from the hub; a failure (offline, no access, no export) is one line that says how to evaluate
    from a file instead.

    Several of FlowerTune's sources (bigbio's PubMedQA and MedQA) are loading scripts, which ``datasets`` 4 no
    longer runs; the hub keeps a Parquet export of the rows the script once produced, so those are read from it:
    the same rows FlowerTune's evaluation scores, without running the script."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(source.path, source.config, split=source.split)
    except Exception as e:  # noqa: BLE001 - any reason the hub cannot serve it ends the same way, named
        if SCRIPT_REFUSED not in str(e):
            raise _hub_error(source, what, e) from None
        try:
            return load_parquet_export(source)
        except Exception as e2:  # noqa: BLE001
            raise _hub_error(source, what, e2, "its Parquet export: ") from None
    return dataset.to_list()


def load_parquet_export(source: HubSource, root: str | None = None) -> list[Row]:
    """The rows of ``source`` from the Parquet export (``root``: the export's folder; a local copy in tests)."""
    import fsspec
    from datasets import load_dataset

    root = root or PARQUET_EXPORT.format(path=source.path)
    config = source.config or "default"
    rows: list[Row] = []
    fs, _ = fsspec.core.url_to_fs(root)  # "hf://" is huggingface_hub's file system; a plain path is local
    for split in source.split.split("+"):
        layouts = (f"{root}/{config}/{split}/*.parquet",  # the export's layout today
                   f"{root}/{config}/*-{split}.parquet")  # and before 2023, kept where a script never re-ran
        files = next((found for pattern in layouts if (found := sorted(fs.glob(pattern)))), None)
        if not files:
            raise FileNotFoundError(f"no Parquet export of {config}/{split} at {root}")
        if root.startswith("hf://"):
            files = ["hf://" + f for f in files]  # fs.glob drops the protocol
        rows += load_dataset("parquet", data_files={split: files}, split=split).to_list()
    return rows


def _hub_error(source: HubSource, what: str, e: Exception, where: str = "") -> DataError:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    return DataError(f"{what}: cannot load {source.describe()} from the hub ({where}{reason}); save that split in "
                     f"its own format and pass it with --data FILE (docs/tasks.md, 'Evaluating an adapter')")


def read_rows(path: str | Path, what: str) -> list[Row]:
    """The records of one local file (see the module docstring for the formats)."""
    file = Path(path).expanduser()
    if not file.exists():
        raise DataError(f"{what}: --data {file}: no such file")
    if file.is_dir():
        raise DataError(f"{what}: --data {file} is a folder; give one file ({', '.join(SUFFIXES)})")
    name = file.name.lower()
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            rows = pq.read_table(file).to_pylist()
        elif name.endswith(".csv"):
            with file.open(encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f))
        elif name.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(file, "rt", encoding="utf-8") as f:
                rows = _json_records(f.read(), file)
        else:
            raise DataError(f"{what}: --data {file}: unknown format; use one of {', '.join(SUFFIXES)}")
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{what}: --data {file} cannot be read ({e})") from None
    except Exception as e:  # noqa: BLE001 - pyarrow's errors for a file that is not Parquet
        if isinstance(e, DataError):
            raise
        raise DataError(f"{what}: --data {file} is not a valid {file.suffix} file ({e})") from None
    if not rows:
        raise DataError(f"{what}: --data {file} holds no rows")
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{what}: --data {file} must hold records (objects with the dataset's columns)")
    return rows


def _json_records(text: str, file: Path) -> list[Row]:
    """A JSON list of records, a JSON object of equal-length columns, or JSON lines."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return json_lines(text, f"--data {file}", "a JSON lines file holds one record a line")
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        sizes = {len(v) for v in data.values()}
        if len(sizes) == 1:  # columns, as pandas' to_json(orient="list") writes them
            return [dict(zip(data, values)) for values in zip(*data.values())]
    if isinstance(data, dict):
        return [data]
    raise DataError(f"--data {file} holds a JSON {type(data).__name__}; expected records")


def check_columns(rows: list[Row], formats: dict[str, tuple[str, ...]], what: str, source: str) -> str:
    """The name of the first format whose columns the rows all have; else one line naming what was found."""
    found = sorted({k for r in rows for k in r})
    for name, columns in formats.items():
        if all(all(c in r for c in columns) for r in rows):
            return name
    expected = " or ".join(f"{name} ({', '.join(cols)})" for name, cols in formats.items())
    raise DataError(f"{what}: {source} has columns {', '.join(found) or 'none'}; expected {expected}")
