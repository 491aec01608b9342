"""The text student as the model registry holds it: logged by train_student's own path with the
tokenizer in front (distill/served_text.py), loaded back by MLflow and answering raw text and
token ids, also from `mlflow models serve`; a logged model with no files is never registered."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pandas as pd
import pytest
import torch

from distill import data, model_registry, text, tracking
from distill.classification import ClassificationTask
from distill.classification_params import Params
from distill.config import BaseRegistryConfig, TrackingConfig
from distill.models import TextCNN
from tiny_text import make_bert_folder, make_reviews

REGISTRY = BaseRegistryConfig(model_name="distill-text-student")
TEXTS = ["a warm and clever film", "dull , tedious plot", "great", "the cast was silly and the ending flat " * 4]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny TextCNN over prepared reviews, the params that prepared them, and the prepared folder."""
    root = tmp_path_factory.mktemp("served")
    bert = make_bert_folder(root / "bert")
    params = Params.model_validate({"data": {
        "source": "csv", "path": str(make_reviews(root / "reviews.csv", rows=200, movies=40)), "text_column": "text",
        "group_column": "movie", "transfer_size": 10, "augment_copies": 1, "text": {"tokenizer": str(bert), "max_length": 24}}})
    meta = data.prepare(params.data, root / "prepared")
    torch.manual_seed(0)
    model = TextCNN(num_classes=2, vocab_size=meta.tokens["vocab_size"], pad_id=meta.tokens["pad_id"], embedding_dim=8,
                    channels=[8, 8], kernel_sizes=[2, 3], hidden=[]).eval()
    (root / "student.pt").write_bytes(b"the checkpoint a catch-up would rebuild the model from")
    return model, params, root


def log_student(student, text_reader: bool = True) -> str:
    """Log the student as train_student does, in the current folder's store; its run id."""
    model, params, root = student
    example = data.read_split(root / "prepared", "val").x[:5]
    served = ClassificationTask()._served_text(params, root / "prepared") if text_reader else None
    with tracking.stage_run("train_student", TrackingConfig(experiment="served"), {}, None) as run:
        run.log_model(model, example, root / "student.pt", text=served)
    return run.run_id


def register(student_run: str) -> dict:
    with tracking.stage_run("evaluate", TrackingConfig(experiment="served"), {}, None) as run:
        return model_registry.register_student(run, student_run, REGISTRY, passed=True)


def expected_logits(student, rows: np.ndarray) -> np.ndarray:
    model, _, _ = student
    with torch.inference_mode():
        return model(torch.from_numpy(rows.astype(np.int64))).numpy()


def tokenized(student, texts: list[str]) -> np.ndarray:
    _, params, _ = student
    return text.tokenize(text.load_tokenizer(params.data.text.tokenizer), np.asarray(texts, dtype=object), 24)


def test_the_registered_text_student_answers_raw_text_and_token_ids(student, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    registered = register(log_student(student))
    assert str(registered["registered_version"]) == "1"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    loaded = mlflow.pyfunc.load_model("models:/distill-text-student@champion")
    ids = tokenized(student, TEXTS)
    expected = expected_logits(student, ids)

    from_text = loaded.predict(TEXTS)
    assert list(from_text.columns) == ["fresh", "rotten"]  # one logit per class, by name
    np.testing.assert_allclose(from_text.to_numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loaded.predict(ids.tolist()).to_numpy(), expected, rtol=1e-5, atol=1e-6)
    # id rows of any length: padded (or cut) to max_length as prepare does
    short = [[int(i) for i in row if i != 0] for row in ids]
    np.testing.assert_allclose(loaded.predict(short).to_numpy(), expected, rtol=1e-5, atol=1e-6)
    assert loaded.predict(pd.DataFrame({"text": TEXTS[:2]})).shape == (2, 2)
    # the teacher's folder is not copied whole: the tokenizer's own files only
    files = {a.path for a in mlflow.artifacts.list_artifacts("models:/distill-text-student@champion/artifacts/tokenizer")}
    assert not any(name.endswith((".safetensors", ".bin")) for name in files)


def test_a_logged_model_with_no_files_is_not_registered(student, tmp_path, monkeypatch, caplog):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    # without its tokenizer the TextCNN goes to mlflow.pytorch's torch.export, which refuses its
    # data-dependent length: the logged model is left with no files, as it was before the fix
    student_run = log_student(student, text_reader=False)
    assert "the MLflow model was not logged (GuardOnDataDependentSymNode" in caplog.text
    registered = register(student_run)
    assert registered["registered_version"] is None
    assert "no files" in registered.get("unregistered", "no files")
    (line,) = [r.getMessage() for r in caplog.records if "not registered" in r.getMessage()]
    assert line.startswith("distill-text-student: not registered: ") and "has no files" in line
    assert not MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_registered_models()


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_raw_text_request(student, tmp_path, monkeypatch):
    from servers import mlflow_model_server

    monkeypatch.chdir(tmp_path)
    register(log_student(student))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with mlflow_model_server("models:/distill-text-student@champion", tmp_path / "serve.log", uri) as server:
        def ask(inputs: list) -> np.ndarray:
            request = urllib.request.Request(f"{server}/invocations", data=json.dumps({"inputs": inputs}).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as answer:
                rows = json.loads(answer.read())["predictions"]
            return np.array([[row["fresh"], row["rotten"]] for row in rows])

        expected = expected_logits(student, tokenized(student, TEXTS))
        np.testing.assert_allclose(ask(TEXTS), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ask(tokenized(student, TEXTS).tolist()), expected, rtol=1e-5, atol=1e-6)
