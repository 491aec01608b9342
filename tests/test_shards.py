"""Sharded soft labels: shards cut exactly, one provenance.json listing them, the same rows
as one shard, a student streamed from them trained exactly as from one shard, and a
damaged set (missing, extra, truncated, changed or foreign shard) refused by name."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distill import data, softlabels, training
from distill.classification_params import DataConfig, SoftLabelsConfig, StudentConfig, TeacherConfig
from distill.errors import UserError
from distill.io import file_sha256
from distill.shards import METADATA_KEY, ShardWriter, shard_paths

SHARD_ROWS = 150


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Prepared data (288 train + 300 transfer rows), a teacher, and its soft labels written
    as one shard and as shards of 150 rows (teacher batches of 64: cuts fall inside batches)."""
    tmp = tmp_path_factory.mktemp("shards")
    prepared = tmp / "prepared"
    data.prepare(DataConfig(source="synthetic", num_samples=400, transfer_size=300), prepared)
    teacher = tmp / "teacher.pt"
    job = training.TrainJob(TeacherConfig(arch="mlp", hidden=[16], epochs=1, batch_size=64), 0, "teacher")
    training.train_on_labels(job, prepared, training.Outputs(teacher, tmp / "teacher.csv"))
    results = {}
    for name, shard_rows in (("one", 1_000_000), ("sharded", SHARD_ROWS)):
        cfg = SoftLabelsConfig(batch_size=64, shard_rows=shard_rows)
        results[name] = softlabels.dump(teacher, prepared, tmp / name, cfg)
    return {"tmp": tmp, "prepared": prepared, "meta": data.read_meta(prepared), "results": results,
            "one": tmp / "one", "sharded": tmp / "sharded"}


def test_shards_are_cut_exactly_and_listed_in_one_provenance(sets):
    meta, folder = sets["meta"], sets["sharded"]
    rows = meta.splits["train"] + meta.splits["transfer"]
    counts = [SHARD_ROWS] * (rows // SHARD_ROWS) + ([rows % SHARD_ROWS] if rows % SHARD_ROWS else [])
    names = [f"part-{i:05d}.parquet" for i in range(len(counts))]
    assert len(counts) == 4
    assert sorted(p.name for p in folder.iterdir()) == names + ["provenance.json"]
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["rows"] == rows and prov["shard_rows"] == SHARD_ROWS
    assert prov["schema_version"] == softlabels.SOFT_LABELS_SCHEMA_VERSION
    assert prov["prepared_fingerprint"] == meta.fingerprint
    assert prov["shards"] == [{"file": n, "rows": c, "bytes": (folder / n).stat().st_size,
                               "sha256": file_sha256(folder / n)} for n, c in zip(names, counts)]
    assert sets["results"]["sharded"]["bytes"] == sum(s["bytes"] for s in prov["shards"])
    # every shard carries the set's header and its own index; the folder's provenance is the record
    header = {k: v for k, v in prov.items() if k not in ("rows", "shards")}
    for i, name in enumerate(names):
        f = pq.ParquetFile(folder / name)
        assert json.loads(f.schema_arrow.metadata[METADATA_KEY]) == header | {"shard": i}
        assert f.metadata.num_rows == counts[i]


@pytest.mark.parametrize("batches, shard_rows, group_rows, expected, groups", [
    ([64, 64, 64], 150, None, [150, 42], [[64, 64, 22], [42]]),  # a cut inside a batch; a group per batch
    ([50, 50, 50, 50], 100, None, [100, 100], [[50, 50], [50, 50]]),  # cuts on batch boundaries: no empty shard
    ([30], 100, None, [30], [[30]]),
    ([], 100, None, [0], [[]]),  # no rows: still one (empty) shard
    ([64, 64, 64, 64, 64], 250, 128, [250, 70], [[128, 122], [70]]),  # batches gathered; the shard's end cuts
    ([64, 64, 64], 1000, 100, [192], [[100, 92]]),  # a group cut exactly inside a batch
])
def test_the_shard_writer_cuts_exactly_in_row_order(tmp_path, batches, shard_rows, group_rows, expected, groups):
    schema = softlabels.soft_label_schema(3, "float32")
    writer = ShardWriter(tmp_path, schema, {"schema_version": softlabels.SOFT_LABELS_SCHEMA_VERSION}, shard_rows,
                         group_rows)
    start = 0
    for n in batches:
        ids = np.arange(start, start + n)
        writer.write(softlabels.to_record_batch(schema, ids, "transfer", -np.ones(n), np.zeros((n, 3), np.float32)))
        start += n
    listed = writer.close()
    assert [s["rows"] for s in listed] == expected
    assert [s["file"] for s in listed] == sorted(p.name for p in tmp_path.iterdir())
    ids = np.concatenate([pq.read_table(tmp_path / s["file"]).column("id").to_numpy() for s in listed])
    np.testing.assert_array_equal(ids, np.arange(sum(batches)))
    meta = [pq.ParquetFile(tmp_path / s["file"]).metadata for s in listed]
    assert [[m.row_group(g).num_rows for g in range(m.num_row_groups)] for m in meta] == groups


def test_sharded_rows_are_the_one_shard_rows_in_the_same_order(sets):
    one = softlabels.read_soft_labels(sets["one"], sets["meta"])
    sharded = softlabels.read_soft_labels(sets["sharded"], sets["meta"])
    np.testing.assert_array_equal(sharded.ids, one.ids)
    np.testing.assert_array_equal(sharded.logits, one.logits)
    # every column, split and label included, row for row
    one_table = pq.read_table(sets["one"] / "part-00000.parquet").replace_schema_metadata()
    shards = [pq.read_table(p).replace_schema_metadata() for p in shard_paths(sets["sharded"])]
    assert pa.concat_tables(shards).equals(one_table)


def test_a_student_streams_from_shards_exactly_as_from_one_shard(sets):
    prepared, tmp = sets["prepared"], sets["tmp"]
    cfg = StudentConfig(arch="mlp", hidden=[8], epochs=2, batch_size=32, lr=0.01, shuffle_buffer=64)
    rows = softlabels.StudentRows(prepared, sets["sharded"], sets["meta"])
    assert sum(rows.block_sizes) > cfg.shuffle_buffer  # so the rows are streamed, not held in memory
    assert any(start // SHARD_ROWS != (stop - 1) // SHARD_ROWS for start, stop in rows.bounds)  # blocks span shards
    runs = {name: training.train_student(training.TrainJob(cfg, 0, "student"), prepared, sets[name],
                                         training.Outputs(tmp / f"{name}.pt", tmp / f"{name}.csv"))
            for name in ("one", "sharded")}
    assert runs["sharded"]["history"] == runs["one"]["history"]
    for a, b in zip(runs["sharded"]["model"].state_dict().values(), runs["one"]["model"].state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    losses = [row["train_loss"] for row in runs["sharded"]["history"]]
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- damaged sets


def damaged(sets, tmp_path):
    folder = tmp_path / "soft"
    shutil.copytree(sets["sharded"], folder)
    return folder


def edit_provenance(folder, change):
    path = folder / "provenance.json"
    prov = json.loads(path.read_text())
    change(prov)
    path.write_text(json.dumps(prov))


def refused(folder, sets, *texts):
    with pytest.raises(UserError) as error:
        softlabels.StudentRows(sets["prepared"], folder, sets["meta"])
    message = str(error.value)
    assert "\n" not in message and ("soft_labels" in message or "its stage" in message), message  # the fix
    for text in texts:
        assert text in message, message


def test_a_missing_shard_is_refused_by_name(sets, tmp_path):
    folder = damaged(sets, tmp_path)
    (folder / "part-00002.parquet").unlink()
    refused(folder, sets, str(folder / "part-00002.parquet"), "not found", "lists 4 shards")


def test_a_shard_the_provenance_does_not_list_is_refused(sets, tmp_path):
    folder = damaged(sets, tmp_path)

    def drop_last(prov):
        prov["rows"] -= prov["shards"].pop()["rows"]

    edit_provenance(folder, drop_last)
    refused(folder, sets, str(folder / "part-00003.parquet"), "does not list", "lists 3")


def test_a_provenance_whose_shards_do_not_add_up_is_refused(sets, tmp_path):
    folder = damaged(sets, tmp_path)
    edit_provenance(folder, lambda prov: prov.update(rows=prov["rows"] + 1))
    refused(folder, sets, "provenance.json", "4 shards add up to")


def test_a_truncated_shard_is_refused_by_name(sets, tmp_path):
    folder = damaged(sets, tmp_path)
    path = folder / "part-00001.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(folder, sets, str(path), "truncated")


def test_a_shard_rewritten_with_the_same_rows_is_refused_by_its_size(sets, tmp_path):
    folder = damaged(sets, tmp_path)
    path = folder / "part-00001.parquet"
    pq.write_table(pq.read_table(path), path, compression="none")  # same rows and metadata, other bytes
    refused(folder, sets, str(path), "bytes but provenance.json lists")


def test_a_shard_of_another_set_or_in_another_place_is_refused(sets, tmp_path):
    other = tmp_path / "float16"
    softlabels.dump(sets["tmp"] / "teacher.pt", sets["prepared"], other,
                    SoftLabelsConfig(dtype="float16", batch_size=64, shard_rows=SHARD_ROWS))
    folder = damaged(sets, tmp_path)
    shutil.copy(other / "part-00001.parquet", folder / "part-00001.parquet")
    refused(folder, sets, str(folder / "part-00001.parquet"), "not shard 1 of this soft-label set")
    folder = damaged(sets, tmp_path / "swapped")
    shutil.copy(sets["sharded"] / "part-00000.parquet", folder / "part-00001.parquet")
    refused(folder, sets, str(folder / "part-00001.parquet"), "not shard 1")


def test_a_foreign_parquet_as_a_shard_and_a_folder_without_provenance_are_refused(sets, tmp_path):
    folder = damaged(sets, tmp_path)
    pq.write_table(pq.read_table(sets["prepared"] / "train.parquet"), folder / "part-00000.parquet")
    refused(folder, sets, str(folder / "part-00000.parquet"), "no provenance metadata")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(sets["one"] / "part-00000.parquet", legacy / "soft_labels.parquet")
    refused(legacy, sets, str(legacy / "provenance.json"), "not found; run the soft_labels stage first")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(empty, sets, str(empty / "provenance.json"), "not found")
