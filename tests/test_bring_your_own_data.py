"""A user's own Parquet or CSV file with a string label column, through the whole pipeline."""

import csv
import json

import numpy as np
import pytest
from sklearn.datasets import load_wine

from conftest import run_pipeline_in_process, tiny_params, write_params

CULTIVARS = np.asarray(["barolo", "grignolino", "barbera"])


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_user_file_with_string_labels_runs_through_every_stage(project, fmt):
    wine = load_wine(as_frame=True)
    df = wine.data.assign(cultivar=CULTIVARS[wine.target])
    path = project / "data" / "raw" / f"wine.{fmt}"
    path.parent.mkdir(parents=True)
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
