"""The metrics users report, small enough to check by hand (tests/test_tasks.py does).

* ``accuracy``, ``macro_f1``: classification; ``binary_f1``: the F1 of one class (GLUE's "F1" for
  MRPC and QQP is that of the positive class, label 1).
* ``mcc``: Matthews correlation coefficient; for k > 2 classes Gorodkin's R_K, which is
  the binary MCC when k = 2 (the GLUE metric for CoLA, also reported for SST-2).
* ``rouge_l``: ROUGE-L F-measure (beta = 1) from the longest common subsequence of
  lower-cased word tokens (letters and digits; punctuation dropped), as ``rouge-score``
  computes ``rougeL`` without stemming.
"""

from __future__ import annotations

import math
import re

import numpy as np


def accuracy_f1_mcc(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    preds, labels = np.asarray(preds), np.asarray(labels)
    f1s = []
    for k in range(num_labels):
        tp = np.sum((preds == k) & (labels == k))
        fp = np.sum((preds == k) & (labels != k))
        fn = np.sum((preds != k) & (labels == k))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(preds == labels)) if len(labels) else 0.0,
            "macro_f1": float(np.mean(f1s)), "mcc": mcc(preds, labels, num_labels)}


def binary_f1(preds, labels, positive: int = 1) -> float:
    """F1 of the class ``positive``: 2 TP / (2 TP + FP + FN); 0 when it is never predicted nor present."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    tp = int(np.sum((preds == positive) & (labels == positive)))
    fp = int(np.sum((preds == positive) & (labels != positive)))
    fn = int(np.sum((preds != positive) & (labels == positive)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def mcc(preds, labels, num_labels: int) -> float:
    """Matthews correlation (R_K for k classes); 0 when it is undefined (one class predicted or present)."""
    preds, labels = np.asarray(preds, dtype=int), np.asarray(labels, dtype=int)
    c = np.zeros((num_labels, num_labels), dtype=np.float64)  # c[true, pred]
    np.add.at(c, (labels, preds), 1)
    s = c.sum()
    correct = np.trace(c)
    t = c.sum(axis=1)  # times each class truly occurs
    p = c.sum(axis=0)  # times each class is predicted
    num = correct * s - float(t @ p)
    den = math.sqrt(s * s - float(p @ p)) * math.sqrt(s * s - float(t @ t))
    return 0.0 if den == 0 else float(num / den)


_WORD = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one prediction against one reference."""
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)
