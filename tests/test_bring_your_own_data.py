"""A user's own Parquet or CSV file with a string label column, through the whole pipeline; the
file as a DVC dependency: a changed byte reruns prepare and everything downstream; and what
prepare says of a table it reads: columns it leaves out, a column named twice."""

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_wine

from conftest import ALL_STAGES, dvc, git_commit, repro, run_pipeline_in_process, tiny_params, write_params
from distill import sources
from distill.classification_params import Params
from distill.errors import UserError

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


def table_config(path, **data):
    return Params.model_validate({"data": {"source": path.suffix.lstrip("."), "path": str(path),
                                           "label_column": "cultivar"} | data}).data


def test_columns_left_out_of_the_features_are_named_in_prepares_log(tmp_path, caplog):
    wine = load_wine(as_frame=True)
    df = wine.data.assign(cultivar=CULTIVARS[wine.target], notes="a fine wine", vineyard="north")
    df.to_csv(tmp_path / "wine.csv", index=False)
    raw = sources.load_source(table_config(tmp_path / "wine.csv", group_column="vineyard"))
    assert raw.feature_names == list(wine.data.columns)
    (line,) = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    # the group column is not a feature either, but it is read: not named
    assert "column 'notes' is not numeric" in line and "vineyard" not in line and "data.text_column" in line
    caplog.clear()
    sources.load_source(table_config(tmp_path / "wine.csv", feature_columns=["alcohol"]))
    assert "left out" not in caplog.text  # the user chose the features


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_header_that_names_a_column_twice_is_refused_by_name(tmp_path, fmt):
    wine = load_wine(as_frame=True).data.head(30)
    columns = {"alcohol": wine["alcohol"], "ash": wine["ash"], "cultivar": CULTIVARS[np.arange(30) % 3]}
    names = ["alcohol", "ash", "alcohol", "cultivar"]  # pandas would read the second as 'alcohol.1'
    table = pa.table([pa.array(columns[n]) for n in names], names=names)
    path = tmp_path / f"wine.{fmt}"
    pq.write_table(table, path) if fmt == "parquet" else path.write_text(table.to_pandas().to_csv(index=False))
    with pytest.raises(UserError, match=f"^{path}: column 'alcohol' appears 2 times in the header; give each column"):
        sources.load_source(table_config(path))
