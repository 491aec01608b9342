"""A tiny language-model pipeline for tests: a few hundred short documents, a 300-id BPE, a one-layer
GPT-2 of width 32, a few dozen steps. Every key of lm/params.yaml is spelled out (as there)."""

from __future__ import annotations

from pathlib import Path

import yaml

from conftest import REPO, with_overrides

WORDS = ("the film a story of love and loss told with wit and grace but the plot drags in the middle "
         "while the actors shine and the music soars over a city at night").split()


def make_corpus(path: Path, documents: int = 120, seed: int = 0) -> Path:
    """A parquet of `documents` short documents (rows grouped by a `doc` column), from a small
    seeded word grammar, so a model can learn something in a few steps."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for d in range(documents):
        for _ in range(3):
            start = int(rng.integers(0, len(WORDS) - 8))
            rows.append({"doc": f"d{d}", "text": " ".join(WORDS[start:start + int(rng.integers(6, 12))])})
    pd.DataFrame(rows).to_parquet(path)
    return path


def tiny_lm_params(corpus: str, **over) -> dict:
    """lm/params.yaml with the tiny sizes and `corpus` as the data; `over` = {"student.temperature": 2}."""
    params = yaml.safe_load((REPO / "lm" / "params.yaml").read_text())
    params["data"].update({"source": "parquet", "path": corpus, "document_column": "doc", "vocab_size": 300,
                           "context_length": 16, "test_fraction": 0.2, "val_fraction": 0.2})
    small = {"layers": 1, "heads": 2, "width": 32, "steps": 16, "batch_size": 8, "eval_every": 8, "dropout": 0.0}
    params["teacher"].update(small | {"width": 48})
    params["student"].update(small | {"width": 16, "shuffle_buffer": 64})
    params["soft_labels"].update({"samples": 8, "top_k": 8, "batch_size": 16, "shard_rows": 40})
    params["evaluate"].update({"samples": 2, "prompt_tokens": 4, "new_tokens": 6})
    params["tracking"]["enabled"] = False
    params["resume"]["every_steps"] = 4  # saved and removed again in every training stage
    params["registry"]["max_test_bits_per_token"] = 20.0
    return with_overrides(params, over)
