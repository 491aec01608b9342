"""The `distill` command line: each command driven on tiny params."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

from conftest import BIN, REPO, git_commit, subprocess_env, tiny_params, write_params
from pipelines.app import app

COMMANDS = ["run", "compare", "sweep", "serve", "ui", "validate"]
runner = CliRunner()


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_says_what_it_does_and_shows_an_example(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output
    overview = runner.invoke(app, ["--help"]).output
    assert command in overview


def test_validate_accepts_good_params_and_names_the_bad_key(tmp_path):
    good = write_params(tmp_path / "good.yaml", tiny_params())
    result = runner.invoke(app, ["validate", str(good)])
    assert result.exit_code == 0 and "valid" in result.output
    bad = write_params(tmp_path / "bad.yaml", tiny_params(**{"student.alpha": 3}))
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2 and "student.alpha = 3" in result.output and "Traceback" not in result.output


def test_commands_outside_a_project_folder_say_where_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["compare"])
    assert result.exit_code == 2 and "run distill from the project folder" in result.output


def test_compare_prints_the_latest_comparison_and_diffs_git_revisions(built_project, monkeypatch):
    monkeypatch.chdir(built_project)
    result = runner.invoke(app, ["compare"])
    assert result.exit_code == 0 and "| student |" in result.output and "Gap closed" in result.output
    result = runner.invoke(app, ["compare", "--rev", "HEAD~1"])  # the scratch commit, before the build: no metrics
    assert result.exit_code == 0 and "student.test_accuracy" in result.output
    result = runner.invoke(app, ["compare", "--exps"])  # DVC's experiments, key columns only
    assert result.exit_code == 0, result.output
    head = result.output.splitlines()[0]
    for column in ("Experiment", "student.test_accuracy", "baseline.test_accuracy", "gap_closed",
                   "student.temperature", "student.alpha"):
        assert column in head, column
    assert "checkpoint_bytes" not in head and "ece" not in head and "…" not in result.output
    (built_project / "reports" / "compare.md").unlink()
    result = runner.invoke(app, ["compare"])
    assert result.exit_code == 2 and "run the pipeline first" in result.output


EVALUATE_ELSEWHERE = """stages:
  evaluate:
    cmd: >-
      python -m stages.evaluate --params params.yaml --metrics out/scores.json
      --compare out/table.md --report out/page.html
"""


def test_compare_and_the_sweeps_metrics_are_read_where_dvc_yaml_says_evaluate_writes_them(tmp_path, monkeypatch):
    from pipelines.experiments import metrics

    project = tmp_path / "p"
    (project / "out").mkdir(parents=True)
    (project / "dvc.yaml").write_text(EVALUATE_ELSEWHERE)
    write_params(project / "params.yaml", tiny_params())
    (project / "out" / "table.md").write_text("| model | written where dvc.yaml says |\n")
    (project / "out" / "scores.json").write_text('{"gap_closed": 0.5}')
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    git_commit(project, "evaluate writes to out/")
    monkeypatch.chdir(project)
    result = runner.invoke(app, ["compare"])
    assert result.exit_code == 0 and "| model | written where dvc.yaml says |" in result.output
    assert metrics(project, "HEAD") == {"gap_closed": 0.5}
    (project / "dvc.yaml").write_text(EVALUATE_ELSEWHERE.replace(" --compare out/table.md", ""))
    result = runner.invoke(app, ["compare"])
    assert result.exit_code == 2 and "the evaluate stage's command has no --compare" in result.output


@pytest.mark.parametrize("folder", [".", "text", "lm"])
def test_each_committed_dvc_yaml_says_where_evaluate_writes_the_files_the_commands_read(folder):
    from pipelines.dvcfile import evaluate_file

    assert evaluate_file(REPO / folder, "metrics") == Path("reports/metrics.json")
    assert evaluate_file(REPO / folder, "compare") == Path("reports/compare.md")
    assert evaluate_file(REPO / folder, "report") == Path("reports/report.html")


def test_compare_two_mlflow_runs_side_by_side(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    ids = []
    for temperature, acc in ((2.0, 0.9), (4.0, 0.95)):
        with mlflow.start_run(run_name="evaluate student") as run:  # the same name, as two pipelines' runs have
            mlflow.log_params({"temperature": temperature, "arch": "cnn1d"})
            mlflow.log_metrics({"test_accuracy": acc, "nll": 0.3})
            ids.append(run.info.run_id)
    project = tmp_path / "p"
    project.mkdir()
    (project / "dvc.yaml").write_text("stages: {}\n")
    write_params(project / "params.yaml", tiny_params())
    monkeypatch.chdir(project)
    result = runner.invoke(app, ["compare", "--run", ids[0], "--run", ids[1]])
    assert result.exit_code == 0, result.output
    assert "| test_accuracy | 0.9 | 0.95 | +0.05 |" in result.output
    assert f"| metric | evaluate student {ids[0][:8]} | evaluate student {ids[1][:8]} | difference |" in result.output
    assert "| temperature | 2.0 | 4.0 |" in result.output and "| arch |" not in result.output  # params that differ
    missing = runner.invoke(app, ["compare", "--run", ids[0], "--run", "0" * 32])
    assert missing.exit_code == 2 and "not found" in missing.output


def test_run_applies_overrides_runs_the_flow_and_prints_the_comparison(built_project, flow_module, monkeypatch):
    project = built_project
    monkeypatch.chdir(project)
    result = runner.invoke(app, ["run", "--set", "student.temperature=2"])
    assert result.exit_code == 0, result.output
    assert "train_student ran" in result.output and "| student |" in result.output
    assert f"report: {project / 'reports' / 'report.html'}" in result.output
    assert (project / "reports" / "report.html").is_file()
    for bad, named in (("student.alpha=7", "student.alpha = 7"), ("student.temprature=2", "student.temprature")):
        result = runner.invoke(app, ["run", "--set", bad])
        assert result.exit_code == 2 and named in result.output and "Traceback" not in result.output


@pytest.mark.timed
def test_a_typo_in_set_is_one_line_and_exit_2_before_any_flow_starts(project):
    started = time.monotonic()
    result = subprocess.run([str(BIN / "distill"), "run", "--set", "student.temprature=2"], cwd=project,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, lines
    assert lines[0] == "error: --set student.temprature=2: params.yaml has no key 'student.temprature'; check its spelling"
    assert time.monotonic() - started < 20  # no Prefect server was started (that alone takes 8-20 s)


@pytest.mark.slow
def test_sweep_runs_a_grid_of_dvc_experiments_one_at_a_time_and_summarises_them(project, flow_module, monkeypatch,
                                                                                 caplog):
    import logging

    monkeypatch.chdir(project)
    caplog.set_level(logging.INFO, logger="prefect.flow_runs")
    refused = runner.invoke(app, ["sweep", "-S", "student.alpha=0.5,9"])
    assert refused.exit_code == 2 and "student.alpha = 9" in refused.output
    result = runner.invoke(app, ["sweep", "-S", "student.temperature=1,4"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| sweep-temperature")]
    assert [row.split(" | ")[1] for row in rows] == ["1", "4"]
    shown = subprocess.run([str(BIN / "dvc"), "exp", "show", "--csv"], cwd=project, env=subprocess_env(),
                           capture_output=True, text=True, check=True).stdout
    assert "sweep-temperature1" in shown and "sweep-temperature4" in shown
    # each point's result was said as it finished, before the table
    finished = [r.getMessage() for r in caplog.records if r.name == "prefect.flow_runs"
                and r.getMessage().startswith("[")]
    assert [m.split("] ")[0] for m in finished] == ["[1/2", "[2/2"]
    assert {m.split("] ")[1].split(":")[0] for m in finished} == {"sweep-temperature1", "sweep-temperature4"}
    assert all("student" in m and "baseline" in m and "teacher" in m for m in finished)


def test_a_finished_sweep_point_is_one_line_with_the_tasks_headline_metric():
    from distill.classification import ClassificationTask
    from distill.language_model import LanguageModelTask
    from pipelines.experiments import one_line, summary

    acc = ClassificationTask.headline
    m = {"teacher": {"test_accuracy": 0.975}, "student": {"test_accuracy": 0.972},
         "baseline": {"test_accuracy": 0.909}, "gap_closed": 0.955}
    assert one_line("sweep-temperature2", m, acc) == ("sweep-temperature2: teacher 97.50%, student 97.20%, "
                                                      "baseline 90.90%, gap closed 95.5%")
    assert one_line("p", m | {"gap_closed": None}, acc).endswith("no gap to close")
    assert "| teacher acc |" in summary([("sweep-temperature2", {"student.temperature": "2"}, m)], acc)
    bits = LanguageModelTask.headline
    lm = {"teacher": {"test_bits_per_token": 6.8841}, "student": {"test_bits_per_token": 7.171},
          "baseline": {"test_bits_per_token": 7.432}, "gap_closed": 0.475}
    assert one_line("sweep-alpha0.5", lm, bits) == ("sweep-alpha0.5: teacher 6.884 bits/token, student 7.171 "
                                                    "bits/token, baseline 7.432 bits/token, gap closed 47.5%")
    assert "| teacher bits/token |" in summary([("sweep-alpha0.5", {"student.alpha": "0.5"}, lm)], bits)
    assert bits.lower_is_better and not acc.lower_is_better


def test_the_task_a_folders_params_yaml_names_says_which_experiment_columns_to_keep():
    import re

    from pipelines.experiments import exp_columns, project_task

    classify, lm = project_task(REPO), project_task(REPO / "lm")
    assert (classify.name, lm.name) == ("classify", "language_model")
    kept = exp_columns(classify, Path("reports/metrics.json"))
    for column in ("Experiment", "student.test_accuracy", "reports/metrics.json:baseline.latency_ms_b1",
                   "gap_closed", "params.yaml:student.temperature", "soft_labels.top_k", "seed"):
        assert re.match(kept, column), column
    for column in ("student.ece", "student.test_bits_per_token", "student.steps", "student.lr", "data.seed"):
        assert not re.match(kept, column), column
    kept = exp_columns(lm, Path("reports/metrics.json"))
    assert re.match(kept, "student.test_bits_per_token") and re.match(kept, "params.yaml:soft_labels.targets")
    assert not re.match(kept, "student.test_accuracy") and not re.match(kept, "student.test_perplexity")


@pytest.mark.parametrize("folder", [".", "text", "lm"])
def test_each_tasks_experiment_columns_are_keys_of_its_params(folder):
    from pipelines.experiments import project_task

    task = project_task(REPO / folder)
    for key in task.exp_params:  # a misspelt key would keep no column, silently
        *sections, name = key.split(".")
        model = task.params_model
        for section in sections:
            model = model.model_fields[section].annotation
        assert name in model.model_fields, key


def test_serve_needs_a_prefect_server(project):
    from servers import free_port

    env = {k: v for k, v in subprocess_env().items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_PORT": str(free_port()), "PREFECT_HOME": str(project / ".prefect")}  # no server answers there
    result = subprocess.run([str(BIN / "distill"), "serve"], cwd=project, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: no Prefect server answers at "), result.stderr


@pytest.mark.slow
def test_ui_serves_the_projects_mlflow_store_on_loopback(project):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(BIN / "python"), "-m", "pipelines.app", "ui", "--port", str(port)], cwd=project,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        deadline, status = time.monotonic() + 90, None
        while time.monotonic() < deadline and status != 200:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    status = response.status
            except OSError:
                time.sleep(0.5)
        assert status == 200
        assert (project / "mlflow.db").exists()
        said = proc.stdout.readline()
        assert said.startswith(f"open http://127.0.0.1:{port}") and "no runs of experiment 'tiny' yet" in said
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_the_ui_link_opens_the_experiment_on_its_runs_not_the_genai_overview(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.app import experiment_link

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = MlflowClient(uri).create_experiment("tiny")
    assert experiment_link(uri, "tiny", 5000) == (f"http://127.0.0.1:5000/#/experiments/{experiment_id}"
                                                  "?workflowType=machine_learning")
