"""Bits per byte, the measure that does not depend on the tokenizer: each id's bytes of text (byte-level
BPE, WordPiece, SentencePiece conventions; special tokens none), a model's summed cross-entropy over
them, and the evaluate stage's metrics.json, compare.md, report and MLflow record carrying it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_params
from distill import checkpoint, corpus, lm
from distill.config import load_params
from distill.lm_evaluation import lm_compare_table, lm_headline, score
from distill.task import ROLES, EvaluatePaths
from distill.text import byte_lengths
from tiny_lm import make_corpus, tiny_lm_params

# two- and four-byte characters, so that byte-level tokens split characters
DOCUMENTS = [f"the café {i} was naïve 🎬 and the film drags " * 3 + "while the actors shine" for i in range(30)]


def test_the_bpe_trained_here_gives_each_token_its_bytes_and_a_document_its_utf8_length():
    tok = corpus.train_tokenizer(DOCUMENTS, 300)
    table = byte_lengths(tok)
    assert table.shape == (300,) and table[tok.eos_token_id] == 0  # end-of-text is not text
    assert table[tok.convert_tokens_to_ids("Ã©")] == 2  # é, in the byte-to-unicode alphabet: two bytes
    for doc, ids in zip(DOCUMENTS, tok(DOCUMENTS, add_special_tokens=False)["input_ids"]):
        assert table[ids].sum() == len(doc.encode("utf-8"))
    windows, _ = corpus.windows(DOCUMENTS, tok, 16)
    whole = []
    for window in windows:  # end-of-text between documents counts nothing
        text = tok.decode(window, skip_special_tokens=True)
        if "\ufffd" not in text:  # no character cut at the window's edges
            assert table[window].sum() == len(text.encode("utf-8"))
            whole.append(text)
    assert len(whole) > len(windows) / 2 and any("🎬" in text for text in whole)


def fast_tokenizer(model, decoder, special: dict[str, str]):
    """A transformers fast tokenizer over a tokenizers `model` split on whitespace, with `decoder`."""
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoder
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def test_a_wordpiece_token_is_its_text_without_the_continuation_prefix_and_special_tokens_count_nothing():
    from tokenizers import decoders, models

    vocab = {"[UNK]": 0, "[SEP]": 1, "play": 2, "##ing": 3, "café": 4, "##s": 5}
    tok = fast_tokenizer(models.WordPiece(vocab, unk_token="[UNK]"), decoders.WordPiece(),
                         {"unk_token": "[UNK]", "eos_token": "[SEP]"})
    assert byte_lengths(tok).tolist() == [0, 0, 4, 3, 5, 1]
    ids = tok("playing cafés", add_special_tokens=False)["input_ids"]
    assert ids == [2, 3, 4, 5] and byte_lengths(tok)[ids].sum() == len("playingcafés".encode())  # 13


def test_a_sentencepiece_token_counts_its_meta_space_as_one_byte_and_a_fallback_byte_as_one():
    from tokenizers import decoders, models

    vocab = {"<eos>": 0, "\u2581the": 1, "\u2581café": 2, "s": 3, "\u2581": 4, "<0xF0>": 5}
    tok = fast_tokenizer(models.WordLevel(vocab, unk_token="<eos>"),
                         decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()]), {"eos_token": "<eos>"})
    assert byte_lengths(tok).tolist() == [0, 4, 6, 1, 1, 1]  # " the", " café" (é: 2), "s", " ", one byte


def uniform_gpt2(vocab: int, seed: int = 0, scale: float = 0.0) -> torch.nn.Module:
    """A one-layer GPT-2 whose tied embeddings are scaled by `scale`: 0 predicts every id alike."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(scale)
    return model.eval()


def test_a_uniform_model_scores_log2_v_bits_per_token_and_that_times_tokens_over_bytes_per_byte():
    windows = np.random.default_rng(0).integers(0, 8, size=(5, 6))
    table = np.array([0, 1, 2, 3, 1, 1, 4, 2])  # id 0 a special token
    # the head predicts 10 ids; the tokenizer's 8 are scored (a pretrained head's padding rows left out)
    models = {"teacher": uniform_gpt2(10), "student": uniform_gpt2(10, seed=1, scale=50.0)}
    scores = score(models, windows, table, 2, torch.device("cpu"))
    teacher = scores["teacher"]
    assert teacher.tokens == 5 * 5 and teacher.bytes == int(table[windows[:, 1:]].sum())
    assert teacher.bits_per_token == pytest.approx(3.0)  # log2 8
    assert teacher.bits_per_byte == pytest.approx(3.0 * 25 / teacher.bytes)
    assert teacher.kl_nats == pytest.approx(0.0, abs=1e-5) and scores["student"].kl_nats > 0
    assert scores["student"].bits_per_byte == pytest.approx(scores["student"].bits_per_token * 25 / teacher.bytes)
    alone = score({"student": models["student"]}, windows, table, 3, torch.device("cpu"), teacher=None)["student"]
    assert alone.kl_nats is None and alone.nats == pytest.approx(scores["student"].nats)


def tiny_metrics(**gaps) -> dict:
    row = {"test_perplexity": 8.0, "kl_bits_per_token": 0.5, "params": 1000, "latency_ms_b1": 1.0}
    bits = {"teacher": (3.0, 0.75), "student": (3.2, 0.8), "baseline": (4.0, 1.0)}
    metrics = {m: row | {"test_bits_per_token": t, "test_bits_per_byte": b} for m, (t, b) in bits.items()}
    metrics["student"] |= {"soft_label_bytes_per_token": 41.0, "soft_label_targets": "sampled 32"}
    return metrics | {"gap_closed": 0.8, "gap_closed_bits_per_byte": 0.8} | gaps


def test_the_compare_table_and_the_headline_show_bits_per_byte_beside_bits_per_token():
    table = lm_compare_table(tiny_metrics())
    assert "| model | bits / token | bits / byte | perplexity |" in table
    assert "| student | 3.200 | 0.800 | 8.0 |" in table
    assert "80.0% in bits per token, 80.0% in bits per byte" in table
    assert "n/a (the teacher is not better" in lm_compare_table(tiny_metrics(gap_closed=None,
                                                                            gap_closed_bits_per_byte=None))
    assert "(bits per byte: 0.800 vs 1.000 vs 0.750)" in lm_headline(tiny_metrics())
    assert "Aligned to the student's tokenizer" not in table


def test_across_tokenizers_the_compare_table_shows_how_faithful_the_alignment_was():
    metrics = tiny_metrics(gap_closed=None)
    metrics["student"] |= {"soft_label_targets_bits_per_byte": 1.823, "soft_label_teacher_bits_per_byte": 1.835}
    table = lm_compare_table(metrics)
    assert "n/a in bits per token, 80.0% in bits per byte" in table
    assert "the targets score 1.823 bits per byte on the train text, the teacher 1.835" in table


def untrained_project(tmp_path: Path) -> tuple:
    """Prepared tiny data and three untrained checkpoints on it: a uniform teacher, a student whose random
    embeddings are scaled up 10 times and a baseline 200 times (ever more confidently wrong)."""
    from distill.tracking import StageRun

    raw = tiny_lm_params(str(make_corpus(tmp_path / "c.parquet")))
    params = load_params(write_params(tmp_path / "params.yaml", raw), task="language_model")
    meta = corpus.prepare_corpus(params.data, tmp_path / "prepared")
    paths = {}
    for role, (seed, scale) in {"teacher": (0, 0.0), "student": (1, 10.0), "baseline": (2, 200.0)}.items():
        model = uniform_gpt2(meta.vocab_size, seed, scale)
        paths[role] = tmp_path / f"{role}.pt"
        checkpoint.save(paths[role], model, lm.lm_model_args(model), corpus.TASK, prepared_fingerprint=meta.fingerprint,
                        history=[{"step": 0, "val_bits_per_token": 8.0}])
    reports = tmp_path / "reports"
    outputs = {"metrics": reports / "metrics.json", "compare": reports / "compare.md",
               "report": reports / "report.html", "figures": reports / "figures", "curves": reports / "curves"}
    run = StageRun("run-1", "pipeline-1", stage="evaluate", tracked=True)
    run.failure = "no store here: every call is journalled"
    return params, meta, EvaluatePaths(meta.path, paths, outputs), run


def test_evaluate_writes_and_logs_each_models_bits_per_byte_over_the_test_texts_bytes(tmp_path):
    from distill.language_model import LanguageModelTask

    params, meta, paths, run = untrained_project(tmp_path)
    LanguageModelTask().evaluate(params, paths, run)
    metrics = json.loads(paths.outputs["metrics"].read_text())
    test = corpus.read_windows(meta.path, "test")
    table = byte_lengths(lm.tokenizer(meta))
    assert metrics["teacher"]["test_bits_per_token"] == pytest.approx(math.log2(300))  # uniform over 300 ids
    for m in ROLES:
        row = metrics[m]
        assert row["test_tokens"] == test.shape[0] * 15 and row["test_bytes"] == table[test[:, 1:]].sum() > 0
        assert row["test_bits_per_byte"] == pytest.approx(row["test_bits_per_token"] * row["test_tokens"]
                                                          / row["test_bytes"])
    assert metrics["baseline"]["test_bits_per_token"] > metrics["student"]["test_bits_per_token"] > math.log2(300)
    # one tokenizer: every model's bytes are the same, so the gap closed is the same in either measure
    assert 0 < metrics["gap_closed"] < 1 and metrics["gap_closed_bits_per_byte"] == pytest.approx(metrics["gap_closed"])
    compare = paths.outputs["compare"].read_text()
    assert f"| student | {metrics['student']['test_bits_per_token']:.3f} | " \
           f"{metrics['student']['test_bits_per_byte']:.3f} |" in compare
    assert "bits / byte" in paths.outputs["report"].read_text()
    logged = {k: v for op in run.journal if op["op"] == "metrics" for k, v in op["values"].items()}
    assert logged["student.test_bits_per_byte"] == pytest.approx(metrics["student"]["test_bits_per_byte"])
    assert logged["gap_closed_bits_per_byte"] == pytest.approx(metrics["gap_closed_bits_per_byte"])
    assert logged["teacher.test_bytes"] == metrics["teacher"]["test_bytes"]
