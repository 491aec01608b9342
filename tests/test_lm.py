"""The language-model task's data and config: documents split whole, the tokenizer, windows,
lm/params.yaml against its schema and lm/dvc.yaml, and bad input refused in one sentence."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, write_params
from distill import corpus
from distill.config import load_params
from distill.errors import UserError
from distill.lm_params import LM_DISTILLATION_KEYS, CorpusConfig, LMParams, LMStudentConfig
from stages.common import cli_main
from test_config import _missing_keys
from tiny_lm import make_corpus, tiny_lm_params


def marked_corpus(path: Path, documents: int = 40) -> Path:
    """Documents whose every row carries the document's own marker word (docmark<i>)."""
    rows = [{"doc": f"d{d}", "text": f"docmark{d} " + " ".join(["plain words here"] * 3)}
            for d in range(documents) for _ in range(2)]
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_documents_are_split_whole_and_the_windows_hold_each_split_alone(tmp_path):
    cfg = CorpusConfig(**tiny_lm_params(str(marked_corpus(tmp_path / "c.parquet")))["data"])
    meta = corpus.prepare_corpus(cfg, tmp_path / "prepared")
    tok = corpus.given_tokenizer(str(meta.tokenizer_dir))
    seen = {}
    for split in corpus.CORPUS_SPLITS:
        text = tok.decode(corpus.read_windows(meta.path, split).reshape(-1))
        seen[split] = set(re.findall(r"docmark(\d+)", text))
    assert all(seen.values())
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])
    counts = meta.splits
    assert sum(c["documents"] for c in counts.values()) == 40
    assert counts["test"]["documents"] == 8 and counts["val"]["documents"] == 8  # 0.2 of 40 each
    windows = corpus.read_windows(meta.path, "train")
    assert windows.shape == (counts["train"]["windows"], 16) and windows.max() < meta.vocab_size


def test_the_tokenizer_is_trained_on_train_alone_and_the_same_every_time(tmp_path):
    cfg = CorpusConfig(**tiny_lm_params(str(make_corpus(tmp_path / "c.parquet")))["data"])
    a = corpus.prepare_corpus(cfg, tmp_path / "a")
    b = corpus.prepare_corpus(cfg, tmp_path / "b")
    assert a.tokenizer_sha256 == b.tokenizer_sha256 and a.fingerprint == b.fingerprint
    assert a.vocab_size == 300
    # a given tokenizer folder (the first run's) is used as it is: its files, and so its hash
    given = corpus.prepare_corpus(cfg.model_copy(update={"tokenizer": str(a.tokenizer_dir)}), tmp_path / "c")
    assert given.tokenizer_sha256 == a.tokenizer_sha256 and given.vocab_size == a.vocab_size
    assert np.array_equal(corpus.read_windows(given.path, "test"), corpus.read_windows(a.path, "test"))


def test_text_files_are_documents_a_folder_of_files_or_one_file_with_blank_lines(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.txt").write_text(f"story {i} " * 30)
    cfg = CorpusConfig(source="text_files", path=str(folder))
    assert corpus.load_documents(cfg) == [(f"story {i} " * 30).strip() for i in range(5)]
    one = tmp_path / "one.txt"
    one.write_text("first document\nstill first\n\nsecond document\n\n\n")
    assert corpus.load_documents(CorpusConfig(source="text_files", path=str(one))) == [
        "first document\nstill first", "second document"]


def test_the_rotten_tomatoes_corpus_is_one_document_per_movie():
    docs = corpus.load_documents(CorpusConfig())
    assert 1400 < len(docs) < 1500 and all(isinstance(d, str) and d for d in docs)


# ---------------------------------------------------------------- bad input: one sentence, exit 2, nothing written


def run_prepare(tmp_path: Path, params: dict, caplog) -> tuple[int, str]:
    """The stage's exit status and its one error line (distill.errors.report logs it)."""
    from stages import prepare

    path = write_params(tmp_path / "params.yaml", params)
    caplog.clear()
    code = cli_main(prepare.main, ["--params", str(path), "--out", str(tmp_path / "prepared")])
    return code, "\n".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")


@pytest.mark.parametrize("case", ["empty", "short", "tokenizer"])
def test_bad_text_is_refused_in_one_sentence_with_nothing_written(tmp_path, caplog, case):
    path = tmp_path / "c.parquet"
    changes = {}
    if case == "empty":
        pd.DataFrame({"doc": ["a", "b"], "text": ["", "   "]}).to_parquet(path)
        expected = "the corpus has no text"
    elif case == "short":  # every document a few words: a split holds less than one window
        pd.DataFrame({"doc": [f"d{i}" for i in range(10)], "text": ["tiny doc"] * 10}).to_parquet(path)
        changes = {"data.context_length": 512}
        expected = "fewer than one window of data.context_length 512"
    else:
        make_corpus(path)
        broken = tmp_path / "tok"
        broken.mkdir()
        (broken / "tokenizer.json").write_text("{ not json")
        changes = {"data.tokenizer": str(broken)}
        expected = "the tokenizer does not load"
    code, err = run_prepare(tmp_path, tiny_lm_params(str(path), **changes), caplog)
    assert code == 2, err
    assert expected in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "prepared").exists()


def test_a_tokenizer_folder_that_is_not_there_is_refused(tmp_path, caplog):
    params = tiny_lm_params(str(make_corpus(tmp_path / "c.parquet")), **{"data.tokenizer": str(tmp_path / "nope")})
    code, err = run_prepare(tmp_path, params, caplog)
    assert code == 2 and "tokenizer folder not found" in err


# ---------------------------------------------------------------- lm/params.yaml and lm/dvc.yaml


def lm_stages() -> dict:
    return yaml.safe_load((REPO / "lm" / "dvc.yaml").read_text())["stages"]


def test_lm_params_is_valid_and_spells_out_every_key():
    raw = yaml.safe_load((REPO / "lm" / "params.yaml").read_text())
    params = load_params(REPO / "lm" / "params.yaml", task="language_model")
    assert isinstance(params, LMParams) and params.soft_labels.targets == "sampled"
    assert _missing_keys(LMParams, raw) == []


@pytest.mark.parametrize("stage, params", [
    ("prepare", {"data"}),
    ("train_teacher", {"seed", "teacher", "distributed", "runtime.precision"}),
    ("soft_labels", {"soft_labels", "runtime.precision"}),
    ("train_student", {"seed", "student", "distributed", "runtime.precision"}),
    ("evaluate", {"evaluate", "registry"}),
])
def test_each_lm_stage_lists_exactly_the_params_it_reads(stage, params):
    assert set(lm_stages()[stage]["params"]) == params


def test_the_lm_baseline_reads_every_student_key_except_the_distillation_ones():
    expected = {"seed", "distributed", "runtime.precision"} | {
        f"student.{k}" for k in LMStudentConfig.model_fields if k not in LM_DISTILLATION_KEYS}
    assert set(lm_stages()["train_baseline"]["params"]) == expected


def test_a_stage_refuses_the_other_tasks_params_by_name(tmp_path):
    with pytest.raises(UserError, match="its task is language_model, but the caller runs classify"):
        load_params(REPO / "lm" / "params.yaml")
    with pytest.raises(UserError, match="its task is classify, but the caller runs language_model"):
        load_params(REPO / "params.yaml", task="language_model")
    raw = yaml.safe_load((REPO / "lm" / "params.yaml").read_text())
    raw["student"]["width"] = 129  # not a multiple of 2 heads
    with pytest.raises(UserError, match="student.* must be a multiple of heads"):
        load_params(write_params(tmp_path / "p.yaml", raw), task=None)
    raw["task"] = "translate"
    with pytest.raises(UserError, match="task = 'translate' is not allowed"):
        load_params(write_params(tmp_path / "p.yaml", raw), task=None)
