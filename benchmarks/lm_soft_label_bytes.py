"""Benchmark: what the sampled soft labels cost on disk, on a trained teacher's own targets.

With a language-model pipeline folder of benchmarks/lm_quality.py whose teacher is trained
(default benchmarks/.work/lm/seed0: models/teacher.pt, data/prepared), the teacher runs once over
the first `--windows` train windows (one thread, batches of lm/params.yaml's soft_labels.batch_size),
and at each number of draws in DRAWS the sampled targets (soft_labels.seed, soft_labels.sampling)
are drawn and written by the soft_labels stage's own writer (distill/lm_soft_labels.write_set)
into a temporary folder.
A random model's distributions are near uniform, so only a trained teacher's say what is stored.

Reported per token (bytes on disk, Parquet footers included, and per column): at every number of
draws; at zstd levels 1, 9, the stage's and 19 for the default draws; and, for the same default
draws, reference layouts: the stage's with one row group per teacher batch (64 windows); schema 3's
(the ids delta-coded, not their ranks among the position's token's successors), and schema 3 with
plain ascending ids in place of their deltas; schema 2's (the distinct ids delta-coded and their
counts as variable-length lists, with the number per position; its row groups and level 9); and
schema 1's fixed-size lists (the distinct ids, most drawn first, and float16 weights, padded to
the draws; its own writer options). Also: how many distinct ids a position holds (its
distribution) and the teacher's mean entropy. Writes benchmarks/results/lm_soft_label_bytes.json.

    python benchmarks/lm_soft_label_bytes.py [--work benchmarks/.work/lm/seed0] [--windows 3000]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from distill import checkpoint, corpus, lm, lm_soft_labels, shards, sparse  # noqa: E402
from distill.id_ranks import SuccessorRanks  # noqa: E402

DRAWS = (8, 12, 16, 17, 18, 19, 20, 21, 22, 24, 32)
LEVELS = (1, 9, 19)  # besides the stage's own, for the default draws


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / ".work" / "lm" / "seed0"))
    parser.add_argument("--windows", type=int, default=3000)
    parser.add_argument("--out", default="benchmarks/results/lm_soft_label_bytes.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = yaml.safe_load((ROOT / "lm" / "params.yaml").read_text())["soft_labels"]
    work = Path(args.work)
    meta = corpus.read_corpus_meta(work / "data" / "prepared")
    positions = meta.context_length - 1
    ranks = SuccessorRanks(corpus.read_windows(meta.path, "train"), meta.vocab_size)  # as the stage ranks ids
    batches, entropy, seconds = teacher_batches(work, meta, args.windows, cfg, ranks)
    tokens = sum(len(b) for b in batches[cfg["samples"]]) * positions
    result = {"work": str(work), "windows": tokens // positions, "positions": positions, "tokens": tokens,
              "default_draws": cfg["samples"], "teacher_entropy_bits": round(entropy, 3),
              "teacher_and_draws_s": round(seconds, 1),
              "distinct": distinct_ids(batches[cfg["samples"]], positions, ranks),
              "stage_zstd_level": shards.SAMPLED_ZSTD_LEVEL, "sampling": cfg["sampling"]}
    stage_level = shards.SAMPLED_ZSTD_LEVEL
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(d, stage_level) for d in DRAWS if d in batches] + [(cfg["samples"], lvl) for lvl in LEVELS]
        result["stored"] = [stored(batches[d], Path(tmp) / f"n{d}-z{lvl}", positions, d, lvl) for d, lvl in runs]
        shards.SAMPLED_ZSTD_LEVEL = stage_level
        default = batches[cfg["samples"]]
        result["references"] = {
            "one row group per teacher batch": per_batch(default, Path(tmp), positions),
            "schema 3 (ids, not ranks, delta-coded)": as_ids(default, Path(tmp), positions, ranks, deltas=True),
            "schema 3 with plain ascending ids for the deltas": as_ids(default, Path(tmp), positions, ranks),
            "schema 2 (distinct ids and counts)": distinct_layout(default, Path(tmp), positions, ranks),
            "schema 1 (fixed-size ids and float16 weights)": fixed_layout(default, Path(tmp), positions, ranks)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def teacher_batches(work: Path, meta, windows: int, cfg: dict, ranks: SuccessorRanks
                    ) -> tuple[dict[int, list[pa.RecordBatch]], float, float]:
    """The teacher over the first `windows` train windows; each number of draws' record batches
    (its own generator, seeded as the stage seeds it), the mean entropy (bits) and the seconds."""
    model, _ = checkpoint.load(work / "models" / "teacher.pt", task=corpus.TASK)
    ids = corpus.read_windows(meta.path, "train")[:windows]
    draws = sorted(set(DRAWS) | {cfg["samples"]})
    gens = {d: torch.Generator().manual_seed(cfg["seed"]) for d in draws}
    schemas = {d: sparse.schema("sampled", meta.context_length - 1, d, cfg["id_dtype"]) for d in draws}
    out, entropy, start = {d: [] for d in draws}, 0.0, time.perf_counter()
    for lo in range(0, len(ids), cfg["batch_size"]):
        x = torch.from_numpy(ids[lo:lo + cfg["batch_size"]])
        with torch.inference_mode():
            logits = lm.next_token_logits(model, x)[..., :meta.vocab_size].float()  # (B, P, V)
            logp = torch.log_softmax(logits, -1)
            entropy -= float((logp.exp() * logp).sum()) / np.log(2)
            for d in draws:
                kept = sparse.select(logits, "sampled", d, gens[d], cfg["sampling"])  # as the stage draws
                out[d].append(sparse.pack(kept, np.arange(lo, lo + len(x)), schemas[d], ranks))
    return out, entropy / (len(ids) * (meta.context_length - 1)), time.perf_counter() - start


def held(batch: pa.RecordBatch, positions: int, ranks: SuccessorRanks) -> dict[str, np.ndarray]:
    """A batch's distinct ids and counts per position, (B, P, n) each, ascending, padded with 0."""
    drawn = sparse.stored_columns(batch, "sampled", positions, ranks)["sample_draws"]
    drawn = torch.from_numpy(drawn.astype(np.int64))
    kept = sparse.distinct(drawn)
    return {"ids": kept["ids"].numpy().astype(np.uint16), "counts": kept["counts"].numpy().astype(np.uint8)}


def distinct_ids(batches: list[pa.RecordBatch], positions: int, ranks: SuccessorRanks) -> dict:
    """How many distinct ids a position holds (mean, percentiles, positions with 1, 2, ... n), and
    what an ideal code of the ids and counts by their overall frequencies would take (bytes per
    token: each value's order-0 entropy, less log2(k!) for a position's k ids being a set)."""
    kept = [held(b, positions, ranks) for b in batches]
    k = np.concatenate([(c["counts"] > 0).sum(-1).reshape(-1) for c in kept]).astype(np.int64)
    ids = np.concatenate([c["ids"][c["counts"] > 0] for c in kept])  # without the padding
    counts = np.concatenate([c["counts"][c["counts"] > 0] for c in kept])
    as_set = sum(math.lgamma(n + 1) for n in k.tolist()) / math.log(2)  # bits: the order of a position's ids
    return {"mean": round(float(k.mean()), 2), "percentiles_10_25_50_75_90": [float(np.percentile(k, q))
                                                                              for q in (10, 25, 50, 75, 90)],
            "positions_with_1_to_n": np.bincount(k)[1:].tolist(),
            "ideal_order0_bytes_per_token": {"ids": round((entropy_bits(ids) - as_set) / 8 / len(k), 2),
                                             "counts": round(entropy_bits(counts) / 8 / len(k), 2)}}


def entropy_bits(values: np.ndarray) -> float:
    """The values' order-0 entropy, in bits, times their number."""
    _, n = np.unique(values, return_counts=True)
    return float(-(n * np.log2(n / n.sum())).sum())


def stored(batches: list[pa.RecordBatch], folder: Path, positions: int, draws: int, level: int) -> dict:
    """The batches through the stage's writer at zstd `level`: bytes per token, in all and per column."""
    shards.SAMPLED_ZSTD_LEVEL = level
    folder.mkdir()
    header = {"schema_version": lm_soft_labels.TARGETS_SCHEMA_VERSION, "task": corpus.TASK, "targets": "sampled",
              "positions": positions, "width": draws, "samples": draws}
    start = time.perf_counter()
    prov = lm_soft_labels.write_set(iter(batches), folder, batches[0].schema, header, 10 ** 9)
    tokens = prov["rows"] * positions
    return {"draws": draws, "zstd_level": level, "bytes_per_token": round(prov["bytes_per_token"], 2),
            "columns": {c: round(n / tokens, 2) for c, n in prov["column_bytes"].items()},
            "write_s": round(time.perf_counter() - start, 2)}


def bytes_per_token(batches: list[pa.RecordBatch], path: Path, options: dict, positions: int) -> float:
    """One Parquet file of the batches, one row group each."""
    with pq.ParquetWriter(path, batches[0].schema, **options) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return round(path.stat().st_size / (sum(len(b) for b in batches) * positions), 2)


def per_batch(batches: list[pa.RecordBatch], tmp: Path, positions: int) -> float:
    """The stage's layout and options, one row group per teacher batch."""
    return bytes_per_token(batches, tmp / "per_batch.parquet", shards.writer_options(batches[0].schema), positions)


def distinct_layout(batches: list[pa.RecordBatch], tmp: Path, positions: int, ranks: SuccessorRanks) -> float:
    """Schema 2: per window the distinct ids, delta-coded, and their counts as variable-length lists,
    and how many each position has; one row group per batch, zstd 9, byte-stream-split, as it was."""
    rows = []
    for batch in batches:
        kept = held(batch, positions, ranks)
        mask = kept["counts"] > 0
        deltas = kept["ids"].astype(np.int64)
        deltas[..., 1:] -= kept["ids"][..., :-1]
        distinct = mask.sum(-1)  # (B, P)
        offsets = pa.array(np.concatenate([[0], distinct.sum(-1).cumsum()]), pa.int32())
        rows.append(pa.RecordBatch.from_pydict({
            "window": batch.column("window"),
            "sample_id_deltas": pa.ListArray.from_arrays(offsets, pa.array(deltas[mask].astype(np.uint16))),
            "sample_counts": pa.ListArray.from_arrays(offsets, pa.array(kept["counts"][mask])),
            "sample_distinct": pa.FixedSizeListArray.from_arrays(pa.array(distinct.reshape(-1).astype(np.uint8)),
                                                                 positions)}))
    split = {f"{c}.list.element": "BYTE_STREAM_SPLIT" for c in ("sample_id_deltas", "sample_counts", "sample_distinct")}
    options = {"compression": "zstd", "compression_level": 9, "use_dictionary": False,
               "column_encoding": {"window": "DELTA_BINARY_PACKED"} | split}
    return bytes_per_token(rows, tmp / "distinct.parquet", options, positions)


def fixed_layout(batches: list[pa.RecordBatch], tmp: Path, positions: int, ranks: SuccessorRanks) -> float:
    """Schema 1: per window, fixed-size lists of the n ids (most drawn first) and float16 weights."""
    fixed = []
    for batch in batches:
        kept = held(batch, positions, ranks)  # (B, P, n) ids ascending, then padding
        order = np.argsort(-kept["counts"].astype(np.int64), axis=-1, kind="stable")
        ids = np.take_along_axis(kept["ids"], order, -1).reshape(len(batch), -1)
        counts = np.take_along_axis(kept["counts"], order, -1).reshape(len(batch), -1)
        weights = (counts / kept["counts"].shape[-1]).astype(np.float16)
        fixed.append(pa.RecordBatch.from_pydict({
            "window": batch.column("window"),
            "sample_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), ids.shape[1]),
            "sample_weights": pa.FixedSizeListArray.from_arrays(pa.array(weights.reshape(-1)), ids.shape[1])}))
    options = {"compression": "zstd", "use_dictionary": ["sample_ids.list.element"],
               "column_encoding": {"window": "DELTA_BINARY_PACKED"}}  # schema 1's writer options
    return bytes_per_token(fixed, tmp / "fixed.parquet", options, positions)


def as_ids(batches: list[pa.RecordBatch], tmp: Path, positions: int, ranks: SuccessorRanks, deltas: bool = False
           ) -> float:
    """The stage's layout, options and row groups with each draw's id in its rank's place: delta-coded
    within the position (schema 3) or each id itself."""
    plain = []
    for batch in batches:
        drawn = sparse.stored_columns(batch, "sampled", positions, ranks)["sample_draws"]  # ascending ids
        if deltas:
            drawn = drawn.copy()
            drawn[..., 1:] -= drawn[..., :-1].copy()
        column = batch.column("sample_rank_deltas")
        plain.append(batch.set_column(1, "sample_rank_deltas", pa.FixedSizeListArray.from_arrays(
            pa.array(drawn.reshape(-1), column.type.value_type), type=column.type)))
    folder = tmp / f"ids-{deltas}"
    folder.mkdir()
    header = {"targets": "sampled", "positions": positions}
    prov = lm_soft_labels.write_set(iter(plain), folder, plain[0].schema, header, 10 ** 9)
    return round(prov["bytes_per_token"], 2)


if __name__ == "__main__":
    main()
