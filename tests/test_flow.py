"""The Prefect pipeline flow over the DVC DAG, and its scheduled deployment."""

import importlib
import os
import subprocess
import threading
import time

import pytest
import yaml

import conftest
from conftest import BIN, REPO, subprocess_env
from distill.errors import UserError
from pipelines.tools import StageCrashed, StageFailed
from servers import free_port

ALL_STAGES = list(conftest.ALL_STAGES)


def ran(outcome: dict) -> set[str]:
    return {stage for stage, result in outcome.items() if result == "ran"}


def test_the_flow_has_a_task_per_stage_in_order_applies_an_override_and_reuses_what_dvc_cached(built_project,
                                                                                                flow_module):
    project = built_project  # built by dvc repro; which change reruns what is tests/test_pipeline.py's
    outcome = flow_module.pipeline(overrides={"student.temperature": 2}, repo_dir=str(project))
    assert list(outcome) == ALL_STAGES, "one task per DVC stage, in dependency order"
    assert ran(outcome) == {"train_student", "evaluate"}
    assert {outcome[s] for s in ALL_STAGES if s not in ("train_student", "evaluate")} == {"reused"}
    assert yaml.safe_load((project / "params.yaml").read_text())["student"]["temperature"] == 2
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=project, env=subprocess_env(),
                            capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout
    # the run's results on its Prefect page: the stages and the comparison
    from prefect.artifacts import Artifact

    artifact = Artifact.get(flow_module.COMPARISON_ARTIFACT)
    assert artifact.type == "markdown" and "train_student ran" in artifact.data
    assert (project / "reports" / "compare.md").read_text() in artifact.data


def hold_pipeline_lock(flow_module, project, seconds: float) -> threading.Thread:
    """Another run holding the pipeline lock for `seconds`, in a thread (flock: one holder per open file)."""
    held = threading.Event()

    def hold():
        with flow_module.exclusive_run(project):
            held.set()
            time.sleep(seconds)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(10)
    return thread


def test_a_run_that_finds_the_project_busy_waits_for_it_then_runs(built_project, flow_module):
    started = time.monotonic()
    holder = hold_pipeline_lock(flow_module, built_project, 3)
    outcome = flow_module.pipeline(repo_dir=str(built_project), wait_for_lock_s=60)
    holder.join()
    assert set(outcome.values()) == {"reused"} and time.monotonic() - started >= 3


def test_a_run_that_waits_for_dvcs_own_lock_then_runs(built_project, flow_module):
    code = ("import sys, time; from dvc.repo import Repo; repo = Repo('.'); repo.lock.lock(); "
            "print('locked', flush=True); time.sleep(10); repo.lock.unlock()")
    holder = subprocess.Popen([str(BIN / "python"), "-c", code], cwd=built_project, env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    started = time.monotonic()
    outcome = flow_module.pipeline(repo_dir=str(built_project), wait_for_lock_s=60)
    assert holder.wait(timeout=30) == 0 and set(outcome.values()) == {"reused"}
    assert time.monotonic() - started >= 9  # it waited for the lock (held 10 s from "locked"; DVC itself tries 3 s)


def test_a_run_still_blocked_after_its_wait_ends_skipped_not_crashed(built_project, flow_module):
    holder = hold_pipeline_lock(flow_module, built_project, 6)
    state = flow_module.pipeline(repo_dir=str(built_project), wait_for_lock_s=1, return_state=True)
    holder.join()
    assert state.is_cancelled() and state.name == "Skipped" and "another pipeline run" in state.message


@pytest.mark.slow
def test_force_reruns_every_stage(built_project, flow_module):
    assert ran(flow_module.pipeline(force=True, repo_dir=str(built_project))) == set(ALL_STAGES)


@pytest.mark.parametrize("overrides, message", [
    ({"student.alpha": 5}, "student.alpha = 5"),
    ({"student.temprature": 2}, "params.yaml has no key 'student.temprature'"),
])
def test_a_bad_override_fails_once_before_any_stage_and_leaves_params_alone(project, flow_module, overrides, message):
    before = (project / "params.yaml").read_text()
    with pytest.raises(UserError, match=message):
        flow_module.pipeline(overrides=overrides, repo_dir=str(project))
    assert (project / "params.yaml").read_text() == before
    assert not (project / "data" / "prepared").exists()


def use_csv(project, path: str) -> None:
    (project / "params.yaml").write_text((project / "params.yaml").read_text()
                                         .replace("source: synthetic", "source: csv").replace("path: data/raw", f"path: {path}"))


def test_a_table_without_its_label_column_is_refused_before_any_stage(project, flow_module):
    (project / "data" / "raw" / "nolabel.csv").write_text("f1,f2\n1,2\n3,4\n")  # there, but no label column
    use_csv(project, "data/raw/nolabel.csv")
    with pytest.raises(UserError, match="^data/raw/nolabel.csv: no label column 'label'; set data.label_column"):
        flow_module.pipeline(repo_dir=str(project))
    assert not (project / "data" / "prepared").exists()  # DVC was not asked to run prepare


def test_a_missing_input_file_is_refused_before_any_stage(project, flow_module):
    use_csv(project, "missing.csv")
    with pytest.raises(UserError, match="missing.csv: file not found; set data.path to your csv file"):
        flow_module.pipeline(repo_dir=str(project))
    assert not (project / "data" / "prepared").exists()


def test_a_second_run_while_one_holds_the_pipeline_lock_is_refused_and_touches_nothing(project, flow_module):
    with flow_module.exclusive_run(project):  # as a run in another process would hold it
        with pytest.raises(UserError, match=f"another pipeline run \\(pid {os.getpid()}: .*\\) is running"):
            flow_module.pipeline(repo_dir=str(project))
    assert not (project / "data" / "prepared").exists()
    with flow_module.exclusive_run(project):  # released when the holder is done
        pass


def test_prefect_yaml_deploys_the_flow_on_a_valid_cron_schedule(flow_module):
    from prefect.client.schemas.schedules import CronSchedule

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"nightly", "nightly-lm"}  # the MNIST-1D pipeline, and lm/ (its schedule off)
    for deployment in deployments.values():
        path, func = deployment["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert getattr(module, func) is flow_module.pipeline
        assert deployment["work_pool"]["name"]
        (schedule,) = deployment["schedules"]
        CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises if invalid
        built = flow_module.pipeline.to_deployment(name=deployment["name"], cron=schedule["cron"],
                                                   parameters=deployment["parameters"])
        assert built.schedules[0].schedule.cron == schedule["cron"]
        assert (REPO / deployment["parameters"].get("repo_dir", ".") / "dvc.yaml").is_file()
    assert deployments["nightly"]["parameters"] == {"force": False, "wait_for_lock_s": 3600}
    assert deployments["nightly"]["schedules"][0]["active"] and not deployments["nightly-lm"]["schedules"][0]["active"]


def test_serve_refuses_to_start_without_a_server(monkeypatch):
    env = {k: v for k, v in subprocess_env().items() if k != "PREFECT_API_URL"}
    env["PREFECT_PORT"] = str(free_port())  # where no project server answers
    result = subprocess.run([str(BIN / "python"), "-m", "pipelines.serve", "--cron", "0 3 * * *"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.endswith(f"error: no Prefect server answers at http://127.0.0.1:{env['PREFECT_PORT']}/api; start the "
                         "project's server (make server) in another terminal, or set PREFECT_API_URL to yours")


@pytest.mark.parametrize("error, retried", [(UserError("bad params"), False), (StageCrashed("a bug"), False),
                                            (RuntimeError("a bug in the flow"), False),
                                            (StageFailed("Unable to acquire lock"), True)])
def test_only_failures_that_can_pass_are_retried(flow_module, error, retried):
    from prefect.states import Completed, Failed

    assert flow_module._retry_if_transient(None, None, Failed(data=error)) is retried
    assert flow_module._retry_if_transient(None, None, Completed(data="ran")) is False
