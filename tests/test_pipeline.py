"""End to end: `dvc repro` in a fresh copy of the project, then what a change reruns."""

import json
import re
import subprocess

import pytest
import yaml

from conftest import BIN, git_commit, subprocess_env, tiny_params, write_params

ALL_STAGES = {"prepare", "train_teacher", "soft_labels", "train_student", "train_baseline", "evaluate"}


def dvc(project, *args: str) -> str:
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=project, env=subprocess_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def repro(project) -> set[str]:
    """Run `dvc repro` and return the names of the stages that ran."""
    return set(re.findall(r"Running stage '(\w+)'", dvc(project, "repro")))


def test_dvc_repro_runs_the_pipeline_then_reruns_exactly_what_a_change_touches(project):
    assert repro(project) == ALL_STAGES
    metrics = json.loads((project / "reports/metrics.json").read_text())
    for model in ("teacher", "student", "baseline"):
        assert 0 <= metrics[model]["test_accuracy"] <= 1
        assert {"nll", "ece", "teacher_agreement", "kl_from_teacher", "entropy", "params",
                "checkpoint_bytes", "latency_ms_b1", "latency_ms_batch"} <= set(metrics[model])
    assert metrics["teacher"]["test_accuracy"] > 0.5  # it learned something
    assert "gap_closed" in metrics
    for out in ("data/prepared/train.parquet", "data/prepared/transfer.parquet",
                "data/soft_labels/part-00000.parquet", "data/soft_labels/provenance.json", "models/teacher.pt",
                "models/student.pt", "models/baseline.pt", "reports/compare.md", "reports/predictions.csv",
                "reports/reliability/student.csv", "reports/train/student.csv", "reports/report.html",
                *(f"reports/figures/{name}.png" for name in ("tradeoff", "training", "confusion", "reliability"))):
        assert (project / out).is_file(), out
    # the report's figures are DVC plots, rendered by `dvc plots show` beside the CSV plots
    dvc(project, "plots", "show", "--out", "plots")
    shown = (project / "plots/index.html").read_text()
    assert "reports/figures/confusion.png" in shown.replace("_", "/") or "confusion.png" in shown

    assert repro(project) == set(), "a second repro must run no stage"
    assert "up to date" in dvc(project, "status")

    # as an experiment: dvc exp run -S edits params.yaml and reruns the student side only
    git_commit(project, "first run")
    out = dvc(project, "exp", "run", "-S", "student.temperature=2")
    assert set(re.findall(r"Running stage '(\w+)'", out)) == {"train_student", "evaluate"}
    assert yaml.safe_load((project / "params.yaml").read_text())["student"]["temperature"] == 2
    assert "student.test_accuracy" in dvc(project, "metrics", "diff")

    # by editing params.yaml
    write_params(project / "params.yaml", tiny_params(**{"student.temperature": 3.0}))
    assert repro(project) == {"train_student", "evaluate"}

    write_params(project / "params.yaml", tiny_params(**{"student.temperature": 3.0,
                                                         "teacher.hidden": [48]}))
    assert repro(project) == {"train_teacher", "soft_labels", "train_student", "evaluate"}

    write_params(project / "params.yaml", tiny_params(**{"student.temperature": 3.0,
                                                         "teacher.hidden": [48], "student.epochs": 2}))
    assert repro(project) == {"train_student", "train_baseline", "evaluate"}

    write_params(project / "params.yaml", tiny_params(**{"student.temperature": 3.0,
                                                         "teacher.hidden": [48], "student.epochs": 2,
                                                         "data.num_samples": 700}))
    assert repro(project) == ALL_STAGES


@pytest.mark.parametrize("stage", ["train_student", "evaluate"])
def test_a_stage_fails_cleanly_when_its_inputs_are_missing(project, stage):
    spec = yaml.safe_load((project / "dvc.yaml").read_text())["stages"][stage]
    result = subprocess.run(spec["cmd"].split(), cwd=project, env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "not found; run the" in result.stderr
