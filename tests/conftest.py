"""Shared fixtures: tiny params, a throw-away copy of the repo, the tiny pipeline built
once per test session (tests get private copies of it), and stage runners."""

from __future__ import annotations

import copy
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.tools import BIN
from scratch import GIT_IDENTITY, PROJECT_DIR as REPO, env as subprocess_env, git_commit
from scratch import make_scratch_project

__all__ = ["BIN", "GIT_IDENTITY", "REPO", "git_commit", "subprocess_env"]

ALL_STAGES = ("prepare", "train_teacher", "soft_labels", "train_student", "train_baseline", "evaluate")

# Small enough that the whole pipeline runs in seconds, big enough to learn something.
TINY_PARAMS = {
    "task": "classify",
    "seed": 0,
    "data": {
        "source": "synthetic", "seed": 7, "num_samples": 800, "test_fraction": 0.25, "val_fraction": 0.2,
        "transfer_size": 400, "augment": "munge", "augment_copies": 20, "transfer_path": "data/raw", "standardize": True,
        "path": "data/raw", "label_column": "label", "feature_columns": None, "on_nan": "error", "text_column": None,
        "group_column": None,
        "text": {"tokenizer": "data/raw", "max_length": 64, "mask_prob": 0.1, "ngram_prob": 0.25, "ngram_max": 5},
        "synthetic": {"n_features": 20, "n_classes": 4, "hidden": 16},
    },
    "teacher": {
        "source": "train", "model": "data/raw", "trainable_layers": None,
        "arch": "mlp", "arch_kwargs": {}, "channels": [4], "kernel_size": 3, "kernel_sizes": [3, 4, 5], "embedding_dim": 64,
        "hidden": [64], "dropout": 0.0, "epochs": 4, "min_steps": 0, "patience": None, "batch_size": 64, "lr": 0.01,
        "weight_decay": 0.0, "warmup_fraction": None,
    },
    "soft_labels": {"dtype": "float32", "top_k": None, "batch_size": 256, "shard_rows": 300},  # 3 shards
    "student": {
        "arch": "mlp", "arch_kwargs": {}, "channels": [4], "kernel_size": 3, "kernel_sizes": [3, 4, 5], "embedding_dim": 64,
        "hidden": [8], "dropout": 0.0, "epochs": 3, "min_steps": 0, "patience": None, "batch_size": 64, "lr": 0.01,
        "weight_decay": 0.0, "warmup_fraction": None, "temperature": 4.0, "alpha": 0.9,
        "loss": "kd", "dkd_target_weight": 1.0, "dkd_nontarget_weight": 8.0, "shuffle_buffer": 131072,
        "vocabulary": "all", "embedding_init": "random",
    },
    "evaluate": {"ece_bins": 10, "latency_batch_size": 32, "latency_repeats": 2},
    "resume": {"every_epochs": 1, "dir": ".resume"},
    "distributed": {"nproc": 1, "backend": "auto"},
    "runtime": {"device": "auto", "precision": "fp32"},
    # MLflow is off here (it costs seconds per stage); tests/test_tracking.py turns it on.
    "tracking": {"enabled": False, "experiment": "tiny", "on_error": "warn"},
    "registry": {"model_name": "tiny-student", "alias": "champion", "min_test_accuracy": 0.0,
                 "max_latency_ms_b1": 1000.0},
}


def tiny_params(**overrides: object) -> dict:
    """TINY_PARAMS with dotted-key overrides, e.g. tiny_params(**{"student.alpha": 0.5})."""
    return with_overrides(TINY_PARAMS, overrides)


def with_overrides(params: dict, overrides: dict) -> dict:
    """A deep copy of `params` with dotted-key overrides applied."""
    params = copy.deepcopy(params)
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = params
        for p in parents:
            node = node[p]
        node[last] = value
    return params


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_stage_in_process(workdir: Path, name: str) -> object:
    """Run one dvc.yaml stage's command through its module's main(), in this process."""
    spec = yaml.safe_load((workdir / "dvc.yaml").read_text())
    argv = shlex.split(spec["stages"][name]["cmd"])
    assert argv[:2] == ["python", "-m"], argv
    cwd = Path.cwd()
    os.chdir(workdir)
    try:
        return importlib.import_module(argv[2]).main(argv[3:])
    finally:
        os.chdir(cwd)


def run_pipeline_in_process(workdir: Path) -> dict:
    """Every dvc.yaml stage, in file order (a topological order), in this process."""
    spec = yaml.safe_load((workdir / "dvc.yaml").read_text())
    return {name: run_stage_in_process(workdir, name) for name in spec["stages"]}


@pytest.fixture(autouse=True)
def _mlflow_uris_do_not_leak():
    """mlflow.set_tracking_uri() also sets MLFLOW_TRACKING_URI for the process and every
    subprocess it starts: a test that points MLflow at its own store must not send a
    later test's stages, or its registry look-ups, there."""
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the project's code in a fresh git repo with DVC initialised, tiny params."""
    return make_scratch_project(tmp_path / "project", yaml.safe_dump(TINY_PARAMS, sort_keys=False))


def dvc(project: Path, *args: str) -> str:
    """`dvc args` in `project`; its output (a failure fails the test, with DVC's words)."""
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=project, env=subprocess_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def repro(project: Path, *args: str) -> set[str]:
    """Run `dvc repro` and return the names of the stages that ran."""
    return set(re.findall(r"Running stage '(\w+)'", dvc(project, "repro", *args)))


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """The tiny pipeline built once per test session: `dvc repro` ran every stage in a scratch
    copy, and the result (dvc.lock, metrics) is committed on top of the scratch commit.
    Tests never change it: they take a copy (`built_project`)."""
    root = make_scratch_project(tmp_path_factory.mktemp("tiny-pipeline") / "project",
                                yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    assert repro(root) == set(ALL_STAGES)
    git_commit(root, "built")
    return root


@pytest.fixture
def built_project(tiny_pipeline: Path, tmp_path: Path) -> Path:
    """A private copy of the built tiny pipeline: git history, DVC cache and outputs included;
    `dvc status` calls it up to date."""
    return Path(shutil.copytree(tiny_pipeline, tmp_path / "built", symlinks=True))


@pytest.fixture(scope="session")
def flow_module(tmp_path_factory):
    """pipelines.flow against a temporary Prefect database (one server for the session)."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield importlib.import_module("pipelines.flow")
