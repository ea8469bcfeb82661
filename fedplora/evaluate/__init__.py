"""``fedplora evaluate``: an exported adapter on FlowerTune's evaluation benchmarks, with FlowerTune's metrics.

FlowerTune's leaderboard scores a federated fine-tune of an LLM on four challenges' benchmarks (general NLP:
MMLU; finance: FPB, FIQA, TFNS; medical: PubMedQA, MedMCQA, MedQA, CareQA; code: HumanEval, MBPP). This package
scores the adapters fedplora exports (or any PEFT LoRA) on the same rows with the same prompts and metric
definitions, so a figure here reads like one of theirs; where it cannot be the same, docs/tasks.md says what
differs and why. The modules, in the order an evaluation goes through them:

* ``adapter``: PATH (an adapter folder or a run folder) -> the adapter, its base, the model;
* ``data``: a benchmark's rows from the hub or a local file, and the column check;
* ``benchmarks``: the registry (name -> source, formats, rows -> items, scorer), with ``mmlu`` its categories;
* ``choice``: multiple choice and yes/no/maybe by the options' likelihood; ``generation``: greedy decoding;
  ``sentiment``: finance labels read from generations; ``code``: pass@1 in the sandbox;
* ``runner``: one evaluation, input checked before the model loads; ``cli``: the flags and the table.
"""

from .benchmarks import BENCHMARKS, CHALLENGES, Benchmark, Options
from .cli import add_evaluate_parser, evaluate_main, print_table
from .runner import Request, evaluate

__all__ = ["BENCHMARKS", "CHALLENGES", "Benchmark", "Options", "Request", "add_evaluate_parser", "evaluate",
           "evaluate_main", "print_table"]
