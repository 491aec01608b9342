"""Soft labels on disk, for every task: Parquet shards written while the teacher runs, and checked when read.

A soft-label folder holds part-00000.parquet, part-00001.parquet, ... of at most
`soft_labels.shard_rows` rows each, cut exactly (every shard but the last has shard_rows
rows), in row order, and `provenance.json`, written last: the set's header (what the task
records about the teacher and the data), the total rows, and each shard's file name, rows,
bytes and sha256. Every shard also carries the header and its own index under the schema
metadata key `distill.soft_labels`. Shards are zstd-compressed (encodings in
`writer_options`) and written as the teacher runs, on a writer thread, so compression overlaps
the next forward pass and the whole set is never held in memory: one row group per teacher
batch, or of `group_rows` rows where the task asks for more (a language model's sampled targets:
small rows, which compress better in larger groups).

A reader refuses a folder whose shard files are not exactly those the provenance lists
(missing, extra, out of order), and a shard whose header, index, rows or bytes are not the
provenance's. Shard hashes are recorded, not recomputed on every read (that would read the
whole set twice); their digest is the set's identity in MLflow. What the columns hold, and
what the header must match, is the task's: distill/softlabels.py (a classifier's logits),
distill/lm_soft_labels.py (a language model's per-token targets).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distill.errors import UserError
from distill.io import file_sha256
from distill.rows import ParquetRows

METADATA_KEY = b"distill.soft_labels"
PROVENANCE_NAME = "provenance.json"
SHARD_NAME = "part-{:05d}.parquet"
SHARD_GLOB = "part-*.parquet"
SAMPLED_ZSTD_LEVEL = 17  # sampled targets: 7 % smaller than the default level 1 and 4 % than level 9, writing
# about 15x slower than level 1 (on the writer thread: about 5 s for 7,750 windows); 19 gains 0.1 % (see the docs)
SAMPLED_GROUP_ROWS = 1024  # sampled targets: windows per row group (a 64-window group compresses 3 % worse)
# the whole set's provenance keys, not in a shard's metadata; `summary`: what the writer counted over all rows,
# `column_bytes`: each column's compressed bytes
SET_KEYS = ("rows", "shards", "bytes", "bytes_per_token", "summary", "column_bytes")


def writer_options(schema: pa.Schema) -> dict:
    """Parquet encodings: consecutive row ids delta-encoded; split, label and top-k class (or
    language-model token) ids dictionary-encoded (few distinct values); logits byte-stream-split (their exponent
    bytes then compress: about 9 % off float32 files, nothing either way for float16). A language model's
    sampled targets (small integers, mostly one byte) are byte-stream-split too, so their high bytes, nearly
    all zero, compress apart, at zstd level SAMPLED_ZSTD_LEVEL (docs/language-models.md measures the choices)."""
    split = {"logits": "logits.list.element", "topk_logits": "topk_logits.list.element", "rest_logit": "rest_logit"}
    split["sample_rank_deltas"] = "sample_rank_deltas.list.element"
    options = {
        "compression": "zstd",
        "use_dictionary": [c for c in ("split", "label", "topk_index.list.element", "topk_ids.list.element")
                           if c.split(".")[0] in schema.names],
        "column_encoding": {c: "DELTA_BINARY_PACKED" for c in ("id", "window") if c in schema.names}
        | {path: "BYTE_STREAM_SPLIT" for name, path in split.items() if name in schema.names},
    }
    if "sample_rank_deltas" in schema.names:
        options["compression_level"] = SAMPLED_ZSTD_LEVEL
    return options


class ShardWriter:
    """Record batches into part-NNNNN.parquet files of at most `shard_rows` rows each,
    cut exactly (a batch that crosses the limit is split), in the order written.

    Each shard's schema metadata is `header` plus its index; `shards` lists the closed
    shards' file name, rows, bytes and sha256 for provenance.json. A row group is each batch
    written, or, with `group_rows`, that many rows gathered from the batches, cut exactly (the
    shard's last group: what is left).
    """

    def __init__(self, folder: Path, schema: pa.Schema, header: dict, shard_rows: int, group_rows: int | None = None):
        self.folder, self.schema, self.header, self.shard_rows = Path(folder), schema, header, shard_rows
        self.group_rows = group_rows
        self.shards: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0  # rows in the open shard, written or gathered
        self._gathered: list[pa.RecordBatch] = []  # the open group's rows, not yet written

    def write(self, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            if self._writer is None:
                self._open()
            room = self.shard_rows - self._rows
            if self.group_rows is not None:
                room = min(room, self.group_rows - sum(b.num_rows for b in self._gathered))
            part = batch.slice(0, room)
            self._gathered.append(part)
            self._rows += part.num_rows
            batch = batch.slice(part.num_rows)
            if self.group_rows is None or sum(b.num_rows for b in self._gathered) == self.group_rows:
                self._flush()
            if self._rows == self.shard_rows:
                self._close()

    def _flush(self) -> None:
        """Write the gathered rows as one row group."""
        if self._gathered:
            table = pa.Table.from_batches(self._gathered)
            self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
            self._gathered = []

    def close(self) -> list[dict]:
        """Close the last shard (an empty set still gets one, empty, shard); the shard list."""
        if self._writer is None and not self.shards:
            self._open()
        if self._writer is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        """Close an open shard's file without recording it (no-op once `close` has run)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._gathered = []

    def _open(self) -> None:
        index = len(self.shards)
        metadata = {METADATA_KEY: json.dumps(self.header | {"shard": index}, sort_keys=True).encode()}
        schema = self.schema.with_metadata(metadata)
        self._writer = pq.ParquetWriter(self.folder / SHARD_NAME.format(index), schema, **writer_options(schema))
        self._rows = 0

    def _close(self) -> None:
        self._flush()
        self._writer.close()
        path = self.folder / SHARD_NAME.format(len(self.shards))
        self.shards.append({"file": path.name, "rows": self._rows, "bytes": path.stat().st_size,
                            "sha256": file_sha256(path)})
        self._writer = None


def write_shards(batches: Iterable[pa.RecordBatch], shards: ShardWriter) -> tuple[list[dict], int]:
    """Write the batches through `shards` on a writer thread, one batch in flight (so compression
    overlaps computing the next batch and memory stays bounded); the shard list and the rows.
    After an error the open shard's file is released (the caller's atomic_path removes the folder)."""
    rows = 0
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet") as pool:
            pending = None
            for record in batches:
                if pending is not None:
                    pending.result()
                pending = pool.submit(shards.write, record)
                rows += record.num_rows
            if pending is not None:
                pending.result()
        return shards.close(), rows
    finally:
        shards.abort()


def column_bytes(folder: Path, shards: list[dict]) -> dict[str, int]:
    """Each top-level column's compressed bytes (its data and dictionary pages), over the listed shards."""
    out: dict[str, int] = {}
    for entry in shards:
        meta = pq.ParquetFile(folder / entry["file"]).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                chunk = meta.row_group(g).column(c)
                name = chunk.path_in_schema.split(".")[0]
                out[name] = out.get(name, 0) + chunk.total_compressed_size
    return out


def read_provenance(soft_dir: str | Path) -> dict:
    """A soft-label folder's provenance.json as written (`checked_provenance` checks it)."""
    folder = Path(soft_dir)
    path = folder / PROVENANCE_NAME
    if not path.is_file():
        raise UserError(f"{path}: not found; run the soft_labels stage first (dvc repro soft_labels)")
    try:
        prov = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        prov = None
    if not isinstance(prov, dict):
        raise UserError(f"{path}: unreadable or truncated provenance; rerun the soft_labels stage")
    return prov


def check_shard_list(folder: Path, prov: dict) -> None:
    """Refuse a provenance whose shard list is malformed, or whose folder holds other shard files
    than it lists (missing or extra), by name."""
    path = folder / PROVENANCE_NAME
    shards = prov.get("shards")
    if not isinstance(shards, list) or not shards or not all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("rows"), int)
            and isinstance(s.get("bytes"), int) for s in shards):
        raise UserError(f"{path}: no list of shards (file, rows, bytes); rerun soft_labels")
    names = [s["file"] for s in shards]
    if names != [SHARD_NAME.format(i) for i in range(len(shards))]:
        raise UserError(f"{path}: lists shards {names}, not {SHARD_NAME.format(0)} onwards in order; rerun soft_labels")
    if sum(s["rows"] for s in shards) != prov.get("rows"):
        raise UserError(f"{path}: its {len(shards)} shards add up to {sum(s['rows'] for s in shards)} rows, not the "
                        f"{prov.get('rows')} it records; rerun soft_labels")
    present = {p.name for p in folder.glob(SHARD_GLOB)}
    if missing := [n for n in names if n not in present]:
        raise UserError(f"{folder / missing[0]}: not found, though {PROVENANCE_NAME} lists {len(names)} shards; "
                        "rerun soft_labels")
    if extra := sorted(present - set(names)):
        raise UserError(f"{folder / extra[0]}: a shard that {PROVENANCE_NAME} does not list (it lists "
                        f"{len(names)}); rerun soft_labels")


def open_shards(soft_dir: str | Path, prov: dict, columns: list[str]) -> ParquetRows:
    """`columns` of the shards a checked provenance lists, as one table in row order, after
    checking each shard against it: same header and index in its metadata, same rows and
    bytes. Opening reads each shard's footer only."""
    folder = Path(soft_dir)
    listed = prov["shards"]
    rows = ParquetRows([folder / s["file"] for s in listed], columns)  # refuses an unreadable shard by name
    header = {k: v for k, v in prov.items() if k not in SET_KEYS}
    for index, (entry, file, path) in enumerate(zip(listed, rows.files, rows.paths)):
        own = (file.schema_arrow.metadata or {}).get(METADATA_KEY)
        if own is None:
            raise UserError(f"{path}: no provenance metadata, so the soft_labels stage did not write it; "
                            "rerun soft_labels")
        try:
            own = json.loads(own)
        except json.JSONDecodeError:
            own = {}
        if not isinstance(own, dict) or own.pop("shard", None) != index or own != header:
            raise UserError(f"{path}: not shard {index} of this soft-label set (its metadata does not match "
                            f"{PROVENANCE_NAME}); rerun soft_labels")
        if file.metadata.num_rows != entry["rows"]:
            raise UserError(f"{path}: {file.metadata.num_rows} rows but {PROVENANCE_NAME} lists {entry['rows']}; "
                            "rerun soft_labels")
        if path.stat().st_size != entry["bytes"]:
            raise UserError(f"{path}: {path.stat().st_size} bytes but {PROVENANCE_NAME} lists {entry['bytes']}, "
                            "so it changed after soft_labels wrote it; rerun soft_labels")
    return rows


def shard_paths(soft_dir: str | Path) -> list[Path]:
    """The shard files a soft-label folder's provenance lists, in row order (unchecked)."""
    return [Path(soft_dir) / s["file"] for s in read_provenance(soft_dir).get("shards", [])]
