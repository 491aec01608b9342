"""Soft labels: the teacher's raw logits, stored once as Parquet shards.

The folder data/soft_labels holds the rows in order (train, then transfer) in shards
part-00000.parquet, part-00001.parquet, ... of at most `soft_labels.shard_rows` rows
each (cut exactly: every shard but the last has shard_rows rows), with columns
  id      int64, the prepared example id
  split   string ("train" or "transfer")
  label   int32 class id, null on transfer rows
and either every logit (`soft_labels.top_k: null`)
  logits       fixed_size_list<float32 | float16>[num_classes], raw (no temperature)
or the k largest (`soft_labels.top_k: k`), as in FKD (Shen & Xing, 2022)
  topk_index   fixed_size_list<int16 | int32>[k], class ids, largest logit first
  topk_logits  fixed_size_list<float32 | float16>[k]
  rest_logit   float32 | float16, log(mean(exp(z_j))) over the other classes j
A reader rebuilds full logits by giving every other class `rest_logit`: at
temperature 1 that keeps each top-k probability and the total mass of the rest
exactly; at higher temperatures the rest is spread evenly.

Shards are zstd-compressed and written one row group per teacher batch while the
teacher runs (on a writer thread, so compression overlaps the next forward pass), so
the whole set is never held in memory: distill/shards.py writes and checks the shards,
for a language model's soft labels too; this module is what a classifier's hold.

`provenance.json`, written last, is the set's one record: schema version, teacher
checkpoint sha256, prepared-data fingerprint, number and names of classes, dtype,
top_k, shard_rows, run ids, the total rows, and each shard's file name, rows, bytes
and sha256. Every shard also carries the same header (without the shard list) and
its own index under the schema metadata key `distill.soft_labels`. Readers check
the provenance against the prepared data, and each shard against the provenance
(listed and present, same header and index, same rows and bytes), and refuse a set
made from other data, or one with a missing, extra, truncated or foreign shard.
Shard hashes are recorded, not recomputed on every read (that would read the whole
set twice); their digest is the set's identity in MLflow.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distill import device as devices
from distill.classification_params import SoftLabelsConfig
from distill.data import PreparedMeta, features, labels, read_meta
from distill.errors import UserError
from distill.io import atomic_path, file_sha256
from distill import checkpoint
from distill.models import predict_logits
import distill.pretrained  # noqa: F401  (registers the transformer and torchscript archs a teacher may be)
from distill.progress import bar
from distill.rows import Block, ParquetRows
from distill.shards import PROVENANCE_NAME, ShardWriter, check_shard_list, open_shards, read_provenance, write_shards

log = logging.getLogger(__name__)

SOFT_LABELS_SCHEMA_VERSION = 3
LABELLED_SPLITS = ("train", "transfer")  # the rows the student trains on, in this order
LOGIT_COLUMNS = {False: ["logits"], True: ["topk_index", "topk_logits", "rest_logit"]}


@dataclass(frozen=True)
class SoftLabels:
    ids: np.ndarray  # (N,) int64
    logits: np.ndarray  # (N, C) float32
    provenance: dict


def soft_label_schema(num_classes: int, dtype: str, top_k: int | None = None) -> pa.Schema:
    """The columns of a shard (its metadata is added per shard, see `ShardWriter`)."""
    value_type = {"float32": pa.float32(), "float16": pa.float16()}[dtype]
    if top_k is None:
        logit_fields = [("logits", pa.list_(value_type, num_classes))]
    else:
        logit_fields = [
            ("topk_index", pa.list_(pa.int16() if num_classes <= 2**15 else pa.int32(), top_k)),
            ("topk_logits", pa.list_(value_type, top_k)),
            ("rest_logit", value_type),
        ]
    return pa.schema([("id", pa.int64()), ("split", pa.string()), ("label", pa.int32()), *logit_fields])


def top_k_logits(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, C) logits -> (index (N, k) largest first, their logits (N, k), rest (N,) log-mean-exp of the others)."""
    n, c = logits.shape
    part = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(logits, part, axis=1), axis=1, kind="stable")
    index = np.take_along_axis(part, order, axis=1)
    values = np.take_along_axis(logits, index, axis=1)
    if k == c:
        return index, values, np.full(n, -np.inf, dtype=logits.dtype)
    others = logits.astype(np.float64, copy=True)
    np.put_along_axis(others, index, -np.inf, axis=1)
    top = others.max(axis=1, keepdims=True)
    rest = top[:, 0] + np.log(np.exp(others - top).sum(axis=1) / (c - k))
    return index, values, rest.astype(logits.dtype)


def dense_logits(index: np.ndarray, values: np.ndarray, rest: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse of `top_k_logits` up to the rest: every class outside the top k gets `rest`."""
    out = np.repeat(rest.astype(np.float32)[:, None], num_classes, axis=1)
    np.put_along_axis(out, index.astype(np.int64), values.astype(np.float32), axis=1)
    return out


def to_record_batch(schema: pa.Schema, ids, split: str, labels, logits: np.ndarray) -> pa.RecordBatch:
    """One batch of rows; `logits` (N, C) is cast to the schema's value type (top-k taken if the schema says so)."""
    head = [
        pa.array(ids, pa.int64()),
        pa.array([split] * len(ids), pa.string()),
        pa.array(np.asarray(labels, dtype=np.int32), pa.int32(), mask=np.asarray(labels) < 0),
    ]
    if "logits" in schema.names:
        value_type = schema.field("logits").type.value_type
        return pa.record_batch(head + [_fixed_lists(logits, value_type)], schema=schema)
    value_type = schema.field("topk_logits").type.value_type
    index, values, rest = top_k_logits(logits, schema.field("topk_index").type.list_size)
    np_type = value_type.to_pandas_dtype()
    index_type = schema.field("topk_index").type.value_type
    tail = [_fixed_lists(index, index_type), _fixed_lists(values, value_type), pa.array(rest.astype(np_type))]
    return pa.record_batch(head + tail, schema=schema)


def _fixed_lists(a: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(a, dtype=value_type.to_pandas_dtype()).reshape(-1), value_type)
    return pa.FixedSizeListArray.from_arrays(flat, a.shape[1])


def dump(teacher_path: str | Path, prepared_dir: str | Path, out_dir: str | Path, cfg: SoftLabelsConfig,
         run_id: str | None = None, device: torch.device = devices.CPU, precision: str = "fp32") -> dict:
    """Stage step soft_labels: run the teacher once over train (+ transfer), write the shards
    and provenance.json.

    `run_id` (the MLflow run of this stage) is recorded in the provenance, with the
    teacher's own run id from its checkpoint. The teacher runs on `device` at `precision`
    (runtime.*); its logits are copied back to the CPU batch by batch as they are written.
    """
    model, ckpt = checkpoint.load(teacher_path, task="classify")
    meta = read_meta(prepared_dir)
    if ckpt.get("prepared_fingerprint") != meta.fingerprint:
        raise UserError(f"{teacher_path}: teacher was trained on other prepared data; rerun train_teacher")
    if cfg.top_k is not None and cfg.top_k >= meta.num_classes:
        raise UserError(f"soft_labels.top_k = {cfg.top_k} is not allowed: the data has {meta.num_classes} "
                        "classes; use a smaller k, or null to keep every logit")
    header = {
        "schema_version": SOFT_LABELS_SCHEMA_VERSION,
        "teacher_sha256": file_sha256(teacher_path),
        "prepared_fingerprint": meta.fingerprint,
        "num_classes": meta.num_classes,
        "class_names": meta.class_names,
        "dtype": cfg.dtype,
        "top_k": cfg.top_k,
        "shard_rows": cfg.shard_rows,
        "teacher_run_id": ckpt.get("mlflow_run_id"),
        "run_id": run_id,
        "precision": precision,
        # text: the tokenizer that made the token ids the teacher read (the model's own weights are in
        # the checkpoint that teacher_sha256 names)
        "tokenizer_sha256": (meta.tokens or {}).get("tokenizer_sha256"),
        "vocab_size": (meta.tokens or {}).get("vocab_size"),
    }
    schema = soft_label_schema(meta.num_classes, cfg.dtype, cfg.top_k)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        batches = teacher_batches(model.to(device), prepared_dir, schema, cfg.batch_size, precision,
                                  (meta.tokens or {}).get("pad_id"))
        listed, rows = write_shards(batches, ShardWriter(tmp, schema, header, cfg.shard_rows))
        provenance = header | {"rows": rows, "shards": listed}
        (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    log.info("soft labels: %d rows in %d shard(s) under %s", rows, len(listed), out_dir)
    return {"bytes": sum(s["bytes"] for s in listed), **provenance}


def teacher_batches(model: torch.nn.Module, prepared_dir: str | Path, schema: pa.Schema,
                    batch_size: int, precision: str = "fp32", pad_id: int | None = None) -> Iterator[pa.RecordBatch]:
    """The teacher's logits over the prepared train then transfer rows, one record batch of
    `schema` per `batch_size` rows, read and computed as they are asked for (on the model's
    device, under `precision`'s autocast; the logits come back as float32 on the CPU)."""
    device = next(model.parameters()).device
    rows = 0
    for split in LABELLED_SPLITS:
        path = Path(prepared_dir) / f"{split}.parquet"
        if not path.exists():
            continue
        # pre_buffer off: with it, iter_batches buffers the whole file's column chunks
        # (memory growing with the rows, 190 MB at 1M rows of 40 features)
        source = pq.ParquetFile(path, pre_buffer=False)
        with bar(source.metadata.num_rows, f"soft labels ({split})", unit="row", unit_scale=True) as progress:
            for batch in source.iter_batches(batch_size=batch_size):
                with torch.inference_mode(), devices.autocast(device, precision):
                    x = devices.to_device(torch.from_numpy(features(batch)), device)
                    # token ids go through in length-sorted passes, each cut to its longest row
                    logits = (model(x) if x.is_floating_point() else predict_logits(model, x, pad_id=pad_id))
                    logits = logits.float().cpu().numpy()
                yield to_record_batch(schema, batch.column("id").to_numpy(), split, labels(batch), logits)
                rows += len(batch)
                progress.update(len(batch))
        log.info("soft labels: %d rows computed (%s done)", rows, split)


def checked_provenance(soft_dir: str | Path, prepared: PreparedMeta) -> dict:
    """The folder's provenance, after refusing a missing, foreign or stale set, or one whose
    shard files are not exactly those the provenance lists, by name."""
    folder = Path(soft_dir)
    path = folder / PROVENANCE_NAME
    prov = read_provenance(folder)
    if prov.get("schema_version") != SOFT_LABELS_SCHEMA_VERSION:
        raise UserError(f"{path}: schema version {prov.get('schema_version')} is not {SOFT_LABELS_SCHEMA_VERSION}; "
                        "rerun soft_labels")
    if prov.get("prepared_fingerprint") != prepared.fingerprint:
        raise UserError(f"{path}: stale soft labels, made from other prepared data; rerun soft_labels")
    if prov.get("num_classes") != prepared.num_classes:
        raise UserError(
            f"{path}: {prov.get('num_classes')} classes but the prepared data has {prepared.num_classes}; "
            "rerun soft_labels"
        )
    check_shard_list(folder, prov)
    return prov


def logits_of(table: pa.Table, prov: dict) -> np.ndarray:
    """Full (N, C) float32 logits from a soft-label table (dense, or rebuilt from top-k)."""
    c = prov["num_classes"]
    if prov.get("top_k") is None:
        return _flat(table.column("logits")).astype(np.float32, copy=False).reshape(-1, c)
    k = prov["top_k"]
    index = _flat(table.column("topk_index")).reshape(-1, k)
    values = _flat(table.column("topk_logits")).reshape(-1, k)
    return dense_logits(index, values, table.column("rest_logit").to_numpy(), c)


def _soft_label_rows(soft_dir: Path, prov: dict) -> ParquetRows:
    """The id and logit columns (dense or top-k, as the provenance says) of a soft-label set."""
    return open_shards(soft_dir, prov, ["id", *LOGIT_COLUMNS[prov.get("top_k") is not None]])


def _flat(column: pa.ChunkedArray) -> np.ndarray:
    return column.combine_chunks().flatten().to_numpy(zero_copy_only=False, writable=True)


class StudentRows:
    """The student's training rows: prepared features and labels (train, then transfer)
    joined with their soft labels, read one prepared row group at a time (a block may
    span two shards: the shards read as one table in row order).

    Opening checks the soft labels' provenance against the prepared data and every
    shard against the provenance; each block read checks that the ids line up, so a set
    that no longer matches is refused by name instead of training on misaligned targets.
    `path` is the set's provenance.json: it lists every shard's sha256, so its own
    sha256 is the set's digest.
    """

    def __init__(self, prepared_dir: str | Path, soft_dir: str | Path, prepared: PreparedMeta):
        self.dir = Path(soft_dir)
        self.path = self.dir / PROVENANCE_NAME
        self.provenance = checked_provenance(self.dir, prepared)
        splits = [Path(prepared_dir) / f"{s}.parquet" for s in LABELLED_SPLITS if s in prepared.splits]
        self.prepared = ParquetRows(splits, ["id", "x", "label"])
        if self.provenance["rows"] != self.prepared.num_rows:
            raise UserError(f"{self.path}: {self.provenance['rows']} rows but the prepared train/transfer splits "
                            f"have {self.prepared.num_rows}; rerun soft_labels")
        self.soft = _soft_label_rows(self.dir, self.provenance)
        self.bounds = self.prepared.group_bounds

    @property
    def block_sizes(self) -> list[int]:
        return [stop - start for start, stop in self.bounds]

    def read_block(self, i: int) -> Block:
        start, stop = self.bounds[i]
        rows, soft = self.prepared.read(start, stop), self.soft.read(start, stop)
        if not np.array_equal(rows.column("id").to_numpy(), soft.column("id").to_numpy()):
            raise UserError(f"{self.dir}: soft-label rows do not match the prepared train/transfer rows; "
                            "rerun soft_labels")
        return Block(features(rows), labels(rows), logits_of(soft, self.provenance))


def read_soft_labels(soft_dir: str | Path, prepared: PreparedMeta) -> SoftLabels:
    """All soft labels at once, logits as float32 (N, C); for small sets and inspection."""
    prov = checked_provenance(soft_dir, prepared)
    table = _soft_label_rows(Path(soft_dir), prov).read(0, 1 << 62)
    return SoftLabels(table.column("id").to_numpy(), logits_of(table, prov), prov)
