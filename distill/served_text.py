"""The text student as MLflow loads and serves it: raw text (or token ids) in, a logit per class out.

MLflow runs this file itself when it loads the model (a "model from code": distill/run_logging.py
logs the file with the model, so the model needs torch, transformers and pandas to load, not
this project). The logged model holds three things: the student exported by `torch.export`
(`model.pt2`, reading (N, max_length) token ids), the teacher's tokenizer folder, and the
model config (`max_length`, `pad_id`, `class_names`).

A request is a list (served: `{"inputs": [...]}`): of texts, tokenized as prepare did (cut at
max_length, padded with the pad id), or of token id rows as data/prepared holds them (any
length: cut or padded to max_length the same way). The answer is one row per input, a column
of logits per class name.
"""

from __future__ import annotations

import logging

import mlflow
import numpy as np
import pandas as pd

# MLflow checks a request is a list, not its elements (a union): predict tells texts from id rows
logging.getLogger("mlflow.types.type_hints").setLevel(logging.ERROR)


class TextClassifier(mlflow.pyfunc.PythonModel):
    """The student with the tokenizer in front: texts or token ids -> logits by class name."""

    def load_context(self, context) -> None:
        import torch
        from transformers import AutoTokenizer

        # torch notes symbols of the export's data-dependent length it does not need again: not news
        logging.getLogger("torch._export.serde.serialize").setLevel(logging.ERROR)
        self.model = torch.export.load(context.artifacts["model"]).module()
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["tokenizer"], local_files_only=True)
        config = context.model_config
        self.max_length, self.pad_id = int(config["max_length"]), int(config["pad_id"])
        self.class_names = [str(name) for name in config["class_names"]]

    # returns a pd.DataFrame (not hinted: MLflow would log that it cannot read the hint)
    def predict(self, context, model_input: list[str | list[int]], params=None):
        import torch

        ids = self.token_ids(model_input)
        if not len(ids):
            return pd.DataFrame(columns=self.class_names, dtype=np.float32)
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(ids)).numpy()  # (N, max_length) -> (N, C)
        return pd.DataFrame(logits, columns=self.class_names)

    def token_ids(self, model_input) -> np.ndarray:
        """(N, max_length) int64 token ids from texts, or from id rows of any length."""
        values = list(model_input)
        if values and all(isinstance(v, str) for v in values):
            values = self.tokenizer(values, truncation=True, max_length=self.max_length, padding="max_length",
                                    return_attention_mask=False)["input_ids"]
        out = np.full((len(values), self.max_length), self.pad_id, dtype=np.int64)
        for i, row in enumerate(values):
            row = np.asarray(row).ravel()[: self.max_length]
            if row.dtype.kind not in "iu":
                raise ValueError("send texts (a list of strings) or token ids (a list of rows of integers)")
            out[i, : len(row)] = row
        return out


mlflow.models.set_model(TextClassifier())
