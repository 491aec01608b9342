"""Training: the loop shared by teacher, student and baseline, and the three stage steps.

Data sets here are small enough to sit in memory as tensors, so batches are
drawn by a seeded permutation (no DataLoader workers, ordered and repeatable).
The checkpoint kept is the one with the best validation accuracy; the test split
is never looked at here.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill import data, softlabels
from distill.config import ModelTrainConfig, StudentConfig
from distill.errors import UserError
from distill.io import file_sha256, write_csv
from distill.losses import cross_entropy, kd_loss
from distill.models import build_model, count_parameters, model_args, save_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distillation:
    """Teacher logits aligned with the training rows, and the loss settings."""

    teacher_logits: torch.Tensor  # (N, C) float32
    temperature: float
    alpha: float


@dataclass
class TrainResult:
    model: nn.Module
    best_epoch: int
    best_val_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and return a generator for batch order; CPU kernels deterministic."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """(N, D) -> (N, C) logits in eval mode."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def fit(
    model: nn.Module,
    cfg: ModelTrainConfig,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    seed: int,
    distillation: Distillation | None = None,
    name: str = "model",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train `model` on `train` (x, y; y = -1 marks unlabelled rows), select on `val`.

    Without `distillation` the loss is cross-entropy on the labelled rows; with it,
    the Hinton KD loss against the given teacher logits. `on_epoch` receives each
    epoch's row of the history (for a tracker).
    """
    gen = seed_everything(seed)
    x, y = torch.as_tensor(train[0]), torch.as_tensor(train[1])
    val_x, val_y = torch.as_tensor(val[0]), torch.as_tensor(val[1])
    steps_per_epoch = (len(x) + cfg.batch_size - 1) // cfg.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    best = TrainResult(copy.deepcopy(model), 0, -1.0)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
        for idx in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
            logits = model(x[idx])
            if distillation is None:
                parts = {"loss": cross_entropy(logits, y[idx])}
            else:
                d = distillation
                parts = kd_loss(logits, d.teacher_logits[idx], y[idx], d.temperature, d.alpha)
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            opt.step()
            sched.step()
            for k, v in parts.items():
                sums[k] += v.item() / steps_per_epoch
        row = _epoch_row(epoch, sums, model, val_x, val_y, distillation is not None)
        best.history.append(row)
        if on_epoch:
            on_epoch(row)
        if row["val_accuracy"] > best.best_val_accuracy:
            best.model, best.best_epoch, best.best_val_accuracy = copy.deepcopy(model), epoch, row["val_accuracy"]
        log.info(
            "%s epoch %d/%d loss %.4f val_accuracy %.4f",
            name, epoch, cfg.epochs, row["train_loss"], row["val_accuracy"],
        )
    best.model.eval()
    return best


def _epoch_row(
    epoch: int, sums: dict[str, float], model: nn.Module, val_x: torch.Tensor, val_y: torch.Tensor, kd: bool
) -> dict[str, float]:
    logits = predict_logits(model, val_x)
    row = {
        "epoch": epoch,
        "train_loss": sums["loss"],
        "val_loss": float(cross_entropy(logits, val_y)),
        "val_accuracy": float((logits.argmax(1) == val_y).float().mean()),
    }
    if kd:
        row |= {"train_ce": sums["ce"], "train_kd": sums["kd"]}
    return row


# ---------------------------------------------------------------- stage steps


def train_on_labels(cfg: ModelTrainConfig, seed: int, prepared_dir: str | Path, model_out: str | Path,
                    history_out: str | Path, name: str, on_epoch: Callable | None = None,
                    info: dict | None = None) -> dict:
    """Stage steps train_teacher and train_baseline: hard labels only, best checkpoint on val.

    The baseline is called with the student's config: same architecture, seed and budget.
    `info` is stored in the checkpoint (the MLflow run id, say).
    """
    meta = data.read_meta(prepared_dir)
    train, val = data.read_split(prepared_dir, "train"), data.read_split(prepared_dir, "val")
    return _train_and_save(cfg, seed, meta, (train.x, train.y), (val.x, val.y), None, model_out, history_out,
                           name=name, on_epoch=on_epoch, info=info or {})


def train_student(cfg: StudentConfig, seed: int, prepared_dir: str | Path, soft_labels_dir: str | Path,
                  model_out: str | Path, history_out: str | Path, on_epoch: Callable | None = None,
                  info: dict | None = None) -> dict:
    """Stage step train_student: distil from the stored soft labels (train + transfer rows)."""
    meta = data.read_meta(prepared_dir)
    soft = softlabels.read_soft_labels(soft_labels_dir, meta)
    parts = [data.read_split(prepared_dir, s) for s in softlabels.LABELLED_SPLITS if s in meta.splits]
    ids = np.concatenate([p.ids for p in parts])
    if not np.array_equal(ids, soft.ids):
        raise UserError(f"{soft_labels_dir}: soft-label rows do not match the prepared train/transfer rows; "
                        "rerun soft_labels")
    x, y = np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts])
    val = data.read_split(prepared_dir, "val")
    kd = Distillation(torch.from_numpy(soft.logits), cfg.temperature, cfg.alpha)
    lineage = {"teacher_sha256": soft.provenance["teacher_sha256"],
               "teacher_run_id": soft.provenance.get("teacher_run_id"),
               "soft_labels_run_id": soft.provenance.get("run_id"),
               "soft_labels_sha256": file_sha256(Path(soft_labels_dir) / softlabels.FILE_NAME)}
    result = _train_and_save(cfg, seed, meta, (x, y), (val.x, val.y), kd, model_out, history_out,
                             name="student", on_epoch=on_epoch, info=(info or {}) | {"soft_labels": lineage})
    return result | {"soft_labels": lineage}


def _train_and_save(cfg: ModelTrainConfig, seed: int, meta: data.PreparedMeta, train: tuple, val: tuple,
                    kd: Distillation | None, model_out: str | Path, history_out: str | Path, name: str,
                    on_epoch: Callable | None, info: dict) -> dict:
    args = model_args(cfg, meta.num_features, meta.num_classes)
    torch.manual_seed(seed)  # the initial weights are part of what the seed fixes
    model = build_model(args)
    log.info("%s: %s with %d parameters, %d training rows", name, cfg.arch, count_parameters(model), len(train[1]))
    result = fit(model, cfg, train, val, seed, kd, name=name, on_epoch=on_epoch)
    save_checkpoint(
        model_out, result.model, args,
        config=cfg.model_dump(), seed=seed, epoch=result.best_epoch, val_accuracy=result.best_val_accuracy,
        history=result.history, class_names=meta.class_names, prepared_fingerprint=meta.fingerprint, **info,
    )
    write_csv(history_out, result.history)
    return {"best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
            "parameters": count_parameters(result.model), "history": result.history,
            "model": result.model, "example": val[0][:5]}
