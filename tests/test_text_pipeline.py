"""The text pipeline (text/dvc.yaml) end to end: a tiny random BERT teacher fine-tuned on tiny
reviews and distilled into a text CNN, in this process; under `dvc repro` (slow) with the
no-op and temperature-only reruns and a checkpoint teacher tracked by hash; and the real
bundled MiniLM on a few hundred Rotten Tomatoes reviews (slow)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, dvc, git_commit, make_scratch_project, repro, run_pipeline_in_process, run_stage_in_process
from conftest import TINY_PARAMS, write_params
from distill import text
from distill.io import file_sha256
from tiny_text import make_bert_folder, make_reviews, tiny_text_params


def text_project(root: Path, **params_changes) -> Path:
    """A folder laid out like text/: its dvc.yaml, tiny params, the tiny BERT and the reviews."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "text" / "dvc.yaml", root / "dvc.yaml")
    make_bert_folder(root / "bert")
    make_reviews(root / "data" / "raw" / "reviews.csv")
    params = tiny_text_params()
    for key, value in params_changes.items():
        section, name = key.split(".")
        params[section][name] = value
    write_params(root / "params.yaml", params)
    return root


def test_a_tiny_bert_goes_through_every_stage(tmp_path):
    root = text_project(tmp_path / "text")
    results = run_pipeline_in_process(root)
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    teacher, student = metrics["teacher"], metrics["student"]
    assert teacher["params"] > 10 * student["params"], "the text CNN is not a tenth of the tiny BERT"
    assert teacher["test_accuracy"] > 0.6, metrics
    assert metrics["baseline"]["params"] == student["params"]
    prov = json.loads((root / "data" / "soft_labels" / "provenance.json").read_text())
    assert prov["tokenizer_sha256"] == text.tokenizer_sha256(root / "bert")
    assert prov["teacher_sha256"] == file_sha256(root / "models" / "teacher.pt")
    ckpt = torch.load(root / "models" / "teacher.pt", weights_only=True)
    assert ckpt["model_args"]["arch"] == "transformer"
    assert results["train_teacher"]["best_epoch"] >= 1
    # the same run as a checkpoint teacher: nothing trained, the file recorded by its hash
    shutil.copy(root / "models" / "teacher.pt", root / "data" / "raw" / "teacher.pt")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["teacher"] |= {"source": "checkpoint", "model": "data/raw/teacher.pt"}
    write_params(root / "params.yaml", params)
    result = run_stage_in_process(root, "train_teacher")
    assert result["best_epoch"] == 0 and [row["epoch"] for row in result["history"]] == [0]
    brought = torch.load(root / "models" / "teacher.pt", weights_only=True)
    assert brought["teacher_source_sha256"] == file_sha256(root / "data" / "raw" / "teacher.pt")
    assert result["best_val_accuracy"] == pytest.approx(ckpt["val_accuracy"])


@pytest.mark.slow
def test_under_dvc_a_temperature_change_reruns_only_the_student_and_evaluate(tmp_path, flow_module, monkeypatch):
    project = make_scratch_project(tmp_path / "project", yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    root = project / "text"
    make_bert_folder(root / "bert")
    make_reviews(root / "data" / "raw" / "reviews.csv")
    write_params(root / "params.yaml", tiny_text_params() | {"tracking": {
        "enabled": True, "experiment": "tiny-text", "on_error": "fail"}})
    git_commit(project, "tiny text pipeline")
    stages = {"prepare", "train_teacher", "soft_labels", "train_student", "train_baseline", "evaluate"}
    assert repro(root) == stages
    assert repro(root) == set(), "a second dvc repro reran stages"
    assert "text/" not in dvc(project, "status"), "the root project sees the text pipeline's stages"
    # the project's one MLflow store, not one per pipeline folder
    assert (project / "mlflow.db").is_file() and not (root / "mlflow.db").exists()
    # the Prefect flow from the text folder: its own stages, the change applied as dvc exp run -S does
    from pipelines.app import app
    from typer.testing import CliRunner

    monkeypatch.chdir(root)
    result = CliRunner().invoke(app, ["run", "--set", "student.temperature=3"])
    assert result.exit_code == 0, result.output
    ran = set(re.findall(r"(\w+) ran", result.output))
    assert ran == {"train_student", "evaluate"}, result.output
    # and as a DVC experiment
    out = dvc(root, "exp", "run", "-S", "student.temperature=2.5")
    assert set(re.findall(r"Running stage '(\w+)'", out)) == {"train_student", "evaluate"}
    params = yaml.safe_load((root / "params.yaml").read_text())
    # a checkpoint teacher: train_teacher trains nothing; the file is a dependency, by hash
    shutil.copy(root / "models" / "teacher.pt", root / "data" / "raw" / "teacher.pt")
    params["teacher"] |= {"source": "checkpoint", "model": "data/raw/teacher.pt"}
    params["student"]["embedding_init"] = "random"  # the teacher's embeddings are read from a Hugging Face folder
    params["tracking"]["enabled"] = False
    write_params(root / "params.yaml", params)
    assert "train_teacher" in repro(root)
    assert repro(root) == set()
    ckpt = torch.load(root / "data" / "raw" / "teacher.pt", weights_only=True)
    ckpt["state_dict"]["head.bias"] += 1.0
    torch.save(ckpt, root / "data" / "raw" / "teacher.pt")
    assert "train_teacher" in repro(root)


@pytest.mark.slow
def test_the_real_minilm_fine_tunes_and_distils_on_a_few_hundred_reviews(tmp_path):
    from distill import sources
    from distill.classification_params import DataConfig

    raw = sources.load_source(DataConfig(source="rotten_tomatoes", transfer_size=0, text={"tokenizer": "minilm"}))
    reviews = pd.DataFrame({"text": raw.x, "label": raw.y, "movie": raw.groups}).iloc[:400]
    root = tmp_path / "text"
    root.mkdir()
    shutil.copy(REPO / "text" / "dvc.yaml", root / "dvc.yaml")
    (root / "data" / "raw").mkdir(parents=True)
    reviews.to_csv(root / "data" / "raw" / "reviews.csv", index=False)
    params = tiny_text_params(tokenizer="minilm")
    params["data"]["text"]["max_length"] = 48
    params["teacher"] |= {"trainable_layers": 2, "epochs": 2, "lr": 5e-5, "batch_size": 16}
    params["student"] |= {"channels": [32, 32, 32], "kernel_sizes": [3, 4, 5], "embedding_dim": 32, "epochs": 5}
    write_params(root / "params.yaml", params)
    run_pipeline_in_process(root)
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert metrics["teacher"]["params"] > 22_000_000
    assert metrics["teacher"]["test_accuracy"] > 0.6, metrics["teacher"]
    assert metrics["student"]["params"] * 10 <= metrics["teacher"]["params"]
