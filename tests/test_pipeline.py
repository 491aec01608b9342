"""End to end: the tiny pipeline as `dvc repro` built it (once per session, tests/conftest.py),
then what a change reruns. The flow's own behaviour is tests/test_flow.py's."""

import json
import re
import subprocess

import pytest
import yaml

from conftest import BIN, dvc, git_commit, repro, subprocess_env, tiny_params, write_params

METRIC_KEYS = {"test_accuracy", "nll", "ece", "teacher_agreement", "kl_from_teacher", "entropy", "params",
               "checkpoint_bytes", "latency_ms_b1", "latency_ms_batch"}
FIGURES = ("tradeoff", "training", "confusion", "reliability")


def test_the_built_pipeline_has_every_output_and_metrics_that_show_learning(built_project):
    project = built_project
    metrics = json.loads((project / "reports/metrics.json").read_text())
    for model in ("teacher", "student", "baseline"):
        assert METRIC_KEYS <= set(metrics[model])
    # 4 classes: chance is 25 %; the tiny models learn well above it, the teacher most
    assert metrics["teacher"]["test_accuracy"] > 0.6
    assert metrics["student"]["test_accuracy"] > 0.4 and metrics["baseline"]["test_accuracy"] > 0.4
    assert metrics["student"]["params"] == metrics["baseline"]["params"] < metrics["teacher"]["params"]
    gap = metrics["gap_closed"]
    acc = {m: metrics[m]["test_accuracy"] for m in ("teacher", "student", "baseline")}
    assert gap == pytest.approx((acc["student"] - acc["baseline"]) / (acc["teacher"] - acc["baseline"]))
    for out in ("data/prepared/train.parquet", "data/prepared/transfer.parquet",
                "data/soft_labels/part-00000.parquet", "data/soft_labels/provenance.json", "models/teacher.pt",
                "models/student.pt", "models/baseline.pt", "reports/compare.md", "reports/predictions.csv",
                "reports/reliability/student.csv", "reports/train/student.csv", "reports/report.html",
                *(f"reports/figures/{name}.png" for name in FIGURES)):
        assert (project / out).is_file(), out
    # the report's figures are DVC plots: `dvc plots show` renders each of them beside the CSV plots
    dvc(project, "plots", "show", "--out", "plots")
    shown = (project / "plots/index.html").read_text()
    for name in FIGURES:
        assert f"{name}.png" in shown, name
    # each training curve is drawn once, in one plot, a colour per model (DVC colours by revision by default)
    plots = json.loads(subprocess.run([str(BIN / "dvc"), "plots", "show", "--json"], cwd=project, env=subprocess_env(),
                                      capture_output=True, text=True, check=True).stdout)["data"]
    assert not [name for name in plots if name.startswith(("reports/train/", "reports/curves/"))]
    (curves,) = plots["Validation accuracy by optimizer step"]
    assert curves["content"]["encoding"]["color"]["field"] == "filename"
    assert {row["filename"] for row in curves["content"]["data"]["values"]} == {"teacher.csv", "student.csv",
                                                                                 "baseline.csv"}


def test_plots_and_metrics_diff_against_head_work_in_a_fresh_clone_without_a_dvc_pull(tiny_pipeline, tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(tiny_pipeline), str(clone)], check=True, env=subprocess_env())
    result = subprocess.run([str(BIN / "dvc"), "plots", "diff", "HEAD", "--json"], cwd=clone, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "failed to load" not in result.stderr, result.stderr
    shown = json.loads(result.stdout)
    assert not shown.get("errors"), shown.get("errors")
    (curves,) = shown["data"]["Validation accuracy by optimizer step"]
    assert {row["filename"] for row in curves["content"]["data"]["values"]} == {"teacher.csv", "student.csv",
                                                                                 "baseline.csv"}
    assert {"reports/predictions.csv", "reports/figures/training.png"} <= set(shown["data"])
    assert "student.test_accuracy" in dvc(clone, "metrics", "show")


@pytest.mark.slow  # every stage under dvc repro, several times over: run by make test-slow, in CI
def test_a_second_repro_runs_nothing_and_each_change_reruns_exactly_what_it_touches(built_project):
    project = built_project
    assert repro(project) == set(), "an unchanged pipeline runs no stage"
    assert "up to date" in dvc(project, "status")

    # as an experiment: dvc exp run -S edits params.yaml and reruns the student side only
    out = dvc(project, "exp", "run", "-S", "student.temperature=2")
    assert set(re.findall(r"Running stage '(\w+)'", out)) == {"train_student", "evaluate"}
    assert yaml.safe_load((project / "params.yaml").read_text())["student"]["temperature"] == 2
    assert "student.test_accuracy" in dvc(project, "metrics", "diff")
    git_commit(project, "temperature 2")

    write_params(project / "params.yaml", tiny_params(**{"student.temperature": 3.0}))
    assert repro(project) == {"train_student", "evaluate"}

    # a code change reruns exactly the stages whose import closure holds it (dvc.yaml's code deps)
    with open(project / "distill" / "report.py", "a") as f:
        f.write("\n# a comment is a change to DVC\n")
    assert repro(project) == {"evaluate"}
    # a data change reruns everything: tests/test_bring_your_own_data.py (slow) changes the user's file


@pytest.mark.slow
def test_a_teacher_change_reruns_the_teacher_side_and_a_shared_student_key_both_students(built_project):
    project = built_project
    write_params(project / "params.yaml", tiny_params(**{"teacher.hidden": [48]}))
    assert repro(project) == {"train_teacher", "soft_labels", "train_student", "evaluate"}
    write_params(project / "params.yaml", tiny_params(**{"teacher.hidden": [48], "student.epochs": 2}))
    assert repro(project) == {"train_student", "train_baseline", "evaluate"}


@pytest.mark.parametrize("stage", ["train_student", "evaluate"])
def test_a_stage_fails_cleanly_when_its_inputs_are_missing(project, stage):
    spec = yaml.safe_load((project / "dvc.yaml").read_text())["stages"][stage]
    result = subprocess.run(spec["cmd"].split(), cwd=project, env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "not found; run the" in result.stderr
