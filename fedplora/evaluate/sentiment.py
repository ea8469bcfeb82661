"""Finance sentiment by generation (FPB, FIQA, TFNS), read the way FlowerTune's finance evaluation reads it.

The prompt is FlowerTune's (``finance/utils.format_example``)::

    Instruction: What is the sentiment of this {news|tweet}? Please choose an answer from {negative/neutral/positive}.
    Input: {text}
    Answer: 

The model continues greedily; FlowerTune decodes prompt and continuation together and keeps what follows the
first "Answer: " up to the next one, which is the continuation cut at "Answer: " (``answer_segment``). The label
is then ``label_of``: "positive" if the text contains "positive" or "Positive", else "negative" if it contains
"negative" or "Negative", else "neutral" (so an empty or off-topic answer counts as neutral, as there).
Accuracy is the share of rows whose label equals the gold label.
"""

from __future__ import annotations

from dataclasses import dataclass

LABELS = ("negative", "neutral", "positive")
# the datasets' integer labels, as FlowerTune's finance/benchmarks.py maps them
FPB_LABELS = {0: "negative", 1: "neutral", 2: "positive"}
# zeroshot/twitter-financial-news-sentiment's 0, 1, 2 are Bearish, Bullish, Neutral
TFNS_LABELS = {0: "negative", 1: "positive", 2: "neutral"}


def instruction(kind: str) -> str:
    return f"What is the sentiment of this {kind}? Please choose an answer from {{negative/neutral/positive}}."


def prompt(kind: str, text: str) -> str:
    context = f"Instruction: {instruction(kind)}\n"
    if text:
        context += f"Input: {text}\n"
    return context + "Answer: "


def fiqa_label(score: float) -> str:
    """FIQA's sentiment score in [-1, 1] -> label, with FlowerTune's thresholds (``generate_label``)."""
    return "negative" if score < -0.1 else "neutral" if score < 0.1 else "positive"


def answer_segment(continuation: str) -> str:
    """What FlowerTune's ``split("Answer: ")[1]`` keeps of prompt + continuation: the continuation up to a
    further "Answer: "."""
    return continuation.split("Answer: ")[0]


def label_of(text: str) -> str:
    """FlowerTune's ``change_target``: the first of positive / negative the text names, else neutral."""
    if "positive" in text or "Positive" in text:
        return "positive"
    if "negative" in text or "Negative" in text:
        return "negative"
    return "neutral"


@dataclass
class Sentence:
    id: str
    prompt: str
    gold: str


def evaluate_sentiment(items: list[Sentence], generations: list[str]) -> dict:
    """Accuracy of the labels read from the generations, the predicted label counts, and per item."""
    rows = []
    for it, g in zip(items, generations):
        answer = answer_segment(g)
        pred = label_of(answer)
        rows.append({"id": it.id, "gold": it.gold, "prediction": pred, "correct": pred == it.gold,
                     "generation": answer})
    n = len(rows)
    return {"accuracy": sum(r["correct"] for r in rows) / n if n else None, "n": n,
            "predicted": {label: sum(r["prediction"] == label for r in rows) for label in LABELS},
            "examples": rows}
