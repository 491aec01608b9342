"""Your own text and teacher, refused in words: a file with blank cells or one class stops the
prepare stage (a process, as DVC runs it) with exit status 2 and one line naming the file, the
column and the fix, and writes nothing; `data.on_nan: drop` drops those rows and counts them in
the log. A long corpus is measured against `data.text.max_length`; a small one fine-tunes its
teacher for `teacher.min_steps`; a teacher brought trained that scores near chance on val is named
in train_teacher's log with the likely cause."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import subprocess_env, tiny_params, write_params
from distill import data, pretrained, text
from distill.classification_params import Params
from tiny_text import FILLER, make_bert_folder, make_reviews


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_bert_folder(tmp_path_factory.mktemp("bert") / "bert")


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> pd.DataFrame:
    return pd.read_csv(make_reviews(tmp_path_factory.mktemp("reviews") / "reviews.csv", rows=150, movies=30))


def text_params(bert: Path, **data: object) -> dict:
    """Tiny params reading reviews.csv (in the working folder) as text, grouped by movie, without a transfer set."""
    return tiny_params(**{"data.source": "csv", "data.path": "reviews.csv", "data.text_column": "text",
                          "data.group_column": "movie", "data.transfer_size": 0, "data.augment": "none",
                          "data.text.tokenizer": str(bert), "data.text.max_length": 24,
                          **{f"data.{k}": v for k, v in data.items()}})


def run_prepare(folder: Path, frame: pd.DataFrame, bert: Path, **data: object) -> subprocess.CompletedProcess:
    frame.to_csv(folder / "reviews.csv", index=False)
    write_params(folder / "params.yaml", text_params(bert, **data))
    return subprocess.run([sys.executable, "-m", "stages.prepare", "--params", "params.yaml", "--out", "prepared"],
                          cwd=folder, env=subprocess_env(), capture_output=True, text=True, timeout=120)


def with_blank(frame: pd.DataFrame, column: str, row: int) -> pd.DataFrame:
    frame = frame.copy()
    frame[column] = frame[column].astype(object)
    frame.loc[row, column] = np.nan
    return frame


REFUSALS = [
    ("a blank group cell", lambda df: with_blank(df, "movie", 5),
     ["reviews.csv", "group column 'movie'", "row 5", "data.on_nan: drop"]),
    ("a blank text cell", lambda df: with_blank(df, "text", 3),
     ["reviews.csv", "text column 'text'", "row 3", "data.on_nan: drop"]),
    ("a blank label cell", lambda df: with_blank(df, "label", 7),
     ["reviews.csv", "label column 'label'", "row 7", "data.on_nan: drop"]),
    ("one class", lambda df: df.assign(label="fresh"),
     ["reviews.csv", "label column 'label'", "only one class", "'fresh'"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, breakage, named", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_prepare_refuses_a_bad_text_file_in_one_line_naming_file_and_column(tmp_path, bert, reviews, name,
                                                                             breakage, named):
    result = run_prepare(tmp_path, breakage(reviews), bert)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "error:" in lines[0] and all(text in lines[0] for text in named), lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "prepared").exists()


@pytest.mark.slow
def test_on_nan_drop_drops_rows_with_a_blank_text_label_or_group_and_says_how_many(tmp_path, bert, reviews):
    frame = with_blank(with_blank(with_blank(reviews, "text", 3), "label", 7), "movie", 5)
    result = run_prepare(tmp_path, frame, bert, on_nan="drop")
    assert result.returncode == 0, result.stderr
    assert "reviews.csv: dropped 3 of 150 rows with a blank text or a blank label or a blank group" in result.stderr
    assert sum(json.loads((tmp_path / "prepared" / "meta.json").read_text())["splits"].values()) == 147


def test_prepare_says_how_much_of_the_median_document_max_length_reads(tmp_path, bert, caplog):
    rng = np.random.default_rng(0)
    long = [" ".join(rng.choice(FILLER, size=40)) + (" good" if i % 2 else " bad") for i in range(60)]
    frame = pd.DataFrame({"text": long, "label": ["fresh", "rotten"] * 30, "movie": [f"m{i % 20}" for i in range(60)]})
    frame.to_csv(tmp_path / "reviews.csv", index=False)
    cfg = Params.model_validate(text_params(bert, **{"path": str(tmp_path / "reviews.csv"), "text.max_length": 16})).data
    with caplog.at_level("INFO", logger="distill"):
        meta = data.prepare(cfg, tmp_path / "prepared")
    assert meta.tokens["median_tokens"] == 43 and meta.tokens["cut_fraction"] == 1.0
    said = caplog.text
    assert "data.text.max_length 16 reads 16 of the median document's 43 tokens (37 %); 100 % of documents are cut" \
        in said
    assert "raise data.text.max_length (up to the teacher's limit, 64" in said and "only the first 16 tokens" in said


def test_a_corpus_that_fits_max_length_gets_no_warning(bert, caplog):
    tok = text.load_tokenizer(bert)
    lengths = text.document_lengths(tok, np.asarray(["a good film", "a dull plot and a weak cast"], dtype=object), 24)
    assert lengths == {"median_tokens": 7, "cut_fraction": 0.0, "measured_documents": 2}  # [CLS] and [SEP] count
    with caplog.at_level("INFO", logger="distill"):
        text.log_lengths(lengths, 24, text.position_limit(tok, bert))
    assert "reads all of the median document's 7 tokens; 0 % of documents are cut" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


class RawScale(nn.Module):
    """A teacher trained on raw features: class 0 ('high') when x0 is above 100."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, 0] - 100, 100 - x[:, 0]], dim=1)


def test_a_near_chance_line_lies_within_noise_of_the_majority_rate():
    y = np.array([0] * 60 + [1] * 40)  # majority rate 0.6; 2 sqrt(0.24 / 100) = 0.098
    assert pretrained.chance_warning(0.69, y, ["a", "b"], True) is not None
    assert pretrained.chance_warning(0.70, y, ["a", "b"], True) is None
    big = np.array([0] * 5000 + [1] * 5000)  # the floor of 0.02 where 2 standard errors are 0.01
    assert pretrained.chance_warning(0.515, big, ["a", "b"], False) is not None
    said = pretrained.chance_warning(0.2, y, ["a", "b"], None)
    assert "'a' scores 0.600 on these 100 rows" in said and "data.text.tokenizer" in said


@pytest.mark.slow
def test_a_brought_teacher_near_chance_is_named_with_data_standardize_as_the_likely_cause(tmp_path):
    rng = np.random.default_rng(0)
    x0 = rng.normal(100, 10, size=300)
    frame = pd.DataFrame({"x0": x0, "x1": rng.normal(size=300), "label": np.where(x0 > 100, "high", "low")})
    frame.to_csv(tmp_path / "table.csv", index=False)
    torch.jit.save(torch.jit.script(RawScale()), tmp_path / "teacher.ts")
    params = tiny_params(**{"data.source": "csv", "data.path": "table.csv", "data.transfer_size": 0,
                            "data.augment": "none", "teacher.source": "checkpoint", "teacher.model": "teacher.ts"})
    write_params(tmp_path / "params.yaml", params)
    data.prepare(Params.model_validate(params).data.model_copy(update={"path": str(tmp_path / "table.csv")}),
                 tmp_path / "prepared")
    result = subprocess.run([sys.executable, "-m", "stages.train_teacher", "--params", "params.yaml", "--prepared",
                             "prepared", "--model", "teacher.pt", "--history", "teacher.csv"], cwd=tmp_path,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "near chance" in line]
    assert len(warning) == 1 and "it was given standardised features (data.standardize: true); if it was trained " \
        "on raw ones set data.standardize: false" in warning[0], result.stderr


def test_a_small_corpus_fine_tunes_its_pretrained_teacher_for_min_steps_warmed_up_and_decayed_over_them(
        tmp_path, bert, reviews):
    from distill import training
    from distill.rows import Batches, InMemoryRows

    reviews.to_csv(tmp_path / "reviews.csv", index=False)
    params = Params.model_validate(text_params(bert, path=str(tmp_path / "reviews.csv")) | {"teacher": {
        "source": "pretrained", "model": str(bert), "epochs": 1, "min_steps": 300, "batch_size": 32, "lr": 1e-3,
        "warmup_fraction": 0.1}})
    data.prepare(params.data, tmp_path / "prepared")
    train, val = (data.read_split(tmp_path / "prepared", split) for split in ("train", "val"))
    job = training.TrainJob(params.teacher, name="teacher")
    trainee = training.ClassifierTrainee(job, Batches(InMemoryRows(train.x, train.y), 32), (val.x, val.y))
    assert trainee.eval_every <= 5 and trainee.steps >= 300  # 150 rows: about 90 in train, 3 batches an epoch
    opt = torch.optim.AdamW(nn.Linear(1, 1).parameters(), lr=1e-3)
    schedule, rates = trainee.schedule(opt), []
    for _ in range(trainee.steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert int(np.argmax(rates)) == round(0.1 * trainee.steps) - 1 and rates[-1] <= 2e-3 / trainee.steps
