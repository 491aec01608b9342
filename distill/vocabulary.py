"""A text student's own vocabulary and first embeddings (`student.vocabulary`, `student.embedding_init`).

The student reads the teacher's token ids, but need not keep the teacher's whole table:
MiniLM's tokenizer has 30,522 word pieces and a corpus of review snippets uses about a third
of them, so a student with a row per id spends most of its parameters on rows that never
learn. With `vocabulary: used` the TextCNN's table holds a row per id that occurs in the
rows it trains on (train and the transfer set), row 0 for the padding and row 1 shared by
every other id (one seen only at test time); a buffer saved with the weights maps ids to rows.

With `embedding_init: teacher` the rows start as the teacher's own input embeddings (the
word-piece table of `teacher.model`, a Hugging Face folder), projected onto their first
`embedding_dim` principal components and scaled to unit variance per component (the scale
of a random `nn.Embedding`), so the student starts from what the teacher knows of each word
piece instead of noise: CNN-static over CNN-rand in Kim (2014). The baseline starts from
the same table, so the distilled student is compared with the same student trained on labels.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from distill import data, text
from distill.checkpoint import build_model
from distill.classification_params import StudentConfig, TeacherConfig
from distill.errors import UserError
from distill.models import check_model, model_args

log = logging.getLogger(__name__)

PAD_ROW, UNSEEN_ROW = 0, 1  # the rows every cut table starts with
TRAINING_SPLITS = ("train", "transfer")


def used_ids(prepared_dir: str | Path, pad_id: int) -> np.ndarray:
    """The sorted token ids that occur in the prepared train and transfer splits, the padding left out."""
    seen: set[int] = set()
    for split in TRAINING_SPLITS:
        path = Path(prepared_dir) / f"{split}.parquet"
        if not path.is_file():
            continue
        for batch in pq.ParquetFile(path).iter_batches(columns=["x"]):
            seen.update(np.unique(batch.column("x").flatten().to_numpy(zero_copy_only=False)).tolist())
    seen.discard(pad_id)
    return np.asarray(sorted(seen), dtype=np.int64)


def row_map(ids: np.ndarray, vocab_size: int, pad_id: int) -> torch.Tensor:
    """(vocab_size,) the row of each token id: the padding's row 0, `ids` rows 2.., the rest row 1."""
    rows = torch.full((vocab_size,), UNSEEN_ROW, dtype=torch.long)
    rows[torch.from_numpy(ids)] = torch.arange(2, len(ids) + 2)
    rows[pad_id] = PAD_ROW
    return rows


def teacher_table(folder: str | Path) -> torch.Tensor:
    """(V, H) the input word-piece embeddings of the Hugging Face model `folder`."""
    from distill.pretrained import load_encoder

    return load_encoder(text.model_folder(folder, "teacher.model")).get_input_embeddings().weight.detach().float()


def projected(table: torch.Tensor, dim: int) -> torch.Tensor:
    """(V, H) -> (V, dim): centred, onto the first `dim` principal components, each scaled to unit variance."""
    if dim > table.shape[1]:
        raise UserError(f"student.embedding_dim = {dim} is not allowed with student.embedding_init: teacher: the "
                        f"teacher's embeddings are {table.shape[1]} wide; use at most {table.shape[1]}")
    centred = table - table.mean(0, keepdim=True)
    _, _, vt = torch.linalg.svd(centred, full_matrices=False)
    out = centred @ vt[:dim].T
    return out / out.std(0, keepdim=True).clamp(min=1e-8)


def check(cfg: StudentConfig, teacher: TeacherConfig) -> None:
    """Refuse, in one sentence, teacher embeddings where the teacher is not a Hugging Face folder."""
    if cfg.embedding_init == "teacher" and teacher.source != "pretrained":
        raise UserError("student.embedding_init: teacher reads the input embeddings of teacher.model, a Hugging "
                        f"Face folder; teacher.source is {teacher.source}: set embedding_init: random")


def student_start(cfg: StudentConfig, teacher: TeacherConfig, prepared_dir: str | Path
                  ) -> Callable[[data.PreparedMeta], tuple[nn.Module, dict]] | None:
    """What the student and the baseline start from (training's `start`): None where the config asks
    for the untrained model as it is (every id its row, random embeddings)."""
    if cfg.vocabulary == "all" and cfg.embedding_init == "random":
        return None

    def start(meta: data.PreparedMeta) -> tuple[nn.Module, dict]:
        tokens = meta.tokens
        args = model_args(cfg, meta.num_features, meta.num_classes, meta.signal, tokens)
        if tokens is None or args["arch"] != "textcnn":
            raise UserError(f"student.vocabulary: {cfg.vocabulary} and student.embedding_init: {cfg.embedding_init} "
                            "are for the textcnn student on text; set them to all and random")
        check(cfg, teacher)
        ids = (used_ids(prepared_dir, tokens["pad_id"]) if cfg.vocabulary == "used"
               else np.asarray([i for i in range(tokens["vocab_size"]) if i != tokens["pad_id"]], dtype=np.int64))
        args["vocab_rows"] = len(ids) + 2
        model = build_model(args)
        model.rows.copy_(row_map(ids, tokens["vocab_size"], tokens["pad_id"]))
        if cfg.embedding_init == "teacher":
            table = projected(teacher_table(teacher.model), cfg.embedding_dim)
            with torch.no_grad():
                model.embed.weight[2:] = table[torch.from_numpy(ids)]
                model.embed.weight[:2] = 0.0  # the padding, and every id unseen in training: the mean word piece
        check_model(model, meta.num_features, meta.num_classes, args["arch"], tokens)
        log.info("student: %d embedding rows (of the tokenizer's %d ids)%s", len(ids) + 2, tokens["vocab_size"],
                 ", from the teacher's embeddings" if cfg.embedding_init == "teacher" else "")
        return model, args

    return start
