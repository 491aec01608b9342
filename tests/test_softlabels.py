"""Soft-label Parquet: exact round trip, fp16 precision, streaming row groups, provenance checks."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from distill import data, softlabels, training
from distill.config import DataConfig, SoftLabelsConfig, TeacherConfig
from distill.errors import UserError
from distill.models import load_checkpoint


@pytest.fixture
def prepared_and_teacher(tmp_path):
    prepared = tmp_path / "prepared"
    data.prepare(DataConfig(source="synthetic", num_samples=400, transfer_size=300), prepared)
    teacher = tmp_path / "teacher.pt"
    cfg = TeacherConfig(arch="mlp", hidden=[16], epochs=1, batch_size=64)
    training.train_on_labels(cfg, 0, prepared, teacher, tmp_path / "teacher.csv", name="teacher")
    return prepared, teacher


def teacher_logits(teacher, prepared) -> tuple[np.ndarray, np.ndarray]:
    model, _ = load_checkpoint(teacher)
    parts = [data.read_split(prepared, s) for s in ("train", "transfer")]
    x = torch.from_numpy(np.concatenate([p.x for p in parts]))
    return np.concatenate([p.ids for p in parts]), training.predict_logits(model, x).numpy()


def test_float32_soft_labels_round_trip_exactly(tmp_path, prepared_and_teacher):
    prepared, teacher = prepared_and_teacher
    result = softlabels.dump(teacher, prepared, tmp_path / "soft", SoftLabelsConfig(dtype="float32", batch_size=128))
    soft = softlabels.read_soft_labels(tmp_path / "soft", data.read_meta(prepared))
    ids, expected = teacher_logits(teacher, prepared)
    meta = data.read_meta(prepared)
    assert result["rows"] == len(ids) == meta.splits["train"] + meta.splits["transfer"]
    np.testing.assert_array_equal(soft.ids, ids)
    np.testing.assert_array_equal(soft.logits, expected)


def test_float16_soft_labels_round_trip_within_half_precision_and_are_smaller(tmp_path, prepared_and_teacher):
    prepared, teacher = prepared_and_teacher
    for dtype in ("float32", "float16"):
        softlabels.dump(teacher, prepared, tmp_path / dtype, SoftLabelsConfig(dtype=dtype))
    soft = softlabels.read_soft_labels(tmp_path / "float16", data.read_meta(prepared))
    _, expected = teacher_logits(teacher, prepared)
    assert soft.logits.dtype == np.float32
    np.testing.assert_allclose(soft.logits, expected, rtol=2**-10, atol=2**-14)
    size = {d: (tmp_path / d / softlabels.FILE_NAME).stat().st_size for d in ("float32", "float16")}
    assert size["float16"] < size["float32"]


def test_the_file_has_the_documented_schema_rows_groups_and_provenance(tmp_path, prepared_and_teacher):
    prepared, teacher = prepared_and_teacher
    softlabels.dump(teacher, prepared, tmp_path / "soft", SoftLabelsConfig(batch_size=100))
    f = pq.ParquetFile(tmp_path / "soft" / softlabels.FILE_NAME)
    assert f.schema_arrow.names == ["id", "split", "label", "logits"]
    meta = data.read_meta(prepared)
    assert f.schema_arrow.field("logits").type.list_size == meta.num_classes
    batches = sum(-(-meta.splits[s] // 100) for s in ("train", "transfer"))
    assert f.metadata.num_row_groups == batches  # one per teacher batch: streamed, not written whole
    assert f.metadata.row_group(0).column(0).compression == "ZSTD"
    table = f.read()
    assert set(table.column("split").to_pylist()) == {"train", "transfer"}
    transfer = np.asarray(table.column("split").to_pylist()) == "transfer"
    assert all(v is None for v, t in zip(table.column("label").to_pylist(), transfer) if t)
    prov = softlabels.read_provenance(tmp_path / "soft" / softlabels.FILE_NAME)
    assert prov["prepared_fingerprint"] == meta.fingerprint
    assert prov["num_classes"] == meta.num_classes
    assert len(prov["teacher_sha256"]) == 64 and prov["schema_version"] == softlabels.SCHEMA_VERSION


def test_soft_labels_from_other_prepared_data_are_refused_as_stale(tmp_path, prepared_and_teacher):
    prepared, teacher = prepared_and_teacher
    softlabels.dump(teacher, prepared, tmp_path / "soft", SoftLabelsConfig())
    data.prepare(DataConfig(source="synthetic", num_samples=400, transfer_size=300, seed=99), prepared)
    with pytest.raises(UserError, match="stale soft labels"):
        softlabels.read_soft_labels(tmp_path / "soft", data.read_meta(prepared))


def test_a_teacher_trained_on_other_data_is_refused(tmp_path, prepared_and_teacher):
    prepared, teacher = prepared_and_teacher
    data.prepare(DataConfig(source="synthetic", num_samples=400, seed=99), prepared)
    with pytest.raises(UserError, match="trained on other prepared data"):
        softlabels.dump(teacher, prepared, tmp_path / "soft", SoftLabelsConfig())
    assert not (tmp_path / "soft").exists()


def test_a_truncated_or_foreign_parquet_is_refused(tmp_path, prepared_and_teacher):
    prepared, teacher = prepared_and_teacher
    meta = data.read_meta(prepared)
    softlabels.dump(teacher, prepared, tmp_path / "soft", SoftLabelsConfig())
    path = tmp_path / "soft" / softlabels.FILE_NAME
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="unreadable or truncated"):
        softlabels.read_soft_labels(tmp_path / "soft", meta)
    pq.write_table(pq.read_table(prepared / "train.parquet"), path)
    with pytest.raises(UserError, match="no provenance metadata"):
        softlabels.read_soft_labels(tmp_path / "soft", meta)
