"""Where a language-model student, and its baseline, start: `student.source`.

- `train`: random weights, `student.*`'s layers, heads and width (distill/lm.py `gpt2`).
- `pretrained`: the Hugging Face causal-LM folder `student.model` as it is (`lm.pretrained`:
  its own architecture, its tokenizer checked against the prepared data as a teacher's is).
- `teacher_layers`: the language-model checkpoint `student.model` (the pipeline's own teacher,
  models/teacher.pt), DistilBERT-style (Sanh et al. 2019): the student is the teacher with
  `student.layers` of its blocks taken evenly spaced (every other one for half the depth: 0 and
  2 of 4), its token and position embeddings, final layer norm and (tied) head copied as they
  are. It needs the student's width and heads to be the teacher's.

The distilled student and the baseline start alike (same source, same `student.model`), so the
comparison measures the distillation alone. What the start is (the folder's or the checkpoint's
sha256) keys the saved training state and is recorded in the checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import nn

from distill import checkpoint, lm
from distill.corpus import TASK, CorpusMeta
from distill.errors import UserError
from distill.io import tree_sha256
from distill.lm_params import LMStudentConfig, LMTeacherConfig
from distill.task import CHECKPOINTS

BLOCK = re.compile(r"transformer\.h\.(\d+)\.(.+)")  # a GPT-2 block's weight: its index, the rest of its name


def start(cfg: LMStudentConfig, meta: CorpusMeta, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """The untrained student `cfg.source` gives, and what it started from: the source, and the
    sha256 of the folder or checkpoint (`start_sha256`; none for random weights)."""
    if cfg.source == "train":
        return lm.gpt2(cfg, meta, seed), {"source": "train"}
    if cfg.source == "pretrained":
        model = lm.pretrained(cfg.model, meta, "student.model")
    else:
        model = teacher_layers(cfg, meta)
    return model, {"source": cfg.source, "start_sha256": tree_sha256(cfg.model)}


def taken_blocks(teacher_layers: int, layers: int) -> list[int]:
    """The teacher's blocks a student of `layers` takes, evenly spaced from the first: 0, 2 of 4."""
    return [i * teacher_layers // layers for i in range(layers)]


def teacher_layers(cfg: LMStudentConfig, meta: CorpusMeta) -> nn.Module:
    """A GPT-2 student made of the checkpoint `cfg.model`'s embeddings, final layer norm, head and
    `cfg.layers` of its blocks (`taken_blocks`), with the student's dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = _checkpoint_file(cfg.model)
    teacher, ckpt = checkpoint.load(path, task=TASK)
    lm.same_tokenizer(path, ckpt.get("tokenizer_sha256"), meta.tokenizer_sha256, "student.model")
    config = teacher.config.to_dict()
    fits_teacher(cfg, config, str(path))
    taken = taken_blocks(config["n_layer"], cfg.layers)
    drop = cfg.dropout
    student = GPT2LMHeadModel(GPT2Config.from_dict(config | {"n_layer": cfg.layers, "resid_pdrop": drop,
                                                             "embd_pdrop": drop, "attn_pdrop": drop}))
    weights = {}
    for name, tensor in teacher.state_dict().items():
        block = BLOCK.fullmatch(name)
        if block is None:  # embeddings, final layer norm, head
            weights[name] = tensor
        elif int(block[1]) in taken:
            weights[f"transformer.h.{taken.index(int(block[1]))}.{block[2]}"] = tensor
    student.load_state_dict(weights)
    return lm.fits_data(student.train(), path, meta)


def fits_teacher(cfg: LMStudentConfig, teacher: dict[str, Any], where: str) -> None:
    """Refuse, in one sentence, a student that cannot take the layers of the teacher whose Hugging
    Face config is `teacher` (`where`: its file, or the params keys that size it): not a GPT-2,
    another width or number of heads, more layers than it has."""
    kind = teacher.get("model_type")
    if kind != "gpt2":
        raise UserError(f"{where}: a {kind} model; student.source teacher_layers takes the blocks of a GPT-2 "
                        "(the pipeline's own teacher)")
    width, heads, layers = teacher["n_embd"], teacher["n_head"], teacher["n_layer"]
    if (cfg.width, cfg.heads) != (width, heads):
        raise UserError(f"student.width {cfg.width} and student.heads {cfg.heads} must be the teacher's ({where}) "
                        f"width {width} and heads {heads} for student.source teacher_layers; set them so")
    if cfg.layers > layers:
        raise UserError(f"student.layers {cfg.layers} is more than the teacher's ({where}) {layers} layers, which "
                        "student.source teacher_layers takes its blocks from; lower it")


def check_teacher_layers(cfg: LMStudentConfig, teacher: LMTeacherConfig) -> None:
    """Before any stage: refuse a teacher_layers student whose start cannot fit. The pipeline's own
    teacher (an output of train_teacher in the project's dvc.yaml) may not be trained yet, or be
    trained again first, so it is sized by `teacher.*` when trained here (a pretrained one is
    sized when train_student reads it); any other checkpoint is read as it is."""
    if made_by_train_teacher(cfg.model):
        if teacher.source == "train":
            sized = {"model_type": "gpt2", "n_embd": teacher.width, "n_head": teacher.heads, "n_layer": teacher.layers}
            fits_teacher(cfg, sized, "teacher.*")
        return
    path = _checkpoint_file(cfg.model)
    fits_teacher(cfg, checkpoint.read(path, task=TASK)["model_args"].get("config") or {}, str(path))


def made_by_train_teacher(path: str) -> bool:
    """Whether `path` is the pipeline's own teacher checkpoint, train_teacher's output (task.CHECKPOINTS)."""
    return Path(path) == Path(CHECKPOINTS["teacher"])


def _checkpoint_file(name: str) -> Path:
    path = Path(name)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint; set student.model to a language model's checkpoint "
                        "(models/teacher.pt, the pipeline's teacher) for student.source teacher_layers")
    return path
