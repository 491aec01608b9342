"""A classifier's prepared data: splitting, and the prepared-data format.

`prepare` takes the raw examples of the data source (distill/sources.py), splits them
(stratified, and grouped where rows share a group: no movie in two splits), standardizes or
tokenizes (distill.text) and writes them as
data/prepared/{train,val,test[,transfer]}.parquet plus meta.json (features, class
names, standardization, tokens and how much of the documents they read). Every later
stage reads the prepared directory through `read_meta` and `read_split`.

A prepared split is a Parquet table with columns
  id     int64, unique across all splits
  x      fixed_size_list<float32>[num_features], or on text fixed_size_list<int32>[max_length]
         token ids padded with the pad id
  label  int32 class id (null on transfer rows)
  text   string, the example's text (text data only; for reading, models see `x`)
written in row groups of ROW_GROUP_ROWS rows, so a reader can stream it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill import text as texts
from distill.classification_params import DataConfig
from distill.config import META_FILE
from distill.errors import UserError
from distill.io import atomic_path, tree_sha256
from distill.sources import GENERATED, SIGNALS, RawData, load_source, load_transfer_file

log = logging.getLogger(__name__)

PREPARED_SCHEMA_VERSION = 1  # meta.json's, as `prepare` writes it
SPLITS = ("train", "val", "test", "transfer")
ROW_GROUP_ROWS = 16384  # the unit a streaming reader decodes: ~2.6 MB of x at 40 features


@dataclass(frozen=True)
class Split:
    """One prepared split in memory."""

    ids: np.ndarray  # (N,) int64
    x: np.ndarray  # (N, D) float32
    y: np.ndarray  # (N,) int64, -1 where unlabeled


@dataclass(frozen=True)
class PreparedMeta:
    """What every consumer needs to know about the prepared data."""

    num_features: int
    class_names: list[str]
    splits: dict[str, int]
    fingerprint: str  # sha256 over the prepared directory
    source: str = "csv"
    tokens: dict | None = None  # text: vocab_size, pad_id, max_length, mask_token, tokenizer_sha256,
    # median_tokens, cut_fraction (documents longer than max_length), measured_documents

    @property
    def is_text(self) -> bool:
        return self.tokens is not None

    @property
    def signal(self) -> bool:
        """Whether the features are an ordered signal (convolutions make sense), not a table's columns."""
        return self.source in SIGNALS

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def summary(self) -> dict:
        return {"splits": self.splits, "num_classes": self.num_classes, "num_features": self.num_features}


# ---------------------------------------------------------------- splitting


def encode_labels(y: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Map labels (strings or numbers) to class ids 0..K-1 in sorted order."""
    classes, ids = np.unique(y, return_inverse=True)
    return ids.astype(np.int64), [str(c) for c in classes]


def stratified_split(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held_out) with about `fraction` of each class held out."""
    held = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        held.append(idx[: int(round(len(idx) * fraction))])
    held_idx = np.sort(np.concatenate(held))
    mask = np.ones(len(y), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


def grouped_split(y: np.ndarray, groups: np.ndarray, fraction: float, rng: np.random.Generator,
                  where: str = "data: the groups") -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held_out): whole groups held out, about `fraction` of the rows, classes
    balanced as far as the groups allow (one fold of scikit-learn's StratifiedGroupKFold).
    `where` begins a refusal: what holds the groups."""
    from sklearn.model_selection import StratifiedGroupKFold

    folds = max(2, int(round(1 / fraction)))
    if len(np.unique(groups)) < folds:
        raise UserError(f"{where}: {len(np.unique(groups))} groups cannot be split {folds} ways; "
                        "use fewer, larger fractions or more groups")
    splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=int(rng.integers(2**31)))
    rest, held = next(splitter.split(np.zeros(len(y)), y, groups))
    return np.sort(rest), np.sort(held)


def split_raw(raw: RawData, cfg: DataConfig,
              mask_token: str | None = None) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """Split into {split: (x, y)} with encoded labels, and return the class names. Rows of
    one group (`raw.groups`) stay in one split. `mask_token`: the tokenizer's, for augmenting text."""
    rng = np.random.default_rng(cfg.seed)
    labels = raw.y if raw.y_test is None else np.concatenate([raw.y, raw.y_test])
    ids, class_names = encode_labels(labels)
    labels_in = _labels_in(cfg)
    if len(class_names) < 2:
        raise UserError(f"{labels_in} holds only one class ('{class_names[0]}', all {len(labels)} rows); a "
                        "classifier needs at least two: set data.label_column to the column of classes, or add "
                        "rows of another class")
    y, y_test = ids[: len(raw.y)], ids[len(raw.y) :]
    x, x_test, groups = raw.x, raw.x_test, raw.groups
    if x_test is None:
        _check_class_sizes(y, class_names, labels_in)
        if groups is None:
            rest, test_idx = stratified_split(y, cfg.test_fraction, rng)
        else:
            rest, test_idx = grouped_split(y, groups, cfg.test_fraction, rng, _groups_in(cfg))
            groups = groups[rest]
        x, y, x_test, y_test = x[rest], y[rest], x[test_idx], y[test_idx]
    if groups is None:
        train_idx, val_idx = stratified_split(y, cfg.val_fraction, rng)
    else:
        train_idx, val_idx = grouped_split(y, groups, cfg.val_fraction, rng, _groups_in(cfg))
    missing = sorted(set(y_test) - set(y[train_idx]))
    if missing:
        raise UserError(f"data: class '{class_names[missing[0]]}' is in the test split but not in train; add rows")
    splits = {"train": (x[train_idx], y[train_idx]), "val": (x[val_idx], y[val_idx]), "test": (x_test, y_test)}
    x_transfer = raw.x_transfer
    user_rows = load_transfer_file(cfg, raw.feature_names)
    if user_rows is not None:
        log.info("read %d unlabeled transfer rows from %s", len(user_rows), cfg.transfer_path)
    synthetic = min(max(cfg.transfer_size - (0 if user_rows is None else len(user_rows)), 0),
                    cfg.augment_copies * len(train_idx))
    if x_transfer is None and synthetic and cfg.source not in GENERATED and cfg.augment != "none":
        if cfg.is_text:
            x_transfer = texts.augment(splits["train"][0], cfg.augment_copies, cfg.text, mask_token, rng,
                                       limit=synthetic)
            log.info("augmented %d transfer texts from %d train texts (data.augment: mask_ngram%s)", synthetic,
                     len(train_idx), f", about {cfg.text.splice_prob:.0%} spliced" if cfg.text.splice_prob else "")
        else:
            x_transfer = munge(splits["train"][0], synthetic, rng)
            log.info("synthesised %d transfer rows from %d train rows (data.augment: munge)", synthetic,
                     len(train_idx))
    if user_rows is not None:
        x_transfer = user_rows if x_transfer is None else np.concatenate([user_rows, x_transfer])
    if x_transfer is not None:
        splits["transfer"] = (x_transfer, np.full(len(x_transfer), -1))
    return splits, class_names


def _nearest_neighbours(x: np.ndarray, which: np.ndarray) -> np.ndarray:
    """For each row index in `which`, the index of its nearest other row of `x` (features scaled to
    unit variance); an array over all rows, filled at `which`. Distances are computed a block of
    rows at a time, about 256 MB each, so memory stays bounded whatever the table's size."""
    scale = x.std(axis=0)
    z = x / np.where(scale > 0, scale, 1.0)
    norms = (z ** 2).sum(1)
    nearest = np.zeros(len(x), dtype=np.int64)
    block = max(1, 2 ** 25 // max(len(x), 1))  # 2^25 float64 distances: 256 MB
    for start in range(0, len(which), block):
        rows = which[start:start + block]
        d = norms[rows][:, None] - 2 * z[rows] @ z.T + norms[None, :]
        d[np.arange(len(rows)), rows] = np.inf
        nearest[rows] = d.argmin(axis=1)
    return nearest


def munge(x: np.ndarray, rows: int, rng: np.random.Generator, swap: float = 0.5, spread: float = 1.0) -> np.ndarray:
    """`rows` synthetic rows like `x`, by MUNGE (Bucilua, Caruana, Niculescu-Mizil 2006, "Model
    Compression"): each new row starts as a train row e; each feature, with probability `swap`,
    is replaced by that of e's nearest neighbour e' (distance on features scaled to unit
    variance), drawn from a normal around it with standard deviation |e - e'| / `spread`.
    The teacher labels these rows, so the student sees the teacher's function between the
    train rows, not only at them. Deterministic for a given `rng` state.
    """
    base = rng.integers(0, len(x), size=rows)
    nearest = _nearest_neighbours(x, np.unique(base))
    e, other = x[base], x[nearest[base]]
    swapped = rng.random(e.shape) < swap
    jitter = rng.normal(size=e.shape) * np.abs(e - other) / spread
    return np.where(swapped, other + jitter, e).astype(x.dtype)


def _labels_in(cfg: DataConfig) -> str:
    """What holds the labels, to begin a refusal with: the user's file and its label column, or the source."""
    return f"{cfg.path}: label column '{cfg.label_column}'" if cfg.source in ("csv", "parquet") else \
        f"data.source {cfg.source}"


def _groups_in(cfg: DataConfig) -> str:
    """What holds the groups, to begin a refusal with: the user's file and its group column, or the source."""
    return f"{cfg.path}: group column '{cfg.group_column}'" if cfg.group_column else f"data.source {cfg.source}"


def _check_class_sizes(y: np.ndarray, class_names: list[str], labels_in: str) -> None:
    counts = np.bincount(y, minlength=len(class_names))
    if counts.min() < 3:
        c = int(np.argmin(counts))
        raise UserError(
            f"{labels_in}: class '{class_names[c]}' has {counts[c]} rows; each class needs at least 3 "
            "(train, val and test)"
        )


# ---------------------------------------------------------------- prepared I/O


def prepare(cfg: DataConfig, out_dir: str | Path) -> PreparedMeta:
    """Load, split, standardize and write the prepared splits atomically."""
    tok = texts.load_tokenizer(cfg.text.tokenizer) if cfg.is_text else None  # a bad folder stops before work
    raw = load_source(cfg)
    splits, class_names = split_raw(raw, cfg, tok.mask_token if tok is not None else None)
    meta = {
        "schema_version": PREPARED_SCHEMA_VERSION,
        "source": cfg.source,
        "feature_names": raw.feature_names,
        "class_names": class_names,
        "splits": {name: len(y) for name, (_, y) in splits.items()},
    }
    if tok is not None:
        lengths = texts.document_lengths(tok, raw.x, cfg.text.max_length)
        texts.log_lengths(lengths, cfg.text.max_length, texts.position_limit(tok, cfg.text.tokenizer))
        meta["tokens"] = texts.token_info(tok, cfg.text.tokenizer, cfg.text.max_length) | lengths

        def encode(x: np.ndarray) -> np.ndarray:
            return texts.tokenize(tok, x, cfg.text.max_length)
    else:
        mean, std = splits["train"][0].mean(axis=0), splits["train"][0].std(axis=0)
        if not cfg.standardize:
            mean, std = np.zeros_like(mean), np.ones_like(std)
        std = np.where(std > 0, std, 1.0)
        meta["standardize"] = {"mean": mean.tolist(), "std": std.tolist()}

        def encode(x: np.ndarray) -> np.ndarray:
            return (x - mean) / std
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        next_id = 0
        for name, (x, y) in splits.items():
            write_split(tmp / f"{name}.parquet", np.arange(next_id, next_id + len(y)), encode(x), y,
                        x if tok is not None else None)
            next_id += len(y)
            log.info("wrote %s: %d rows", name, len(y))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return read_meta(out_dir)


def write_split(path: Path, ids: np.ndarray, x: np.ndarray, y: np.ndarray, text: np.ndarray | None = None) -> None:
    """Write one split (see the module docstring for the columns): x as float32 features, or
    as int32 token ids when `text` (the strings they were made from) is given."""
    x = np.ascontiguousarray(x, dtype=np.float32 if text is None else texts.TOKEN_DTYPE)
    columns = {
        "id": pa.array(ids, pa.int64()),
        "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1]),
        "label": pa.array(np.asarray(y, dtype=np.int32), pa.int32(), mask=np.asarray(y) < 0),
    }
    if text is not None:
        columns["text"] = pa.array([str(t) for t in text], pa.string())
    table = pa.table(columns)
    pq.write_table(table, path, compression="zstd", row_group_size=ROW_GROUP_ROWS)


def read_meta(prepared_dir: str | Path) -> PreparedMeta:
    """Read meta.json and fingerprint the prepared directory."""
    prepared_dir = Path(prepared_dir)
    path = prepared_dir / META_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found; run the prepare stage first (dvc repro prepare)")
    meta = json.loads(path.read_text())
    if meta.get("schema_version") != PREPARED_SCHEMA_VERSION:
        raise UserError(f"{path}: schema version {meta.get('schema_version')} is not {PREPARED_SCHEMA_VERSION}; "
                        "rerun prepare")
    return PreparedMeta(
        num_features=meta["tokens"]["max_length"] if "tokens" in meta else len(meta["feature_names"]),
        class_names=meta["class_names"],
        splits=meta["splits"],
        fingerprint=tree_sha256(prepared_dir),
        source=meta["source"],
        tokens=meta.get("tokens"),
    )


def standardized(prepared_dir: str | Path) -> bool | None:
    """Whether prepare standardised the features (data.standardize: a train mean or std other than
    0 and 1 in meta.json); None on text, which has no features to scale."""
    scale = json.loads((Path(prepared_dir) / META_FILE).read_text()).get("standardize")
    if scale is None:
        return None
    return any(m != 0 for m in scale["mean"]) or any(s != 1 for s in scale["std"])


def read_split(prepared_dir: str | Path, name: str) -> Split:
    """Read one prepared split into numpy arrays."""
    path = Path(prepared_dir) / f"{name}.parquet"
    if not path.is_file():
        raise UserError(f"{path}: not found; run the prepare stage first (dvc repro prepare)")
    try:
        table = pq.read_table(path, columns=["id", "x", "label"])
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: unreadable or truncated Parquet ({exc}); rerun prepare") from None
    return Split(
        ids=table.column("id").to_numpy(),
        x=features(table),
        y=labels(table),
    )


def features(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """The `x` column as a writable (N, D) array: float32 features, or int32 token ids on text."""
    x = table.column("x")
    x = x.combine_chunks() if isinstance(x, pa.ChunkedArray) else x
    return x.flatten().to_numpy(zero_copy_only=False, writable=True).reshape(-1, x.type.list_size)


def labels(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """The `label` column as int64, -1 where unlabelled."""
    return table.column("label").fill_null(-1).to_numpy().astype(np.int64)
