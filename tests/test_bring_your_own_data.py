"""A user's own Parquet or CSV file with a string label column, through the whole pipeline, and
the file as a DVC dependency: a changed byte reruns prepare and everything downstream."""

import csv
import json

import numpy as np
import pytest
from sklearn.datasets import load_wine

from conftest import ALL_STAGES, dvc, git_commit, repro, run_pipeline_in_process, tiny_params, write_params

CULTIVARS = np.asarray(["barolo", "grignolino", "barbera"])


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_user_file_with_string_labels_runs_through_every_stage(project, fmt):
    wine = load_wine(as_frame=True)
    df = wine.data.assign(cultivar=CULTIVARS[wine.target])
    path = project / "data" / "raw" / f"wine.{fmt}"
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False) if fmt == "csv" else df.to_parquet(path)
    write_params(project / "params.yaml", tiny_params(**{
        "data.source": fmt, "data.path": f"data/raw/wine.{fmt}", "data.label_column": "cultivar",
        "data.transfer_size": 0, "data.num_samples": None,
        "teacher.epochs": 15, "student.epochs": 15,
    }))
    results = run_pipeline_in_process(project)

    assert results["prepare"]["num_classes"] == 3 and results["prepare"]["num_features"] == 13
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["teacher"]["test_accuracy"] > 0.8  # wine is easy once standardized
    with open(project / "reports/predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["actual"] for r in rows} == set(CULTIVARS)  # the saved mapping names the classes
    assert {r["student"] for r in rows} <= set(CULTIVARS)


def wine_csv(project, rows: int | None = None):
    """scikit-learn's wine table as the user's CSV under data/raw, and params that read it."""
    wine = load_wine(as_frame=True)
    df = wine.data.assign(cultivar=CULTIVARS[wine.target])
    path = project / "data" / "raw" / "wine.csv"
    df.head(rows).to_csv(path, index=False)
    write_params(project / "params.yaml", tiny_params(**{
        "data.source": "csv", "data.path": "data/raw/wine.csv", "data.label_column": "cultivar",
        "data.num_samples": None}))
    return path


def test_a_changed_byte_of_your_data_file_makes_prepare_stale(built_project):
    path = wine_csv(built_project)
    assert repro(built_project, "prepare") == {"prepare"}
    assert "up to date" in dvc(built_project, "status", "prepare")
    path.write_bytes(path.read_bytes().replace(b"14.23", b"14.24", 1))  # one value of the first row
    status = dvc(built_project, "status", "prepare")
    assert "data/raw/wine.csv" in status and "modified" in status


@pytest.mark.slow
def test_a_changed_data_file_reruns_prepare_and_everything_downstream(project):
    path = wine_csv(project)
    git_commit(project, "wine")
    assert repro(project) == set(ALL_STAGES)
    assert repro(project) == set()

    def labelled_rows() -> int:
        splits = json.loads((project / "data/prepared/meta.json").read_text())["splits"]
        return sum(splits[s] for s in ("train", "val", "test"))

    rows = labelled_rows()
    wine_csv(project, rows=150)  # the CSV cut short, params unchanged
    assert repro(project) == set(ALL_STAGES)
    assert labelled_rows() == 150 < rows
    assert path.stat().st_size > 0
