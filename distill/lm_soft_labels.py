"""A language-model teacher's soft labels: written once per train window, read back streaming.

data/soft_labels holds part-NNNNN.parquet shards (one row per train window, in window order,
`soft_labels.shard_rows` rows each; the columns of distill/sparse.py's `schema`) and
provenance.json, as for a classifier (distill/shards.py writes and checks the shards):
the teacher checkpoint's sha256, the prepared data's fingerprint, the tokenizer's sha256, the
vocabulary size, context length and positions per window, which targets (top_k with k,
sampled with the draws and their seed, or dense), the id type, the layout (each column's
Arrow type), and per shard its rows, bytes and sha256, with the total bytes per token and
each column's share of them (its compressed bytes in the shards).

The student refuses, by name, a set made with another tokenizer or vocabulary, over other
prepared data, or whose shards are not the ones listed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from distill import device as devices
from distill import checkpoint, lm, sparse
from distill.corpus import TASK, CorpusMeta, read_corpus_meta, read_windows, student_view
from distill.cross_tokenizer import Aligner
from distill.errors import UserError
from distill.id_ranks import SuccessorRanks
from distill.io import atomic_path, file_sha256
from distill.lm_params import LMSoftLabelsConfig
from distill.progress import bar
from distill.shards import PROVENANCE_NAME, SAMPLED_GROUP_ROWS, ShardWriter, check_shard_list, column_bytes, open_shards
from distill.shards import read_provenance, write_shards

log = logging.getLogger(__name__)

TARGETS_SCHEMA_VERSION = 4  # 4: sampled targets as every draw's rank among its token's successors, delta-coded
# (3: every draw's id, delta-coded; 2: distinct ids and counts; 1: fixed-size ids and float16 weights)
READ_VERSIONS = {"sampled": (4,), "top_k": (2, 3, 4), "dense": (2, 3, 4)}  # top-k's and dense layouts unchanged
MAX_BUFFER_BYTES = 1 << 30  # targets held in memory at once, whatever student.shuffle_buffer says


def dump_targets(teacher_path: str | Path, prepared_dir: str | Path, out_dir: str | Path, cfg: LMSoftLabelsConfig,
         run_id: str | None = None, device: torch.device = devices.CPU, precision: str = "fp32") -> dict:
    """Stage step soft_labels (language model): the teacher over every train window, its targets
    packed into shards as it goes, then provenance.json; written atomically. With a student view
    of its own (data.cross_tokenizer) the windows are the student's and the targets are over its
    vocabulary, aligned by bytes (distill/cross_tokenizer.py)."""
    meta = read_corpus_meta(prepared_dir)
    model, ckpt = checkpoint.load(teacher_path, task=TASK)
    lm.check_lineage(teacher_path, ckpt, meta)
    own = read_corpus_meta(student_view(prepared_dir))  # the student's tokens: the teacher's, or its own
    aligner = None if own.path == meta.path else Aligner(lm.tokenizer(meta), lm.tokenizer(own),
                                                         meta.context_length)
    vocab = own.vocab_size  # the tokenizer's ids (a pretrained head may have padding rows past them)
    sparse.check_id_type(vocab, cfg.id_dtype)
    windows = read_windows(own.path, "train")
    ranks = SuccessorRanks(windows, vocab) if cfg.targets == "sampled" else None  # ids stored as ranks below V
    width = sparse.per_position(cfg.targets, vocab, cfg.top_k, cfg.samples)
    if cfg.targets == "top_k" and cfg.top_k >= vocab:
        raise UserError(f"soft_labels.top_k = {cfg.top_k} is not allowed: the vocabulary has {vocab} ids; use a "
                        "smaller k, or targets: dense")
    positions = own.context_length - 1
    schema = sparse.schema(cfg.targets, positions, width, cfg.id_dtype)
    header = {
        "schema_version": TARGETS_SCHEMA_VERSION, "task": TASK, "teacher_sha256": file_sha256(teacher_path),
        "prepared_fingerprint": own.fingerprint, "tokenizer_sha256": own.tokenizer_sha256, "vocab_size": vocab,
        "context_length": own.context_length, "positions": positions, "targets": cfg.targets, "width": width,
        "top_k": cfg.top_k if cfg.targets == "top_k" else None,
        "samples": cfg.samples if cfg.targets == "sampled" else None,
        "seed": cfg.seed if cfg.targets == "sampled" else None, "id_dtype": cfg.id_dtype,
        "sampling": cfg.sampling if cfg.targets == "sampled" else None,
        "id_order": "successor_ranks" if cfg.targets == "sampled" else "ids",
        "shard_rows": cfg.shard_rows, "teacher_run_id": ckpt.get("mlflow_run_id"), "run_id": run_id,
        "precision": precision, "cross_tokenizer": aligner is not None,
        # the pairing: the teacher's tokenizer and view of the corpus (the student's are above)
        "teacher_tokenizer_sha256": meta.tokenizer_sha256, "teacher_prepared_fingerprint": meta.fingerprint,
    }
    # counted as the rows go: positions with no teacher token to align to (their target is the next token), and
    # the targets' bits per byte on the text beside the teacher's own (how faithful the alignment is)
    summary = None if aligner is None else aligner.summary
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        batches = _teacher_batches(model.to(device), windows, cfg, schema, (width, vocab), precision, aligner, ranks)
        provenance = write_set(batches, tmp, schema, header, cfg.shard_rows, summary)
    log.info("soft labels: %d windows (%s, %.1f bytes per token) in %d shard(s) under %s", provenance["rows"],
             cfg.targets, provenance["bytes_per_token"], len(provenance["shards"]), out_dir)
    return provenance


def write_set(batches: Iterable[pa.RecordBatch], folder: Path, schema: pa.Schema, header: dict, shard_rows: int,
              summary: Callable[[], dict] | None = None) -> dict:
    """The batches as shards of `schema` under `folder`, then its provenance.json: the header with
    the layout (each column's Arrow type), rows, shard list, bytes on disk, bytes per token, each
    column's compressed bytes (`column_bytes`; the rest of `bytes` is the files' footers), and
    `summary()` once every batch is written, if given. Sampled targets go in row groups of
    SAMPLED_GROUP_ROWS windows, the rest one per batch."""
    header = header | {"layout": {field.name: str(field.type) for field in schema}}
    group_rows = SAMPLED_GROUP_ROWS if header["targets"] == "sampled" else None
    shards = ShardWriter(folder, schema, header, shard_rows, group_rows)
    listed, rows = write_shards(batches, shards)
    size = sum(s["bytes"] for s in listed)
    provenance = header | {"rows": rows, "shards": listed, "bytes": size,
                           "bytes_per_token": size / max(rows * header["positions"], 1),
                           "column_bytes": column_bytes(folder, listed)}
    if summary is not None:
        provenance["summary"] = summary()
    (folder / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return provenance


def _teacher_batches(model, windows: np.ndarray, cfg: LMSoftLabelsConfig, schema, sizes: tuple[int, int],
                     precision: str, aligner: Aligner | None = None, ranks: SuccessorRanks | None = None):
    (width, vocab), device = sizes, next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)  # on the CPU: the same draws whatever the device
    with bar(len(windows), "soft labels", unit="window") as progress:
        for start in range(0, len(windows), cfg.batch_size):
            chunk = windows[start:start + cfg.batch_size]
            if aligner is not None:  # (B, P, V_s) distributions over the student's ids, as log-probs
                logits = aligner.batch(model, chunk, devices.autocast(device, precision)).log()
            else:
                ids = torch.from_numpy(chunk).to(device)
                with torch.inference_mode(), devices.autocast(device, precision):
                    logits = lm.next_token_logits(model, ids)[..., :vocab].float()
            with torch.inference_mode():
                kept = sparse.select(logits, cfg.targets, width, gen, cfg.sampling)
            yield sparse.pack(kept, np.arange(start, start + len(chunk)), schema, ranks)
            progress.update(len(chunk))


def checked_targets_provenance(soft_dir: str | Path, meta: CorpusMeta, vocab_size: int,
                               teacher: CorpusMeta | None = None) -> dict:
    """The set's provenance after refusing, by name, one made with another tokenizer or
    vocabulary (both hashes / sizes named), over other prepared data, or with other shards; with
    `teacher` (the teacher's view of the prepared data) also one made for another pairing of
    teacher tokenizer, student tokenizer and corpus."""
    folder = Path(soft_dir)
    path = folder / PROVENANCE_NAME
    prov = read_provenance(folder)
    if prov.get("task") != TASK or prov.get("targets") not in sparse.TARGET_COLUMNS:
        raise UserError(f"{path}: not a language model's soft labels; rerun soft_labels")
    if prov.get("schema_version") not in READ_VERSIONS[prov["targets"]]:
        raise UserError(f"{path}: {prov['targets']} soft labels in layout version {prov.get('schema_version')}, but "
                        f"this version reads version {TARGETS_SCHEMA_VERSION} (docs/language-models.md); rerun "
                        "soft_labels")
    if prov.get("tokenizer_sha256") != meta.tokenizer_sha256:
        raise UserError(f"{path}: made with tokenizer sha256 {prov.get('tokenizer_sha256')}, but the prepared data "
                        f"was tokenized with sha256 {meta.tokenizer_sha256}; rerun soft_labels (dvc repro)")
    if prov.get("vocab_size") != vocab_size:
        raise UserError(f"{path}: targets over a vocabulary of {prov.get('vocab_size')} ids, but the student "
                        f"predicts {vocab_size}; rerun soft_labels with this teacher and data")
    if prov.get("prepared_fingerprint") != meta.fingerprint:
        raise UserError(f"{path}: stale soft labels, made over other prepared data; rerun soft_labels")
    if prov.get("positions") != meta.context_length - 1:
        raise UserError(f"{path}: {prov.get('positions')} positions per window, not {meta.context_length - 1}; "
                        "rerun soft_labels")
    if teacher is not None and prov.get("teacher_prepared_fingerprint") != teacher.fingerprint:
        raise UserError(f"{path}: made for another pairing of teacher tokenizer (sha256 "
                        f"{prov.get('teacher_tokenizer_sha256')}), student tokenizer and corpus than the prepared "
                        f"data's (teacher tokenizer sha256 {teacher.tokenizer_sha256}); rerun soft_labels")
    check_shard_list(folder, prov)
    return prov


@dataclass
class WindowBlock:
    """Windows held in memory together: their indices into train, and their stored targets."""

    windows: np.ndarray
    columns: dict[str, np.ndarray]  # stored dtypes (uint16 ids, float16 values; sampled: the draws' ids), (N, P, width)
    targets_kind: str

    def targets(self, rows: np.ndarray) -> sparse.Targets:
        return sparse.as_targets(self.targets_kind, {k: v[rows] for k, v in self.columns.items()})


class SoftLabelSet:
    """The checked shards of a soft-label set, read a buffer of row groups at a time."""

    def __init__(self, soft_dir: str | Path, meta: CorpusMeta, vocab_size: int, teacher: CorpusMeta | None = None):
        self.provenance = checked_targets_provenance(soft_dir, meta, vocab_size, teacher)
        self.kind, self.positions = self.provenance["targets"], self.provenance["positions"]
        self.columns = sparse.TARGET_COLUMNS[self.kind]
        self.rows = open_shards(soft_dir, self.provenance, ["window", *self.columns])
        self.path = Path(soft_dir) / PROVENANCE_NAME
        self.window_bytes = sparse.held_bytes(self.rows.files[0].schema_arrow, self.kind, self.positions,
                                              self.provenance["width"])  # one window's targets in memory
        # sampled targets are stored as ranks among what follows each position's token in the train windows
        self.ranks = (SuccessorRanks(read_windows(meta.path, "train"), self.provenance["vocab_size"])
                      if self.kind == "sampled" else None)

    def blocks(self, gen: torch.Generator, buffer: int) -> Iterator[WindowBlock]:
        """One epoch: the row groups in a seeded order, gathered `buffer` windows at a time (at
        most MAX_BUFFER_BYTES of stored targets: dense targets are V values per position)."""
        buffer = min(buffer, max(1, MAX_BUFFER_BYTES // self.window_bytes))
        bounds = self.rows.group_bounds
        order = torch.randperm(len(bounds), generator=gen).tolist()
        taken: list[tuple[int, int]] = []
        for g in order + [None]:
            if g is not None:
                taken.append(bounds[g])
            held = sum(hi - lo for lo, hi in taken)
            if taken and (g is None or held >= buffer):
                yield self._read(taken)
                taken = []

    def _read(self, ranges: list[tuple[int, int]]) -> WindowBlock:
        table = pa.concat_tables([self.rows.read(lo, hi) for lo, hi in ranges])
        return WindowBlock(table.column("window").to_numpy(),
                           sparse.stored_columns(table, self.kind, self.positions, self.ranks), self.kind)


def lineage(soft: SoftLabelSet) -> dict:
    """What a student records of the set it learnt from (with a tokenizer of its own, also how
    faithful the alignment was: the set's `summary`)."""
    prov = soft.provenance
    return {"teacher_sha256": prov["teacher_sha256"], "teacher_run_id": prov.get("teacher_run_id"),
            "soft_labels_run_id": prov.get("run_id"), "soft_labels_sha256": file_sha256(soft.path),
            "targets": prov["targets"], "width": prov["width"], "bytes_per_token": prov["bytes_per_token"],
            "alignment": prov.get("summary")}

