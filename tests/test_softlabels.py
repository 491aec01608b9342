"""Soft-label Parquet: exact round trip, fp16 precision, streaming row groups, provenance checks
(the sharded layout itself: tests/test_shards.py)."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from distill import data, shards, softlabels, training
from distill.classification_params import DataConfig, SoftLabelsConfig, TeacherConfig
from distill.errors import UserError
from distill.losses import Distillation
from distill.io import file_sha256
from distill import checkpoint
from distill.models import predict_logits


@pytest.fixture
def prepared_and_teacher(tmp_path):
    prepared = tmp_path / "prepared"
    data.prepare(DataConfig(source="synthetic", num_samples=400, transfer_size=300), prepared)
    teacher = tmp_path / "teacher.pt"
    cfg = TeacherConfig(arch="mlp", hidden=[16], epochs=1, batch_size=64)
    training.train_on_labels(training.TrainJob(cfg, 0, "teacher"), prepared, training.Outputs(teacher, tmp_path / "teacher.csv"))
    return prepared, teacher


def teacher_logits(teacher, prepared) -> tuple[np.ndarray, np.ndarray]:
    model, _ = checkpoint.load(teacher)
    parts = [data.read_split(prepared, s) for s in ("train", "transfer")]
    x = torch.from_numpy(np.concatenate([p.x for p in parts]))
    return np.concatenate([p.ids for p in parts]), predict_logits(model, x).numpy()


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
    size = {d: sum(p.stat().st_size for p in shards.shard_paths(tmp_path / d)) for d in ("float32", "float16")}
    assert size["float16"] < size["float32"]


def test_the_file_has_the_documented_schema_rows_groups_and_provenance(tmp_path, prepared_and_teacher):
    prepared, teacher = prepared_and_teacher
    softlabels.dump(teacher, prepared, tmp_path / "soft", SoftLabelsConfig(batch_size=100))
    (shard,) = shards.shard_paths(tmp_path / "soft")  # the default shard_rows: one shard for these rows
    f = pq.ParquetFile(shard)
    assert shard.name == "part-00000.parquet"
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
    prov = shards.read_provenance(tmp_path / "soft")
    assert sorted(p.name for p in (tmp_path / "soft").iterdir()) == ["part-00000.parquet", "provenance.json"]
    assert prov["shards"] == [{"file": "part-00000.parquet", "rows": table.num_rows, "bytes": shard.stat().st_size,
                               "sha256": file_sha256(shard)}]
    assert prov["prepared_fingerprint"] == meta.fingerprint
    assert prov["num_classes"] == meta.num_classes
    assert len(prov["teacher_sha256"]) == 64 and prov["schema_version"] == softlabels.SOFT_LABELS_SCHEMA_VERSION


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
    (path,) = shards.shard_paths(tmp_path / "soft")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="unreadable or truncated"):
        softlabels.read_soft_labels(tmp_path / "soft", meta)
    pq.write_table(pq.read_table(prepared / "train.parquet"), path)
    with pytest.raises(UserError, match="no provenance metadata"):
        softlabels.read_soft_labels(tmp_path / "soft", meta)


def test_top_k_keeps_the_largest_logits_and_the_mean_mass_of_the_rest():
    logits = np.array([[0.0, 3.0, -2.0, 1.0], [5.0, 5.5, 4.0, -1.0]], dtype=np.float32)
    index, values, rest = softlabels.top_k_logits(logits, 2)
    np.testing.assert_array_equal(index, [[1, 3], [1, 0]])
    np.testing.assert_array_equal(values, [[3.0, 1.0], [5.5, 5.0]])
    np.testing.assert_allclose(rest, [np.log((1 + np.exp(-2)) / 2), np.log((np.exp(4) + np.exp(-1)) / 2)], rtol=1e-6)
    dense = softlabels.dense_logits(index, values, rest, 4)
    np.testing.assert_allclose(dense[0], [rest[0], 3.0, rest[0], 1.0])
    # at temperature 1 the top-k probabilities, and so the mass of the rest, are kept exactly
    p, q = torch.softmax(torch.from_numpy(logits), 1), torch.softmax(torch.from_numpy(dense), 1)
    for row, top in enumerate(index):
        np.testing.assert_allclose(q[row, top], p[row, top], rtol=1e-6)


def test_top_k_soft_labels_are_stored_as_k_values_and_read_back_as_full_logits(tmp_path, prepared_and_teacher):
    prepared, teacher = prepared_and_teacher
    meta = data.read_meta(prepared)
    softlabels.dump(teacher, prepared, tmp_path / "top3", SoftLabelsConfig(top_k=3))
    f = pq.ParquetFile(shards.shard_paths(tmp_path / "top3")[0])
    assert f.schema_arrow.names == ["id", "split", "label", "topk_index", "topk_logits", "rest_logit"]
    assert f.schema_arrow.field("topk_logits").type.list_size == 3
    soft = softlabels.read_soft_labels(tmp_path / "top3", meta)
    ids, expected = teacher_logits(teacher, prepared)
    np.testing.assert_array_equal(soft.ids, ids)
    assert soft.logits.shape == expected.shape and soft.provenance["top_k"] == 3
    np.testing.assert_array_equal(np.sort(soft.logits, 1)[:, -3:], np.sort(expected, 1)[:, -3:])
    np.testing.assert_array_equal(soft.logits.argmax(1), expected.argmax(1))


def test_top_k_must_be_smaller_than_the_number_of_classes(tmp_path, prepared_and_teacher):
    prepared, teacher = prepared_and_teacher
    classes = data.read_meta(prepared).num_classes
    with pytest.raises(UserError, match=f"soft_labels.top_k = {classes} .* {classes} classes"):
        softlabels.dump(teacher, prepared, tmp_path / "soft", SoftLabelsConfig(top_k=classes))
    assert not (tmp_path / "soft").exists()


def test_student_rows_join_features_labels_and_logits_block_by_block(tmp_path, prepared_and_teacher):
    prepared, teacher = prepared_and_teacher
    meta = data.read_meta(prepared)
    softlabels.dump(teacher, prepared, tmp_path / "soft", SoftLabelsConfig(batch_size=64))
    rows = softlabels.StudentRows(prepared, tmp_path / "soft", meta)
    blocks = [rows.read_block(i) for i in range(len(rows.block_sizes))]
    parts = [data.read_split(prepared, s) for s in ("train", "transfer")]
    np.testing.assert_array_equal(np.concatenate([b.x for b in blocks]), np.concatenate([p.x for p in parts]))
    np.testing.assert_array_equal(np.concatenate([b.y for b in blocks]), np.concatenate([p.y for p in parts]))
    _, expected = teacher_logits(teacher, prepared)
    np.testing.assert_array_equal(np.concatenate([b.logits for b in blocks]), expected)


def test_the_student_trains_on_exactly_the_stored_rows_and_learns_when_streamed(tmp_path, prepared_and_teacher):
    from distill.classification_params import StudentConfig
    from distill.rows import InMemoryRows

    prepared, teacher = prepared_and_teacher
    meta = data.read_meta(prepared)
    softlabels.dump(teacher, prepared, tmp_path / "soft", SoftLabelsConfig())
    cfg = StudentConfig(arch="mlp", hidden=[8], epochs=3, batch_size=32, lr=0.01)
    stored = training.train_student(training.TrainJob(cfg, 0, "student"), prepared, tmp_path / "soft",
                                    training.Outputs(tmp_path / "s.pt", tmp_path / "s.csv"))
    # the same training from arrays in memory: identical history
    parts = [data.read_split(prepared, s) for s in ("train", "transfer")]
    _, logits = teacher_logits(teacher, prepared)
    rows = InMemoryRows(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]), logits)
    model = training.initial_model(cfg, meta, 0)
    val = data.read_split(prepared, "val")
    job = training.TrainJob(cfg, 0, distillation=Distillation(cfg.temperature, cfg.alpha))
    direct = training.fit_classifier(model, job, rows, (val.x, val.y))
    assert stored["history"] == direct.history
    # streamed through a buffer smaller than the rows: the loss still falls
    small = cfg.model_copy(update={"shuffle_buffer": 100})
    streamed = training.train_student(training.TrainJob(small, 0, "student"), prepared, tmp_path / "soft",
                                      training.Outputs(tmp_path / "t.pt", tmp_path / "t.csv"))
    losses = [row["train_loss"] for row in streamed["history"]]
    assert losses[-1] < losses[0]
