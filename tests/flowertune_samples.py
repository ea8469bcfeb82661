"""Small local samples of FlowerTune's four training sets, in each hub dataset's own columns, for offline runs.

The rows are written here by hand (nothing is downloaded or copied from the datasets): the same columns and the same
kind of record as each dataset, so that reading, prompting and a smoke run see what the real data gives them.

* general-nlp (flwrlabs/alpaca-gpt4): instruction, input (often empty), output, and ``text``, the whole Alpaca prompt
  the dataset carries (FlowerTune ignores it);
* finance (flwrlabs/fingpt-sentiment-train): a sentiment instruction, a headline or tweet as input, the label as output;
* medical (flwrlabs/medical-meadow-medical-flashcards): the same instruction on every row, the question as input, the
  answer as output;
* code (flwrlabs/code-alpaca-20k): a programming instruction, an input that is mostly empty, the code as output.

``python tests/flowertune_samples.py DIR [json|jsonl|parquet]`` writes ``DIR/<challenge>.<ext>`` (the README's smoke
runs use it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ALPACA_PREAMBLE = ("Below is an instruction that describes a task{}. Write a response that appropriately completes the "
                   "request.")


def _alpaca(instruction: str, inp: str, output: str) -> dict[str, str]:
    if inp:
        text = (ALPACA_PREAMBLE.format(", paired with an input that provides further context")
                + f"\n\n### Instruction:\n{instruction}\n\n### Input:\n{inp}\n\n### Response:\n{output}")
    else:
        text = ALPACA_PREAMBLE.format("") + f"\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}"
    return {"instruction": instruction, "input": inp, "output": output, "text": text}


GENERAL = [
    ("Give three tips for staying healthy.", "",
     "1. Eat a balanced diet with plenty of fruit and vegetables.\n2. Exercise regularly.\n3. Get enough sleep."),
    ("Identify the odd one out.", "Apple, Banana, Carrot", "Carrot is the odd one out: it is a vegetable, the others "
     "are fruits."),
    ("Translate the sentence into French.", "The cat is sleeping on the sofa.", "Le chat dort sur le canapé."),
    ("What is the capital of Australia?", "", "The capital of Australia is Canberra."),
    ("Summarize the paragraph in one sentence.", "Bees collect nectar from flowers and turn it into honey, which they "
     "store in wax combs to feed the colony during winter.", "Bees make honey from nectar and store it to feed the "
     "colony in winter."),
    ("Rewrite the sentence in the passive voice.", "The chef cooked the meal.", "The meal was cooked by the chef."),
    ("Name the largest planet in the solar system.", "", "Jupiter is the largest planet in the solar system."),
    ("Classify the animal as a mammal, bird or reptile.", "Penguin", "A penguin is a bird."),
    ("Explain why the sky is blue.", "", "Sunlight is scattered by the molecules of the air, and blue light is "
     "scattered much more than red light, so the sky looks blue."),
    ("Convert the temperature from Celsius to Fahrenheit.", "25 degrees Celsius", "25 degrees Celsius is 77 degrees "
     "Fahrenheit."),
    ("Suggest a name for a bakery.", "", "The Golden Crust."),
    ("Find the synonym of the word.", "Happy", "Joyful."),
    ("Write a haiku about autumn.", "", "Red leaves drift and fall,\ncool wind hums through empty trees,\nthe year "
     "breathes slower."),
    ("Calculate the area of a rectangle.", "Length 4 m, width 3 m", "The area is 4 m x 3 m = 12 square metres."),
    ("Generate a question about the text.", "The Nile is the longest river in Africa.", "Which river is the longest "
     "in Africa?"),
    ("List two renewable sources of energy.", "", "Solar power and wind power."),
    ("Correct the grammar of the sentence.", "She don't like apples.", "She doesn't like apples."),
    ("Describe the colour green to someone who cannot see.", "", "Green feels like cool grass under your feet and "
     "smells like leaves after rain."),
    ("Give an antonym of the word.", "Ancient", "Modern."),
    ("What does a thermometer measure?", "", "A thermometer measures temperature."),
    ("Arrange the numbers in ascending order.", "9, 2, 7, 4", "2, 4, 7, 9"),
    ("Write a short greeting for a birthday card.", "", "Happy birthday! Wishing you a year full of joy."),
    ("Tell whether the statement is true or false.", "Water boils at 100 degrees Celsius at sea level.", "True."),
    ("Explain what a noun is.", "", "A noun is a word that names a person, place, thing or idea."),
]

SENTIMENT_NEWS = "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
SENTIMENT_TWEET = "What is the sentiment of this tweet? Please choose an answer from {negative/neutral/positive}."
FINANCE = [
    (SENTIMENT_NEWS, "Company profit rose 35% in the third quarter on strong demand.", "positive"),
    (SENTIMENT_NEWS, "The board will meet on Thursday to discuss the annual report.", "neutral"),
    (SENTIMENT_NEWS, "Shares fell sharply after the firm cut its full-year outlook.", "negative"),
    (SENTIMENT_TWEET, "$ABC beats estimates, raises dividend. Great quarter!", "positive"),
    (SENTIMENT_TWEET, "$XYZ down 8% premarket after the CEO resigns", "negative"),
    (SENTIMENT_NEWS, "Net sales were flat compared with the same period last year.", "neutral"),
    (SENTIMENT_NEWS, "The bank posted a record operating profit and hired 200 staff.", "positive"),
    (SENTIMENT_NEWS, "The retailer will close 40 stores and cut 1,200 jobs.", "negative"),
    (SENTIMENT_TWEET, "Oil prices steady ahead of the OPEC meeting", "neutral"),
    (SENTIMENT_NEWS, "Order intake grew by 12% and the backlog reached a new high.", "positive"),
    (SENTIMENT_NEWS, "Operating loss widened to EUR 5.2 million from EUR 1.1 million.", "negative"),
    (SENTIMENT_NEWS, "The company's headquarters are located in Helsinki.", "neutral"),
    (SENTIMENT_TWEET, "Strong guidance from $DEF, buying more on this dip", "positive"),
    (SENTIMENT_TWEET, "Regulators open probe into $GHI accounting", "negative"),
    (SENTIMENT_NEWS, "The new plant will start production in the spring as planned.", "neutral"),
    (SENTIMENT_NEWS, "Earnings per share increased to 0.45 from 0.30.", "positive"),
    (SENTIMENT_NEWS, "The airline warned that fuel costs will squeeze margins.", "negative"),
    (SENTIMENT_NEWS, "The annual general meeting will be held on 12 April.", "neutral"),
    (SENTIMENT_TWEET, "$JKL secures a five-year supply contract worth $300M", "positive"),
    (SENTIMENT_TWEET, "Weak retail sales drag the index lower", "negative"),
    (SENTIMENT_NEWS, "The deal is expected to close in the second half of the year.", "neutral"),
    (SENTIMENT_NEWS, "Sales of the new model exceeded expectations in every market.", "positive"),
    (SENTIMENT_NEWS, "The group recorded an impairment charge on its shipping unit.", "negative"),
    (SENTIMENT_NEWS, "The company employs about 3,000 people in 20 countries.", "neutral"),
]

TRUTHFULLY = "Answer this question truthfully"
MEDICAL = [
    ("What is the primary function of red blood cells?", "Red blood cells carry oxygen from the lungs to the tissues, "
     "bound to haemoglobin."),
    ("Which organ produces insulin?", "Insulin is produced by the beta cells of the islets of Langerhans in the "
     "pancreas."),
    ("What is the normal resting heart rate of an adult?", "About 60 to 100 beats per minute."),
    ("What vitamin deficiency causes scurvy?", "A deficiency of vitamin C (ascorbic acid)."),
    ("What is the most common cause of community-acquired pneumonia?", "Streptococcus pneumoniae."),
    ("Which nerve is compressed in carpal tunnel syndrome?", "The median nerve."),
    ("What does an elevated troponin level indicate?", "Damage to heart muscle, as in a myocardial infarction."),
    ("What is the antidote for paracetamol overdose?", "N-acetylcysteine."),
    ("Which hormone regulates calcium levels by raising them?", "Parathyroid hormone."),
    ("What is the largest organ of the human body?", "The skin."),
    ("What type of anaemia is caused by a lack of vitamin B12?", "Megaloblastic (macrocytic) anaemia."),
    ("Which part of the brain coordinates balance and fine movement?", "The cerebellum."),
    ("What is the mechanism of action of aspirin?", "It irreversibly inhibits cyclooxygenase (COX-1 and COX-2), "
     "reducing prostaglandin and thromboxane synthesis."),
    ("What electrolyte abnormality causes peaked T waves on an ECG?", "Hyperkalaemia."),
    ("Where is bile stored?", "In the gallbladder."),
    ("What is the first-line treatment for anaphylaxis?", "Intramuscular adrenaline (epinephrine)."),
    ("What are the three layers of the heart wall?", "The endocardium, the myocardium and the epicardium."),
    ("Which blood group is the universal donor for red cells?", "Group O negative."),
    ("What disease is caused by Mycobacterium tuberculosis?", "Tuberculosis."),
    ("What is the function of the loop of Henle?", "It concentrates the urine by creating a salt gradient in the "
     "renal medulla."),
    ("Which cranial nerve controls the muscles of facial expression?", "The facial nerve (cranial nerve VII)."),
    ("What is hypertension?", "Persistently raised arterial blood pressure, usually 140/90 mmHg or more."),
    ("What cells produce antibodies?", "Plasma cells, which derive from B lymphocytes."),
    ("What is the main symptom of angina pectoris?", "Chest pain on exertion, relieved by rest."),
]

CODE = [
    ("Write a Python function that returns the sum of a list of numbers.", "",
     "def list_sum(numbers):\n    total = 0\n    for n in numbers:\n        total += n\n    return total"),
    ("Create a function to check whether a number is even.", "", "def is_even(n):\n    return n % 2 == 0"),
    ("Reverse the given string in Python.", "s = 'hello'", "reversed_s = s[::-1]"),
    ("Write a SQL query to select every row of the table 'users'.", "", "SELECT * FROM users;"),
    ("Write a function to compute the factorial of n.", "",
     "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result"),
    ("Create a list of the squares of the numbers from 1 to 10.", "", "squares = [i * i for i in range(1, 11)]"),
    ("Write a JavaScript function that adds two numbers.", "", "function add(a, b) {\n  return a + b;\n}"),
    ("Find the largest element of the array.", "arr = [3, 9, 2, 7]", "largest = max(arr)"),
    ("Write a function that counts the vowels in a string.", "",
     "def count_vowels(text):\n    return sum(1 for c in text.lower() if c in 'aeiou')"),
    ("Sort the list of strings alphabetically.", "words = ['pear', 'apple', 'fig']", "words.sort()"),
    ("Write a Python class for a point with x and y coordinates.", "",
     "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y"),
    ("Remove the duplicates from the list.", "items = [1, 2, 2, 3, 1]", "unique = list(dict.fromkeys(items))"),
    ("Write a function that checks whether a string is a palindrome.", "",
     "def is_palindrome(s):\n    return s == s[::-1]"),
    ("Write a loop that prints the numbers from 1 to 5.", "", "for i in range(1, 6):\n    print(i)"),
    ("Convert the string to an integer.", "value = '42'", "number = int(value)"),
    ("Write a function that returns the n-th Fibonacci number.", "",
     "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a"),
    ("Create a dictionary mapping each word to its length.", "words = ['sun', 'moon']",
     "lengths = {w: len(w) for w in words}"),
    ("Write a SQL query that counts the orders per customer.", "",
     "SELECT customer_id, COUNT(*) FROM orders GROUP BY customer_id;"),
    ("Write a function to merge two dictionaries.", "", "def merge(a, b):\n    return {**a, **b}"),
    ("Read a file and return its lines.", "", "def read_lines(path):\n    with open(path) as f:\n"
     "        return f.read().splitlines()"),
    ("Compute the average of the numbers.", "nums = [2, 4, 6]", "average = sum(nums) / len(nums)"),
    ("Write a function that returns the maximum of three numbers.", "", "def max3(a, b, c):\n    return max(a, b, c)"),
    ("Join the list of words with spaces.", "words = ['a', 'quick', 'fox']", "sentence = ' '.join(words)"),
    ("Write a function that capitalises the first letter of every word.", "",
     "def title_case(text):\n    return ' '.join(w.capitalize() for w in text.split())"),
]


def records(challenge: str) -> list[dict[str, str]]:
    """The sample's rows in the hub dataset's own columns."""
    if challenge == "general-nlp":
        return [_alpaca(*row) for row in GENERAL]
    if challenge == "finance":
        return [{"input": inp, "output": out, "instruction": ins} for ins, inp, out in FINANCE]
    if challenge == "medical":
        return [{"input": q, "output": a, "instruction": TRUTHFULLY} for q, a in MEDICAL]
    if challenge == "code":
        return [{"instruction": ins, "input": inp, "output": out} for ins, inp, out in CODE]
    raise ValueError(f"no sample for {challenge!r}")


def write(rows: list[dict], path: Path) -> Path:
    """``rows`` as a JSON list (.json), JSON lines (.jsonl) or Parquet (.parquet) file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(f"unknown format {path.suffix}")
    return path


def write_sample(challenge: str, folder: Path, fmt: str = "jsonl") -> Path:
    return write(records(challenge), Path(folder) / f"{challenge}.{fmt}")


if __name__ == "__main__":
    out, fmt = Path(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "jsonl")
    for name in ("general-nlp", "finance", "medical", "code"):
        print(write_sample(name, out, fmt))
