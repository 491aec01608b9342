"""Training: the loop shared by teacher, student and baseline, and the three stage steps.

Batches come from distill.rows: rows that fit the shuffle buffer sit in memory and
are drawn by a seeded permutation; a larger transfer set is streamed from Parquet
block by block (no DataLoader workers, ordered and repeatable either way). The
checkpoint kept is the one with the best validation accuracy; the test split is
never looked at here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distill import data, softlabels
from distill.config import ModelTrainConfig, ResumeConfig, StudentConfig
from distill.distributed import World
from distill.errors import UserError
from distill.io import atomic_path, file_sha256, write_csv
from distill.losses import LOSSES, UNLABELED, cross_entropy, total
from distill.models import build_model, check_model, count_parameters, model_args, save_checkpoint
from distill.progress import bar
from distill.rows import Batches, EpochTiming, InMemoryRows, Rows, timed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distillation:
    """The KD loss settings, and where the teacher's logits come from.

    Offline (the pipeline): the training rows carry the stored soft labels.
    Online (`teacher` given, rows without logits): the teacher runs forward on every
    batch, as in a one-script distillation; kept to measure what offline saves.
    """

    temperature: float
    alpha: float
    teacher: nn.Module | None = None
    loss: str = "kd"  # a key of distill.losses.LOSSES
    loss_options: dict = field(default_factory=dict)  # dkd: target_weight, nontarget_weight

    @staticmethod
    def of(cfg: StudentConfig, teacher: nn.Module | None = None) -> Distillation:
        options = {"target_weight": cfg.dkd_target_weight, "nontarget_weight": cfg.dkd_nontarget_weight}
        return Distillation(cfg.temperature, cfg.alpha, teacher, cfg.loss, options if cfg.loss == "dkd" else {})

    def __call__(self, student_logits, teacher_logits, labels) -> dict[str, torch.Tensor]:
        return LOSSES[self.loss](student_logits, teacher_logits, labels, self.temperature, self.alpha,
                                 **self.loss_options)


@dataclass
class TrainResult:
    model: nn.Module
    best_epoch: int
    best_val_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)
    timings: list[EpochTiming] = field(default_factory=list)  # not in the history: it varies run to run


@dataclass(frozen=True)
class Resume:
    """Where `fit` saves its training state every `every` epochs; a saved state is
    resumed only if its `key` (a hash of everything the training reads) matches."""

    path: Path
    key: str
    every: int

    @staticmethod
    def make(cfg: ResumeConfig | None, name: str, inputs: dict) -> Resume | None:
        if cfg is None or cfg.every_epochs == 0:
            return None
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
        return Resume(Path(cfg.dir) / f"{name}-{key[:16]}.pt", key, cfg.every_epochs)


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and return a generator for batch order; CPU kernels deterministic.

    Deterministic mode would also fill every new tensor's memory before use, a
    debugging aid that costs about 8 % of a small model's training step; no kernel
    here reads memory it has not written, so that filling is turned off.
    """
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    return torch.Generator().manual_seed(seed)


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """(N, D) -> (N, C) logits in eval mode."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def fit(
    model: nn.Module,
    cfg: ModelTrainConfig,
    train: Rows,
    val: tuple[np.ndarray, np.ndarray],
    seed: int,
    distillation: Distillation | None = None,
    name: str = "model",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    buffer_rows: int | None = None,
    resume: Resume | None = None,
    world: World = World(),
) -> TrainResult:
    """Train `model` on the `train` rows (y = -1 marks unlabelled rows), select on `val` (x, y).

    Without `distillation` the loss is cross-entropy on the labelled rows; with it,
    the Hinton KD loss against the teacher's logits. `buffer_rows` bounds the rows
    held in memory (None: all). `on_epoch` receives each epoch's history row plus
    its timing (epoch_seconds, data_wait_fraction), for a tracker. With `resume`, the
    training state (weights, optimizer, schedule, random generators, best model,
    history) is saved every few epochs and a matching saved state is picked up, so an
    interrupted run ends as an uninterrupted one would (bit for bit in one process).
    Under torchrun (`world`), the model is wrapped in DistributedDataParallel, each rank
    trains on its share of every global batch, and only rank 0 saves resume state.
    """
    gen = seed_everything(seed)
    batches = Batches(train, cfg.batch_size, buffer_rows, world.rank, world.size)
    val_x, val_y = torch.as_tensor(val[0]), torch.as_tensor(val[1])
    steps_per_epoch = batches.steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    best = TrainResult(copy.deepcopy(model), 0, -1.0)
    if distillation is not None and distillation.teacher is not None:
        distillation.teacher.eval()
    done = _restore(resume, model, opt, sched, gen, best, name) if resume else 0
    net = DistributedDataParallel(model) if world.distributed else model
    if on_epoch:
        for row in best.history:  # a resumed run reports the epochs it picked up, too
            on_epoch(row)
    with bar(cfg.epochs * steps_per_epoch, name, unit="batch", initial=done * steps_per_epoch,
             disable=not world.is_main) as progress:
        for epoch in range(done + 1, cfg.epochs + 1):
            model.train()
            sums: dict[str, float] = {}
            timing, start = EpochTiming(), time.perf_counter()
            for x, y, teacher_logits in timed(batches.epoch(gen), timing):
                logits = net(x)
                if distillation is None:
                    parts = {"loss": cross_entropy(logits, y)}
                else:
                    if teacher_logits is None:
                        teacher_logits = _teacher_forward(distillation, x)
                    parts = distillation(logits, teacher_logits, y)
                opt.zero_grad(set_to_none=True)
                if world.distributed:
                    parts = _global_batch_shares(parts, y, logits, distillation, world)
                    (parts["loss"] * world.size).backward()  # DDP averages over ranks; the shares sum
                else:
                    parts["loss"].backward()
                opt.step()
                sched.step()
                progress.update()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v.item() / steps_per_epoch
            timing.seconds = time.perf_counter() - start
            if world.distributed:  # each rank holds its shares of the global batches' means: add them up
                sums = _sum_over_ranks(sums)
            row = _epoch_row(epoch, sums, model, val_x, val_y, distillation is not None)
            best.history.append(row)
            progress.set_postfix_str(f"epoch {epoch}/{cfg.epochs} val_accuracy {row['val_accuracy']:.4f}")
            best.timings.append(timing)
            if on_epoch:
                on_epoch(row | {"epoch_seconds": timing.seconds, "data_wait_fraction": timing.data_wait_fraction})
            if row["val_accuracy"] > best.best_val_accuracy:
                best.model, best.best_epoch, best.best_val_accuracy = copy.deepcopy(model), epoch, row["val_accuracy"]
            log.info(
                "%s epoch %d/%d loss %.4f val_accuracy %.4f",
                name, epoch, cfg.epochs, row["train_loss"], row["val_accuracy"],
            )
            if resume and world.is_main and epoch % resume.every == 0 and epoch < cfg.epochs:
                _save(resume, epoch, model, opt, sched, gen, best)
    if resume and world.is_main:
        resume.path.unlink(missing_ok=True)
    best.model.eval()
    return best


def _global_batch_shares(parts: dict[str, torch.Tensor], y: torch.Tensor, logits: torch.Tensor,
                         distillation: Distillation | None, world: World) -> dict[str, torch.Tensor]:
    """This rank's shares of the global batch's loss terms, so that they sum over the ranks
    to what one process computes on the whole batch.

    A mean over rows (the KD terms) is weighted by the rank's share of the batch's rows;
    the cross-entropy, a mean over labelled rows, by its share of the labelled rows
    (counted across ranks with one small all-reduce). A rank whose share is empty
    still joins the gradient all-reduce, with zeros.
    """
    import torch.distributed as dist

    labelled = int((y != UNLABELED).sum())
    counts = torch.tensor([len(y), labelled], dtype=torch.float64)
    dist.all_reduce(counts)
    row_share = len(y) / counts[0].item()
    labelled_share = labelled / counts[1].item() if counts[1] else 0.0
    if not len(y):
        zero = logits.sum() * 0.0
        return {k: zero for k in parts}
    if distillation is None:
        return {"loss": parts["loss"] * labelled_share}
    shares = {k: v * (labelled_share if k == "ce" else row_share) for k, v in parts.items() if k != "loss"}
    shares["loss"] = total(shares["kd"], shares["ce"], distillation.temperature, distillation.alpha)
    return shares


def _sum_over_ranks(sums: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist

    values = torch.tensor(list(sums.values()), dtype=torch.float64)
    dist.all_reduce(values)
    return dict(zip(sums, values.tolist()))


def _save(resume: Resume, epoch: int, model, opt, sched, gen: torch.Generator, best: TrainResult) -> None:
    state = {
        "key": resume.key, "epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
        "best_model": best.model.state_dict(), "best_epoch": best.best_epoch,
        "best_val_accuracy": best.best_val_accuracy, "history": best.history,
    }
    with atomic_path(resume.path) as tmp:
        torch.save(state, tmp)


def _restore(resume: Resume, model, opt, sched, gen: torch.Generator, best: TrainResult, name: str) -> int:
    """Load a matching saved state into the training objects; return the epochs it covers (0: none)."""
    if not resume.path.is_file():
        return 0
    initial = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    try:
        state = torch.load(resume.path, map_location="cpu", weights_only=True)
        if state.get("key") != resume.key:
            return 0
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        best.model.load_state_dict(state["best_model"])
    except Exception as exc:  # a state from other code or a damaged file: start over
        model.load_state_dict(initial[0])
        opt.load_state_dict(initial[1])
        sched.load_state_dict(initial[2])
        log.warning("%s: ignoring saved training state %s (%s); starting from epoch 1",
                    name, resume.path, type(exc).__name__)
        return 0
    best.best_epoch, best.best_val_accuracy = state["best_epoch"], state["best_val_accuracy"]
    best.history = list(state["history"])
    log.info("%s: resuming after epoch %d from %s", name, state["epoch"], resume.path)
    return state["epoch"]


def _teacher_forward(d: Distillation, x: torch.Tensor) -> torch.Tensor:
    if d.teacher is None:
        raise ValueError("distillation needs stored teacher logits in the rows or a teacher to run online")
    with torch.no_grad():  # not inference_mode: the loss keeps these logits for its backward pass
        return d.teacher(x)


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
    if kd:  # the loss's parts: ce and kd, and for dkd tckd and nckd
        row |= {f"train_{k}": v for k, v in sums.items() if k != "loss"}
    return row


# ---------------------------------------------------------------- stage steps


def train_on_labels(cfg: ModelTrainConfig, seed: int, prepared_dir: str | Path, model_out: str | Path,
                    history_out: str | Path, name: str, on_epoch: Callable | None = None,
                    info: dict | None = None, resume: ResumeConfig | None = None, world: World = World()) -> dict:
    """Stage steps train_teacher and train_baseline: hard labels only, best checkpoint on val.

    The baseline is called with the student's config: same architecture, seed and budget.
    `info` is stored in the checkpoint (the MLflow run id, say).
    """
    meta = data.read_meta(prepared_dir)
    train, val = data.read_split(prepared_dir, "train"), data.read_split(prepared_dir, "val")
    return _train_and_save(cfg, seed, meta, InMemoryRows(train.x, train.y), (val.x, val.y), None, model_out,
                           history_out, name=name, on_epoch=on_epoch, info=info or {}, resume=resume, world=world)


def train_student(cfg: StudentConfig, seed: int, prepared_dir: str | Path, soft_labels_dir: str | Path,
                  model_out: str | Path, history_out: str | Path, on_epoch: Callable | None = None,
                  info: dict | None = None, resume: ResumeConfig | None = None, world: World = World()) -> dict:
    """Stage step train_student: distil from the stored soft labels (train + transfer rows).

    The rows are streamed from Parquet when there are more than `cfg.shuffle_buffer`.
    """
    meta = data.read_meta(prepared_dir)
    rows = softlabels.StudentRows(prepared_dir, soft_labels_dir, meta)
    val = data.read_split(prepared_dir, "val")
    kd = Distillation.of(cfg)
    prov = rows.provenance
    lineage = {"teacher_sha256": prov["teacher_sha256"],
               "teacher_run_id": prov.get("teacher_run_id"),
               "soft_labels_run_id": prov.get("run_id"),
               "soft_labels_sha256": file_sha256(rows.path)}
    result = _train_and_save(cfg, seed, meta, rows, (val.x, val.y), kd, model_out, history_out,
                             name="student", on_epoch=on_epoch, info=(info or {}) | {"soft_labels": lineage},
                             buffer_rows=cfg.shuffle_buffer, resume=resume, resume_inputs={"soft_labels": lineage},
                             world=world)
    return result | {"soft_labels": lineage}


def initial_model(cfg: ModelTrainConfig, meta: data.PreparedMeta, seed: int) -> nn.Module:
    """The untrained model of `cfg` for the prepared data, its weights fixed by `seed`, checked
    on a dummy batch (an import-path model with the wrong shapes stops here)."""
    torch.manual_seed(seed)  # the initial weights are part of what the seed fixes
    model = build_model(model_args(cfg, meta.num_features, meta.num_classes))
    check_model(model, meta.num_features, meta.num_classes, cfg.arch)
    return model


def _train_and_save(cfg: ModelTrainConfig, seed: int, meta: data.PreparedMeta, train: Rows, val: tuple,
                    kd: Distillation | None, model_out: str | Path, history_out: str | Path, name: str,
                    on_epoch: Callable | None, info: dict, buffer_rows: int | None = None,
                    resume: ResumeConfig | None = None, resume_inputs: dict | None = None,
                    world: World = World()) -> dict:
    """Train, then (rank 0 only, under torchrun) save the best checkpoint and the history."""
    args = model_args(cfg, meta.num_features, meta.num_classes)
    model = initial_model(cfg, meta, seed)
    log.info("%s: %s with %d parameters, %d training rows", name, cfg.arch, count_parameters(model),
             sum(train.block_sizes))
    inputs = {"name": name, "config": cfg.model_dump(), "seed": seed, "prepared": meta.fingerprint,
              "model_args": args, "processes": world.size, **(resume_inputs or {})}
    result = fit(model, cfg, train, val, seed, kd, name=name, on_epoch=on_epoch, buffer_rows=buffer_rows,
                 resume=Resume.make(resume, name, inputs), world=world)
    if world.is_main:
        _save_outputs(model_out, history_out, result, args, cfg, seed, meta, info, world)
    return {"best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
            "parameters": count_parameters(result.model), "history": result.history,
            "model": result.model, "example": val[0][:5]}


def _save_outputs(model_out: str | Path, history_out: str | Path, result: TrainResult, args: dict,
                  cfg: ModelTrainConfig, seed: int, meta: data.PreparedMeta, info: dict, world: World) -> None:
    if world.distributed:
        info = info | {"processes": world.size}
    save_checkpoint(
        model_out, result.model, args,
        config=cfg.model_dump(), seed=seed, epoch=result.best_epoch, val_accuracy=result.best_val_accuracy,
        history=result.history, class_names=meta.class_names, prepared_fingerprint=meta.fingerprint, **info,
    )
    write_csv(history_out, result.history)
