"""pass@1 on HumanEval and MBPP, as FlowerTune's code evaluation (bigcode-evaluation-harness) defines it.

Prompts, stop strings and the program that is run are the harness's:

* HumanEval: the prompt is the problem's ``prompt`` stripped of surrounding whitespace (its ``humaneval``
  task); the completion is cut at ``\\nclass``, ``\\ndef``, ``\\n#``, ``\\n@``, ``\\nprint``, ``\\nif``, a
  newline and three backticks, or ``<file_sep>``; the program is prompt + completion, a newline, the
  problem's ``test`` and ``check(<entry_point>)``.
* MBPP: the prompt is ``\"\"\"\\n{text}\\n{first test}\\n\"\"\"\\n`` (InCoder's, with one test shown); the
  completion is cut at ``\\nclass``, ``\\nassert``, ``\\n\"\"\"``, ``\\nprint``, ``\\nif``, ``\\n<|/``, a
  newline and three backticks; the program is prompt + completion, a newline and every test of ``test_list``.

A problem passes if its program exits with status 0. With one completion per problem the harness's unbiased
pass@k estimator is, for k = 1, the share of problems that pass. Every program runs in fedplora's sandbox
(``fedplora.tasks.sandbox``: no network, confined file system, limited memory and CPU, killed after the
timeout), never in this process.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..tasks.sandbox import run_python

HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>")
MBPP_STOPS = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```")


@dataclass
class Problem:
    id: str
    prompt: str
    tests: str  # what follows prompt + completion in the program


def humaneval_problem(row: dict) -> Problem:
    return Problem(str(row["task_id"]), row["prompt"].strip(), f"\n{row['test']}\ncheck({row['entry_point']})")


def mbpp_problem(row: dict) -> Problem:
    text = row["text"] if "text" in row else row["prompt"]  # the "full" and "sanitized" configurations
    tests = list(row["test_list"])
    return Problem(str(row["task_id"]), f'"""\n{text}\n{tests[0]}\n"""\n', "\n".join(tests))


def program(problem: Problem, completion: str) -> str:
    return f"{problem.prompt}{completion}\n{problem.tests}"


def pass_at_1(problems: list[Problem], completions: list[str], timeout: float = 10.0, workers: int = 2) -> dict:
    """Run each completed program in the sandbox; pass@1, the timeouts and each problem's status."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(lambda pc: run_python(program(*pc), timeout=timeout), zip(problems, completions)))
    rows = [{"id": p.id, "status": r.status, "passed": r.passed, "completion": c}
            for p, c, r in zip(problems, completions, results)]
    n = len(rows)
    return {"pass@1": sum(r["passed"] for r in rows) / n if n else None, "n": n,
            "timeouts": sum(r["status"] == "timeout" for r in rows), "examples": rows}
