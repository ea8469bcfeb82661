"""FlowerTune's four LLM challenges (General NLP, Finance, Medical, Code) as tasks: ``flowertune-<challenge>``.

Why a task per challenge and not only a TOML file each: a challenge fixes its training data (one hub dataset with its
own columns) and how FlowerTune's template folds those columns into one instruction, and both must hold the same way
for data read from the hub and for a local copy read offline. The settings of the template's runs (model, rank,
schedule, clients, ...) are in ``configs/flowertune/<challenge>.toml``; docs/tasks.md sets them beside FlowerTune's.

Data, the first of:

* ``--dataset PATH``: a local ``.json`` (a list of records, or JSON lines as ``Dataset.to_json`` writes them),
  ``.jsonl`` or ``.parquet`` file, or a folder with ``train.<ext>`` and optionally ``test.<ext>``; ``--data-dir``
  names such a folder too;
* ``--dataset ORG/NAME``: a hub dataset in the challenge's format (its ``train`` split);
* nothing: the challenge's own hub dataset (the template's ``dataset.name``), which needs the network.

Every source must have the challenge's columns (all four: ``instruction``, ``input``, ``output``; extra columns such as
alpaca-gpt4's ``text`` are ignored); a file without them is refused in one line naming the file, the columns it has
and the ones expected. Without a test file, ``test_fraction`` of the rows (seeded) are held out.

How a record becomes a prompt is the template's (``dataset.py``: ``reformat`` and ``formatting_prompts_func``): the
instruction is ``instruction`` (General NLP: the template never reads ``input``), ``instruction + " " + input``
(Finance, Code) or ``input`` alone (Medical, whose ``instruction`` is the same sentence on every row), then::

    Below is an instruction that describes a task. Write a response that appropriately completes the request.
    ### Instruction:
    {instruction}
    ### Response: {output}

with the loss on `` {output}`` only (the template's completion-only collator starts it after ``### Response:``) and,
unlike the template, the end-of-sequence token after it, so that generation stops. ``prompt_template = "chat"``
renders the same instruction as a user turn of the model's own chat template instead (the instruct task's).
Metrics, as the instruct task's: ROUGE-L of greedy generations, the held-out loss and perplexity; the leaderboard's
benchmarks are ``fedplora evaluate``'s.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from datasets import Dataset

from .. import rng
from ..paths import local_path, missing_message, ref_kind
from .base import DataError, json_lines
from .instruct import InstructTask

PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
COLUMNS = ("instruction", "input", "output")
EXTENSIONS = (".parquet", ".jsonl", ".json")
FOLDS = {  # how the template turns a record into its one instruction (``reformat`` in its dataset.py)
    "instruction": lambda r: r["instruction"],
    "instruction input": lambda r: f"{r['instruction']} {r['input']}",
    "input": lambda r: r["input"],
}


@dataclass(frozen=True)
class Challenge:
    """One FlowerTune LLM challenge as its template sets it up."""

    name: str  # the task is flowertune-<name>
    title: str
    hub: str  # the template's dataset.name (static: the leaderboard fixes it)
    fold: str  # a key of FOLDS
    num_clients: int  # the template's num-supernodes
    fraction: float  # its strategy.fraction-train
    evaluation: str  # the leaderboard's benchmarks
    columns: tuple[str, ...] = COLUMNS

    @property
    def task(self) -> str:
        return f"flowertune-{self.name}"

    @property
    def clients_per_round(self) -> int:
        return max(1, round(self.num_clients * self.fraction))


CHALLENGES: dict[str, Challenge] = {c.name: c for c in (
    Challenge("general-nlp", "General NLP", "flwrlabs/alpaca-gpt4", "instruction", 20, 0.1,
              "MMLU (STEM, social sciences, humanities) accuracy"),
    Challenge("finance", "Finance", "flwrlabs/fingpt-sentiment-train", "instruction input", 50, 0.1,
              "FPB, FIQA, TFNS sentiment accuracy"),
    Challenge("medical", "Medical", "flwrlabs/medical-meadow-medical-flashcards", "input", 20, 0.1,
              "PubMedQA, MedMCQA, MedQA, CareQA accuracy"),
    Challenge("code", "Code", "flwrlabs/code-alpaca-20k", "instruction input", 10, 0.2,
              "HumanEval, MBPP, MultiPL-E (JavaScript, C++) pass@1"),
)}


def flowertune_prompt(instruction: str) -> str:
    """The template's Alpaca prompt up to and including its response tag; the response follows after a space."""
    return f"{PREAMBLE}\n### Instruction:\n{instruction}\n### Response:"


# ------------------------------------------------------------------ reading
def check_columns(found: list[str], source: str, challenge: Challenge) -> None:
    """The one line for a source without the challenge's columns: the file, what it has, what is expected."""
    missing = [c for c in challenge.columns if c not in found]
    if missing:
        raise DataError(f"{challenge.task}: {source} has the columns {sorted(found)}; expected "
                        f"{list(challenge.columns)}, those of {challenge.hub} (missing: {', '.join(missing)}; "
                        "other columns are ignored)")


def _text(path: Path, task: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{task}: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _json_records(path: Path, task: str) -> list[Any]:
    text = _text(path, task)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{task}: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    # .jsonl, or a .json file of JSON lines (what datasets' Dataset.to_json writes)
    return json_lines(text, f"{task}: {path}",
                      f"a {path.suffix} file holds a JSON list of records or one JSON object per line")


def read_file(path: Path, challenge: Challenge) -> list[dict[str, Any]]:
    """A local file's records, checked against the challenge's columns (the file's own column names)."""
    task = challenge.task
    if not path.is_file():
        raise DataError(f"{task}: no file {path}")
    if path.suffix not in EXTENSIONS:
        raise DataError(f"{task}: {path} must be a .json, .jsonl or .parquet file with the columns "
                        f"{', '.join(challenge.columns)}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # not Parquet, truncated, ...: one line
            raise DataError(f"{task}: {path} is not a readable Parquet file ({type(e).__name__}: {e})") from None
        check_columns(table.column_names, str(path), challenge)
        return table.select(list(challenge.columns)).to_pylist()
    records = _json_records(path, task)
    if not records:
        raise DataError(f"{task}: {path} has no records")
    if not all(isinstance(r, dict) for r in records):
        kind = next(type(r).__name__ for r in records if not isinstance(r, dict))
        raise DataError(f"{task}: {path} holds a {kind} where a record (a JSON object with the columns "
                        f"{', '.join(challenge.columns)}) was expected")
    check_columns(sorted({k for r in records for k in r}), str(path), challenge)
    return records


def peek_columns(path: Path, challenge: Challenge) -> None:
    """A local file's columns checked without reading all of it (a Parquet schema, the first JSON record), so that
    a wrong file fails before Flower starts; ``read_file`` checks every record when the data is loaded."""
    if not path.is_file() or path.suffix not in EXTENSIONS:
        read_file(path, challenge)  # its one line for a missing file or a wrong extension
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except Exception as e:
            raise DataError(f"{challenge.task}: {path} is not a readable Parquet file ({type(e).__name__}: {e})") \
                from None
        check_columns(names, str(path), challenge)
        return
    try:
        with path.open(encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
    except UnicodeDecodeError as e:
        raise DataError(f"{challenge.task}: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix == ".json" and first.lstrip().startswith("["):
        records = _json_records(path, challenge.task)[:1]  # a JSON list: only a full parse finds its first record
    else:
        try:
            records = [json.loads(first)] if first else []
        except json.JSONDecodeError as e:
            raise DataError(f"{challenge.task}: {path} line 1 is not JSON ({e.msg}); a {path.suffix} file holds a "
                            "JSON list of records or one JSON object per line") from None
    if records and isinstance(records[0], dict):
        check_columns(sorted(records[0]), str(path), challenge)


def to_rows(records: list[dict[str, Any]], source: str, challenge: Challenge) -> dict[str, list[str]]:
    """Records in the challenge's format -> the task's columns: prompt, response, instruction, context (empty: the
    template folds everything it keeps into the instruction)."""
    task, fold = challenge.task, FOLDS[challenge.fold]
    if not records:
        raise DataError(f"{task}: {source} has no records")
    cols: dict[str, list[str]] = {"prompt": [], "response": [], "instruction": [], "context": []}
    for n, rec in enumerate(records, start=1):
        missing = [c for c in challenge.columns if c not in rec]
        if missing:
            raise DataError(f"{task}: {source} record {n} has the columns {sorted(rec)}, expected "
                            f"{list(challenge.columns)}: {missing} missing")
        rec = {c: "" if rec[c] is None and c == "input" else rec[c] for c in challenge.columns}
        bad = [c for c in challenge.columns if not isinstance(rec[c], str)]
        if bad:
            raise DataError(f"{task}: {source} record {n}: {bad} must be text, got "
                            f"{', '.join(type(rec[c]).__name__ for c in bad)}")
        if not rec["output"].strip():
            continue
        instruction = fold(rec).strip()
        cols["prompt"].append(flowertune_prompt(instruction))
        cols["instruction"].append(instruction)
        cols["context"].append("")
        cols["response"].append(rec["output"].strip())
    if not cols["prompt"]:
        raise DataError(f"{task}: {source}: every record has an empty output")
    return cols


def find_split(folder: Path, split: str) -> Path | None:
    for ext in EXTENSIONS:
        if (folder / f"{split}{ext}").is_file():
            return folder / f"{split}{ext}"
    return None


def offline() -> bool:
    """Whether the hub is switched off for this process (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set true)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


# ------------------------------------------------------------------ the task
class ChallengeTask(InstructTask):
    """A FlowerTune challenge: the instruct task's model, loss and metrics on the challenge's data and prompt."""

    challenge: ClassVar[Challenge]
    label_column = None  # FlowerTune splits IID; the records have no label to skew by

    @classmethod
    def source(cls, config) -> str:
        """Where the data comes from: ``--dataset``, else ``--data-dir``, else the challenge's own hub dataset."""
        return config.dataset or config.data_dir or cls.challenge.hub

    @classmethod
    def check_source(cls, config) -> None:
        """Before Flower starts: a local path must exist and have the challenge's columns, and a hub dataset needs the
        hub (one line in a second, not a failure in every client after the federation's start-up)."""
        src = cls.source(config)
        kind = ref_kind(src)
        if kind == "missing":
            raise DataError(missing_message("dataset", src, "file or folder"))
        if kind == "local":
            path = local_path(src)
            if path.is_dir():
                path = find_split(path, "train")
                if path is None:
                    raise DataError(f"{cls.challenge.task}: {src} has no train.parquet, train.jsonl or train.json")
            peek_columns(path, cls.challenge)
        if kind == "hub" and offline():
            raise DataError(f"{cls.challenge.task}: the data is the hub dataset {src}, but the hub is off "
                            "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); pass a local copy with --dataset FILE (.json, "
                            f".jsonl or .parquet with the columns {', '.join(cls.challenge.columns)})")

    def load_splits(self) -> tuple[Dataset, Dataset]:
        c = self.challenge
        src = self.source(self.config)
        kind = ref_kind(src)
        test = None
        if kind == "missing":
            raise DataError(missing_message("dataset", src, "file or folder"))
        if kind == "hub":
            train = self._hub(src)
        elif local_path(src).is_dir():
            folder = local_path(src)
            train_file = find_split(folder, "train")
            if train_file is None:
                raise DataError(f"{c.task}: {folder} has no train.parquet, train.jsonl or train.json")
            train = to_rows(read_file(train_file, c), str(train_file), c)
            test_file = find_split(folder, "test")
            if test_file is not None:
                test = to_rows(read_file(test_file, c), str(test_file), c)
        else:
            train = to_rows(read_file(local_path(src), c), str(local_path(src)), c)
        data = Dataset.from_dict(train)
        if test is not None:
            return data, Dataset.from_dict(test)
        if len(data) < 2:
            raise DataError(f"{c.task}: need at least 2 records to hold some out, have {len(data)}")
        split = data.train_test_split(test_size=self.config.test_fraction,
                                      seed=rng.small_seed("split", self.config.seed))
        return split["train"], split["test"]

    def _hub(self, name: str) -> dict[str, list[str]]:
        from datasets import load_dataset

        c = self.challenge
        try:
            data = load_dataset(name, split="train")
        except Exception as e:  # offline, unknown name, ...: one clear line
            raise DataError(f"{c.task}: cannot load the hub dataset {name!r} ({type(e).__name__}: {e}); offline, pass "
                            "a local .json/.jsonl/.parquet copy with --dataset FILE") from None
        check_columns(data.column_names, f"the hub dataset {name}", c)
        return to_rows(data.select_columns(list(c.columns)).to_list(), name, c)

    def encode(self, dataset: Dataset) -> Dataset:
        """``alpaca``: the template's prompt with the response after a space (the loss from that space on, as the
        template's collator); ``chat``: the instruct task's rendering through the model's chat template."""
        if self.config.prompt_template == "chat":
            return super().encode(dataset)

        def fn(row):
            ids, n = self.tokenize_pair(row["prompt"], " " + row["response"])
            return {"input_ids": ids, "prompt_len": n}

        return dataset.map(fn)

    def describe(self) -> dict[str, Any]:
        c = self.challenge
        return {**super().describe(), "challenge": {"name": c.name, "hub": c.hub, "columns": list(c.columns),
                                                    "instruction": c.fold, "evaluation": c.evaluation}}


def _task_class(challenge: Challenge) -> type[ChallengeTask]:
    cls_name = "FlowerTune" + challenge.title.replace(" ", "") + "Task"
    doc = f"FlowerTune's {challenge.title} challenge: {challenge.hub}, instruction = {challenge.fold}."
    return type(cls_name, (ChallengeTask,), {"name": challenge.task, "challenge": challenge, "__doc__": doc,
                                             "__module__": __name__})


FLOWERTUNE_TASKS: dict[str, type[ChallengeTask]] = {c.task: _task_class(c) for c in CHALLENGES.values()}

__all__ = ["CHALLENGES", "COLUMNS", "Challenge", "ChallengeTask", "FLOWERTUNE_TASKS", "PREAMBLE", "check_columns",
           "flowertune_prompt", "read_file", "to_rows"]
