"""Soft labels: the teacher's raw logits, stored once as Parquet.

The file data/soft_labels/soft_labels.parquet has columns
  id      int64, the prepared example id
  split   string ("train" or "transfer")
  label   int32 class id, null on transfer rows
  logits  fixed_size_list<float32 | float16>[num_classes], raw (no temperature)
and is zstd-compressed, written one row group per batch while the teacher runs,
so the whole set is never held in memory. The schema metadata key
`distill.soft_labels` holds JSON provenance: schema version, teacher checkpoint
sha256, prepared-data fingerprint, number and names of classes, dtype. Readers
check it and refuse a file made from other data.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distill.config import SoftLabelsConfig
from distill.data import PreparedMeta, features, labels, read_meta
from distill.errors import UserError
from distill.io import atomic_path, file_sha256
from distill.models import load_checkpoint

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
METADATA_KEY = b"distill.soft_labels"
FILE_NAME = "soft_labels.parquet"
LABELLED_SPLITS = ("train", "transfer")  # the rows the student trains on, in this order


@dataclass(frozen=True)
class SoftLabels:
    ids: np.ndarray  # (N,) int64
    logits: np.ndarray  # (N, C) float32
    provenance: dict


def soft_label_schema(num_classes: int, dtype: str, provenance: dict) -> pa.Schema:
    value_type = {"float32": pa.float32(), "float16": pa.float16()}[dtype]
    return pa.schema(
        [
            ("id", pa.int64()),
            ("split", pa.string()),
            ("label", pa.int32()),
            ("logits", pa.list_(value_type, num_classes)),
        ],
        metadata={METADATA_KEY: json.dumps(provenance, sort_keys=True).encode()},
    )


def to_record_batch(schema: pa.Schema, ids, split: str, labels, logits: np.ndarray) -> pa.RecordBatch:
    """One batch of rows; `logits` (N, C) is cast to the schema's value type."""
    value_type = schema.field("logits").type.value_type
    flat = pa.array(np.ascontiguousarray(logits, dtype=value_type.to_pandas_dtype()).reshape(-1))
    return pa.record_batch(
        [
            pa.array(ids, pa.int64()),
            pa.array([split] * len(ids), pa.string()),
            pa.array(np.asarray(labels, dtype=np.int32), pa.int32(), mask=np.asarray(labels) < 0),
            pa.FixedSizeListArray.from_arrays(flat, logits.shape[1]),
        ],
        schema=schema,
    )


def dump(teacher_path: str | Path, prepared_dir: str | Path, out_dir: str | Path, cfg: SoftLabelsConfig,
         run_id: str | None = None) -> dict:
    """Stage step soft_labels: run the teacher once over train (+ transfer), write the Parquet.

    `run_id` (the MLflow run of this stage) is recorded in the provenance, with the
    teacher's own run id from its checkpoint.
    """
    model, ckpt = load_checkpoint(teacher_path)
    meta = read_meta(prepared_dir)
    if ckpt.get("prepared_fingerprint") != meta.fingerprint:
        raise UserError(f"{teacher_path}: teacher was trained on other prepared data; rerun train_teacher")
    provenance = {
        "schema_version": SCHEMA_VERSION,
        "teacher_sha256": file_sha256(teacher_path),
        "prepared_fingerprint": meta.fingerprint,
        "num_classes": meta.num_classes,
        "class_names": meta.class_names,
        "dtype": cfg.dtype,
        "teacher_run_id": ckpt.get("mlflow_run_id"),
        "run_id": run_id,
    }
    schema = soft_label_schema(meta.num_classes, cfg.dtype, provenance)
    rows = 0
    with atomic_path(out_dir) as tmp, torch.inference_mode():
        tmp.mkdir()
        with pq.ParquetWriter(tmp / FILE_NAME, schema, compression="zstd") as writer:
            for split in LABELLED_SPLITS:
                path = Path(prepared_dir) / f"{split}.parquet"
                if not path.exists():
                    continue
                for batch in pq.ParquetFile(path).iter_batches(batch_size=cfg.batch_size):
                    logits = model(torch.from_numpy(features(batch))).numpy()
                    ids = batch.column("id").to_numpy()
                    writer.write_batch(to_record_batch(schema, ids, split, labels(batch), logits))
                    rows += len(batch)
                log.info("soft labels: %d rows written (%s done)", rows, split)
    return {"rows": rows, "bytes": (Path(out_dir) / FILE_NAME).stat().st_size, **provenance}


def read_provenance(path: Path) -> dict:
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError):
        raise UserError(f"{path}: unreadable or truncated Parquet; rerun the soft_labels stage") from None
    if METADATA_KEY not in metadata:
        raise UserError(f"{path}: no provenance metadata; it was not written by the soft_labels stage")
    return json.loads(metadata[METADATA_KEY])


def read_soft_labels(soft_dir: str | Path, prepared: PreparedMeta) -> SoftLabels:
    """Read all soft labels as float32, refusing a file made from other prepared data."""
    path = Path(soft_dir) / FILE_NAME
    if not path.is_file():
        raise UserError(f"{path}: not found; run the soft_labels stage first (dvc repro soft_labels)")
    prov = read_provenance(path)
    if prov.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{path}: schema version {prov.get('schema_version')} is not {SCHEMA_VERSION}; rerun soft_labels")
    if prov["prepared_fingerprint"] != prepared.fingerprint:
        raise UserError(f"{path}: stale soft labels, made from other prepared data; rerun soft_labels")
    if prov["num_classes"] != prepared.num_classes:
        raise UserError(
            f"{path}: {prov['num_classes']} classes but the prepared data has {prepared.num_classes}; rerun soft_labels"
        )
    try:
        table = pq.read_table(path, columns=["id", "logits"])
    except (pa.ArrowInvalid, OSError):
        raise UserError(f"{path}: unreadable or truncated Parquet; rerun the soft_labels stage") from None
    logits = table.column("logits").combine_chunks()
    values = logits.flatten().to_numpy(zero_copy_only=False, writable=True).astype(np.float32, copy=False)
    return SoftLabels(table.column("id").to_numpy(), values.reshape(-1, prov["num_classes"]), prov)
