"""Multiple choice (MMLU, MedMCQA, MedQA, CareQA) and yes/no/maybe (PubMedQA), by the answer's likelihood.

FlowerTune's general-NLP and medical evaluations put the question in one prompt (below) and let the model
generate as many tokens as the gold answer has, greedily; its ``format_answer`` then reads a letter (or yes/no)
from the text. A small or barely tuned model often answers with something that is not a letter, and that
counts as wrong, so the figure mixes "knows the answer" with "follows the format". Here the prediction is the
option whose tokens are most likely after the same prompt (``score_options``), which always picks one of the
options shown; that is ``accuracy``. FlowerTune's own reading of the greedy answer is reported beside it as
``accuracy_greedy`` (``flowertune_reading``), computed from the same forward pass when every answer is one
token (letters and yes/no/maybe are, for SmolLM2 and the Llama/Mistral tokenizers), and by greedy generation
otherwise.

The prompt, as FlowerTune writes it (``utils.format_example`` and ``benchmarks.inference``)::

    <|im_start|>question
    {instruction}
    Question: {question, with "?" added unless it ends in "?" or "."}

    Options:
    A. {first option}
    ...
    The answer is:
    <|im_end|>
    <|im_start|>answer

PubMedQA's body is its contexts joined by newlines, then the question. The text is tokenized with the
tokenizer's own special tokens, as FlowerTune's ``tokenizer.encode`` does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..hardware import model_device

LETTERS = "ABCDE"


@dataclass
class Choice:
    """One scored question: its prompt, the options' texts as the model should write them, the gold option."""
    id: str
    prompt: str
    options: list[str]
    gold: int
    group: str = ""


def question_block(question: str, options: list[str]) -> str:
    """FlowerTune's ``format_example``: the question and its lettered options."""
    if not question.endswith("?") and not question.endswith("."):
        question += "?"
    lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"Question: {question}\n\nOptions:\n{lines}"


def wrap(instruction: str, body: str) -> str:
    """The question/answer turn FlowerTune builds around every medical and MMLU prompt."""
    return f"<|im_start|>question\n{instruction}\n{body}\nThe answer is:\n<|im_end|>\n<|im_start|>answer\n"


def letters(n: int) -> list[str]:
    return list(LETTERS[:n])


@torch.no_grad()
def continuation_logprobs(model, sequences: list[list[int]], tails: list[int]) -> list[torch.Tensor]:
    """Per sequence, ``tail + 1`` rows of log-probabilities over the vocabulary: row j < tail is the distribution
    that predicts the j-th of its last ``tail`` tokens, the last row the distribution of the token after it.

    Sequences are left-padded with explicit position ids, so a padded row computes exactly what it computes
    alone, and only the last ``max(tails) + 1`` positions go through the output layer (``logits_to_keep``):
    a vocabulary of 49,152 over every position of a long prompt would not fit a CPU's cache, let alone a batch."""
    device = model_device(model)
    width = max(len(s) for s in sequences)
    keep = max(tails) + 1
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   logits_to_keep=keep).logits[:, -keep:]
    logp = torch.log_softmax(logits.float(), dim=-1).cpu()
    return [logp[i, keep - t - 1:] for i, t in enumerate(tails)]


def score_options(model, tokenizer, items: list[Choice],
                  batch_size: int = 8) -> tuple[list[list[float]], list[str | None]]:
    """Per item, the log-likelihood of each option's tokens after the prompt, and the first greedy token's text
    (None unless every option is one token, where that token is what FlowerTune's greedy answer holds).

    One-token options (the usual case) need one forward pass per item: the option scores are entries of the
    next-token distribution. Longer options are scored as the sum of their tokens' log-probabilities, one
    sequence per option (the joint probability of writing that option)."""
    prompt_ids = [tokenizer(it.prompt)["input_ids"] for it in items]
    option_ids = [[tokenizer(o, add_special_tokens=False)["input_ids"] for o in it.options] for it in items]
    scores: list[list[float]] = [[] for _ in items]
    greedy: list[str | None] = [None] * len(items)
    single = [all(len(o) == 1 for o in opts) for opts in option_ids]
    one = [i for i in range(len(items)) if single[i]]
    for start in range(0, len(one), batch_size):
        chunk = one[start:start + batch_size]
        rows = continuation_logprobs(model, [prompt_ids[i] for i in chunk], [0] * len(chunk))
        for i, row in zip(chunk, rows):
            dist = row[-1]
            scores[i] = [float(dist[o[0]]) for o in option_ids[i]]
            greedy[i] = tokenizer.decode([int(dist.argmax())], skip_special_tokens=True)
    many = [(i, k) for i in range(len(items)) if not single[i] for k in range(len(option_ids[i]))]
    for start in range(0, len(many), batch_size):
        chunk = many[start:start + batch_size]
        seqs = [prompt_ids[i] + option_ids[i][k] for i, k in chunk]
        rows = continuation_logprobs(model, seqs, [len(option_ids[i][k]) for i, k in chunk])
        for (i, k), row in zip(chunk, rows):
            tail = torch.tensor(option_ids[i][k])
            scores[i].append(float(row[:-1].gather(1, tail[:, None]).sum()))
    return scores, greedy


def flowertune_reading(output: str, kind: str) -> str:
    """What FlowerTune's ``format_answer`` makes of a generated answer (lower case), so that the greedy figure is
    theirs: after a ``\\n##`` header only its line counts; everything but letters and digits becomes a space;
    for ``boolean`` a doubled answer ("yesyes", "yesno", ...) keeps its first word; for ``mcq`` only the first
    character is kept (so "Answer" reads as "a"). A result other than a-e, yes or no is replaced by the whole
    lower-cased output, which then matches the gold only if it is the gold exactly ("maybe")."""
    full = output.lower()
    text = full
    if "\n##" in text:
        text = text.split("\n##")[1].split("\n")[0].strip()
    text = re.sub(" +", " ", re.sub(r"[^a-zA-Z0-9]", " ", text).strip())
    if kind == "boolean":
        for doubled, single in (("yesyes", "yes"), ("nono", "no"), ("yesno", "yes"), ("noyes", "no")):
            if doubled in text:
                text = text.replace(doubled, single)
                break
    text = text.encode("ascii", "ignore").decode("ascii")
    if kind == "mcq":
        text = text[:1]
    return text if text in ("a", "b", "c", "d", "e", "yes", "no") else full


def evaluate_choices(model, tokenizer, items: list[Choice], kind: str, batch_size: int = 8,
                     generate=None) -> dict:
    """Accuracy by likelihood, FlowerTune's greedy accuracy, per group (MMLU's categories) and per item.

    ``generate(prompts, max_new_tokens)`` is called only for items whose options are longer than one token."""
    scores, greedy = score_options(model, tokenizer, items, batch_size)
    missing = [i for i, g in enumerate(greedy) if g is None]
    if missing and generate is not None:
        for i in missing:  # FlowerTune generates as many tokens as the gold answer has
            n = len(tokenizer(items[i].options[items[i].gold], add_special_tokens=False)["input_ids"])
            greedy[i] = generate([items[i].prompt], n)[0]
    rows = []
    for it, sc, g in zip(items, scores, greedy):
        pred = max(range(len(sc)), key=sc.__getitem__)
        gold_text = it.options[it.gold].lower()
        rows.append({"id": it.id, "group": it.group, "gold": it.options[it.gold], "prediction": it.options[pred],
                     "correct": pred == it.gold, "greedy": g,
                     "greedy_correct": None if g is None else flowertune_reading(g, kind) == gold_text})
    return summarise(rows)


def summarise(rows: list[dict]) -> dict:
    """``accuracy`` over all rows and, where rows carry groups, per group and the mean of the groups."""
    def acc(sub, key):
        vals = [r[key] for r in sub if r[key] is not None]
        return sum(vals) / len(vals) if vals else None

    out = {"accuracy": acc(rows, "correct"), "accuracy_greedy": acc(rows, "greedy_correct"), "n": len(rows)}
    groups = [g for g in dict.fromkeys(r["group"] for r in rows) if g]
    if groups:
        out["groups"] = {g: {"accuracy": acc([r for r in rows if r["group"] == g], "correct"),
                             "accuracy_greedy": acc([r for r in rows if r["group"] == g], "greedy_correct"),
                             "n": sum(r["group"] == g for r in rows)} for g in groups}
    out["examples"] = rows
    return out
