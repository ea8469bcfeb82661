"""MMLU as FlowerTune's general-NLP challenge scores it: three categories of subjects, each its own accuracy.

FlowerTune evaluates the test split of the subjects in STEM, social sciences and humanities (its
``MMLU_CATEGORY``, below; the fourth group, "other", is not part of the challenge and is left out here too), with
the instruction "Answer the following multiple choice question." and the prompt of ``choice.py``. The
leaderboard's figure is the mean of the three categories' accuracies.

Rows are read in either of two formats: ``cais/mmlu`` (question, subject, choices, answer as 0-3), which the hub
serves as Parquet, or ``lukaemon/mmlu`` (input, A, B, C, D, target as a letter), FlowerTune's source, one file
per subject: its subject is a ``subject`` (or ``subset``) column, else the file's name (``anatomy.jsonl``,
``anatomy_test.csv``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from . import choice

INSTRUCTION = "Answer the following multiple choice question."

CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics", "computer_security",
        "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
        "high_school_chemistry", "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning"),
    "social_sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics", "high_school_macroeconomics",
        "high_school_microeconomics", "high_school_psychology", "human_sexuality", "professional_psychology",
        "public_relations", "security_studies", "sociology", "us_foreign_policy"),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios", "philosophy",
        "prehistory", "professional_law", "world_religions"),
    "other": (
        "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging", "management",
        "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
        "professional_medicine", "virology"),
}
CATEGORY_OF = {s: c for c, subjects in CATEGORIES.items() for s in subjects}
EVALUATED = ("stem", "social_sciences", "humanities")


def subject_from_name(source: str) -> str | None:
    """``.../anatomy_test.csv`` -> ``anatomy``: how the original MMLU files and per-subject exports are named."""
    stem = Path(source).name.split(".")[0]
    for suffix in ("_test", "_val", "_dev", "-test"):
        stem = stem.removesuffix(suffix)
    return stem if stem in CATEGORY_OF else None


def build_mmlu(rows, fmt: str, source: str) -> list[choice.Choice]:
    items = []
    for n, r in enumerate(rows, 1):
        if fmt == "cais/mmlu":
            question, options, answer, subject = r["question"], list(r["choices"]), r["answer"], r["subject"]
        else:
            question, options, answer = r["input"], [r[k] for k in "ABCD"], r["target"]
            subject = r.get("subject") or r.get("subset") or subject_from_name(source)
            if subject is None:
                raise DataError(f"mmlu: {source} has lukaemon/mmlu's columns but no subject: add a subject column "
                                "or name the file after its subject (e.g. anatomy.jsonl)")
        category = CATEGORY_OF.get(subject)
        if category is None:
            raise DataError(f"mmlu: {source} row {n}: subject {subject!r} is not one of MMLU's 57 subjects")
        if category not in EVALUATED:
            continue
        text = str(answer).strip().upper()
        if text in choice.LETTERS[:len(options)]:
            gold = choice.LETTERS.index(text)
        elif text.isdigit() and int(text) < len(options):  # cais/mmlu's 0-3 (a string in a CSV export)
            gold = int(text)
        else:
            raise DataError(f"mmlu: {source} row {n}: answer {answer!r} is not an option index or letter")
        body = choice.question_block(question, [str(o) for o in options])
        items.append(choice.Choice(f"{subject}/{n}", choice.wrap(INSTRUCTION, body), choice.letters(len(options)),
                                   gold, group=category))
    items.sort(key=lambda it: EVALUATED.index(it.group))  # reported in FlowerTune's order of the categories
    if not items:
        raise DataError(f"mmlu: {source} holds no question of the STEM, social sciences or humanities subjects")
    return items
