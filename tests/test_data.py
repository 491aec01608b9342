"""Data sources, splitting, label mapping and the prepared-data format."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_wine

from distill import data
from distill.classification_params import DataConfig
from distill.errors import UserError


def wine_frame(n_per_class: int | None = None) -> pd.DataFrame:
    """scikit-learn's bundled wine data with a string label column."""
    wine = load_wine(as_frame=True)
    df = wine.data.copy()
    df["cultivar"] = np.asarray(["barolo", "grignolino", "barbera"])[wine.target]
    if n_per_class:
        df = df.groupby("cultivar").head(n_per_class)
    return df


@pytest.mark.parametrize("source", ["synthetic", "digits"])
def test_builtin_sources_split_into_disjoint_train_val_test(tmp_path, source):
    cfg = DataConfig(source=source, num_samples=500, transfer_size=0)
    meta = data.prepare(cfg, tmp_path / "prepared")
    splits = {s: data.read_split(tmp_path / "prepared", s) for s in ("train", "val", "test")}
    ids = np.concatenate([s.ids for s in splits.values()])
    assert len(ids) == len(set(ids))
    assert set(meta.splits) == {"train", "val", "test"}
    assert all(split.y.min() >= 0 and split.y.max() < meta.num_classes for split in splits.values())
    total = sum(meta.splits.values())
    assert meta.splits["test"] == pytest.approx(0.2 * total, abs=meta.num_classes)


def test_a_table_gets_a_munge_transfer_set_made_from_train_capped_and_repeatable(tmp_path):
    cfg = DataConfig(source="digits", transfer_size=100_000, augment_copies=3)
    meta = data.prepare(cfg, tmp_path / "a")
    transfer, train = data.read_split(tmp_path / "a", "transfer"), data.read_split(tmp_path / "a", "train")
    assert meta.splits["transfer"] == 3 * meta.splits["train"] and (transfer.y == -1).all()
    # new rows, not copies of train rows, but within the range of each train feature
    assert not (transfer.x[:, None, :] == train.x[None, :50, :]).all(axis=2).any()
    assert (transfer.x >= train.x.min(0) - 1e-5).mean() > 0.95 and (transfer.x <= train.x.max(0) + 1e-5).mean() > 0.95
    data.prepare(cfg, tmp_path / "b")
    assert np.array_equal(data.read_split(tmp_path / "b", "transfer").x, transfer.x)  # same seed, same rows
    capped = data.prepare(cfg.model_copy(update={"transfer_size": 100}), tmp_path / "c")
    assert capped.splits["transfer"] == 100


def test_munge_swaps_features_with_the_nearest_neighbour(tmp_path):
    x = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 10.0], [10.0, 11.0]])
    rows = data.munge(x, 2000, np.random.default_rng(0))
    # every synthetic row stays near its pair of neighbours, never between the two far clusters
    near_origin = (np.abs(rows) < 4).all(axis=1)
    near_ten = (np.abs(rows - 10) < 4).all(axis=1)
    assert (near_origin | near_ten).mean() > 0.97 and 0.3 < near_origin.mean() < 0.7
    assert len(np.unique(rows, axis=0)) > 1000


@pytest.mark.parametrize("update", [{"augment": "none"}, {"transfer_size": 0}, {"augment_copies": 0}])
def test_a_table_has_no_transfer_set_when_augmentation_is_off(tmp_path, update):
    meta = data.prepare(DataConfig(**{"source": "digits", "transfer_size": 1000} | update), tmp_path / "prepared")
    assert set(meta.splits) == {"train", "val", "test"}
    assert not (tmp_path / "prepared" / "transfer.parquet").exists()


def test_mnist1d_keeps_the_published_split_and_adds_an_unlabelled_transfer_set(tmp_path):
    cfg = DataConfig(source="mnist1d", num_samples=1000, transfer_size=200)
    meta = data.prepare(cfg, tmp_path / "prepared")
    assert meta.num_features == 40 and meta.num_classes == 10
    assert meta.splits["test"] == 200 and meta.splits["train"] + meta.splits["val"] == 800
    transfer = data.read_split(tmp_path / "prepared", "transfer")
    assert len(transfer.ids) == 200 and (transfer.y == -1).all()
    train = data.read_split(tmp_path / "prepared", "train")
    assert not np.isin(transfer.x[:, :5], train.x[:, :5]).all(axis=1).any()  # fresh draws


def test_synthetic_labels_are_learnable_and_roughly_balanced(tmp_path):
    meta = data.prepare(DataConfig(source="synthetic", num_samples=2000), tmp_path / "p")
    y = data.read_split(tmp_path / "p", "train").y
    assert np.bincount(y, minlength=meta.num_classes).min() > 0.3 * len(y) / meta.num_classes


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_string_labels_from_a_user_file_are_mapped_to_class_ids_and_saved(tmp_path, fmt):
    df = wine_frame()
    path = tmp_path / f"wine.{fmt}"
    df.to_csv(path, index=False) if fmt == "csv" else df.to_parquet(path)
    cfg = DataConfig(source=fmt, path=str(path), label_column="cultivar")
    meta = data.prepare(cfg, tmp_path / "prepared")
    assert meta.class_names == ["barbera", "barolo", "grignolino"]
    assert meta.num_features == df.shape[1] - 1
    saved = json.loads((tmp_path / "prepared" / "meta.json").read_text())
    assert saved["class_names"] == meta.class_names


def test_feature_columns_can_be_chosen(tmp_path):
    path = tmp_path / "wine.csv"
    wine_frame().to_csv(path, index=False)
    cfg = DataConfig(source="csv", path=str(path), label_column="cultivar", feature_columns=["alcohol", "hue"])
    assert data.prepare(cfg, tmp_path / "prepared").num_features == 2


def test_on_nan_drop_drops_a_tables_rows_with_nan_features_or_a_blank_label_or_group(tmp_path, caplog):
    df = wine_frame().assign(farm=lambda d: [f"farm{i % 30}" for i in range(len(d))])
    df["cultivar"] = df["cultivar"].astype(object)
    df.loc[0, "alcohol"], df.loc[1, "cultivar"], df.loc[2, "farm"] = np.nan, np.nan, " "
    df.to_csv(tmp_path / "wine.csv", index=False)
    cfg = DataConfig(source="csv", path=str(tmp_path / "wine.csv"), label_column="cultivar", group_column="farm",
                     on_nan="drop")
    with caplog.at_level("WARNING", logger="distill"):
        meta = data.prepare(cfg, tmp_path / "prepared")
    assert sum(meta.splits.values()) == len(df) - 3
    assert "dropped 3 of 178 rows with NaN / infinite features or a blank label or a blank group" in caplog.text
    assert data.standardized(tmp_path / "prepared") is True
    with pytest.raises(UserError, match=r"wine.csv: label column 'cultivar' has empty values, the first at row 1 \(1 "):
        data.prepare(cfg.model_copy(update={"on_nan": "error", "feature_columns": ["hue"]}), tmp_path / "out")


def test_standardization_uses_train_statistics(tmp_path):
    data.prepare(DataConfig(source="digits"), tmp_path / "p")
    train = data.read_split(tmp_path / "p", "train")
    varying = train.x.std(axis=0) > 0
    assert np.allclose(train.x.mean(axis=0), 0, atol=1e-5)
    assert np.allclose(train.x.std(axis=0)[varying], 1, atol=1e-4)


def test_prepare_is_deterministic_byte_for_byte(tmp_path):
    cfg = DataConfig(source="synthetic", num_samples=300, transfer_size=50)
    a = data.prepare(cfg, tmp_path / "a")
    b = data.prepare(cfg, tmp_path / "b")
    assert a.fingerprint == b.fingerprint


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda df: df.drop(columns=["cultivar"]), "no label column 'cultivar'"),
        (lambda df: df.assign(alcohol=np.nan), "column 'alcohol' has NaN"),
        (lambda df: df.assign(cultivar="barolo"), "only one class"),
        (lambda df: df[["cultivar"]].assign(name="x"), "no numeric feature columns"),
        (lambda df: df.groupby("cultivar").head(2), "needs at least 3"),
    ],
)
def test_bad_user_data_is_refused_with_one_sentence(tmp_path, mutate, message):
    path = tmp_path / "bad.csv"
    mutate(wine_frame()).to_csv(path, index=False)
    with pytest.raises(UserError, match=message):
        data.prepare(DataConfig(source="csv", path=str(path), label_column="cultivar"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_missing_or_unreadable_file_is_refused(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        data.prepare(DataConfig(source="csv", path=str(tmp_path / "nope.csv")), tmp_path / "out")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="cannot be read as parquet"):
        data.prepare(DataConfig(source="parquet", path=str(tmp_path / "bad.parquet")), tmp_path / "out")
