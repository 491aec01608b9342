"""Tiny text fixtures: a random BERT with its WordPiece vocabulary, saved as a Hugging Face
folder, and a CSV of short labelled "reviews" grouped by movie, learnable from a few words."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

POSITIVE = ["good", "great", "superb", "moving", "fun", "clever", "warm", "brilliant"]
NEGATIVE = ["bad", "dull", "awful", "boring", "weak", "tedious", "flat", "silly"]
FILLER = ["the", "a", "film", "movie", "plot", "actor", "story", "was", "is", "and", "it", "very", "quite",
          "this", "of", "scene", "script", "cast", "ending", "music"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_bert_folder(folder: Path, hidden: int = 32, layers: int = 2, classifier_labels: int | None = None) -> Path:
    """A random BERT (`hidden` wide, `layers` deep) and its tokenizer in `folder`."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64)
    if classifier_labels:
        config.num_labels = classifier_labels
        BertForSequenceClassification(config).save_pretrained(folder)
    else:
        BertModel(config).save_pretrained(folder)
    return folder


def make_reviews(path: Path, rows: int = 600, movies: int = 60, seed: int = 0) -> Path:
    """`rows` short reviews (text, label fresh/rotten, movie) in a CSV: each holds one or two
    sentiment words among filler."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(rows):
        fresh = rng.random() < 0.5
        words = list(rng.choice(FILLER, size=int(rng.integers(4, 12))))
        for _ in range(int(rng.integers(1, 3))):
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(POSITIVE if fresh else NEGATIVE)))
        if rng.random() < 0.15:  # some label noise, so that no model is perfect
            fresh = not fresh
        records.append({"text": " ".join(words), "label": "fresh" if fresh else "rotten",
                        "movie": f"movie{i % movies}"})
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(records).to_csv(path, index=False)
    return path


def tiny_text_params(tokenizer: str = "bert", data_path: str = "data/raw/reviews.csv") -> dict:
    """text/params.yaml cut down to seconds: the tiny BERT at `tokenizer` (also the teacher's
    folder), the reviews CSV at `data_path`, small students, tracking off."""
    import copy

    import yaml

    from conftest import REPO

    params = copy.deepcopy(yaml.safe_load((REPO / "text" / "params.yaml").read_text()))
    params["data"].update(source="csv", path=data_path, text_column="text", label_column="label",
                          group_column="movie", transfer_size=600, augment_copies=2)
    params["data"]["text"].update(tokenizer=tokenizer, max_length=24)
    params["teacher"].update(model=tokenizer, trainable_layers=None, epochs=3, min_steps=0, batch_size=32, lr=1e-3)
    params["student"].update(epochs=3, min_steps=0, channels=[8, 8], kernel_sizes=[2, 3], embedding_dim=8)
    params["soft_labels"].update(batch_size=256, shard_rows=500)
    params["evaluate"].update(latency_repeats=2, latency_batch_size=16)
    params["tracking"]["enabled"] = False
    params["registry"]["min_test_accuracy"] = 0.0
    return params
